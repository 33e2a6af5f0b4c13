//! What the target served, per peer: bytes each way, frames, refusals and
//! how long each frame took to serve, for the agent's metrics.
//!
//! A peer is known by the name it gives in its HELLO (authenticated only
//! when a token is set), so the table is bounded: the first
//! [`SERVED_PEERS`] names get their own counters, later ones share
//! [`OTHER`]. A connection looks its counters up once, at the handshake;
//! a frame then costs a few relaxed atomic adds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::backend::{ServedStats, SERVE_TIME_BOUNDS};

/// Peers with counters of their own.
pub(super) const SERVED_PEERS: usize = 64;
/// The name shared by the peers beyond [`SERVED_PEERS`].
pub(super) const OTHER: &str = "other";

/// One peer's counters.
#[derive(Default)]
pub(super) struct PeerServed {
    write_bytes: AtomicU64,
    read_bytes: AtomicU64,
    frames: AtomicU64,
    refused: AtomicU64,
    /// Frames by serve time: bucket `i` counts times ≤ `SERVE_TIME_BOUNDS[i]`
    /// (and above the previous bound); the last one counts the rest.
    time: [AtomicU64; SERVE_TIME_BOUNDS.len() + 1],
    time_ns: AtomicU64,
}

impl PeerServed {
    /// One frame served in `took`: `bytes` written into this agent (WRITE) or read from it.
    pub(super) fn served(&self, write: bool, bytes: u64, took: Duration) {
        let c = if write { &self.write_bytes } else { &self.read_bytes };
        c.fetch_add(bytes, Ordering::Relaxed);
        self.frames.fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let i = SERVE_TIME_BOUNDS.iter().position(|&b| secs <= b).unwrap_or(SERVE_TIME_BOUNDS.len());
        self.time[i].fetch_add(1, Ordering::Relaxed);
        self.time_ns.fetch_add(took.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// One frame refused.
    pub(super) fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    fn stats(&self) -> ServedStats {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServedStats {
            write_bytes: load(&self.write_bytes),
            read_bytes: load(&self.read_bytes),
            frames: load(&self.frames),
            refused: load(&self.refused),
            time_buckets: self.time.iter().map(load).collect(),
            time_sum: Duration::from_nanos(load(&self.time_ns)),
        }
    }
}

/// Every peer's counters.
#[derive(Default)]
pub(super) struct ServedTable {
    peers: Mutex<HashMap<Arc<str>, Arc<PeerServed>>>,
}

impl ServedTable {
    /// The counters of the peer named `name` (or of [`OTHER`] past the cap).
    pub(super) fn for_peer(&self, name: &str) -> Arc<PeerServed> {
        let mut p = self.peers.lock();
        if let Some(c) = p.get(name) {
            return c.clone();
        }
        let key: Arc<str> = if p.len() < SERVED_PEERS { name.into() } else { OTHER.into() };
        p.entry(key).or_default().clone()
    }

    /// Every peer's totals.
    pub(super) fn snapshot(&self) -> Vec<(String, ServedStats)> {
        self.peers.lock().iter().map(|(k, v)| (k.to_string(), v.stats())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_capped_and_times_bucketed() {
        let t = ServedTable::default();
        for i in 0..SERVED_PEERS + 10 {
            t.for_peer(&format!("p{i}")).served(true, 10, Duration::from_micros(3));
        }
        let s = t.snapshot();
        assert_eq!(s.len(), SERVED_PEERS + 1);
        let other = &s.iter().find(|(k, _)| k == OTHER).unwrap().1;
        assert_eq!((other.write_bytes, other.frames), (100, 10));
        // 3 µs lies in the bucket bounded by 4 µs (1 µs × 4).
        assert_eq!(other.time_buckets[1], 10);
        t.for_peer("p0").refused();
        let p0 = &t.snapshot().into_iter().find(|(k, _)| k == "p0").unwrap().1;
        assert_eq!((p0.refused, p0.frames), (1, 1));
    }
}
