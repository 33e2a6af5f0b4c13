//! A prepared TCP transfer: the plan cut into frames once, and the state of
//! its current posting (frames owed, first error, notification, result).
//!
//! Frames are built at prepare time — header and entry table bytes, and the
//! list of local spans — so a post does no per-descriptor work and no
//! allocation besides the notification it carries.
//!
//! Memory safety of cancel and drop: every thread that touches the local
//! memory of a request (a lane writing WRITE data, a reader filling READ
//! data) holds the request's access guard (a read lock) and checks that its
//! posting is still live. `cancel` marks the posting dead and then takes the
//! write lock, so it returns only once no thread touches the memory, and no
//! thread touches it afterwards. If a copy does not end within 50 ms (a
//! stalled peer), the connections doing it are shut down to end it at once.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock, RwLockReadGuard};

use super::conn::{Conn, Job, Peer};
use super::proto::{self, Entry, FrameType, Header, HEADER_LEN};
use super::Shared;
use crate::backend::{BackendXfer, XferPlan};
use crate::error::{Error, ErrorKind, Result};
use crate::sys::Span;
use crate::types::{XferOp, XferState};

/// One frame of a request, built at prepare time.
pub(super) struct FramePlan {
    /// The frame's op id (request id and frame index).
    pub(super) op: u64,
    /// Header and entry table: owns the bytes the frame's first span points at.
    _head: Vec<u8>,
    /// Data bytes the frame moves.
    pub(super) bytes: u64,
    /// Its spans in [`XferShared::spans`]: the head first, then local data.
    spans: Range<usize>,
}

/// The state of the current posting.
struct PostState {
    gen: u64,
    remaining: usize,
    error: Option<Error>,
    notif: Option<Vec<u8>>,
    result: Option<Result<()>>,
    peer: Option<(Arc<Shared>, Arc<Peer>)>,
}

/// What the lanes and readers share with a prepared transfer.
pub(super) struct XferShared {
    pub(super) op: XferOp,
    pub(super) frames: Vec<FramePlan>,
    spans: Vec<Span>,
    /// The posting that is live (0: none yet).
    gen: AtomicU64,
    /// The posting that was canceled or failed: its queued frames are skipped.
    dead: AtomicU64,
    /// The posting that finished (its result is in `state`).
    finished: AtomicU64,
    state: Mutex<PostState>,
    done_cv: Condvar,
    access: RwLock<()>,
    /// Connections copying this request's memory now (to abort on a stuck cancel).
    users: Mutex<Vec<Arc<Conn>>>,
}

/// Held while a thread copies a request's local memory.
pub(super) struct Access<'a> {
    x: &'a XferShared,
    conn: *const Conn,
    _guard: RwLockReadGuard<'a, ()>,
}

impl Drop for Access<'_> {
    fn drop(&mut self) {
        let mut u = self.x.users.lock();
        if let Some(i) = u.iter().position(|c| std::ptr::eq(Arc::as_ptr(c), self.conn)) {
            u.swap_remove(i);
        }
    }
}

impl XferShared {
    /// Whether posting `gen` is live (not canceled, failed or superseded).
    pub(super) fn live(&self, gen: u64) -> bool {
        self.gen.load(Ordering::Acquire) == gen && self.dead.load(Ordering::Acquire) != gen
    }

    /// Takes the access guard for posting `gen`, or `None` if it is no longer live.
    pub(super) fn enter(&self, gen: u64, conn: &Arc<Conn>) -> Option<Access<'_>> {
        let g = self.access.read();
        if !self.live(gen) {
            return None;
        }
        self.users.lock().push(conn.clone());
        Some(Access { x: self, conn: Arc::as_ptr(conn), _guard: g })
    }

    /// Spans to write for a frame: its head, then (WRITE) its local data.
    pub(super) fn send_spans(&self, f: &FramePlan) -> &[Span] {
        match self.op {
            XferOp::Write => &self.spans[f.spans.clone()],
            XferOp::Read => &self.spans[f.spans.start..f.spans.start + 1],
        }
    }

    /// Local spans that receive a READ frame's data.
    pub(super) fn recv_spans(&self, f: &FramePlan) -> &[Span] {
        &self.spans[f.spans.start + 1..f.spans.end]
    }

    /// Records the outcome of one frame of posting `gen`; the last one
    /// completes the posting, or first queues its notification.
    pub(super) fn frame_done(self: &Arc<Self>, gen: u64, r: Result<()>) {
        let mut s = self.state.lock();
        if s.gen != gen || s.result.is_some() {
            return;
        }
        if let Err(e) = r {
            self.dead.store(gen, Ordering::Release);
            s.error.get_or_insert(e);
        }
        s.remaining = s.remaining.saturating_sub(1);
        if s.remaining > 0 {
            return;
        }
        if let Some(e) = s.error.take() {
            return self.complete(&mut s, Err(e));
        }
        if s.notif.is_some() {
            if let Some((shared, peer)) = s.peer.clone() {
                drop(s);
                // Every frame is acknowledged: the data is visible at the target.
                peer.lanes[0].push(&shared, &peer, [Job::Notif { x: self.clone(), gen }]);
                return;
            }
        }
        self.complete(&mut s, Ok(()));
    }

    /// The notification of posting `gen`, if it is still to be sent.
    pub(super) fn notif_for(&self, gen: u64) -> Option<Vec<u8>> {
        let s = self.state.lock();
        (s.gen == gen && s.result.is_none()).then(|| s.notif.clone()).flatten()
    }

    /// Completes posting `gen` with `r` (after its notification was sent).
    pub(super) fn finish(&self, gen: u64, r: Result<()>) {
        let mut s = self.state.lock();
        if s.gen == gen && s.result.is_none() {
            self.complete(&mut s, r);
        }
    }

    fn complete(&self, s: &mut PostState, r: Result<()>) {
        if r.is_err() {
            self.dead.store(s.gen, Ordering::Release);
        }
        s.result = Some(r);
        s.peer = None;
        self.finished.store(s.gen, Ordering::Release);
        self.done_cv.notify_all();
    }
}

impl std::fmt::Debug for XferShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpXferShared").field("op", &self.op).field("frames", &self.frames.len()).finish()
    }
}

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
            frames.push(FramePlan { op, _head: head, bytes: *bytes, spans: start..spans.len() });
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
        if frames.last().is_some_and(|f| f.spans.end < spans.len()) {
            spans.pop();
        }
        if frames.is_empty() {
            return Err(Error::invalid("TCP: a request needs at least one byte to move"));
        }
        let x = Arc::new(XferShared {
            op: plan.op,
            frames,
            spans,
            gen: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            state: Mutex::new(PostState { gen: 0, remaining: 0, error: None, notif: None, result: None, peer: None }),
            done_cv: Condvar::new(),
            access: RwLock::new(()),
            users: Mutex::new(Vec::new()),
        });
        Ok(Box::new(TcpXfer { shared, x, peer: plan.peer, total: plan.total_bytes, striped, posted: 0, direct: None }))
    }

    fn in_flight(&self) -> bool {
        self.posted != 0 && self.x.finished.load(Ordering::Acquire) != self.posted
    }
}

impl BackendXfer for TcpXfer {
    fn post(&mut self, notif: Option<&[u8]>) -> Result<XferState> {
        if self.in_flight() {
            return Err(Error::new(ErrorKind::RepostActive, "TCP: request still in flight; wait before posting again"));
        }
        let peer = self.shared.peer(&self.peer)?;
        let x = &self.x;
        let gen = x.gen.load(Ordering::Relaxed) + 1;
        {
            let mut s = x.state.lock();
            *s = PostState {
                gen,
                remaining: x.frames.len(),
                error: None,
                notif: notif.map(<[u8]>::to_vec),
                result: None,
                peer: Some((self.shared.clone(), peer.clone())),
            };
            x.gen.store(gen, Ordering::Release);
        }
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
        if self.x.finished.load(Ordering::Acquire) != self.posted {
            if let Some((peer, c)) = &self.direct {
                let (x, gen) = (&self.x, self.posted);
                c.read_direct(&self.shared, peer, &|| x.finished.load(Ordering::Acquire) == gen, None);
            }
            if self.x.finished.load(Ordering::Acquire) != self.posted {
                // Callers spin on poll: give the CPU to the threads that make
                // progress (lanes, readers, the target's) when they need it.
                std::thread::yield_now();
                return Ok(XferState::InProgress);
            }
        }
        match &self.x.state.lock().result {
            Some(Ok(())) => Ok(XferState::Done),
            Some(Err(e)) => Err(e.clone()),
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
        {
            let mut s = self.x.state.lock();
            while s.gen == self.posted && s.result.is_none() {
                if self.x.done_cv.wait_until(&mut s, deadline).timed_out() {
                    break;
                }
            }
        }
        self.poll()
    }

    fn cancel(&mut self) {
        if !self.in_flight() {
            return;
        }
        let gen = self.posted;
        self.x.dead.store(gen, Ordering::Release);
        self.x.finish(gen, Err(Error::new(ErrorKind::Canceled, "TCP: the request was canceled")));
        // Wait until no thread copies this request's memory.
        // Bounded: a thread copying for this request is in socket I/O on a
        // connection in `users`, and aborting that connection fails the copy at
        // once; the loop aborts again any connection that entered since.
        let start = Instant::now();
        let mut warned = false;
        while self.x.access.try_write_for(Duration::from_millis(50)).is_none() {
            let stuck: Vec<Arc<Conn>> = self.x.users.lock().clone();
            for c in stuck {
                c.abort("a request using it was canceled while its peer stalled");
            }
            if !warned && start.elapsed() > Duration::from_secs(1) {
                warned = true;
                tracing::warn!("TCP: a cancel still waits for a copy on an aborted connection to stop");
            }
        }
    }
}

impl TcpXfer {
    /// `wait` for a small posting written by the posting thread: read its
    /// answer from this thread, or, while another thread reads the
    /// connection, wait for that one to complete it.
    fn wait_direct(&mut self, peer: &Arc<Peer>, c: &Arc<Conn>, deadline: Instant) -> Result<XferState> {
        let (x, gen) = (self.x.clone(), self.posted);
        let done = || x.finished.load(Ordering::Acquire) == gen;
        loop {
            if done() || Instant::now() >= deadline {
                return self.poll();
            }
            if c.read_direct(&self.shared, peer, &done, Some(deadline)) {
                continue;
            }
            // Another thread reads the answers; it completes ours (or hands over
            // to the reader thread when it leaves). Look again now and then.
            let mut s = x.state.lock();
            let until = deadline.min(Instant::now() + Duration::from_micros(200));
            while s.gen == gen && s.result.is_none() {
                if x.done_cv.wait_until(&mut s, until).timed_out() {
                    break;
                }
            }
        }
    }
}

impl Drop for TcpXfer {
    fn drop(&mut self) {
        self.cancel();
    }
}
