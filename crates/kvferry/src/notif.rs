//! Notifications: small messages between agents, standalone or attached to a
//! request (then delivered only after the request's data is visible).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

pub use crate::types::MAX_NOTIF_LEN;

/// Notifications received, drained by [`take_notifications`](crate::Agent::take_notifications).
pub type Notifications = HashMap<String, Vec<Vec<u8>>>;

/// What one queued notification costs against the limits beyond its bytes:
/// so that a flood of empty messages is bounded too.
pub const NOTIF_OVERHEAD: u64 = 64;

/// How much a sink may hold before it refuses more: bounded memory whatever
/// peers send, and one flooding peer cannot crowd out the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifLimits {
    /// Bytes (each message's length plus [`NOTIF_OVERHEAD`]) queued from one
    /// sender. Default: 16 MiB, about 250 000 small messages.
    pub per_peer_bytes: u64,
    /// Bytes queued from all senders together. Default: 128 MiB.
    pub total_bytes: u64,
}

impl Default for NotifLimits {
    fn default() -> Self {
        NotifLimits { per_peer_bytes: 16 << 20, total_bytes: 128 << 20 }
    }
}

#[derive(Default)]
struct Queue {
    msgs: Vec<(Arc<str>, Vec<u8>)>,
    /// Charged bytes per sender with anything queued.
    per_peer: HashMap<Arc<str>, u64>,
    total: u64,
}

#[derive(Default)]
struct Inner {
    queue: Mutex<Queue>,
    arrived: Condvar,
    limits: NotifLimits,
    dropped: std::sync::atomic::AtomicU64,
}

/// Where backends deliver incoming notifications for their agent. Bounded by
/// [`NotifLimits`]: past them a notification is refused (and counted in
/// [`dropped`](Self::dropped)) until the application drains the queue.
#[derive(Clone, Default)]
pub struct NotifSink {
    inner: Arc<Inner>,
}

impl NotifSink {
    /// A new, empty sink with the default limits.
    pub fn new() -> Self {
        NotifSink::default()
    }

    /// A new, empty sink with the given limits.
    pub fn with_limits(limits: NotifLimits) -> Self {
        NotifSink { inner: Arc::new(Inner { limits, ..Inner::default() }) }
    }

    /// The limits this sink enforces.
    pub fn limits(&self) -> NotifLimits {
        self.inner.limits
    }

    /// Delivers `msg` from agent `from`, or refuses it when the sender's
    /// share or the whole queue is full (`NotAllowed`, counted in
    /// [`dropped`](Self::dropped)). A backend that can, tells the sender.
    pub fn push(&self, from: Arc<str>, msg: Vec<u8>) -> crate::Result<()> {
        let cost = msg.len() as u64 + NOTIF_OVERHEAD;
        let limits = self.inner.limits;
        {
            let mut q = self.inner.queue.lock();
            let mine = q.per_peer.get(&from).copied().unwrap_or(0);
            if mine + cost > limits.per_peer_bytes || q.total + cost > limits.total_bytes {
                drop(q);
                self.inner.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(peer = %from, len = msg.len(), "notification refused: the receiver's queue is full");
                return Err(crate::Error::not_allowed(format!(
                    "notification from '{from}' refused: the receiving agent holds {} queued bytes from it and {} \
                     in all (limits {} and {}); it must take its notifications before more can arrive",
                    mine,
                    q_total(&self.inner),
                    limits.per_peer_bytes,
                    limits.total_bytes
                )));
            }
            *q.per_peer.entry(from.clone()).or_insert(0) += cost;
            q.total += cost;
            q.msgs.push((from, msg));
        }
        self.inner.arrived.notify_all();
        Ok(())
    }

    /// Notifications refused so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes charged against the limits now (see [`NOTIF_OVERHEAD`]).
    pub fn queued_bytes(&self) -> u64 {
        q_total(&self.inner)
    }

    /// Takes every queued notification, grouped by sender in arrival order.
    pub fn take(&self) -> Notifications {
        let drained = {
            let mut q = self.inner.queue.lock();
            q.per_peer.clear();
            q.total = 0;
            std::mem::take(&mut q.msgs)
        };
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
        while q.msgs.is_empty() {
            if self.inner.arrived.wait_until(&mut q, deadline).timed_out() {
                return !q.msgs.is_empty();
            }
        }
        true
    }

    /// Number of queued notifications.
    pub fn len(&self) -> usize {
        self.inner.queue.lock().msgs.len()
    }

    /// Whether none is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn q_total(inner: &Inner) -> u64 {
    inner.queue.lock().total
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
        s.push("a".into(), b"1".to_vec()).unwrap();
        s.push("b".into(), b"x".to_vec()).unwrap();
        s.push("a".into(), b"2".to_vec()).unwrap();
        assert!(s.wait(Duration::ZERO));
        let n = s.take();
        assert_eq!(n["a"], vec![b"1".to_vec(), b"2".to_vec()]);
        assert_eq!(n["b"], vec![b"x".to_vec()]);
        assert!(s.take().is_empty());
    }

    #[test]
    fn bounded_per_peer_and_in_total() {
        let s = NotifSink::with_limits(NotifLimits { per_peer_bytes: 4 * (NOTIF_OVERHEAD + 10), total_bytes: 1000 });
        for _ in 0..4 {
            s.push("flood".into(), vec![0; 10]).unwrap();
        }
        let e = s.push("flood".into(), vec![0; 10]).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::NotAllowed);
        assert!(e.message().contains("take its notifications"), "{e}");
        // Another sender still gets through, up to the total.
        s.push("other".into(), vec![1; 10]).unwrap();
        assert!(s.push("other".into(), vec![1; 1000]).is_err(), "over the total");
        // Even empty messages are charged.
        let t = NotifSink::with_limits(NotifLimits { per_peer_bytes: NOTIF_OVERHEAD * 3, total_bytes: 1 << 20 });
        let accepted = (0..10).filter(|_| t.push("x".into(), Vec::new()).is_ok()).count();
        assert_eq!(accepted, 3);
        assert_eq!(s.dropped(), 2);
        assert_eq!(t.dropped(), 7);
        // Draining frees the room.
        assert_eq!(s.take()["flood"].len(), 4);
        assert_eq!(s.queued_bytes(), 0);
        s.push("flood".into(), vec![0; 10]).unwrap();
    }
}
