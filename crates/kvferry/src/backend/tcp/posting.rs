//! A posting: one run of a prepared TCP request, and the state the lanes
//! and readers share with it.
//!
//! Each `post` of a prepared request starts a new posting (a generation
//! number). Its frames are owed until each is answered; the first error
//! fails the posting, and once every frame is acknowledged its notification
//! (if any) is queued, sent, and the posting completes with its result.
//! Work queued for an older, canceled or failed posting is skipped.
//!
//! Memory safety of cancel and drop: every thread that touches the local
//! memory of a request (a lane writing WRITE data, a reader filling READ
//! data) holds the request's access guard (a read lock) and checks that its
//! posting is still live. `cancel` marks the posting dead and then takes the
//! write lock, so it returns only once no thread touches the memory, and no
//! thread touches it afterwards. If a copy does not end within 50 ms (a
//! stalled peer), the connections doing it are shut down to end it at once.
//!
//! This file knows neither connections nor lanes: a connection is a
//! [`Copier`] (it can be aborted), and what queues a notification is a
//! [`Notify`] given with each posting.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock, RwLockReadGuard};

use crate::error::{Error, ErrorKind, Result};
use crate::sys::Span;
use crate::types::XferOp;

/// A thread's way to copy a request's memory (a connection): aborted when a
/// cancel waits too long for the copy to end.
pub(super) trait Copier: Send + Sync {
    /// Ends every copy in progress at once (shuts the connection down),
    /// saying `why`.
    fn abort(&self, why: &str);
}

/// Queues the notification of a posting once every frame is acknowledged.
pub(super) trait Notify: Send + Sync {
    /// Queues the sending of posting `gen`'s notification; whoever sends it
    /// completes the posting with [`XferShared::finish`].
    fn queue(&self, x: &Arc<XferShared>, gen: u64);
}

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

impl FramePlan {
    /// A frame with op id `op` whose head bytes `head` and `bytes` data bytes
    /// are the spans `spans` of its request (the first one points into `head`).
    pub(super) fn new(op: u64, head: Vec<u8>, bytes: u64, spans: Range<usize>) -> FramePlan {
        FramePlan { op, _head: head, bytes, spans }
    }

    /// The frame's spans in its request's span list.
    pub(super) fn spans(&self) -> Range<usize> {
        self.spans.clone()
    }
}

/// The state of the current posting.
struct PostState {
    gen: u64,
    remaining: usize,
    error: Option<Error>,
    notif: Option<Vec<u8>>,
    result: Option<Result<()>>,
    /// Queues the notification once every frame is acknowledged.
    notify: Option<Arc<dyn Notify>>,
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
    users: Mutex<Vec<Arc<dyn Copier>>>,
}

/// Held while a thread copies a request's local memory.
pub(super) struct Access<'a> {
    x: &'a XferShared,
    /// The copier's data pointer (its identity in `users`).
    copier: *const (),
    _guard: RwLockReadGuard<'a, ()>,
}

impl Drop for Access<'_> {
    fn drop(&mut self) {
        let mut u = self.x.users.lock();
        if let Some(i) = u.iter().position(|c| std::ptr::eq(Arc::as_ptr(c) as *const (), self.copier)) {
            u.swap_remove(i);
        }
    }
}

impl XferShared {
    /// A request of `op` cut into `frames` over `spans`, never posted yet.
    pub(super) fn new(op: XferOp, frames: Vec<FramePlan>, spans: Vec<Span>) -> XferShared {
        XferShared {
            op,
            frames,
            spans,
            gen: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            state: Mutex::new(PostState { gen: 0, remaining: 0, error: None, notif: None, result: None, notify: None }),
            done_cv: Condvar::new(),
            access: RwLock::new(()),
            users: Mutex::new(Vec::new()),
        }
    }

    /// Starts the next posting, carrying `notif` (queued by `notify` once
    /// every frame is acknowledged), and returns its generation. The caller
    /// makes sure the previous posting finished.
    pub(super) fn begin(&self, notif: Option<&[u8]>, notify: Option<Arc<dyn Notify>>) -> u64 {
        let gen = self.gen.load(Ordering::Relaxed) + 1;
        let mut s = self.state.lock();
        *s = PostState {
            gen,
            remaining: self.frames.len(),
            error: None,
            notif: notif.map(<[u8]>::to_vec),
            result: None,
            notify,
        };
        self.gen.store(gen, Ordering::Release);
        gen
    }

    /// Whether posting `gen` is live (not canceled, failed or superseded).
    pub(super) fn live(&self, gen: u64) -> bool {
        self.gen.load(Ordering::Acquire) == gen && self.dead.load(Ordering::Acquire) != gen
    }

    /// Whether posting `gen` finished (its result is set).
    pub(super) fn finished(&self, gen: u64) -> bool {
        self.finished.load(Ordering::Acquire) == gen
    }

    /// The result of the latest posting, `None` while it runs.
    pub(super) fn result(&self) -> Option<Result<()>> {
        self.state.lock().result.clone()
    }

    /// Sleeps until posting `gen` completes or `deadline` passes.
    pub(super) fn wait_until(&self, gen: u64, deadline: Instant) {
        let mut s = self.state.lock();
        while s.gen == gen && s.result.is_none() {
            if self.done_cv.wait_until(&mut s, deadline).timed_out() {
                break;
            }
        }
    }

    /// Takes the access guard for posting `gen` on behalf of `copier`, or
    /// `None` if the posting is no longer live.
    pub(super) fn enter<C: Copier + 'static>(&self, gen: u64, copier: &Arc<C>) -> Option<Access<'_>> {
        let g = self.access.read();
        if !self.live(gen) {
            return None;
        }
        self.users.lock().push(copier.clone());
        Some(Access { x: self, copier: Arc::as_ptr(copier) as *const (), _guard: g })
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
            if let Some(notify) = s.notify.clone() {
                drop(s);
                // Every frame is acknowledged: the data is visible at the target.
                notify.queue(self, gen);
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
        s.notify = None;
        self.finished.store(s.gen, Ordering::Release);
        self.done_cv.notify_all();
    }

    /// Cancels posting `gen`: it completes with `Canceled`, and this returns
    /// once no thread copies the request's memory (see the module doc).
    pub(super) fn cancel(&self, gen: u64) {
        self.dead.store(gen, Ordering::Release);
        self.finish(gen, Err(Error::new(ErrorKind::Canceled, "TCP: the request was canceled")));
        // Wait until no thread copies this request's memory.
        // Bounded: a thread copying for this request is in socket I/O on a
        // connection in `users`, and aborting that connection fails the copy at
        // once; the loop aborts again any connection that entered since.
        let start = Instant::now();
        let mut warned = false;
        while self.access.try_write_for(Duration::from_millis(50)).is_none() {
            let stuck: Vec<Arc<dyn Copier>> = self.users.lock().clone();
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

impl std::fmt::Debug for XferShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpXferShared").field("op", &self.op).field("frames", &self.frames.len()).finish()
    }
}
