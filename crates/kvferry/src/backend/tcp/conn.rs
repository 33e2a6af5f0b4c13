//! The initiator side: peers, their lanes, and the connection driver.
//!
//! A [`Lane`] is one slot for a connection to a peer, with a worker thread
//! that writes queued frames. A [`Conn`] is one live connection: a writer
//! mutex (frames are written whole, one at a time), the FIFO of frames that
//! await an answer, and a reader thread that takes answers in order, reads
//! READ data straight into registered memory and completes frames.
//!
//! A connection dies on any I/O error, a protocol violation, or silence from
//! the peer for `peer_timeout` while a frame awaits its answer; every frame
//! it still owes then fails with `RemoteDisconnect`, and unless the local
//! side closed it on purpose the agent is told the peer is lost.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::proto::{self, FrameType, Header, Hello, Status, Welcome, HEADER_LEN, WELCOME_FIXED};
use super::sys;
use super::xfer::XferShared;
use super::Shared;
use crate::backend::XferOp;
use crate::error::{Error, ErrorKind, Result};

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
    q: VecDeque<PendingFrame>,
    dead: Option<Error>,
}

/// A frame written (or being written) that awaits its answer.
pub(super) struct PendingFrame {
    pub(super) x: Arc<XferShared>,
    pub(super) gen: u64,
    pub(super) frame: u32,
    op: u64,
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

    fn lost(&self, shared: &Shared) {
        if !self.closed.load(Ordering::Acquire) && !shared.closing.load(Ordering::Acquire) {
            tracing::warn!(agent = %shared.agent, peer = %self.name, "TCP: peer lost");
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
                    peer.lost(shared);
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
                    Ok(c) => c.send_frame(&shared, &peer, &x, gen, frame),
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
        peer.lost(shared);
        err
    })
}

/// Dials the peer (each published address in turn), shakes hands and starts the reader.
fn connect(shared: &Arc<Shared>, peer: &Arc<Peer>, lane: usize) -> Result<Arc<Conn>> {
    let mut tried = Vec::new();
    let mut stream = None;
    for a in &peer.addrs {
        match TcpStream::connect_timeout(a, shared.connect_timeout) {
            Ok(s) => {
                stream = Some((s, *a));
                break;
            }
            Err(e) => tried.push(format!("{a}: {e}")),
        }
    }
    let Some((stream, addr)) = stream else {
        return Err(Error::disconnected(format!(
            "TCP: cannot connect to agent '{}' ({}); is it running, and is the port open? (connect timeout {:?})",
            peer.name,
            tried.join("; "),
            shared.connect_timeout
        )));
    };
    let fd = stream.as_raw_fd();
    let setup = |what: &str, e: io::Error| Error::io(format!("TCP: {what} on the connection to {addr}"), e);
    stream.set_nodelay(shared.cfg.nodelay).map_err(|e| setup("TCP_NODELAY", e))?;
    sys::set_buffers(fd, shared.cfg.sockbuf).map_err(|e| setup("socket buffers", e))?;
    stream.set_read_timeout(Some(shared.connect_timeout)).map_err(|e| setup("read timeout", e))?;
    stream.set_write_timeout(Some(shared.peer_timeout)).map_err(|e| setup("write timeout", e))?;

    let mut hello = Vec::new();
    Hello {
        version: proto::VERSION,
        caps: proto::CAPS,
        instance: shared.instance,
        expect_instance: peer.instance,
        name: shared.agent.to_string(),
        token: shared.auth_token.clone().unwrap_or_default().into_bytes(),
    }
    .encode(&mut hello);
    let hs = |e: io::Error| {
        Error::io(format!("TCP: handshake with agent '{}' at {addr} (lane {lane})", peer.name), e)
            .context("the peer accepted the connection but did not complete the handshake")
    };
    sys::write_bufs(fd, &[&hello]).map_err(hs)?;
    let mut timeout = || Err(io::Error::new(io::ErrorKind::TimedOut, "no answer within the connect timeout"));
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
    // Silence while answers are owed is judged against peer_timeout; wake
    // twice per timeout to judge it.
    stream.set_read_timeout(Some(shared.peer_timeout / 2)).map_err(|e| setup("read timeout", e))?;
    let c = Arc::new(Conn {
        stream,
        addr,
        writer: Mutex::new(()),
        pending: Mutex::new(PendingQueue { q: VecDeque::new(), dead: None }),
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
            p.q.drain(..).collect()
        };
        sys::shutdown(self.fd());
        for f in drained {
            f.x.frame_done(f.gen, Err(err.clone()));
        }
    }

    /// Closes the connection from this side (to stop a copy for a cancel).
    pub(super) fn abort(&self, why: &str) {
        self.by_us.store(true, Ordering::Release);
        self.fail(Error::disconnected(format!("TCP: connection to {} closed: {why}; post again", self.addr)));
    }

    /// Writes frame `frame` of posting `gen`, recording it as awaiting an answer.
    pub(super) fn send_frame(
        self: &Arc<Self>,
        shared: &Shared,
        peer: &Peer,
        x: &Arc<XferShared>,
        gen: u64,
        frame: u32,
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
            p.q.push_back(PendingFrame { x: x.clone(), gen, frame, op: plan.op, sent_at: Instant::now() });
        }
        // SAFETY: the first span is the frame's own header buffer, owned by `x`;
        // for WRITE the others are local ranges the agent checked to lie in
        // registered memory, and the access guard keeps a cancel from returning
        // while they are read.
        let r = unsafe { sys::writev_all(self.fd(), x.send_spans(plan)) };
        drop(guard);
        match r {
            Ok(()) => {
                if let Some(f) = self.pending.lock().q.back_mut().filter(|f| f.op == plan.op && f.gen == gen) {
                    f.sent_at = Instant::now();
                }
            }
            Err(e) => {
                let err = self.io_error(peer, "sending data", e);
                drop(_w);
                self.fail(err);
                if !self.by_us.load(Ordering::Acquire) {
                    peer.lost(shared);
                }
            }
        }
    }
}

/// Takes the answers of one connection in order until it dies.
fn reader(shared: Arc<Shared>, peer: Arc<Peer>, c: Arc<Conn>) {
    let mut current: Option<PendingFrame> = None;
    let err = match read_loop(&shared, &peer, &c, &mut current) {
        Ok(()) => return,
        Err(e) => e,
    };
    if let Some(f) = current.take() {
        f.x.frame_done(f.gen, Err(err.clone()));
    }
    c.fail(err.clone());
    {
        let lane_conn = peer.lanes.iter().find(|l| l.conn.lock().as_ref().is_some_and(|x| Arc::ptr_eq(x, &c)));
        if let Some(l) = lane_conn {
            l.conn.lock().take();
        }
    }
    if !c.by_us.load(Ordering::Acquire) {
        tracing::debug!(agent = %shared.agent, peer = %peer.name, error = %err, "TCP: connection died");
        peer.lost(&shared);
    }
}

fn read_loop(shared: &Shared, peer: &Peer, c: &Arc<Conn>, current: &mut Option<PendingFrame>) -> Result<()> {
    let fd = c.fd();
    let pt = shared.peer_timeout;
    // When the frame being read (popped from the queue) was sent.
    let reading: Cell<Option<Instant>> = Cell::new(None);
    let mut silence = || -> io::Result<()> {
        if c.by_us.load(Ordering::Acquire) || shared.closing.load(Ordering::Acquire) {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "closed locally"));
        }
        let p = c.pending.lock();
        let owed = reading.get().or_else(|| p.q.front().map(|f| f.sent_at));
        match owed {
            Some(t) if t.elapsed() >= pt => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer for {pt:?} (peer_timeout) while a request was in flight"),
            )),
            _ => Ok(()),
        }
    };
    let io_err = |what: &str, e: io::Error| c.io_error(peer, what, e);
    let mut msg = Vec::new();
    loop {
        let mut hb = [0u8; HEADER_LEN];
        sys::read_buf(fd, &mut hb, &mut silence).map_err(|e| io_err("reading", e))?;
        let h = Header::decode(&hb).map_err(|e| {
            Error::malformed(format!("TCP: agent '{}' at {} sent a bad frame: {}", peer.name, c.addr, e.message))
        })?;
        let f = c.pending.lock().q.pop_front();
        let Some(f) = f else {
            return Err(Error::malformed(format!("TCP: agent '{}' sent an unsolicited {:?} frame", peer.name, h.ty)));
        };
        let want = match f.x.op {
            XferOp::Write => FrameType::Ack,
            XferOp::Read => FrameType::Data,
        };
        let (x, gen) = (f.x.clone(), f.gen);
        let plan = &x.frames[f.frame as usize];
        if h.op != f.op || (h.ty != want && h.ty != FrameType::Error) {
            *current = Some(f);
            return Err(Error::malformed(format!(
                "TCP: agent '{}' answered op {:#x} with {:?} op {:#x}: protocol out of step",
                peer.name, plan.op, h.ty, h.op
            )));
        }
        reading.set(Some(f.sent_at));
        *current = Some(f);
        match h.ty {
            FrameType::Ack => {}
            FrameType::Data => {
                if h.len != plan.bytes {
                    return Err(Error::malformed(format!(
                        "TCP: agent '{}' sent {} bytes for a READ of {}",
                        peer.name, h.len, plan.bytes
                    )));
                }
                match x.enter(gen, c) {
                    Some(_g) => {
                        // SAFETY: the pieces are local ranges the agent checked to lie in
                        // registered memory; the access guard keeps a cancel (and so the
                        // release of the request) from returning while they are written.
                        unsafe { sys::readv_all(fd, x.recv_spans(plan), &mut silence) }
                            .map_err(|e| io_err("reading data", e))?;
                    }
                    None => drain(fd, h.len, &mut silence).map_err(|e| io_err("reading data", e))?,
                }
            }
            FrameType::Error => {
                msg.resize(h.len as usize, 0);
                sys::read_buf(fd, &mut msg, &mut silence).map_err(|e| io_err("reading", e))?;
                let text = String::from_utf8_lossy(&msg);
                current.take();
                reading.set(None);
                x.frame_done(
                    gen,
                    Err(Error::new(h.status.error_kind(), format!("TCP: {} refused by the target: {text}", x.op))),
                );
                continue;
            }
            _ => unreachable!("checked above"),
        }
        current.take();
        reading.set(None);
        x.frame_done(gen, Ok(()));
    }
}

fn drain(fd: RawFd, mut n: u64, on_timeout: &mut dyn FnMut() -> io::Result<()>) -> io::Result<()> {
    let mut buf = vec![0u8; n.min(64 << 10) as usize];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        sys::read_buf(fd, &mut buf[..k], on_timeout)?;
        n -= k as u64;
    }
    Ok(())
}
