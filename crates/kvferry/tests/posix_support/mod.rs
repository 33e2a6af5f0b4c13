//! Helpers shared by the POSIX backend's integration tests; directories,
//! mounts, loop devices, patterns and skips are the test toolkit's
//! (`kvferry_test_support`).
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use kvferry::{Agent, AgentConfig, AlignedBuf, MemType, Params, RegDesc, RegDescList, Request, XferDesc, XferDescList};
use kvferry_test_support::fs::{skipped, TestDir};

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(60);

/// A directory on a disk filesystem (not tmpfs: O_DIRECT must work), removed on drop.
pub fn test_dir(name: &str) -> TestDir {
    TestDir::new_in(Path::new(env!("CARGO_TARGET_TMPDIR")), &format!("posix-{name}"))
}

/// Whether `dir` takes O_DIRECT I/O; the reason if not.
pub fn direct_support(dir: &Path) -> Result<(), String> {
    let p = dir.join(".direct-probe");
    let r = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p)
            .map_err(|e| format!("open with O_DIRECT failed: {e}"))?;
        let buf = AlignedBuf::new(4096).unwrap();
        f.write_all(buf.as_slice()).map_err(|e| format!("an aligned O_DIRECT write failed: {e}"))
    })();
    let _ = std::fs::remove_file(&p);
    r
}

/// The engines to test: the thread pool always, io_uring where it works.
pub fn engines(test: &str) -> Vec<&'static str> {
    let probe = Agent::new(
        &format!("{test}-uring-probe"),
        AgentConfig {
            backends: vec![("POSIX".into(), Params::new().with("engine", "uring"))],
            ..AgentConfig::default()
        },
    );
    match probe {
        Ok(_) => vec!["threads", "uring"],
        Err(e) => {
            skipped(&format!("{test} with engine=uring"), &e.to_string());
            vec!["threads"]
        }
    }
}

/// An agent with a POSIX backend on `engine`, plus extra parameters.
pub fn agent(name: &str, engine: &str, extra: &[(&str, &str)]) -> Agent {
    let mut p = Params::new().with("engine", engine);
    for (k, v) in extra {
        p.set(k, v);
    }
    Agent::new(name, AgentConfig { backends: vec![("POSIX".into(), p)], ..AgentConfig::default() }).unwrap()
}

/// A one-descriptor registration list.
pub fn reg(mem: MemType, addr: u64, len: u64, dev: u64, meta: &str) -> RegDescList {
    RegDescList::from_descs(mem, vec![RegDesc::with_meta(addr, len, dev, meta)])
}

/// A FILE/BLOCK transfer list from `(offset, len, dev)` triples.
pub fn file_list(mem: MemType, descs: &[(u64, u64, u64)]) -> XferDescList {
    XferDescList::from_descs(mem, descs.iter().map(|&(a, l, d)| XferDesc::new(a, l, d)).collect())
}

/// A DRAM transfer list from `(offset into buf, len)` pairs.
pub fn dram_list(buf: &AlignedBuf, descs: &[(u64, u64)]) -> XferDescList {
    XferDescList::from_descs(MemType::Dram, descs.iter().map(|&(o, l)| XferDesc::new(buf.addr() + o, l, 0)).collect())
}

/// Posts `req` and waits for it (bounded).
pub fn run(req: &Request) -> kvferry::Result<()> {
    req.post(None)?;
    req.wait(WAIT)?;
    Ok(())
}
