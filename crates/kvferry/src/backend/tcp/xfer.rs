//! A prepared TCP transfer: the plan cut into frames once, and each post
//! handed to the lanes (or written by the posting thread when small).
//!
//! Frames are built at prepare time — header and entry table bytes, and the
//! list of local spans — so a post does no per-descriptor work and no
//! allocation besides the notification it carries.
//!
//! The state a posting shares with the lanes and readers, and the memory
//! safety rule of cancel, are in `posting.rs`; this file knows the lanes,
//! and hands each posting what queues its notification on lane 0.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::{Conn, Job, Peer};
use super::posting::{FramePlan, Notify, XferShared};
use super::proto::{self, Entry, FrameType, Header, HEADER_LEN};
use super::Shared;
use crate::backend::{BackendXfer, XferPlan};
use crate::error::{Error, ErrorKind, Result};
use crate::sys::Span;
use crate::types::{XferOp, XferState};

/// The TCP backend's prepared transfer.
pub(super) struct TcpXfer {
    shared: Arc<Shared>,
    x: Arc<XferShared>,
    peer: Arc<str>,
    total: u64,
    striped: bool,
    /// This handle's latest posting (0: never posted).
    posted: u64,
    /// The connection a small posting was written on by the posting thread:
    /// `wait` and `poll` read its answer themselves (no reader-thread hop).
    direct: Option<(Arc<Peer>, Arc<Conn>)>,
    /// What queues the notifications of postings to the peer as loaded at
    /// the latest post: made again only when the peer was loaded again.
    notify: Option<Arc<LaneZero>>,
}

/// Queues a posting's notification on lane 0 of its peer (the same lane for
/// every notification of a peer, so they arrive in the order they were sent).
struct LaneZero {
    shared: Arc<Shared>,
    peer: Arc<Peer>,
}

impl Notify for LaneZero {
    fn queue(&self, x: &Arc<XferShared>, gen: u64) {
        self.peer.lanes[0].push(&self.shared, &self.peer, [Job::Notif { x: x.clone(), gen }]);
    }
}

impl std::fmt::Debug for TcpXfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpXfer")
            .field("op", &self.x.op)
            .field("peer", &self.peer)
            .field("bytes", &self.total)
            .field("frames", &self.x.frames.len())
            .finish()
    }
}

/// Request ids, unique within the process; a frame's op id is `id << 32 | index`.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl TcpXfer {
    /// Cuts the plan into frames: at most `frame_max` bytes (less when
    /// striping, so every lane gets a share) and [`proto::MAX_ENTRIES`] pieces each.
    pub(super) fn prepare(shared: Arc<Shared>, plan: XferPlan) -> Result<Box<dyn BackendXfer>> {
        let cfg = &shared.cfg;
        let lanes = cfg.lanes as u64;
        let striped = lanes > 1 && plan.total_bytes >= cfg.stripe_threshold;
        let max_bytes = if striped {
            cfg.frame_max.min(plan.total_bytes.div_ceil(lanes).next_multiple_of(4096)).max(4096)
        } else {
            cfg.frame_max
        };
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff;
        let ty = match plan.op {
            XferOp::Write => FrameType::Write,
            XferOp::Read => FrameType::Read,
        };
        let mut frames: Vec<FramePlan> = Vec::new();
        let mut spans: Vec<Span> = Vec::with_capacity(plan.segments.len() + plan.segments.len() / 64 + 2);
        let mut entries: Vec<u8> = Vec::new();
        let mut bytes = 0u64;
        let mut start = 0usize;
        let mut flush = |frames: &mut Vec<FramePlan>, spans: &mut Vec<Span>, entries: &mut Vec<u8>, bytes: &mut u64| {
            if entries.is_empty() {
                return;
            }
            let count = (entries.len() / proto::ENTRY_LEN) as u32;
            let op = id << 32 | frames.len() as u64;
            let mut head = Vec::with_capacity(HEADER_LEN + entries.len());
            head.extend_from_slice(&Header::new(ty, op, count, *bytes).encode());
            head.extend_from_slice(entries);
            // The head's heap buffer never moves again: its address is the frame's first span.
            spans[start] = (head.as_ptr() as u64, head.len() as u64);
            frames.push(FramePlan::new(op, head, *bytes, start..spans.len()));
            entries.clear();
            *bytes = 0;
            start = spans.len();
        };
        spans.push((0, 0));
        for s in &plan.segments {
            if s.len == 0 || s.local_addr.checked_add(s.len).is_none() || s.remote_addr.checked_add(s.len).is_none() {
                return Err(Error::internal(format!("TCP: plan segment {s:?} is empty or overflows")));
            }
            let mut off = 0;
            while off < s.len {
                let n = (s.len - off).min(max_bytes - bytes);
                Entry { key: s.remote_key, addr: s.remote_addr + off, len: n }.encode(&mut entries);
                spans.push((s.local_addr + off, n));
                bytes += n;
                off += n;
                if bytes == max_bytes || entries.len() / proto::ENTRY_LEN == proto::MAX_ENTRIES as usize {
                    flush(&mut frames, &mut spans, &mut entries, &mut bytes);
                    spans.push((0, 0));
                }
            }
        }
        flush(&mut frames, &mut spans, &mut entries, &mut bytes);
        if frames.last().is_some_and(|f| f.spans().end < spans.len()) {
            spans.pop();
        }
        if frames.is_empty() {
            return Err(Error::invalid("TCP: a request needs at least one byte to move"));
        }
        let x = Arc::new(XferShared::new(plan.op, frames, spans));
        Ok(Box::new(TcpXfer {
            shared,
            x,
            peer: plan.peer,
            total: plan.total_bytes,
            striped,
            posted: 0,
            direct: None,
            notify: None,
        }))
    }

    fn in_flight(&self) -> bool {
        self.posted != 0 && !self.x.finished(self.posted)
    }
}

impl BackendXfer for TcpXfer {
    fn post(&mut self, notif: Option<&[u8]>) -> Result<XferState> {
        if self.in_flight() {
            return Err(Error::new(ErrorKind::RepostActive, "TCP: request still in flight; wait before posting again"));
        }
        let peer = self.shared.peer(&self.peer)?;
        let notify = match &self.notify {
            Some(n) if Arc::ptr_eq(&n.peer, &peer) => n.clone(),
            _ => {
                let n = Arc::new(LaneZero { shared: self.shared.clone(), peer: peer.clone() });
                self.notify = Some(n.clone());
                n
            }
        };
        let x = &self.x;
        let gen = x.begin(notif, Some(notify));
        self.posted = gen;
        self.direct = None;
        let n = peer.lanes.len();
        let base = peer.rr.fetch_add(1, Ordering::Relaxed) % n;
        let nframes = x.frames.len() as u32;
        if self.striped {
            for l in 0..n.min(nframes as usize) {
                let jobs = (l as u32..nframes).step_by(n).map(|f| Job::Frame { x: x.clone(), gen, frame: f });
                peer.lanes[(base + l) % n].push(&self.shared, &peer, jobs);
            }
            return Ok(XferState::InProgress);
        }
        let lane = &peer.lanes[base];
        if self.total <= self.shared.cfg.inline_max && lane.idle() {
            if let Some(c) = lane.current() {
                // Small request on a live, idle lane: write it from this thread,
                // and (without a notification to chain) let `wait`/`poll` read
                // its answer too.
                let direct = notif.is_none();
                for f in 0..nframes {
                    c.send_frame(&self.shared, &peer, x, gen, f, direct);
                }
                if direct {
                    self.direct = Some((peer, c));
                }
                return Ok(XferState::InProgress);
            }
        }
        lane.push(&self.shared, &peer, (0..nframes).map(|f| Job::Frame { x: x.clone(), gen, frame: f }));
        Ok(XferState::InProgress)
    }

    fn poll(&mut self) -> Result<XferState> {
        if self.posted == 0 {
            return Err(Error::invalid("TCP: request was never posted"));
        }
        if !self.x.finished(self.posted) {
            if let Some((peer, c)) = &self.direct {
                let (x, gen) = (&self.x, self.posted);
                c.read_direct(&self.shared, peer, &|| x.finished(gen), None);
            }
            if !self.x.finished(self.posted) {
                // Callers spin on poll: give the CPU to the threads that make
                // progress (lanes, readers, the target's) when they need it.
                std::thread::yield_now();
                return Ok(XferState::InProgress);
            }
        }
        match self.x.result() {
            Some(Ok(())) => Ok(XferState::Done),
            Some(Err(e)) => Err(e),
            None => Ok(XferState::InProgress),
        }
    }

    fn poll_for(&mut self, timeout: Duration) -> Result<XferState> {
        let deadline = Instant::now() + timeout;
        if let Some((peer, c)) = self.direct.clone() {
            return self.wait_direct(&peer, &c, deadline);
        }
        // A short spin catches small requests without a sleep and a wake-up.
        let spin_until = Instant::now() + timeout.min(Duration::from_micros(40));
        loop {
            if self.poll()? == XferState::Done {
                return Ok(XferState::Done);
            }
            if Instant::now() >= spin_until {
                break;
            }
            std::thread::yield_now();
        }
        self.x.wait_until(self.posted, deadline);
        self.poll()
    }

    fn cancel(&mut self) {
        if !self.in_flight() {
            return;
        }
        self.x.cancel(self.posted);
    }
}

impl TcpXfer {
    /// `wait` for a small posting written by the posting thread: read its
    /// answer from this thread, or, while another thread reads the
    /// connection, wait for that one to complete it.
    fn wait_direct(&mut self, peer: &Arc<Peer>, c: &Arc<Conn>, deadline: Instant) -> Result<XferState> {
        let (x, gen) = (self.x.clone(), self.posted);
        let done = || x.finished(gen);
        loop {
            if done() || Instant::now() >= deadline {
                return self.poll();
            }
            if c.read_direct(&self.shared, peer, &done, Some(deadline)) {
                continue;
            }
            // Another thread reads the answers; it completes ours (or hands over
            // to the reader thread when it leaves). Look again now and then.
            x.wait_until(gen, deadline.min(Instant::now() + Duration::from_micros(200)));
        }
    }
}

impl Drop for TcpXfer {
    fn drop(&mut self) {
        self.cancel();
    }
}
