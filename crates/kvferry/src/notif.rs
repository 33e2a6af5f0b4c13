//! Notifications: small messages between agents, standalone or attached to a
//! request (then delivered only after the request's data is visible).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Largest notification accepted, in bytes. Notifications are control
/// messages; bulk data belongs in a transfer.
pub const MAX_NOTIF_LEN: usize = 64 * 1024;

/// Notifications received, drained by [`take_notifications`](crate::Agent::take_notifications).
pub type Notifications = HashMap<String, Vec<Vec<u8>>>;

#[derive(Default)]
struct Inner {
    queue: Mutex<Vec<(Arc<str>, Vec<u8>)>>,
    arrived: Condvar,
}

/// Where backends deliver incoming notifications for their agent.
#[derive(Clone, Default)]
pub struct NotifSink {
    inner: Arc<Inner>,
}

impl NotifSink {
    /// A new, empty sink.
    pub fn new() -> Self {
        NotifSink::default()
    }

    /// Delivers `msg` from agent `from`.
    pub fn push(&self, from: Arc<str>, msg: Vec<u8>) {
        self.inner.queue.lock().push((from, msg));
        self.inner.arrived.notify_all();
    }

    /// Takes every queued notification, grouped by sender in arrival order.
    pub fn take(&self) -> Notifications {
        let drained = std::mem::take(&mut *self.inner.queue.lock());
        let mut out: Notifications = HashMap::new();
        for (from, msg) in drained {
            out.entry(from.to_string()).or_default().push(msg);
        }
        out
    }

    /// Waits until at least one notification is queued or `timeout` passes;
    /// returns whether one is queued.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut q = self.inner.queue.lock();
        while q.is_empty() {
            if self.inner.arrived.wait_until(&mut q, deadline).timed_out() {
                return !q.is_empty();
            }
        }
        true
    }

    /// Number of queued notifications.
    pub fn len(&self) -> usize {
        self.inner.queue.lock().len()
    }

    /// Whether none is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for NotifSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotifSink").field("queued", &self.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_in_order_and_drained() {
        let s = NotifSink::new();
        assert!(!s.wait(Duration::from_millis(1)));
        s.push("a".into(), b"1".to_vec());
        s.push("b".into(), b"x".to_vec());
        s.push("a".into(), b"2".to_vec());
        assert!(s.wait(Duration::ZERO));
        let n = s.take();
        assert_eq!(n["a"], vec![b"1".to_vec(), b"2".to_vec()]);
        assert_eq!(n["b"], vec![b"x".to_vec()]);
        assert!(s.take().is_empty());
    }
}
