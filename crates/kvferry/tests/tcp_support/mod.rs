//! Shared helpers of the `tcp_*` integration tests: a peer process (the test
//! binary re-executed in the `peer_entry` role) driven over stdin/stdout.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use kvferry::{Agent, AgentConfig, AlignedBuf, Params};

/// The byte at offset `i` of the pattern `seed`.
pub fn pattern_byte(seed: u8, i: usize) -> u8 {
    (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 12) as u8).wrapping_mul(7)
}

/// Fills `buf` with the pattern `seed`.
pub fn fill(buf: &mut [u8], seed: u8) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(seed, i);
    }
}

/// The first offset in `buf[off..off+len]` that differs from pattern `seed` (at buffer offsets).
pub fn first_mismatch(buf: &[u8], seed: u8, off: usize, len: usize) -> Option<usize> {
    (off..off + len).find(|&i| buf[i] != pattern_byte(seed, i))
}

/// Defines the `#[ignore]`d test that plays the peer when re-executed.
#[macro_export]
macro_rules! peer_entry {
    () => {
        #[test]
        #[ignore = "run by the tcp tests as a peer process, not by hand"]
        fn peer_entry() {
            if std::env::var("KVF_TCP_ROLE").as_deref() == Ok("peer") {
                tcp_support::peer_main();
            }
        }
    };
}

/// The peer role: an agent with TCP and the metadata listener, one buffer
/// filled with a pattern, and a command loop on stdin.
pub fn peer_main() {
    let name = std::env::var("KVF_TCP_NAME").expect("KVF_TCP_NAME");
    let len: usize = std::env::var("KVF_TCP_LEN").ok().and_then(|s| s.parse().ok()).unwrap_or(1 << 20);
    let mut params = Params::new();
    if let Ok(p) = std::env::var("KVF_TCP_PARAMS") {
        for kv in p.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').expect("k=v");
            params.set(k, v);
        }
    }
    let mut cfg = AgentConfig::env_defaults().with_listener(0).with_backend("TCP", params);
    if let Ok(a) = std::env::var("KVF_TCP_LISTEN") {
        cfg.listen_addr = Some(a.parse().unwrap());
    }
    let agent = Agent::new(&name, cfg).unwrap();
    let mut buf = AlignedBuf::new(len).unwrap();
    fill(buf.as_mut_slice(), 1);
    let _reg = agent.register_buf(&buf).unwrap();
    let out = std::io::stdout();
    let say = |s: String| {
        let mut o = out.lock();
        writeln!(o, "KVF {s}").unwrap();
        o.flush().unwrap();
    };
    say(format!("READY {} {} {}", agent.listen_port().unwrap(), buf.addr(), len));
    let mut notifs: Vec<(String, Vec<u8>)> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["check", seed, off, n] => {
                let (seed, off, n): (u8, usize, usize) =
                    (seed.parse().unwrap(), off.parse().unwrap(), n.parse().unwrap());
                match first_mismatch(buf.as_slice(), seed, off, n) {
                    None => say("OK".into()),
                    Some(i) => say(format!("BAD {i}")),
                }
            }
            ["fill", seed] => {
                fill(buf.as_mut_slice(), seed.parse().unwrap());
                say("OK".into());
            }
            ["notifs", count, ms] => {
                let (count, ms): (usize, u64) = (count.parse().unwrap(), ms.parse().unwrap());
                let deadline = Instant::now() + Duration::from_millis(ms);
                loop {
                    for (from, msgs) in agent.take_notifications() {
                        notifs.extend(msgs.into_iter().map(|m| (from.clone(), m)));
                    }
                    if notifs.len() >= count || Instant::now() >= deadline {
                        break;
                    }
                    agent.wait_notifications(Duration::from_millis(20));
                }
                let list: Vec<String> =
                    notifs.drain(..).map(|(f, m)| format!("{f}:{}", String::from_utf8_lossy(&m))).collect();
                say(format!("NOTIFS {}", list.join(",")));
            }
            ["md"] => {
                let md = agent.local_metadata().unwrap();
                say(format!("MD {}", md.iter().map(|b| format!("{b:02x}")).collect::<String>()));
            }
            ["quit"] => break,
            _ => say(format!("ERR unknown command {line}")),
        }
    }
}

/// A running peer process.
pub struct PeerProc {
    pub name: String,
    pub child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    pub md_port: u16,
    pub buf_addr: u64,
    pub buf_len: usize,
}

impl PeerProc {
    /// Starts a peer named `name` with a buffer of `len` bytes; `env` adds
    /// variables (KVF_TCP_PARAMS, KVFERRY_AUTH_TOKEN, ...); `wrap` prefixes the
    /// command (e.g. `ip netns exec ns`).
    pub fn spawn(name: &str, len: usize, env: &[(&str, &str)], wrap: &[&str]) -> PeerProc {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(["--exact", "peer_entry", "--ignored", "--nocapture", "--test-threads=1"])
            .env("KVF_TCP_ROLE", "peer")
            .env("KVF_TCP_NAME", name)
            .env("KVF_TCP_LEN", len.to_string())
            .env_remove("KVFERRY_AUTH_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn peer");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest may print "test peer_entry ... " in front of the first line.
                if let Some(i) = line.find("KVF ") {
                    if tx.send(line[i + 4..].to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        let mut p = PeerProc { name: name.into(), child, stdin, lines: rx, md_port: 0, buf_addr: 0, buf_len: 0 };
        let ready = p.line(Duration::from_secs(30));
        let w: Vec<&str> = ready.split_whitespace().collect();
        assert_eq!(w[0], "READY", "peer said {ready}");
        p.md_port = w[1].parse().unwrap();
        p.buf_addr = w[2].parse().unwrap();
        p.buf_len = w[3].parse().unwrap();
        p
    }

    /// The next line from the peer, failing the test after `timeout`.
    pub fn line(&mut self, timeout: Duration) -> String {
        self.lines
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("peer '{}' said nothing within {timeout:?}: {e}", self.name))
    }

    /// Sends a command and returns the answer.
    pub fn cmd(&mut self, c: &str) -> String {
        writeln!(self.stdin, "{c}").unwrap();
        self.stdin.flush().unwrap();
        self.line(Duration::from_secs(30))
    }

    /// Sends a signal to the peer process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Kills the peer (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A transfer descriptor list into the peer's buffer.
    pub fn blocks(&self, off: usize, block: usize, count: usize) -> kvferry::XferDescList {
        let mut l = kvferry::XferDescList::new(kvferry::MemType::Dram);
        for i in 0..count {
            l.push(kvferry::XferDesc::new(self.buf_addr + (off + i * block) as u64, block as u64, 0));
        }
        l
    }
}

impl Drop for PeerProc {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }
}

/// Creates an agent with the TCP backend (and no listener).
pub fn initiator(name: &str, params: Params) -> Agent {
    Agent::new(name, AgentConfig::default().with_backend("TCP", params)).unwrap()
}

/// Fetches `peer`'s metadata through its listener and waits (bounded) until it is loaded.
pub fn fetch(agent: &Agent, peer: &str, ip: &str, port: u16) {
    agent.fetch_remote_metadata(peer, None, kvferry::MetaPeer::addr(ip, port).unwrap()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.check_remote(peer, None) {
        assert!(Instant::now() < deadline, "metadata of '{peer}' did not arrive within 10 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits (bounded) until `cond` holds.
pub fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
