//! The target side: an accept loop and one thread per accepted connection.
//! What to do with each frame (its turn, kind, table and answer order) is
//! decided in `state.rs`; this file moves the bytes.
//!
//! A connection thread reads frames, checks every entry's key and bounds
//! against the live registration table of its kind *before* a byte moves —
//! memory regions and exported file regions live in different tables, and a
//! frame's entries must all be of one kind — reads WRITE payloads straight
//! into registered memory, writes READ payloads straight from it, and
//! answers with ACK, DATA or ERROR. The memory table is locked only while a
//! frame is checked and the connection publishes which regions the frame
//! uses ([`Slot::using`]); `deregister` aborts the connections whose frame
//! uses the region and returns once none touches it (see [`release_region`]).
//! Frames on exported files are checked on the wire for kinds and framing,
//! then planned by the storage layer (`FileServer::plan`: key, access,
//! bounds, O_DIRECT — the POSIX backend's checks, not a copy of them) before
//! any staging memory is taken; they go through staging buffers from one
//! budget shared by every connection ([`Staging`]) and the server's storage
//! engine, started ahead and answered in order (see `ConnState::file_op`).
//!
//! Bounds against hostile peers (docs/TCP.md): connection caps (total, per
//! source address, in handshake) with eviction of the oldest handshake, a
//! deadline over the whole hello, a deadline over each whole frame, an idle
//! timeout for authenticated connections, and a connection that overflows its
//! share of the notification queue is closed.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::proto::{self, FrameType, Header, Hello, ProtoError, Status, Welcome, HEADER_LEN, HELLO_FIXED};
use super::state::{self, AnswerOrder, Resolved, Route, Tables, Turn};
use super::{frame_budget, MemRegion, Shared};
use crate::storage::{self, FileServer, Plan};
use crate::sys::{self, Span};
use crate::types::{AccessKey, XferOp};

/// A connection still in handshake.
const PENDING: u8 = 0;
/// A connection whose hello was accepted.
const AUTHED: u8 = 1;
/// A connection being closed by this side (evicted, aborted, shutting down).
const CLOSED: u8 = 2;

/// One accepted connection as the backend tracks it.
pub(crate) struct Slot {
    /// A duplicate of the connection's socket, to shut it down from another thread.
    stream: TcpStream,
    ip: IpAddr,
    since: Instant,
    /// [`PENDING`], [`AUTHED`] or [`CLOSED`].
    state: AtomicU8,
    /// Ids of the memory regions the frame in progress reads or writes
    /// (empty between frames). Locked by its own thread twice per memory
    /// frame (uncontended) and by `deregister`.
    using: Mutex<Vec<u64>>,
    /// Why this side closed the connection, for the log.
    why: Mutex<Option<String>>,
}

impl Slot {
    /// Closes the connection from this side: every blocked read or write on it
    /// returns at once, and the thread serving it ends.
    pub(crate) fn abort(&self, why: &str) {
        self.state.store(CLOSED, Ordering::Release);
        self.why.lock().get_or_insert_with(|| why.to_string());
        sys::shutdown(self.stream.as_raw_fd());
    }

    /// Evicts a connection still in handshake; `false` if it is not (any more).
    fn evict(&self, why: &str) -> bool {
        if self.state.compare_exchange(PENDING, CLOSED, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return false;
        }
        self.abort(why);
        true
    }

    fn live(&self) -> bool {
        self.state.load(Ordering::Acquire) != CLOSED
    }

    fn pending(&self) -> bool {
        self.state.load(Ordering::Acquire) == PENDING
    }
}

/// Clears a connection's [`Slot::using`] when a memory frame ends, however it ends.
struct InUse<'a>(&'a Slot);

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        self.0.using.lock().clear();
    }
}

/// How long `deregister` lets a frame that uses the region finish on its own
/// before it aborts the frame's connection.
const RELEASE_GRACE: Duration = Duration::from_millis(20);

/// After the region `id` left the memory table: aborts every connection
/// whose frame in progress uses it (without waiting on the slow peer), then
/// returns once none of them touches its memory any more — a shut-down
/// socket fails the copy at once, so this takes microseconds, not the peer's time.
pub(super) fn release_region(shared: &Shared, id: u64) {
    let mut users: Vec<Arc<Slot>> =
        shared.conns.lock().values().filter(|s| s.using.lock().contains(&id)).cloned().collect();
    // A frame that is just finishing (its last bytes already sent, say, and
    // the peer acting on them) lets go within microseconds: give frames a
    // short grace before aborting, so that an idle peer is not disconnected
    // by a race (found by tests/tcp_model.rs). A slow peer costs the grace.
    let grace = Instant::now() + RELEASE_GRACE;
    while !users.is_empty() && Instant::now() < grace {
        users.retain(|s| s.using.lock().contains(&id));
        if !users.is_empty() {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    if users.is_empty() {
        return;
    }
    for s in &users {
        tracing::warn!(agent = %shared.agent, "TCP: a region was deregistered while a peer's frame used it; closing that connection");
        s.abort("a region its frame used was deregistered");
    }
    let start = Instant::now();
    let mut warned = false;
    for s in &users {
        while s.using.lock().contains(&id) {
            if !warned && start.elapsed() > Duration::from_secs(1) {
                warned = true;
                tracing::warn!(agent = %shared.agent, "TCP: deregister still waits for an aborted frame to let go of the region");
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// Accepts connections until the backend shuts the listener down.
pub(super) fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    for stream in listener.incoming() {
        if shared.closing.load(Ordering::Acquire) {
            break;
        }
        match stream {
            Ok(s) => {
                let Some((id, slot)) = admit(&shared, &s) else { continue };
                let sh = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("kvf-tcp-srv-{}", shared.agent))
                    .spawn(move || serve(sh, s, id, slot));
                match spawned {
                    Ok(h) => shared.track(h),
                    Err(e) => {
                        shared.conns.lock().remove(&id);
                        tracing::warn!(error = %e, "TCP: cannot spawn a connection thread; connection dropped")
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "TCP: accept failed");
                // EMFILE and friends: do not spin.
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// Applies the connection caps to a new connection: makes room by evicting
/// the oldest connections still in handshake where a cap is reached, or
/// refuses it (`None`: the stream is dropped, which closes it).
fn admit(shared: &Shared, s: &TcpStream) -> Option<(u64, Arc<Slot>)> {
    // The per-address cap counts sources (an IPv6 /64 is one host).
    let ip = crate::admission::source_of(
        s.peer_addr().map(|a| a.ip()).unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
    );
    let cfg = &shared.cfg;
    let mut conns = shared.conns.lock();
    // Oldest first: the handshakes to evict when a cap is reached.
    let mut pending: Vec<&Arc<Slot>> = conns.values().filter(|c| c.pending()).collect();
    pending.sort_by_key(|c| c.since);
    let live = conns.values().filter(|c| c.live()).count();
    let from_ip = conns.values().filter(|c| c.live() && c.ip == ip).count();
    let in_hs = pending.len();
    // Evicts the oldest handshake (from `ip` only, if `same_ip`); `Some(its address)`.
    let mut evict = |same_ip: bool, why: &str| -> Option<IpAddr> {
        while let Some(i) = pending.iter().position(|c| !same_ip || c.ip == ip) {
            let c = pending.remove(i);
            if c.evict(why) {
                return Some(c.ip);
            }
        }
        None
    };
    let refuse = |what: &str| {
        tracing::debug!(agent = %shared.agent, %ip, "TCP: connection refused: {what}");
    };
    // Each eviction below lowers every count it belongs to by one.
    let (mut live, mut from_ip, mut in_hs) = (live, from_ip, in_hs);
    if from_ip >= cfg.max_conns_per_ip {
        if evict(true, "max_conns_per_ip reached; oldest handshake dropped").is_none() {
            refuse("max_conns_per_ip connections from this address are authenticated");
            return None;
        }
        (live, from_ip, in_hs) = (live - 1, from_ip - 1, in_hs - 1);
    }
    if live >= cfg.max_conns {
        match evict(false, "max_conns reached; oldest handshake dropped") {
            None => {
                refuse("max_conns connections are authenticated");
                return None;
            }
            Some(_) => (live, in_hs) = (live - 1, in_hs - 1),
        }
    }
    if in_hs >= cfg.max_handshakes {
        evict(false, "max_handshakes reached; oldest handshake dropped");
    }
    let _ = (live, from_ip);
    let stream = s.try_clone().ok()?;
    let slot = Arc::new(Slot {
        stream,
        ip,
        since: Instant::now(),
        state: AtomicU8::new(PENDING),
        using: Mutex::new(Vec::new()),
        why: Mutex::new(None),
    });
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    conns.insert(id, slot.clone());
    Some((id, slot))
}

fn serve(shared: Arc<Shared>, stream: TcpStream, id: u64, slot: Arc<Slot>) {
    if shared.closing.load(Ordering::Acquire) {
        slot.abort("the TCP backend is shutting down");
    }
    let r = serve_conn(&shared, &stream, &slot);
    shared.conns.lock().remove(&id);
    if let Err(e) = r {
        match slot.why.lock().as_deref() {
            Some(why) => {
                tracing::debug!(agent = %shared.agent, ip = %slot.ip, reason = why, "TCP: incoming connection closed")
            }
            None => tracing::debug!(agent = %shared.agent, ip = %slot.ip, error = %e, "TCP: incoming connection ended"),
        }
    }
}

/// The budget of staging memory for frames on exported files, shared by
/// every connection of the backend.
pub(crate) struct Staging {
    cap: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

impl Staging {
    /// A budget of `cap` bytes.
    pub(crate) fn new(cap: u64) -> Staging {
        Staging { cap, used: Mutex::new(0), freed: Condvar::new() }
    }

    /// Takes `n` bytes of the budget if they are free now.
    fn try_take(&self, n: u64) -> bool {
        let mut u = self.used.lock();
        if *u + n <= self.cap {
            *u += n;
            true
        } else {
            false
        }
    }

    /// Takes `n` bytes, waiting for others to give some back until `deadline`.
    fn take_until(&self, n: u64, deadline: Instant) -> bool {
        let mut u = self.used.lock();
        while *u + n > self.cap {
            if self.freed.wait_until(&mut u, deadline).timed_out() && *u + n > self.cap {
                return false;
            }
        }
        *u += n;
        true
    }

    fn give(&self, n: u64) {
        let mut u = self.used.lock();
        *u = u.saturating_sub(n);
        self.freed.notify_all();
    }

    /// Bytes of the budget in use now.
    #[cfg(test)]
    fn used(&self) -> u64 {
        *self.used.lock()
    }
}

/// A staging buffer charged to the backend's [`Staging`] budget until dropped.
struct Staged<'a> {
    buf: crate::mem::AlignedBuf,
    budget: &'a Staging,
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        self.budget.give(self.buf.len() as u64);
    }
}

/// Per-connection state of the target.
struct ConnState<'a> {
    shared: &'a Shared,
    slot: &'a Slot,
    fd: RawFd,
    peer: Arc<str>,
    /// What this peer was served (counters shared by its connections).
    stats: Arc<super::served::PeerServed>,
    /// When the frame being handled started (its header was read).
    started: Instant,
    /// Bytes received and not handled yet.
    rx: sys::RecvBuf,
    spans: Vec<Span>,
    /// When the frame being handled must be complete.
    deadline: Instant,
    /// File operations started and not answered yet, and the order answers leave in.
    order: AnswerOrder<PendingFile<'a>>,
    /// Staging buffers to reuse (page-aligned for O_DIRECT), freed when the connection idles.
    spare: Vec<Staged<'a>>,
}

/// Bytes of file operations one connection holds, running or waiting to be
/// answered (its staging memory): beyond it, it answers before it starts more.
const FILE_HELD: u64 = 32 << 20;

/// How long a connection keeps its spare staging buffers without a frame.
const SPARE_KEEP: Duration = Duration::from_millis(20);

/// A file operation whose I/Os are running into (or from) its staging buffer.
struct PendingFile<'a> {
    op: u64,
    len: u64,
    /// When its frame started (for the serve time).
    started: Instant,
    job: Arc<crate::storage::Job>,
    /// The staging buffer; `None` once handed back.
    buf: Option<Staged<'a>>,
}

impl Drop for PendingFile<'_> {
    fn drop(&mut self) {
        // The kernel may still write into the buffer: wait until no I/O is in flight.
        if self.buf.is_some() {
            self.job.cancel();
        }
    }
}

/// A staging buffer for a file frame of `len` bytes: huge pages from one
/// huge page up, which halve the cost of O_DIRECT on large frames.
fn staging_buf(len: usize) -> crate::Result<crate::mem::AlignedBuf> {
    if len >= crate::mem::HUGE_PAGE {
        crate::mem::AlignedBuf::huge(len)
    } else {
        crate::mem::AlignedBuf::new(len.max(1))
    }
}

/// An `on_timeout` for a read that must end by `deadline`.
fn until(deadline: Instant) -> impl FnMut() -> io::Result<()> {
    move || {
        if Instant::now() >= deadline {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the initiator did not send the whole frame in time (peer_timeout plus 1 s per 16 MiB)",
            ))
        } else {
            Ok(())
        }
    }
}

/// The live tables, each looked up under its own lock: for the routing
/// hint ([`state::turn`]), which decides nothing about access.
struct Live<'a>(&'a Shared);

impl Tables for Live<'_> {
    fn memory(&self, key: &AccessKey) -> Option<MemRegion> {
        self.0.regions.read().get(key).copied()
    }
    fn is_file(&self, key: &AccessKey) -> bool {
        self.0.files.serves(key)
    }
}

/// The tables as one frame is resolved: the memory table stays locked for
/// the whole check (and while the frame publishes the regions it uses).
struct Locked<'a> {
    regions: &'a HashMap<AccessKey, MemRegion>,
    files: &'a FileServer,
}

impl Tables for Locked<'_> {
    fn memory(&self, key: &AccessKey) -> Option<MemRegion> {
        self.regions.get(key).copied()
    }
    fn is_file(&self, key: &AccessKey) -> bool {
        self.files.serves(key)
    }
}

/// Plans a file frame whose framing [`state::file_entries`] checks: the
/// storage plan must accept every entry (a live exported file region,
/// access, bounds, O_DIRECT alignment). The plan's memory addresses are
/// offsets into the frame's staging buffer, entries back to back.
fn plan_file_frame(op: XferOp, h: &Header, table: &[u8], files: &FileServer) -> Result<Plan, ProtoError> {
    let entries =
        state::file_entries(h, table)?.map(|e| storage::Entry { key: e.key, offset: e.offset, len: e.len, buf: e.buf });
    files.plan(op, entries).map_err(|e| state::storage_refusal(&e))
}

fn serve_conn(shared: &Shared, stream: &TcpStream, slot: &Slot) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    stream.set_nodelay(shared.cfg.nodelay)?;
    sys::set_buffers(fd, shared.cfg.sockbuf)?;
    stream.set_write_timeout(Some(shared.peer_timeout))?;
    let hello = handshake(shared, stream, slot)?;
    // Silence is judged twice per peer timeout (frame deadlines, idle timeout).
    stream.set_read_timeout(Some(shared.peer_timeout / 2))?;
    let mut s = ConnState {
        shared,
        slot,
        fd,
        peer: hello.name.as_str().into(),
        stats: shared.served.for_peer(&hello.name),
        started: Instant::now(),
        rx: sys::RecvBuf::new(RECV_BUF),
        spans: Vec::new(),
        deadline: Instant::now(),
        order: AnswerOrder::new(FILE_HELD),
        spare: Vec::new(),
    };
    s.serve_frames()
}

/// Reads the hello (whole, within `connect_timeout`), checks it, and
/// answers WELCOME, or the refusal with its status before the connection
/// closes. The connection is no longer evictable once the hello passed.
fn handshake(shared: &Shared, stream: &TcpStream, slot: &Slot) -> io::Result<Hello> {
    let fd = stream.as_raw_fd();
    // A deadline, not a per-read timeout: a hello dribbled byte by byte is cut.
    let hs_deadline = Instant::now() + shared.connect_timeout;
    stream.set_read_timeout(Some((shared.connect_timeout / 4).max(Duration::from_millis(5))))?;
    let mut fail = move || {
        if Instant::now() >= hs_deadline {
            Err(io::Error::new(io::ErrorKind::TimedOut, "the hello did not arrive whole within connect_timeout"))
        } else {
            Ok(())
        }
    };
    let mut fixed = [0u8; HELLO_FIXED];
    sys::read_buf(fd, &mut fixed, &mut fail)?;
    let refuse = |status: Status, message: String| -> io::Result<Hello> {
        let w = welcome(shared, status, message.clone());
        let _ = sys::write_bufs(fd, &[&w]);
        Err(io::Error::new(io::ErrorKind::PermissionDenied, message))
    };
    let rest = match Hello::rest_len(&fixed) {
        Ok(n) => n,
        Err(e) => return refuse(e.status, e.message),
    };
    let mut all = vec![0u8; HELLO_FIXED + rest];
    all[..HELLO_FIXED].copy_from_slice(&fixed);
    sys::read_buf(fd, &mut all[HELLO_FIXED..], &mut fail)?;
    let hello = match Hello::decode(&all) {
        Ok(h) => h,
        Err(e) => return refuse(e.status, e.message),
    };
    if let Err(e) = hello.check(shared.instance, shared.auth_token.as_ref()) {
        // Debug-escaped: a name that failed the check may hold control characters.
        tracing::warn!(agent = %shared.agent, peer = ?hello.name, reason = ?e.message, "TCP: connection refused");
        return refuse(e.status, e.message);
    }
    // Authenticated from here on: no longer evictable as a pending handshake.
    if slot.state.compare_exchange(PENDING, AUTHED, Ordering::AcqRel, Ordering::Acquire).is_err() {
        return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "evicted during the handshake"));
    }
    sys::write_bufs(fd, &[&welcome(shared, Status::Ok, String::new())])?;
    Ok(hello)
}

/// The target's receive buffer: a whole entry table plus 64 KiB of payload,
/// so a small frame arrives in one read and a large one costs one small copy.
const RECV_BUF: usize = HEADER_LEN + proto::MAX_ENTRIES as usize * proto::ENTRY_LEN + (64 << 10);

fn welcome(shared: &Shared, status: Status, message: String) -> Vec<u8> {
    let mut out = Vec::new();
    Welcome {
        version: proto::VERSION,
        status,
        caps: proto::CAPS,
        instance: shared.instance,
        name: shared.agent.to_string(),
        message,
    }
    .encode(&mut out);
    out
}

impl<'a> ConnState<'a> {
    /// A staging buffer of at least `len` bytes, charged to the shared
    /// budget: a spare one, or a new one once there is room — made by
    /// freeing this connection's spares, then answering its pending
    /// operations, then waiting (until the frame's deadline) for other
    /// connections to give some back.
    fn staging(&mut self, len: usize) -> Result<Staged<'a>, ProtoError> {
        if let Some(i) = self.spare.iter().position(|b| b.buf.len() >= len) {
            return Ok(self.spare.swap_remove(i));
        }
        let budget = &self.shared.staging;
        let full = |cap: u64| ProtoError {
            status: Status::Storage,
            message: format!(
                "the target's staging memory for file frames (staging_max = {cap} bytes, shared by all \
                 connections) stayed full for the frame's time; retry later or use smaller frames"
            ),
        };
        if len as u64 > budget.cap {
            return Err(ProtoError {
                status: Status::Invalid,
                message: format!(
                    "a file frame of {len} bytes is larger than the target's staging memory (staging_max = {} \
                     bytes); use a smaller frame_max on the initiator",
                    budget.cap
                ),
            });
        }
        self.spare.clear();
        let mut got = budget.try_take(len as u64);
        if !got && !self.order.is_empty() {
            self.flush_pending(usize::MAX)
                .map_err(|e| ProtoError { status: Status::Storage, message: e.to_string() })?;
            self.spare.clear();
            got = budget.try_take(len as u64);
        }
        if !got && !budget.take_until(len as u64, self.deadline) {
            return Err(full(budget.cap));
        }
        match staging_buf(len) {
            Ok(buf) => {
                // The budget was charged for `len`; charge what was allocated.
                let extra = buf.len() as u64 - len as u64;
                if extra > 0 {
                    *budget.used.lock() += extra;
                }
                Ok(Staged { buf, budget })
            }
            Err(e) => {
                budget.give(len as u64);
                Err(ProtoError { status: Status::Storage, message: e.to_string() })
            }
        }
    }

    /// A frame on exported files: WRITE payloads land in a staging buffer and
    /// go to the files; READ data comes from the files through one. `plan`
    /// holds the frame's checked I/Os, addressed from the buffer's start. Operations are
    /// pipelined: up to [`FILE_HELD`] bytes of them are started ahead and
    /// answered in order, so the disk works on the next frames while earlier
    /// data goes out (READ) or the next payload comes in (WRITE). An answer
    /// goes out only once its I/O finished: a WRITE is acknowledged when its
    /// bytes are in the file.
    fn file_op(&mut self, h: &Header, tlen: usize, plan: Plan) -> io::Result<()> {
        self.rx.consume(tlen);
        let len = h.len as usize;
        let mut staging = match self.staging(len) {
            Ok(b) => b,
            Err(e) => {
                if h.ty == FrameType::Write {
                    self.rx.discard(self.fd, h.len, &mut until(self.deadline))?;
                }
                // Answers go out in order: earlier operations first.
                self.flush_pending(usize::MAX)?;
                return self.send_error(h.op, &e);
            }
        };
        let ptr = staging.buf.as_mut_ptr();
        if h.ty == FrameType::Write {
            // SAFETY: the staging buffer is owned here and holds at least `len` bytes.
            unsafe { self.rx.read_spans(self.fd, &[(ptr as u64, h.len)], h.len, &mut until(self.deadline))? };
        }
        // SAFETY: the staging buffer is page-aligned, holds at least `h.len`
        // bytes (the plan's entries add up to it), and lives in the pending
        // entry (or here) until the job is finished or cancelled.
        let started = unsafe { self.shared.files.start(plan, ptr) };
        let job = match started {
            Ok(job) => job,
            Err(e) => {
                self.spare.push(staging);
                self.flush_pending(usize::MAX)?;
                return self.send_error(h.op, &state::storage_refusal(&e));
            }
        };
        self.order.hold(h.len, PendingFile { op: h.op, len: h.len, started: self.started, job, buf: Some(staging) });
        Ok(())
    }

    /// Answers up to `n` held file operations, oldest first.
    fn flush_pending(&mut self, n: usize) -> io::Result<()> {
        for _ in 0..n {
            let Some(p) = self.order.next() else { break };
            self.answer(p)?;
        }
        Ok(())
    }

    /// Waits for one file operation and sends its answer (ACK, DATA or ERROR).
    fn answer(&mut self, mut p: PendingFile<'a>) -> io::Result<()> {
        let r = FileServer::finish(&p.job);
        // Finished (or cancelled): no I/O touches the buffer any more.
        let buf = p.buf.take();
        if r.is_ok() {
            self.stats.served(p.job.is_write(), p.len, p.started.elapsed());
        }
        let sent = match r {
            Err(e) => self.send_error(p.op, &state::storage_refusal(&e)),
            Ok(()) if p.job.is_write() => {
                sys::write_bufs(self.fd, &[&Header::new(FrameType::Ack, p.op, 0, 0).encode()])
            }
            Ok(()) => {
                let head = Header::new(FrameType::Data, p.op, 0, p.len).encode();
                let data = buf.as_ref().map(|b| &b.buf.as_slice()[..p.len as usize]).unwrap_or(&[]);
                let spans = [(head.as_ptr() as u64, HEADER_LEN as u64), (data.as_ptr() as u64, data.len() as u64)];
                let deadline = Instant::now() + frame_budget(self.shared.peer_timeout, p.len);
                // SAFETY: both spans are local buffers borrowed for the call.
                unsafe { sys::writev_until(self.fd, &spans, Some(deadline)) }
            }
        };
        if let Some(b) = buf {
            self.spare.push(b);
        }
        sent
    }

    fn send_error(&self, op: u64, e: &ProtoError) -> io::Result<()> {
        self.stats.refused();
        let msg = format!("agent '{}': {}", self.shared.agent, e.message);
        let msg = &msg.as_bytes()[..msg.len().min(proto::MAX_ERROR_MSG as usize)];
        let h = Header { ty: FrameType::Error, status: e.status, count: 0, op, len: msg.len() as u64 };
        sys::write_bufs(self.fd, &[&h.encode(), msg])
    }

    /// The key of a data frame's entry 0 (read in for it), for the routing
    /// hint; `None` for other frames.
    fn entry0(&mut self, h: &Header) -> io::Result<Option<AccessKey>> {
        if !matches!(h.ty, FrameType::Write | FrameType::Read) || h.count == 0 {
            return Ok(None);
        }
        self.rx.fill_to(self.fd, h.entries_len().min(proto::ENTRY_LEN), &mut until(self.deadline))?;
        Ok(proto::Entry::decode(self.rx.bytes(), 0).map(|e| e.key))
    }

    /// Refuses a checked frame: skips its payload and answers ERROR.
    fn refuse(&mut self, h: &Header, tlen: usize, e: &ProtoError) -> io::Result<()> {
        self.rx.consume(tlen);
        if h.ty == FrameType::Write {
            self.rx.discard(self.fd, h.len, &mut until(self.deadline))?;
        }
        tracing::debug!(agent = %self.shared.agent, peer = ?self.peer, reason = %e, "TCP: refused a frame");
        // Answers go out in request order: file operations started before
        // this frame are answered first (found by tests/tcp_model.rs).
        self.flush_pending(usize::MAX)?;
        self.send_error(h.op, e)
    }

    /// Serves frames until the connection ends (an error says how).
    fn serve_frames(&mut self) -> io::Result<()> {
        let mut last_frame = Instant::now();
        loop {
            self.between_frames()?;
            let hb = self.read_header(last_frame)?;
            let h = match Header::decode(&hb) {
                Ok(h) => h,
                Err(e) => {
                    self.send_error(Header::raw_op(&hb), &e)?;
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e.message));
                }
            };
            last_frame = Instant::now();
            self.started = last_frame;
            // The whole frame (entries and payload) must arrive by then.
            self.deadline = last_frame + frame_budget(self.shared.peer_timeout, h.len);
            self.dispatch(&h)?;
        }
    }

    /// With file operations held: starts the next frame as soon as its
    /// header is in and there is room, else answers the oldest (waiting for
    /// it if need be); starting comes first, so that the disk gets new work
    /// the moment earlier I/O finishes, not after the answers went out.
    /// Then polls briefly for the next frame before sleeping (a thread woken
    /// from sleep costs more than a small frame) and, going quiet, gives the
    /// spare staging buffers back to the shared budget.
    fn between_frames(&mut self) -> io::Result<()> {
        let fd = self.fd;
        while !self.order.is_empty() {
            if self.rx.bytes().len() < HEADER_LEN {
                match self.rx.fill_once(fd, true) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if self.rx.bytes().len() >= HEADER_LEN && self.order.room() {
                break;
            }
            self.flush_pending(1)?;
        }
        let spin_until = Instant::now() + self.shared.cfg.busy_poll;
        while self.rx.bytes().len() < HEADER_LEN && Instant::now() < spin_until {
            match self.rx.fill_once(fd, true) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => return Err(e),
            }
        }
        if !self.spare.is_empty()
            && self.rx.bytes().len() < HEADER_LEN
            && !sys::wait_ready(fd, true, None, SPARE_KEEP).data
        {
            self.spare.clear();
        }
        Ok(())
    }

    /// Reads the next frame's header, waiting between frames up to
    /// `idle_timeout` after the last one, or as long as the backend lives.
    /// One read takes the header and whatever follows it (a small frame whole).
    fn read_header(&mut self, last_frame: Instant) -> io::Result<[u8; HEADER_LEN]> {
        let shared = self.shared;
        let mut idle = || {
            if shared.closing.load(Ordering::Acquire) {
                return Err(io::Error::other("backend closing"));
            }
            match shared.cfg.idle_timeout {
                Some(t) if last_frame.elapsed() >= t => {
                    tracing::debug!(agent = %shared.agent, "TCP: closing a connection idle for idle_timeout_s");
                    Err(io::Error::new(io::ErrorKind::TimedOut, format!("no frame for {t:?} (idle_timeout_s)")))
                }
                _ => Ok(()),
            }
        };
        self.rx.fill_to(self.fd, HEADER_LEN, &mut idle)?;
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(&self.rx.bytes()[..HEADER_LEN]);
        self.rx.consume(HEADER_LEN);
        Ok(hb)
    }

    /// Handles one decoded frame as [`state`] decides: in turn after the
    /// held file answers or pipelined, then by its route.
    fn dispatch(&mut self, h: &Header) -> io::Result<()> {
        let entry0 = self.entry0(h)?;
        if state::turn(h, entry0.as_ref(), &Live(self.shared)) == Turn::AfterHeld {
            self.flush_pending(usize::MAX)?;
            // Staging is for runs of file frames: a connection doing other work
            // gives its spare buffers back to the shared budget.
            self.spare.clear();
        }
        match state::route(h) {
            Ok(Route::Data(op)) => self.data_op(op, h),
            Ok(Route::Notif) => self.notif(h),
            Err(e) => {
                self.send_error(h.op, &e)?;
                Err(io::Error::new(io::ErrorKind::InvalidData, e.message))
            }
        }
    }

    /// Takes a notification. A full queue refuses it (counted by the sink).
    /// NOTIF frames have no answer, so the sender learns it the only way the
    /// protocol allows: the connection closes (it sees the peer lost and
    /// reconnects on its next request).
    fn notif(&mut self, h: &Header) -> io::Result<()> {
        // Header::decode bounded len to MAX_NOTIF.
        let mut msg = Vec::new();
        self.rx.read_vec(self.fd, &mut msg, h.len as usize, &mut until(self.deadline))?;
        if let Err(e) = self.shared.notifs.push(self.peer.clone(), msg) {
            tracing::warn!(agent = %self.shared.agent, peer = ?self.peer, reason = %e,
                "TCP: notification queue full for this sender; closing its connection");
            return Err(io::Error::other(format!("notification refused: {e}")));
        }
        Ok(())
    }

    /// A WRITE or READ: resolves its entry table (memory, files, or a
    /// refusal) and serves it.
    fn data_op(&mut self, op: XferOp, h: &Header) -> io::Result<()> {
        // Header::decode bounded the count, so the table fits the buffer.
        let tlen = h.entries_len();
        self.rx.fill_to(self.fd, tlen, &mut until(self.deadline))?;
        let shared = self.shared;
        let regions = shared.regions.read();
        let table = &self.rx.bytes()[..tlen];
        // Published under the table lock: a deregister that removes one of
        // these regions after this check finds this frame and aborts it.
        let mut ids = self.slot.using.lock();
        let tables = Locked { regions: &regions, files: &shared.files };
        let resolved = state::resolve(h, table, &tables, &mut self.spans, &mut ids);
        drop(ids);
        drop(regions);
        match resolved {
            Ok(Resolved::Memory) => self.memory_op(h, tlen),
            Ok(Resolved::Files) => match plan_file_frame(op, h, &self.rx.bytes()[..tlen], &shared.files) {
                Ok(plan) => self.file_op(h, tlen, plan),
                Err(e) => self.refuse(h, tlen, &e),
            },
            Err(e) => self.refuse(h, tlen, &e),
        }
    }

    /// Moves a memory frame's bytes (its spans resolved and published) and answers.
    fn memory_op(&mut self, h: &Header, tlen: usize) -> io::Result<()> {
        let _in_use = InUse(self.slot);
        self.rx.consume(tlen);
        if h.ty == FrameType::Write {
            // SAFETY: every span was just checked to lie inside a memory region
            // registered now, and this connection published the regions it uses
            // before the table lock was let go: `deregister` aborts this socket
            // and waits until `_in_use` clears them before the memory is freed.
            // The registrant agreed that peers may write registered memory at any time.
            unsafe { self.rx.read_spans(self.fd, &self.spans, h.len, &mut until(self.deadline))? };
            drop(_in_use);
            // Counted before the answer: a peer that saw its ACK sees the count.
            self.stats.served(true, h.len, self.started.elapsed());
            let ack = Header::new(FrameType::Ack, h.op, 0, 0);
            sys::write_bufs(self.fd, &[&ack.encode()])
        } else {
            let head = Header::new(FrameType::Data, h.op, 0, h.len).encode();
            self.spans.insert(0, (head.as_ptr() as u64, HEADER_LEN as u64));
            // SAFETY: as above for the checked spans (published, registered);
            // the first span is `head`, alive on this stack frame.
            unsafe { sys::writev_until(self.fd, &self.spans, Some(self.deadline))? };
            self.stats.served(false, h.len, self.started.elapsed());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_budget_is_shared_and_bounded() {
        let b = Staging::new(10);
        assert!(b.try_take(6));
        assert!(!b.try_take(5), "over the cap");
        assert!(!b.take_until(5, Instant::now() + Duration::from_millis(20)), "waits bounded, then refuses");
        std::thread::scope(|sc| {
            sc.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                b.give(6);
            });
            assert!(b.take_until(5, Instant::now() + Duration::from_secs(5)), "room given back by another thread");
        });
        assert_eq!(b.used(), 5);
    }
}
