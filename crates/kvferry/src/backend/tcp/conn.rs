//! The initiator side: peers, their lanes, and the connection driver.
//!
//! A [`Lane`] is one slot for a connection to a peer, with a worker thread
//! that writes queued frames. A [`Conn`] is one live connection: a writer
//! mutex (frames are written whole, one at a time), the FIFO of frames that
//! await an answer, and a read side (a receive buffer behind a mutex: the
//! token) whose holder takes answers in order, reads READ data straight into
//! registered memory and completes frames. The holder is the thread waiting
//! for a small request of its own when there is one (no thread hop), else the
//! connection's reader thread, which otherwise sleeps until it is kicked,
//! the waiter's hold lapses, or the peer hangs up.
//!
//! A connection dies on any I/O error, a protocol violation, or silence from
//! the peer for `peer_timeout` while a frame awaits its answer; every frame
//! it still owes then fails with `RemoteDisconnect`, and unless the local
//! side closed it on purpose the agent is told the peer is lost.
//!
//! Which answer the oldest frame owed accepts is decided by
//! `state::Awaiting`; this file moves the bytes.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::posting::{Copier, XferShared};
use super::proto::{self, FrameType, Header, Hello, Status, Welcome, HEADER_LEN, WELCOME_FIXED};
use super::state::{self, Answer, Awaiting, Expect};
use super::Shared;
use crate::error::{Error, ErrorKind, Result};
use crate::sys;
use crate::types::XferOp;

/// A loaded peer: where to dial it and its lanes.
pub(super) struct Peer {
    pub(super) name: Arc<str>,
    pub(super) instance: u64,
    pub(super) addrs: Vec<SocketAddr>,
    pub(super) lanes: Vec<Lane>,
    pub(super) closed: AtomicBool,
    /// Round-robin lane choice for requests that use one lane.
    pub(super) rr: AtomicUsize,
}

/// Work for a lane's worker thread.
pub(super) enum Job {
    /// Send frame `frame` of the posting `gen` of a request.
    Frame { x: Arc<XferShared>, gen: u64, frame: u32 },
    /// Send the notification of posting `gen`, then complete it.
    Notif { x: Arc<XferShared>, gen: u64 },
}

/// One connection slot of a peer.
pub(super) struct Lane {
    idx: usize,
    conn: Mutex<Option<Arc<Conn>>>,
    /// Serializes connection attempts.
    connecting: Mutex<()>,
    jobs: Mutex<VecDeque<Job>>,
    jobs_cv: Condvar,
    worker: AtomicBool,
}

/// Frames a connection still owes answers for, and whether it is dead.
struct PendingQueue {
    q: Awaiting<PendingFrame>,
    dead: Option<Error>,
    /// Until then the reader thread leaves answers to a thread waiting for a
    /// small request of its own (set by a direct post, renewed while that
    /// thread reads; `None`: the reader thread reads whatever is owed).
    hold_until: Option<Instant>,
    /// The reader thread sleeps and must be kicked to read.
    reader_idle: bool,
}

/// How long answers are left to the thread that posted a small request
/// before the reader thread takes over (renewed while that thread reads).
const DIRECT_HOLD: Duration = Duration::from_micros(500);

/// The initiator's receive buffer: any answer but DATA fits whole.
const RX_BUF: usize = 64 << 10;

/// What one step of reading answers found.
pub(super) enum Step {
    /// One answer was read and its frame completed.
    Handled,
    /// No whole header has arrived yet.
    Empty,
    /// The next answer is a large DATA frame, left to the reader thread.
    Big,
}

/// A frame written (or being written) that awaits its answer.
pub(super) struct PendingFrame {
    pub(super) x: Arc<XferShared>,
    pub(super) gen: u64,
    pub(super) frame: u32,
    /// When the frame was last fully handed to the socket.
    sent_at: Instant,
}

/// One live connection to a peer.
pub(super) struct Conn {
    stream: TcpStream,
    addr: SocketAddr,
    /// Held while one frame is written, so frames never interleave.
    writer: Mutex<()>,
    pending: Mutex<PendingQueue>,
    /// The read side: whoever holds it reads answers, in order — the reader
    /// thread, or a thread waiting for a small request of its own (no thread hop).
    rx: Mutex<sys::RecvBuf>,
    /// Wakes the reader thread when answers are owed that nobody else reads.
    kick: sys::EventFd,
    /// Closed by this side (unload, shutdown, cancel): not a lost peer.
    by_us: AtomicBool,
}

impl Peer {
    pub(super) fn new(name: Arc<str>, instance: u64, addrs: Vec<SocketAddr>, lanes: usize) -> Peer {
        Peer {
            name,
            instance,
            addrs,
            lanes: (0..lanes)
                .map(|idx| Lane {
                    idx,
                    conn: Mutex::new(None),
                    connecting: Mutex::new(()),
                    jobs: Mutex::new(VecDeque::new()),
                    jobs_cv: Condvar::new(),
                    worker: AtomicBool::new(false),
                })
                .collect(),
            closed: AtomicBool::new(false),
            rr: AtomicUsize::new(0),
        }
    }

    /// Closes every connection and stops the workers; queued and in-flight
    /// frames fail with `RemoteDisconnect` naming `why`.
    pub(super) fn close(&self, why: &str) {
        self.closed.store(true, Ordering::Release);
        let err = Error::disconnected(format!("TCP: connection to agent '{}' closed: {why}", self.name));
        for lane in &self.lanes {
            if let Some(c) = lane.conn.lock().take() {
                c.by_us.store(true, Ordering::Release);
                c.fail(err.clone());
            }
            let _g = lane.jobs.lock();
            lane.jobs_cv.notify_all();
        }
    }

    /// Tells the agent the peer is gone (unless this side closed it).
    /// `in_flight`: whether a frame was owed or being sent when the
    /// connection died. Only then did work fail, so only then is it a
    /// warning; a peer that leaves while idle (its process ended, the usual
    /// way a NIXL program finishes) is logged at info.
    fn lost(&self, shared: &Shared, in_flight: bool) {
        if !self.closed.load(Ordering::Acquire) && !shared.closing.load(Ordering::Acquire) {
            if in_flight {
                tracing::warn!(agent = %shared.agent, peer = %self.name, "TCP: peer lost with requests in flight");
            } else {
                tracing::info!(agent = %shared.agent, peer = %self.name, "TCP: peer closed its connection while idle");
            }
            shared.events.peer_lost(&self.name, self.instance);
        }
    }
}

impl Lane {
    /// The live connection, if there is one.
    pub(super) fn current(&self) -> Option<Arc<Conn>> {
        self.conn.lock().as_ref().filter(|c| c.pending.lock().dead.is_none()).cloned()
    }

    /// Whether no job waits for the worker.
    pub(super) fn idle(&self) -> bool {
        self.jobs.lock().is_empty()
    }

    /// The live connection, opened now if there is none.
    pub(super) fn ensure(&self, shared: &Arc<Shared>, peer: &Arc<Peer>) -> Result<Arc<Conn>> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let _serial = self.connecting.lock();
        if let Some(c) = self.current() {
            return Ok(c);
        }
        if peer.closed.load(Ordering::Acquire) || shared.closing.load(Ordering::Acquire) {
            return Err(Error::disconnected(format!(
                "TCP: agent '{}' was unloaded (invalidated or lost); fetch its metadata again",
                peer.name
            )));
        }
        let c = match connect(shared, peer, self.idx) {
            Ok(c) => c,
            Err(e) => {
                if e.kind() == ErrorKind::RemoteDisconnect {
                    peer.lost(shared, true);
                }
                return Err(e);
            }
        };
        *self.conn.lock() = Some(c.clone());
        if peer.closed.load(Ordering::Acquire) {
            c.by_us.store(true, Ordering::Release);
            c.fail(Error::disconnected(format!("TCP: agent '{}' was unloaded", peer.name)));
        }
        Ok(c)
    }

    /// Queues jobs for the worker (started on first use).
    pub(super) fn push(&self, shared: &Arc<Shared>, peer: &Arc<Peer>, jobs: impl IntoIterator<Item = Job>) {
        {
            let mut q = self.jobs.lock();
            q.extend(jobs);
            self.jobs_cv.notify_one();
        }
        if !self.worker.swap(true, Ordering::AcqRel) {
            let (sh, p, idx) = (shared.clone(), peer.clone(), self.idx);
            let spawned = std::thread::Builder::new()
                .name(format!("kvf-tcp-lane{idx}-{}", peer.name))
                .spawn(move || worker(sh, p, idx));
            match spawned {
                Ok(h) => shared.track(h),
                Err(e) => {
                    self.worker.store(false, Ordering::Release);
                    let err = Error::io("TCP: cannot spawn a lane worker", e);
                    for job in self.jobs.lock().drain(..) {
                        job.fail(err.clone());
                    }
                }
            }
        }
    }
}

impl Job {
    fn fail(self, e: Error) {
        match self {
            Job::Frame { x, gen, .. } => x.frame_done(gen, Err(e)),
            Job::Notif { x, gen } => x.finish(gen, Err(e)),
        }
    }
}

fn worker(shared: Arc<Shared>, peer: Arc<Peer>, idx: usize) {
    let lane = &peer.lanes[idx];
    loop {
        let job = {
            let mut q = lane.jobs.lock();
            loop {
                if peer.closed.load(Ordering::Acquire) || shared.closing.load(Ordering::Acquire) {
                    let err = Error::disconnected(format!("TCP: agent '{}' was unloaded", peer.name));
                    for job in q.drain(..) {
                        job.fail(err.clone());
                    }
                    return;
                }
                if let Some(j) = q.pop_front() {
                    break j;
                }
                lane.jobs_cv.wait_for(&mut q, Duration::from_secs(1));
            }
        };
        match job {
            Job::Frame { x, gen, frame } => {
                if !x.live(gen) {
                    x.frame_done(gen, Err(Error::new(ErrorKind::Canceled, "canceled")));
                    continue;
                }
                match lane.ensure(&shared, &peer) {
                    Ok(c) => c.send_frame(&shared, &peer, &x, gen, frame, false),
                    Err(e) => x.frame_done(gen, Err(e)),
                }
            }
            Job::Notif { x, gen } => {
                let Some(msg) = x.notif_for(gen) else { continue };
                let r = send_notif(&shared, &peer, &msg);
                x.finish(gen, r);
            }
        }
    }
}

/// Sends a notification on lane 0 (the same lane for every notification
/// of a peer, so they arrive in the order they were sent).
pub(super) fn send_notif(shared: &Arc<Shared>, peer: &Arc<Peer>, msg: &[u8]) -> Result<()> {
    let c = peer.lanes[0].ensure(shared, peer)?;
    let h = Header::new(FrameType::Notif, 0, 0, msg.len() as u64);
    let _w = c.writer.lock();
    if let Some(e) = &c.pending.lock().dead {
        return Err(e.clone());
    }
    sys::write_bufs(c.fd(), &[&h.encode(), msg]).map_err(|e| {
        let err = c.io_error(peer, "sending a notification", e);
        c.fail(err.clone());
        peer.lost(shared, true);
        err
    })
}

/// Dials the peer (each published address in turn), shakes hands and starts the reader.
fn connect(shared: &Arc<Shared>, peer: &Arc<Peer>, lane: usize) -> Result<Arc<Conn>> {
    let (stream, addr) = dial(shared, peer)?;
    let fd = stream.as_raw_fd();
    let setup = |what: &str, e: io::Error| Error::io(format!("TCP: {what} on the connection to {addr}"), e);
    stream.set_nodelay(shared.cfg.nodelay).map_err(|e| setup("TCP_NODELAY", e))?;
    sys::set_buffers(fd, shared.cfg.sockbuf).map_err(|e| setup("socket buffers", e))?;
    stream.set_read_timeout(Some(shared.connect_timeout)).map_err(|e| setup("read timeout", e))?;
    stream.set_write_timeout(Some(shared.peer_timeout)).map_err(|e| setup("write timeout", e))?;
    handshake(shared, peer, fd, addr, lane)?;
    // Silence while answers are owed is judged against peer_timeout; wake
    // twice per timeout to judge it.
    stream.set_read_timeout(Some(shared.peer_timeout / 2)).map_err(|e| setup("read timeout", e))?;
    let c = Arc::new(Conn {
        stream,
        addr,
        writer: Mutex::new(()),
        pending: Mutex::new(PendingQueue { q: Awaiting::default(), dead: None, hold_until: None, reader_idle: false }),
        rx: Mutex::new(sys::RecvBuf::new(RX_BUF)),
        kick: sys::EventFd::new().map_err(|e| setup("eventfd", e))?,
        by_us: AtomicBool::new(false),
    });
    let (sh, p, cc) = (shared.clone(), peer.clone(), c.clone());
    let h = std::thread::Builder::new()
        .name(format!("kvf-tcp-rd{lane}-{}", peer.name))
        .spawn(move || reader(sh, p, cc))
        .map_err(|e| Error::io("TCP: cannot spawn a reader thread", e))?;
    shared.track(h);
    tracing::debug!(agent = %shared.agent, peer = %peer.name, %addr, lane, "TCP: connected");
    Ok(c)
}

/// A connection to the first of the peer's published addresses that answers.
fn dial(shared: &Shared, peer: &Peer) -> Result<(TcpStream, SocketAddr)> {
    let mut tried = Vec::new();
    for a in &peer.addrs {
        match TcpStream::connect_timeout(a, shared.connect_timeout) {
            Ok(s) => return Ok((s, *a)),
            Err(e) => tried.push(format!("{a}: {e}")),
        }
    }
    Err(Error::disconnected(format!(
        "TCP: cannot connect to agent '{}' ({}); is it running, and is the port open? (connect timeout {:?})",
        peer.name,
        tried.join("; "),
        shared.connect_timeout
    )))
}

/// Says HELLO and checks the WELCOME: it must arrive whole within the
/// connect timeout (a deadline, not a per-read timeout: a target that
/// dribbles it is cut off), accept the connection, and come from the agent
/// and instance whose metadata was loaded.
fn handshake(shared: &Shared, peer: &Peer, fd: RawFd, addr: SocketAddr, lane: usize) -> Result<()> {
    let mut hello = Vec::new();
    Hello {
        version: proto::VERSION,
        caps: proto::CAPS,
        instance: shared.instance,
        expect_instance: peer.instance,
        name: shared.agent.to_string(),
        token: shared.auth_token.as_ref().map(|t| t.as_bytes().to_vec()).unwrap_or_default(),
    }
    .encode(&mut hello);
    let hs = |e: io::Error| {
        Error::io(format!("TCP: handshake with agent '{}' at {addr} (lane {lane})", peer.name), e)
            .context("the peer accepted the connection but did not complete the handshake")
    };
    sys::write_bufs(fd, &[&hello]).map_err(hs)?;
    let hs_deadline = Instant::now() + shared.connect_timeout;
    let mut timeout = || {
        if Instant::now() >= hs_deadline {
            Err(io::Error::new(io::ErrorKind::TimedOut, "no whole answer within the connect timeout"))
        } else {
            Ok(())
        }
    };
    let mut fixed = [0u8; WELCOME_FIXED];
    sys::read_buf(fd, &mut fixed, &mut timeout).map_err(hs)?;
    let rest = Welcome::rest_len(&fixed).map_err(|e| Error::from(e).context(format!("TCP: {addr}")))?;
    let mut all = vec![0u8; WELCOME_FIXED + rest];
    all[..WELCOME_FIXED].copy_from_slice(&fixed);
    sys::read_buf(fd, &mut all[WELCOME_FIXED..], &mut timeout).map_err(hs)?;
    let w = Welcome::decode(&all).map_err(|e| Error::from(e).context(format!("TCP: {addr}")))?;
    if w.status != Status::Ok {
        return Err(Error::new(
            w.status.error_kind(),
            format!("TCP: agent '{}' at {addr} refused the connection: {}", peer.name, w.message),
        ));
    }
    if w.name != *peer.name || w.instance != peer.instance {
        return Err(Error::disconnected(format!(
            "TCP: {addr} is agent '{}' (instance {:#x}), not the loaded agent '{}' (instance {:#x}); fetch fresh metadata",
            w.name, w.instance, peer.name, peer.instance
        )));
    }
    Ok(())
}

impl Conn {
    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn io_error(&self, peer: &Peer, what: &str, e: io::Error) -> Error {
        let mut err = Error::io(format!("TCP: {what} to/from agent '{}' at {}", peer.name, self.addr), e);
        if matches!(err.kind(), ErrorKind::Timeout | ErrorKind::Backend) {
            // Any broken connection means the peer is unreachable for this request.
            err = Error::disconnected(err.message().to_string());
        }
        err
    }

    /// Marks the connection dead, shuts it down, and fails every frame it owes.
    pub(super) fn fail(&self, err: Error) {
        let drained: Vec<PendingFrame> = {
            let mut p = self.pending.lock();
            if p.dead.is_none() {
                p.dead = Some(err.clone());
            }
            p.q.drain().collect()
        };
        sys::shutdown(self.fd());
        for f in drained {
            f.x.frame_done(f.gen, Err(err.clone()));
        }
    }

    /// Writes frame `frame` of posting `gen`, recording it as awaiting an answer.
    pub(super) fn send_frame(
        self: &Arc<Self>,
        shared: &Shared,
        peer: &Peer,
        x: &Arc<XferShared>,
        gen: u64,
        frame: u32,
        direct: bool,
    ) {
        let plan = &x.frames[frame as usize];
        let _w = self.writer.lock();
        // WRITE reads local memory while sending: hold the request's access guard.
        let guard = match x.op {
            XferOp::Write => match x.enter(gen, self) {
                Some(g) => Some(g),
                None => {
                    drop(_w);
                    return x.frame_done(gen, Err(Error::new(ErrorKind::Canceled, "canceled")));
                }
            },
            XferOp::Read => None,
        };
        {
            let mut p = self.pending.lock();
            if let Some(e) = &p.dead {
                let e = e.clone();
                drop(p);
                drop(guard);
                drop(_w);
                return x.frame_done(gen, Err(e));
            }
            let now = Instant::now();
            let expect = Expect { op: plan.op, xfer: x.op, bytes: plan.bytes };
            p.q.push(expect, PendingFrame { x: x.clone(), gen, frame, sent_at: now });
            if direct {
                p.hold_until = Some(now + DIRECT_HOLD);
            } else {
                p.hold_until = None;
                if p.reader_idle {
                    p.reader_idle = false;
                    self.kick.signal();
                }
            }
        }
        // SAFETY: the first span is the frame's own header buffer, owned by `x`;
        // for WRITE the others are local ranges the agent checked to lie in
        // registered memory, and the access guard keeps a cancel from returning
        // while they are read.
        let r = unsafe { sys::writev_all(self.fd(), x.send_spans(plan)) };
        drop(guard);
        match r {
            Ok(()) => {
                let mut p = self.pending.lock();
                if let Some((_, f)) = p.q.newest_mut().filter(|(e, f)| e.op == plan.op && f.gen == gen) {
                    f.sent_at = Instant::now();
                }
            }
            Err(e) => {
                let err = self.io_error(peer, "sending data", e);
                drop(_w);
                self.fail(err);
                if !self.by_us.load(Ordering::Acquire) {
                    peer.lost(shared, true);
                }
            }
        }
    }
}

impl Copier for Conn {
    /// Closes the connection from this side (to stop a copy for a cancel).
    fn abort(&self, why: &str) {
        self.by_us.store(true, Ordering::Release);
        self.fail(Error::disconnected(format!("TCP: connection to {} closed: {why}; post again", self.addr)));
    }
}

/// The reader thread of a connection: sleeps while nothing is owed (or a
/// waiting thread reads its own answers), reads answers otherwise, and
/// notices a peer that hangs up even when idle.
fn reader(shared: Arc<Shared>, peer: Arc<Peer>, c: Arc<Conn>) {
    if let Err(e) = reader_loop(&shared, &peer, &c) {
        c.die(&shared, &peer, e);
    }
}

fn reader_loop(shared: &Shared, peer: &Peer, c: &Arc<Conn>) -> Result<()> {
    let fd = c.fd();
    let pt = shared.peer_timeout;
    loop {
        // Sleep until answers are owed that no waiting thread reads itself.
        let sleep = {
            let mut p = c.pending.lock();
            if p.dead.is_some() {
                return Ok(());
            }
            let now = Instant::now();
            let sleep = match (p.q.is_empty(), p.hold_until) {
                (true, _) => Some(pt / 2),
                (false, Some(t)) if t > now => Some(t - now),
                (false, _) => {
                    p.hold_until = None;
                    None
                }
            };
            p.reader_idle = sleep.is_some();
            sleep
        };
        let mut hup = false;
        if let Some(t) = sleep {
            // Only a hang-up or a kick wakes it: answers read by others do not.
            let r = sys::wait_ready(fd, false, Some(&c.kick), t);
            if r.kick {
                c.kick.clear();
            }
            c.pending.lock().reader_idle = false;
            if !r.hup {
                continue;
            }
            hup = true;
        }
        let mut rx = c.rx.lock();
        loop {
            {
                let p = c.pending.lock();
                if p.dead.is_some() {
                    return Ok(());
                }
                if !hup && p.q.is_empty() {
                    break;
                }
            }
            match c.read_next(shared, peer, &mut rx, false)? {
                Step::Handled | Step::Big => {}
                Step::Empty => {
                    // Nothing arrived and a thread waits for its own small request:
                    // leave the connection to it.
                    if !hup && c.pending.lock().hold_until.is_some_and(|t| t > Instant::now()) {
                        break;
                    }
                    // After a hang-up the read above ends in an error; until then, wait for bytes.
                    let r = sys::wait_ready(fd, true, None, pt / 2);
                    if !r.data && !r.hup {
                        c.check_silence(shared, peer)?;
                    }
                    hup = r.hup;
                }
            }
        }
    }
}

impl Conn {
    /// Reads and handles the next answer if its header has arrived
    /// (`Empty` otherwise; the rest of a frame is waited for, bounded by the
    /// peer timeout). `direct`: the caller waits for a small request of its
    /// own, and leaves a large DATA frame to the reader thread (`Big`).
    /// An error means the connection is broken; the frame read is failed.
    pub(super) fn read_next(
        self: &Arc<Self>,
        shared: &Shared,
        peer: &Peer,
        rx: &mut sys::RecvBuf,
        direct: bool,
    ) -> Result<Step> {
        let fd = self.fd();
        while rx.bytes().len() < HEADER_LEN {
            match rx.fill_once(fd, true) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Empty),
                Err(e) => return Err(self.io_error(peer, "reading", e)),
            }
        }
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(&rx.bytes()[..HEADER_LEN]);
        let h = Header::decode(&hb).map_err(|e| {
            Error::malformed(format!("TCP: agent '{}' at {} sent a bad frame: {}", peer.name, self.addr, e.message))
        })?;
        if direct && state::is_large(&h, shared.cfg.inline_max) {
            return Ok(Step::Big);
        }
        rx.consume(HEADER_LEN);
        let answered = self.pending.lock().q.answer(&h);
        let (answer, f) = match answered {
            Ok(a) => a,
            Err((unexpected, f)) => {
                let err = Error::malformed(format!("TCP: agent '{}' {unexpected}", peer.name));
                if let Some(f) = f {
                    f.x.frame_done(f.gen, Err(err.clone()));
                }
                return Err(err);
            }
        };
        // Outer error: the connection broke; inner: the frame's outcome.
        let r = self.read_answer(shared, peer, rx, &f, answer, h.len);
        match r {
            Ok(outcome) => {
                f.x.frame_done(f.gen, outcome);
                Ok(Step::Handled)
            }
            Err(e) => {
                f.x.frame_done(f.gen, Err(e.clone()));
                Err(e)
            }
        }
    }

    /// Reads what follows an accepted answer's header: READ data straight
    /// into the frame's local memory, or an ERROR's message. The answer's
    /// body must arrive whole within its budget, however it trickles in.
    fn read_answer(
        self: &Arc<Self>,
        shared: &Shared,
        peer: &Peer,
        rx: &mut sys::RecvBuf,
        f: &PendingFrame,
        answer: Answer,
        len: u64,
    ) -> Result<Result<()>> {
        let fd = self.fd();
        let x = &f.x;
        let body_deadline = Instant::now() + super::frame_budget(shared.peer_timeout, len);
        let mut silence = || -> io::Result<()> {
            if self.by_us.load(Ordering::Acquire) || shared.closing.load(Ordering::Acquire) {
                return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "closed locally"));
            }
            if Instant::now() >= body_deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the answer did not arrive whole in time (peer_timeout {:?} plus 1 s per 16 MiB)",
                        shared.peer_timeout
                    ),
                ));
            }
            Ok(())
        };
        match answer {
            Answer::Applied => Ok(Ok(())),
            Answer::Data { len } => {
                let plan = &x.frames[f.frame as usize];
                match x.enter(f.gen, self) {
                    // SAFETY: the pieces are local ranges the agent checked to lie in
                    // registered memory; the access guard keeps a cancel (and so the
                    // release of the request) from returning while they are written.
                    Some(_g) => unsafe { rx.read_spans(fd, x.recv_spans(plan), len, &mut silence) },
                    None => rx.discard(fd, len, &mut silence),
                }
                .map(Ok)
                .map_err(|e| self.io_error(peer, "reading data", e))
            }
            Answer::Refused { status, len } => {
                // Header::decode bounded len to MAX_ERROR_MSG.
                let mut msg = Vec::new();
                rx.read_vec(fd, &mut msg, len as usize, &mut silence).map_err(|e| self.io_error(peer, "reading", e))?;
                let text = String::from_utf8_lossy(&msg);
                Ok(Err(Error::new(status.error_kind(), format!("TCP: {} refused by the target: {text}", x.op))))
            }
        }
    }

    /// An error if the oldest frame owed has waited `peer_timeout` for its answer.
    fn check_silence(&self, shared: &Shared, peer: &Peer) -> Result<()> {
        let p = self.pending.lock();
        match p.q.oldest() {
            Some(f) if f.sent_at.elapsed() >= shared.peer_timeout => Err(Error::disconnected(format!(
                "TCP: no answer from agent '{}' at {} for {:?} (peer_timeout) while a request was in flight",
                peer.name, self.addr, shared.peer_timeout
            ))),
            _ => Ok(()),
        }
    }

    /// Reads answers for a thread waiting for its own small request, so the
    /// answer does not hop through the reader thread. Stops when `done()`,
    /// when nothing more has arrived (`deadline` is `None`: a poll) or at
    /// `deadline`. Answers of other requests met on the way are handled too.
    /// Returns `false` at once when another thread holds the read side.
    pub(super) fn read_direct(
        self: &Arc<Self>,
        shared: &Shared,
        peer: &Peer,
        done: &dyn Fn() -> bool,
        deadline: Option<Instant>,
    ) -> bool {
        let Some(mut rx) = self.rx.try_lock() else { return false };
        let fd = self.fd();
        let mut hand_over = true;
        // A waiter polls briefly before it sleeps (a wake-up costs more than a small round trip).
        let spin_until = deadline.map(|d| d.min(Instant::now() + shared.cfg.busy_poll));
        loop {
            if done() {
                break;
            }
            {
                let mut p = self.pending.lock();
                if p.dead.is_some() {
                    break;
                }
                // Still here: keep the reader thread out.
                if !p.q.is_empty() {
                    p.hold_until = Some(Instant::now() + DIRECT_HOLD);
                }
            }
            match self.read_next(shared, peer, &mut rx, true) {
                Ok(Step::Handled) => {}
                Ok(Step::Big) => break,
                Err(e) => {
                    drop(rx);
                    self.die(shared, peer, e);
                    return true;
                }
                Ok(Step::Empty) => {
                    if let Err(e) = self.check_silence(shared, peer) {
                        drop(rx);
                        self.die(shared, peer, e);
                        return true;
                    }
                    let now = Instant::now();
                    match deadline {
                        // A poll that found nothing: keep the hold, the caller polls again.
                        None => {
                            hand_over = false;
                            break;
                        }
                        Some(d) if now >= d => break,
                        Some(_) if spin_until.is_some_and(|t| now < t) => std::thread::yield_now(),
                        Some(d) => {
                            sys::wait_ready(fd, true, None, (d - now).min(shared.peer_timeout / 2));
                        }
                    }
                }
            }
        }
        drop(rx);
        if hand_over {
            // Leaving: whatever is still owed is the reader thread's.
            let mut p = self.pending.lock();
            p.hold_until = None;
            if !p.q.is_empty() && p.reader_idle {
                p.reader_idle = false;
                self.kick.signal();
            }
        }
        true
    }

    /// Fails the connection with `err` (every frame it owes), frees its lane
    /// slot, and tells the agent the peer is lost unless this side closed it.
    pub(super) fn die(self: &Arc<Self>, shared: &Shared, peer: &Peer, err: Error) {
        let (first, owed) = {
            let p = self.pending.lock();
            (p.dead.is_none(), !p.q.is_empty())
        };
        self.fail(err.clone());
        for l in &peer.lanes {
            let mut slot = l.conn.lock();
            if slot.as_ref().is_some_and(|x| Arc::ptr_eq(x, self)) {
                slot.take();
            }
        }
        if first && !self.by_us.load(Ordering::Acquire) {
            tracing::debug!(agent = %shared.agent, peer = %peer.name, error = %err, "TCP: connection died");
            peer.lost(shared, owed);
        }
    }
}
