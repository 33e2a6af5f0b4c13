//! Helpers shared by the POSIX backend's integration tests.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kvferry::{Agent, AgentConfig, AlignedBuf, MemType, Params, RegDesc, RegDescList, Request, XferDesc, XferDescList};

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(60);

/// A directory on a disk filesystem (not tmpfs: O_DIRECT must work), removed on drop.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("posix-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Prints a skip message nobody can miss.
pub fn skipped(test: &str, why: &str) {
    eprintln!("\n!!!!!!!! SKIPPED {test}: {why} !!!!!!!!\n");
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

/// Fills `buf` with bytes that depend on position and `seed`.
pub fn fill(buf: &mut AlignedBuf, seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf.as_mut_slice().chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// A deterministic permutation of `0..n`.
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..n).rev() {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        v.swap(i, (x >> 33) as usize % (i + 1));
    }
    v
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

/// Runs a command, returning stdout or a reason.
pub fn sh(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("{cmd} {}: {} {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A loop device over an image file, detached on drop.
pub struct LoopDev {
    pub dev: String,
}

impl LoopDev {
    pub fn attach(img: &Path) -> Result<LoopDev, String> {
        let dev = sh("losetup", &["-f", "--show", img.to_str().unwrap()])?;
        Ok(LoopDev { dev })
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        // Detach exactly this device, never others.
        let _ = sh("losetup", &["-d", &self.dev]);
    }
}

/// A tmpfs of `size` mounted at `dir`, unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    pub fn tmpfs(dir: &Path, size: &str) -> Result<Mount, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        sh("mount", &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", dir.to_str().unwrap()])?;
        Ok(Mount { dir: dir.to_path_buf() })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = sh("umount", &[self.dir.to_str().unwrap()]);
    }
}
