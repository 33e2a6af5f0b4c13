//! Bounded waits: a test never hangs, it fails saying what did not happen.

use std::time::{Duration, Instant};

/// Waits until `cond` holds, checking every 5 ms; panics with `what` after
/// `timeout`.
pub fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
