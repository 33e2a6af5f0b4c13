//! Child processes a test talks to line by line, and the usual way kvferry's
//! tests get a second process: this test binary run again, told by an
//! environment variable to play a role (a peer, a victim, an attacker)
//! inside one of its `#[test]` functions.
//!
//! The role is an ordinary test that returns at once unless its variable
//! is set, and answers on stdout with [`say`]:
//!
//! ```text
//! #[test]
//! fn peer_role() {
//!     let Ok(name) = std::env::var("MY_PEER") else { return };
//!     say("@@ ", format!("READY {name}"));
//! }
//! ```
//!
//! and the test that needs a peer starts it:
//!
//! ```no_run
//! use std::time::Duration;
//! use kvferry_test_support::{rerun_self, Child};
//!
//! let mut cmd = rerun_self("peer_role", false, &[]);
//! cmd.env("MY_PEER", "p1");
//! let mut peer = Child::spawn("p1", &mut cmd, "@@ ");
//! assert_eq!(peer.line(Duration::from_secs(30)), "READY p1");
//! ```

use std::fmt::Display;
use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// A command that runs this test binary again, running only the test
/// function `test_fn` (`--exact`, one thread, output not captured), with
/// `--ignored` when the role is an `#[ignore]`d test. `wrap` prefixes the
/// command (`["ip", "netns", "exec", ns]`). Set the role's environment on
/// the command before spawning it.
pub fn rerun_self(test_fn: &str, ignored: bool, wrap: &[&str]) -> Command {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.args(["--exact", test_fn, "--nocapture", "--test-threads=1"]);
    if ignored {
        cmd.arg("--ignored");
    }
    cmd
}

/// Prints `marker` and `line` on one line of stdout and flushes: how a role
/// answers the test that started it.
pub fn say(marker: &str, line: impl Display) {
    let out = std::io::stdout();
    let mut o = out.lock();
    writeln!(o, "{marker}{line}").expect("stdout");
    o.flush().expect("stdout");
}

/// A running child process with piped stdin and stdout. A thread reads its
/// stdout; lines that contain `marker` are kept from just after it (libtest
/// may print `test x ... ` in front), others are dropped (an empty marker
/// keeps every line). Dropping it kills and reaps the process.
#[derive(Debug)]
pub struct Child {
    /// What the messages call the process.
    pub name: String,
    /// The process.
    pub child: std::process::Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Child {
    /// Spawns `cmd` (stdin and stdout piped; stderr as `cmd` says) and starts
    /// reading its stdout.
    pub fn spawn(name: &str, cmd: &mut Command, marker: &str) -> Child {
        let mut child =
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = channel();
        let marker = marker.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(i) = line.find(&marker) {
                    if tx.send(line[i + marker.len()..].to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        Child { name: name.into(), child, stdin, lines: rx }
    }

    /// The next kept line, or `None` after `timeout` or once the process
    /// closed its stdout.
    pub fn try_line(&mut self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// The next kept line; panics after `timeout`, or if the process closed
    /// its stdout first.
    pub fn line(&mut self, timeout: Duration) -> String {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => panic!("{} said nothing within {timeout:?}", self.name),
            Err(RecvTimeoutError::Disconnected) => panic!("{} closed its output before answering", self.name),
        }
    }

    /// Skips lines until one contains `want` and returns it; panics after
    /// `timeout`, or if the process closed its stdout first.
    pub fn wait_for(&mut self, want: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(want) => return l,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!("{} did not say '{want}' within {timeout:?}", self.name),
                Err(RecvTimeoutError::Disconnected) => panic!("{} exited before saying '{want}'", self.name),
            }
        }
    }

    /// Every kept line not read yet, up to the process closing its stdout
    /// (waiting at most `timeout` for that).
    pub fn rest_of_output(&mut self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            out.push(l);
        }
        out
    }

    /// Writes `line` and a newline to the process's stdin.
    pub fn send(&mut self, line: &str) {
        let name = &self.name;
        let stdin = self.stdin.as_mut().unwrap_or_else(|| panic!("{name}'s stdin is closed"));
        writeln!(stdin, "{line}").unwrap_or_else(|e| panic!("writing to {name}: {e}"));
        stdin.flush().unwrap_or_else(|e| panic!("writing to {name}: {e}"));
    }

    /// Writes `line` and returns the next kept line (waiting at most `timeout`).
    pub fn cmd(&mut self, line: &str, timeout: Duration) -> String {
        self.send(line);
        self.line(timeout)
    }

    /// Writes `line` if the process still reads its stdin; errors are ignored.
    pub fn send_quietly(&mut self, line: &str) {
        if let Some(s) = self.stdin.as_mut() {
            let _ = writeln!(s, "{line}").and_then(|()| s.flush());
        }
    }

    /// Closes the process's stdin (it sees end of file).
    pub fn close_stdin(&mut self) {
        self.stdin.take();
    }

    /// The exit status once the process has exited, waiting at most
    /// `timeout`; `None` if it still runs then.
    pub fn exits_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends signal `sig` (`libc::SIGTERM`, ...) to the process.
    pub fn signal(&self, sig: i32) -> std::io::Result<()> {
        // SAFETY: kill(2) takes integers only; the pid is our own child's,
        // not reaped yet (we hold its `Child`), so it names no other process.
        if unsafe { libc::kill(self.child.id() as i32, sig) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill();
        }
    }
}
