//! Helpers for the SHM tests: a peer process (this test binary re-executed
//! with `KVFERRY_SHM_PEER` set) driven by line commands over its stdin and
//! stdout. Patterns, hex, the process harness and the FAKETCP stand-in
//! backend (rank 50) are the test toolkit's (`kvferry_test_support`).

#![allow(dead_code, missing_docs)]

use std::io::BufRead;
use std::time::Duration;

use kvferry::{Agent, AgentConfig, AlignedBuf, MemType, Params};
use kvferry_test_support::plugins::{self, FAKETCP};
use kvferry_test_support::{fill, hex, pattern_byte, scratch, unhex};
use kvferry_test_support::{rerun_self, Child};

/// The env var that turns a test binary into a peer.
pub const PEER_ENV: &str = "KVFERRY_SHM_PEER";

/// What the peer puts in front of its answers.
const MARKER: &str = "@@ ";

/// An agent with the given backends (FAKETCP is registered on demand).
pub fn agent(name: &str, backends: &[&str]) -> Agent {
    if backends.iter().any(|b| b.eq_ignore_ascii_case("FAKETCP")) {
        plugins::register(&FAKETCP);
    }
    let mut cfg = AgentConfig::default();
    for b in backends {
        cfg = cfg.with_backend(b, Params::new());
    }
    Agent::new(name, cfg).expect("agent")
}

// ───────────────────────────── the peer role ─────────────────────────────

/// Runs the peer role if this process was started as one; returns otherwise.
///
/// Environment: `KVFERRY_SHM_PEER=<agent name>`, `KVFERRY_SHM_PEER_BACKENDS`
/// (comma list, default `SHM`), `KVFERRY_SHM_PEER_SIZE` (bytes),
/// `KVFERRY_SHM_PEER_SEED`, `KVFERRY_SHM_PEER_SETUID` (drop to uid 65534 first).
/// Answers are lines starting with `@@ ` on stdout.
pub fn peer_main() {
    let Ok(name) = std::env::var(PEER_ENV) else { return };
    if std::env::var("KVFERRY_SHM_PEER_SETUID").is_ok() {
        // SAFETY: plain syscalls with integer arguments; glibc applies them to every thread.
        unsafe {
            assert_eq!(libc::setresgid(65534, 65534, 65534), 0);
            assert_eq!(libc::setresuid(65534, 65534, 65534), 0);
        }
    }
    if std::env::var("KVFERRY_SHM_PEER_NODUMP").is_ok() {
        // SAFETY: prctl with integer arguments; makes this process non-attachable by same-user peers.
        unsafe { assert_eq!(libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0), 0) };
    }
    let backends = std::env::var("KVFERRY_SHM_PEER_BACKENDS").unwrap_or_else(|_| "SHM".into());
    let size: usize = std::env::var("KVFERRY_SHM_PEER_SIZE").ok().and_then(|s| s.parse().ok()).unwrap_or(1 << 20);
    let seed: u64 = std::env::var("KVFERRY_SHM_PEER_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let list: Vec<&str> = backends.split(',').collect();
    let a = agent(&name, &list);
    let mut buf = PeerMem::new(size, std::env::var("KVFERRY_SHM_PEER_RAW").is_ok());
    fill(buf.as_mut_slice(), seed);
    let mut reg = Some(buf.register(&a));
    let say = |s: String| kvferry_test_support::process::say(MARKER, s);
    say(format!("MD {}", hex(&a.local_metadata().unwrap())));
    say(format!("ADDR {}", buf.addr()));
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let mut w = line.split_whitespace();
        let cmd = w.next().unwrap_or("");
        let args: Vec<&str> = w.collect();
        match cmd {
            "LOAD" => match a.load_remote_metadata(&unhex(args[0])) {
                Ok(_) => say("OK".into()),
                Err(e) => say(format!("ERR {e}")),
            },
            "MD" => say(format!("MD {}", hex(&a.local_metadata().unwrap()))),
            "FILL" => {
                fill(buf.as_mut_slice(), args[0].parse().unwrap());
                say("OK".into());
            }
            "DUMP" => {
                std::fs::write(args[0], buf.as_slice()).unwrap();
                say("OK".into());
            }
            "LOADFILE" => {
                let d = std::fs::read(args[0]).unwrap();
                buf.as_mut_slice()[..d.len()].copy_from_slice(&d);
                say("OK".into());
            }
            "NOTIFS" => {
                let want: usize = args[0].parse().unwrap();
                let mut got: Vec<(String, Vec<u8>)> = Vec::new();
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while got.len() < want && std::time::Instant::now() < deadline {
                    a.wait_notifications(Duration::from_millis(100));
                    for (from, msgs) in a.take_notifications() {
                        got.extend(msgs.into_iter().map(|m| (from.clone(), m)));
                    }
                }
                let l: Vec<String> = got.iter().map(|(f, m)| format!("{f}:{}", String::from_utf8_lossy(m))).collect();
                say(format!("NOTIFS {}", l.join(",")));
            }
            "NOTIFDATA" => {
                // Waits for one notification, then checks the data at once.
                let (seed, len): (u64, usize) = (args[0].parse().unwrap(), args[1].parse().unwrap());
                if !a.wait_notifications(Duration::from_secs(10)) {
                    say("ERR no notification".into());
                    continue;
                }
                let bad = buf.as_slice()[..len].iter().enumerate().position(|(i, &b)| b != pattern_byte(seed, i));
                let n = a.take_notifications();
                match bad {
                    None => say(format!(
                        "DATA OK {}",
                        n.values()
                            .flatten()
                            .map(|m| String::from_utf8_lossy(m).into_owned())
                            .collect::<Vec<_>>()
                            .join(",")
                    )),
                    Some(i) => say(format!("DATA BAD at {i}")),
                }
            }
            "SEND" => match a.send_notification(args[0], args[1].as_bytes(), &[]) {
                Ok(()) => say("OK".into()),
                Err(e) => say(format!("ERR {e}")),
            },
            "DEREG" => {
                reg.take();
                say("OK".into());
            }
            "CHOOSE" => {
                // Loads MD (args[0]) and reports which backend a WRITE of 4 KiB picks.
                let r = a.load_remote_metadata(&unhex(args[0]));
                let peer = args[1];
                let l =
                    kvferry::XferDescList::from_descs(MemType::Dram, vec![kvferry::XferDesc::new(buf.addr(), 4096, 0)]);
                let rem = kvferry::XferDescList::from_descs(
                    MemType::Dram,
                    vec![kvferry::XferDesc::new(args[2].parse().unwrap(), 4096, 0)],
                );
                match r.and_then(|_| a.create_request(kvferry::XferOp::Write, &l, &rem, peer, None)) {
                    Ok(req) => say(format!("CHOSEN {}", req.backend())),
                    Err(e) => say(format!("ERR {e}")),
                }
            }
            "EXIT" => std::process::exit(0),
            other => say(format!("ERR unknown command {other}")),
        }
    }
    std::process::exit(0);
}

/// The peer's memory: an [`AlignedBuf`] registered with `register_buf` (the
/// mapped path), or with `KVFERRY_SHM_PEER_RAW` a `Vec` registered with
/// `register_mem` (cross-memory attach only).
pub enum PeerMem {
    Buf(AlignedBuf),
    Raw(Vec<u8>),
}

impl PeerMem {
    pub fn new(size: usize, raw: bool) -> PeerMem {
        if raw {
            PeerMem::Raw(vec![0; size])
        } else {
            PeerMem::Buf(AlignedBuf::new(size).expect("buffer"))
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        match self {
            PeerMem::Buf(b) => b.as_slice(),
            PeerMem::Raw(v) => v,
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            PeerMem::Buf(b) => b.as_mut_slice(),
            PeerMem::Raw(v) => v,
        }
    }

    pub fn addr(&self) -> u64 {
        self.as_slice().as_ptr() as u64
    }

    pub fn register(&self, a: &Agent) -> kvferry::Registration {
        match self {
            PeerMem::Buf(b) => a.register_buf(b).expect("register"),
            PeerMem::Raw(v) => {
                let mut l = kvferry::RegDescList::new(MemType::Dram);
                l.push(kvferry::RegDesc::new(v.as_ptr() as u64, v.len() as u64, 0));
                // SAFETY: the Vec lives until the process exits and is never reallocated.
                unsafe { a.register_mem(&l, &[]) }.expect("register_mem")
            }
        }
    }
}

/// The inode of the memfd mapped at `addr` in process `pid` ("self" for this
/// one), from `/proc/<pid>/maps`.
pub fn memfd_inode_at(pid: &str, addr: u64) -> Option<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    maps.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (lo, hi) = f.first()?.split_once('-')?;
        let (lo, hi) = (u64::from_str_radix(lo, 16).ok()?, u64::from_str_radix(hi, 16).ok()?);
        (lo <= addr && addr < hi && l.contains("memfd:")).then(|| f.get(4)?.parse().ok()).flatten()
    })
}

/// Whether this process maps the memfd with inode `inode`.
pub fn maps_inode(inode: u64) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    maps.lines().any(|l| l.contains("memfd:") && l.split_whitespace().nth(4) == Some(&inode.to_string()))
}

/// A running peer process.
pub struct Peer {
    pub name: String,
    pub proc: Child,
    pub md: Vec<u8>,
    pub addr: u64,
}

impl Peer {
    /// The inode of the memfd behind the peer's buffer (None for raw memory).
    pub fn memfd_inode(&self) -> Option<u64> {
        memfd_inode_at(&self.proc.pid().to_string(), self.addr)
    }

    /// Starts `test_fn` of this test binary as the peer `name`.
    pub fn spawn(test_fn: &str, name: &str, size: usize, seed: u64, extra: &[(&str, &str)]) -> Peer {
        let mut cmd = rerun_self(test_fn, false, &[]);
        cmd.env(PEER_ENV, name)
            .env("KVFERRY_SHM_PEER_SIZE", size.to_string())
            .env("KVFERRY_SHM_PEER_SEED", seed.to_string());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let proc = Child::spawn(&format!("peer '{name}'"), &mut cmd, MARKER);
        let mut p = Peer { name: name.to_string(), proc, md: Vec::new(), addr: 0 };
        let md = p.line();
        p.md = unhex(md.strip_prefix("MD ").expect("MD line"));
        let addr = p.line();
        p.addr = addr.strip_prefix("ADDR ").expect("ADDR line").parse().unwrap();
        p
    }

    /// The next answer line (panics after 20 s: no test hangs).
    pub fn line(&mut self) -> String {
        self.proc.line(Duration::from_secs(20))
    }

    /// Sends a command and returns its answer.
    pub fn cmd(&mut self, c: &str) -> String {
        self.proc.send(c);
        self.line()
    }

    /// Sends a command without reading its answer (read it later with [`line`](Self::line)).
    pub fn cmd_nowait(&mut self, c: &str) {
        self.proc.send(c);
    }

    /// The peer's whole buffer, as it is now (written to a scratch file by the peer).
    pub fn dump(&mut self, tag: &str) -> Vec<u8> {
        let path = scratch(tag);
        self.ok(&format!("DUMP {}", path.display()));
        let d = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        d
    }

    /// Sends a command that must answer OK.
    pub fn ok(&mut self, c: &str) {
        let a = self.cmd(c);
        assert_eq!(a, "OK", "peer answered {a:?} to {c:?}");
    }

    /// Asks the peer to exit and waits (bounded) until it has.
    pub fn exit(mut self) {
        self.proc.send_quietly("EXIT");
        if self.proc.exits_within(Duration::from_secs(5)).is_none() {
            self.proc.kill();
        }
    }

    /// Kills the peer (SIGKILL) and reaps it.
    pub fn kill(mut self) {
        self.proc.kill();
    }
}

/// DRAM descriptors of `len` bytes at `base + offset` for each offset.
pub fn remote_list(base: u64, offsets: impl Iterator<Item = usize>, len: usize) -> kvferry::XferDescList {
    kvferry::XferDescList::from_descs(
        MemType::Dram,
        offsets.map(|o| kvferry::XferDesc::new(base + o as u64, len as u64, 0)).collect(),
    )
}
