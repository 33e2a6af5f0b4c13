//! Shared helpers of the `tcp_*` integration tests: a peer process (the test
//! binary re-executed in the `peer_entry` role) driven over stdin/stdout.
//! The process harness, patterns and waits are the test toolkit's
//! (`kvferry_test_support`).
#![allow(dead_code)]

use std::io::BufRead;
use std::time::{Duration, Instant};

use kvferry::{Agent, AgentConfig, AlignedBuf, Params};
use kvferry_test_support::{fill, first_mismatch};
use kvferry_test_support::{hex, rerun_self, Child};

/// What the peer puts in front of its answers.
const MARKER: &str = "KVF ";

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
    let say = |s: String| kvferry_test_support::process::say(MARKER, s);
    say(format!("READY {} {} {}", agent.listen_port().unwrap(), buf.addr(), len));
    let mut notifs: Vec<(String, Vec<u8>)> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["check", seed, off, n] => {
                let (seed, off, n): (u64, usize, usize) =
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
                say(format!("MD {}", hex(&md)));
            }
            ["quit"] => break,
            _ => say(format!("ERR unknown command {line}")),
        }
    }
}

/// A running peer process.
pub struct PeerProc {
    /// The peer's agent name.
    pub name: String,
    /// The process.
    pub proc: Child,
    /// Its metadata listener's port.
    pub md_port: u16,
    /// Where its buffer is, in its address space.
    pub buf_addr: u64,
    /// Its buffer's length.
    pub buf_len: usize,
}

impl PeerProc {
    /// Starts a peer named `name` with a buffer of `len` bytes; `env` adds
    /// variables (KVF_TCP_PARAMS, KVFERRY_AUTH_TOKEN, ...); `wrap` prefixes the
    /// command (e.g. `ip netns exec ns`).
    pub fn spawn(name: &str, len: usize, env: &[(&str, &str)], wrap: &[&str]) -> PeerProc {
        let mut cmd = rerun_self("peer_entry", true, wrap);
        cmd.env("KVF_TCP_ROLE", "peer")
            .env("KVF_TCP_NAME", name)
            .env("KVF_TCP_LEN", len.to_string())
            .env_remove("KVFERRY_AUTH_TOKEN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut proc = Child::spawn(&format!("peer '{name}'"), &mut cmd, MARKER);
        let ready = proc.line(Duration::from_secs(30));
        let w: Vec<&str> = ready.split_whitespace().collect();
        assert_eq!(w[0], "READY", "peer said {ready}");
        PeerProc {
            name: name.into(),
            proc,
            md_port: w[1].parse().unwrap(),
            buf_addr: w[2].parse().unwrap(),
            buf_len: w[3].parse().unwrap(),
        }
    }

    /// The next line from the peer, failing the test after `timeout`.
    pub fn line(&mut self, timeout: Duration) -> String {
        self.proc.line(timeout)
    }

    /// Sends a command and returns the answer.
    pub fn cmd(&mut self, c: &str) -> String {
        self.proc.cmd(c, Duration::from_secs(30))
    }

    /// Sends a signal to the peer process.
    pub fn signal(&self, sig: i32) {
        let _ = self.proc.signal(sig);
    }

    /// Kills the peer (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        self.proc.kill();
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
        self.proc.send_quietly("quit");
        if self.proc.exits_within(Duration::from_secs(2)).is_none() {
            self.kill();
        }
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
