//! The target side: an accept loop and one thread per accepted connection.
//!
//! A connection thread reads frames, checks every entry's key and bounds
//! against the live registration table *before* a byte moves, reads WRITE
//! payloads straight into registered memory, writes READ payloads straight
//! from it, and answers with ACK, DATA or ERROR. The registration table is
//! read-locked from the check to the end of the copy, so a region cannot be
//! deregistered (and freed) in the middle of one. Frames on exported files
//! go through staging buffers and the server's storage engine, started ahead
//! and answered in order (see `Served::file_op`).

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::proto::{self, FrameType, Header, Hello, ProtoError, Status, Welcome, HEADER_LEN, HELLO_FIXED};
use super::sys::{self, Span};
use super::Shared;
use crate::backend::posix::Served as FileDir;

/// Accepts connections until the backend shuts the listener down.
pub(super) fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    for stream in listener.incoming() {
        if shared.closing.load(Ordering::Acquire) {
            break;
        }
        match stream {
            Ok(s) => {
                let sh = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("kvf-tcp-srv-{}", shared.agent))
                    .spawn(move || serve(sh, s));
                match spawned {
                    Ok(h) => shared.track(h),
                    Err(e) => tracing::warn!(error = %e, "TCP: cannot spawn a connection thread; connection dropped"),
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

fn serve(shared: Arc<Shared>, stream: TcpStream) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let Ok(clone) = stream.try_clone() else { return };
    shared.accepted.lock().insert(id, clone);
    if shared.closing.load(Ordering::Acquire) {
        sys::shutdown(stream.as_raw_fd());
    }
    let r = serve_conn(&shared, &stream);
    shared.accepted.lock().remove(&id);
    if let Err(e) = r {
        tracing::debug!(agent = %shared.agent, error = %e, "TCP: incoming connection ended");
    }
}

/// Per-connection state of the target.
struct Served<'a> {
    shared: &'a Shared,
    fd: RawFd,
    peer: Arc<str>,
    /// Bytes received and not handled yet.
    rx: sys::RecvBuf,
    spans: Vec<Span>,
    /// File operations started and not answered yet, oldest first.
    pending: std::collections::VecDeque<PendingFile>,
    /// Staging buffers to reuse (page-aligned for O_DIRECT).
    spare: Vec<crate::mem::AlignedBuf>,
}

/// Bytes of file operations one connection holds, running or waiting to be
/// answered (its staging memory): beyond it, it answers before it starts more.
const FILE_HELD: u64 = 32 << 20;

/// A file operation whose I/Os are running into (or from) its staging buffer.
struct PendingFile {
    op: u64,
    len: u64,
    job: Arc<crate::backend::posix::Job>,
    /// The staging buffer; `None` once handed back.
    buf: Option<crate::mem::AlignedBuf>,
}

impl Drop for PendingFile {
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

fn file_error(e: &crate::Error) -> ProtoError {
    let status = match e.kind() {
        crate::ErrorKind::InvalidParam => Status::Invalid,
        crate::ErrorKind::NotAllowed | crate::ErrorKind::NotFound => Status::NotAllowed,
        _ => Status::Storage,
    };
    ProtoError { status, message: e.message().to_string() }
}

fn serve_conn(shared: &Shared, stream: &TcpStream) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    let cfg = &shared.cfg;
    stream.set_nodelay(cfg.nodelay)?;
    sys::set_buffers(fd, cfg.sockbuf)?;
    stream.set_read_timeout(Some(shared.connect_timeout))?;
    stream.set_write_timeout(Some(shared.peer_timeout))?;

    // Handshake: the hello is bounded, so a fixed read then the announced rest.
    let mut fixed = [0u8; HELLO_FIXED];
    let mut fail = || Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"));
    sys::read_buf(fd, &mut fixed, &mut fail)?;
    let refuse = |status: Status, message: String| -> io::Result<()> {
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
        tracing::warn!(agent = %shared.agent, peer = %hello.name, reason = %e, "TCP: connection refused");
        return refuse(e.status, e.message);
    }
    sys::write_bufs(fd, &[&welcome(shared, Status::Ok, String::new())])?;
    stream.set_read_timeout(Some(shared.peer_timeout))?;

    let mut s = Served {
        shared,
        fd,
        peer: hello.name.as_str().into(),
        rx: sys::RecvBuf::new(RECV_BUF),
        spans: Vec::new(),
        pending: std::collections::VecDeque::new(),
        spare: Vec::new(),
    };
    // Idle between frames: wait for as long as the backend lives.
    let mut idle = || {
        if shared.closing.load(Ordering::Acquire) {
            Err(io::Error::other("backend closing"))
        } else {
            Ok(())
        }
    };
    loop {
        // File operations in flight: start the next frame's I/O whenever one
        // is waiting and there is room, else answer the oldest (waiting for it
        // if need be). Starting comes first so that the disk gets new work the
        // moment earlier I/O finishes, not after the answers went out.
        while !s.pending.is_empty() {
            if s.rx.bytes().len() < HEADER_LEN {
                match s.rx.fill_once(fd, true) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if s.rx.bytes().len() >= HEADER_LEN && s.file_room() {
                break;
            }
            s.flush_pending(1)?;
        }
        // Poll briefly for the next frame before sleeping: a thread woken from
        // sleep costs more than a small frame.
        let spin_until = Instant::now() + cfg.busy_poll;
        while s.rx.bytes().len() < HEADER_LEN && Instant::now() < spin_until {
            match s.rx.fill_once(fd, true) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => return Err(e),
            }
        }
        // One read takes the header and whatever follows it (a small frame whole).
        s.rx.fill_to(fd, HEADER_LEN, &mut idle)?;
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(&s.rx.bytes()[..HEADER_LEN]);
        s.rx.consume(HEADER_LEN);
        let h = match Header::decode(&hb) {
            Ok(h) => h,
            Err(e) => {
                let op = u64::from_le_bytes(hb[8..16].try_into().unwrap_or([0; 8]));
                s.send_error(op, &e)?;
                return Err(io::Error::new(io::ErrorKind::InvalidData, e.message));
            }
        };
        let is_file = matches!(h.ty, FrameType::Write | FrameType::Read) && s.file_frame(&h)?;
        if !is_file {
            // Memory operations and notifications answer after earlier file operations.
            s.flush_pending(usize::MAX)?;
        }
        match h.ty {
            FrameType::Write | FrameType::Read => s.data_op(&h)?,
            FrameType::Notif => {
                // Header::decode bounded len to MAX_NOTIF.
                let mut msg = Vec::new();
                s.rx.read_vec(fd, &mut msg, h.len as usize, &mut mid_frame)?;
                // A full queue refuses (counted and logged by the sink).
                let _ = shared.notifs.push(s.peer.clone(), msg);
            }
            other => {
                let e = ProtoError {
                    status: Status::Malformed,
                    message: format!("a target takes WRITE, READ and NOTIF frames, not {other:?}"),
                };
                s.send_error(h.op, &e)?;
                return Err(io::Error::new(io::ErrorKind::InvalidData, e.message));
            }
        }
    }
}

/// The target's receive buffer: a whole entry table plus 64 KiB of payload,
/// so a small frame arrives in one read and a large one costs one small copy.
const RECV_BUF: usize = HEADER_LEN + proto::MAX_ENTRIES as usize * proto::ENTRY_LEN + (64 << 10);

/// Inside a frame, silence for the peer timeout means the initiator is gone.
fn mid_frame() -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::TimedOut, "the initiator stopped in the middle of a frame"))
}

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

impl Served<'_> {
    /// A frame on exported files: WRITE payloads land in a staging buffer and
    /// go to the files; READ data comes from the files through one. Entries
    /// were checked against the live regions already. Operations are
    /// pipelined: up to [`FILE_HELD`] bytes of them are started ahead and
    /// answered in order, so the disk works on the next frames while earlier
    /// data goes out (READ) or the next payload comes in (WRITE). An answer
    /// goes out only once its I/O finished: a WRITE is acknowledged when its
    /// bytes are in the file.
    fn file_op(&mut self, h: &Header, tlen: usize) -> io::Result<()> {
        let table = &self.rx.bytes()[..tlen];
        let entries: Vec<(crate::backend::AccessKey, u64, u64)> = (0..h.count as usize)
            .filter_map(|i| proto::Entry::decode(table, i))
            .map(|e| (e.key, e.addr, e.len))
            .collect();
        self.rx.consume(tlen);
        let len = h.len as usize;
        let mut staging = match self.spare.pop().filter(|b| b.len() >= len) {
            Some(b) => b,
            None => match staging_buf(len) {
                Ok(b) => b,
                Err(e) => {
                    if h.ty == FrameType::Write {
                        self.rx.discard(self.fd, h.len, &mut mid_frame)?;
                    }
                    // Answers go out in order: earlier operations first.
                    self.flush_pending(usize::MAX)?;
                    return self.send_error(h.op, &ProtoError { status: Status::Storage, message: e.to_string() });
                }
            },
        };
        let ptr = staging.as_mut_ptr();
        let dir = if h.ty == FrameType::Write { FileDir::Write } else { FileDir::Read };
        if h.ty == FrameType::Write {
            // SAFETY: the staging buffer is owned here and holds at least `len` bytes.
            unsafe { self.rx.read_spans(self.fd, &[(ptr as u64, h.len)], h.len, &mut mid_frame)? };
        }
        // SAFETY: the staging buffer lives in the pending entry (or here) until
        // the job is finished or cancelled; `entries` add up to `h.len`.
        let started = unsafe { self.shared.files.start(dir, &entries, ptr) };
        let job = match started {
            Ok(job) => job,
            Err(e) => {
                self.spare.push(staging);
                self.flush_pending(usize::MAX)?;
                return self.send_error(h.op, &file_error(&e));
            }
        };
        self.pending.push_back(PendingFile { op: h.op, len: h.len, job, buf: Some(staging) });
        Ok(())
    }

    /// Answers up to `n` pending file operations, oldest first.
    fn flush_pending(&mut self, n: usize) -> io::Result<()> {
        for _ in 0..n {
            let Some(p) = self.pending.pop_front() else { break };
            self.answer(p)?;
        }
        Ok(())
    }

    /// Whether another file operation may start: those held (running, or
    /// finished and not answered yet) stay under [`FILE_HELD`] bytes. The
    /// server's engine decides how many of them run on the disk at once.
    fn file_room(&self) -> bool {
        self.pending.iter().map(|p| p.len).sum::<u64>() < FILE_HELD
    }

    /// Waits for one file operation and sends its answer (ACK, DATA or ERROR).
    fn answer(&mut self, mut p: PendingFile) -> io::Result<()> {
        let r = crate::backend::posix::FileServer::finish(&p.job);
        // Finished (or cancelled): no I/O touches the buffer any more.
        let buf = p.buf.take();
        let sent = match r {
            Err(e) => self.send_error(p.op, &file_error(&e)),
            Ok(()) if p.job.is_write() => {
                sys::write_bufs(self.fd, &[&Header::new(FrameType::Ack, p.op, 0, 0).encode()])
            }
            Ok(()) => {
                let head = Header::new(FrameType::Data, p.op, 0, p.len).encode();
                let data = buf.as_ref().map(|b| &b.as_slice()[..p.len as usize]).unwrap_or(&[]);
                sys::write_bufs(self.fd, &[&head, data])
            }
        };
        if let Some(b) = buf {
            self.spare.push(b);
        }
        sent
    }

    fn send_error(&self, op: u64, e: &ProtoError) -> io::Result<()> {
        let msg = format!("agent '{}': {}", self.shared.agent, e.message);
        let msg = &msg.as_bytes()[..msg.len().min(proto::MAX_ERROR_MSG as usize)];
        let h = Header { ty: FrameType::Error, status: e.status, count: 0, op, len: msg.len() as u64 };
        sys::write_bufs(self.fd, &[&h.encode(), msg])
    }

    /// Whether a data frame is on exported files (reads its entry table in).
    fn file_frame(&mut self, h: &Header) -> io::Result<bool> {
        if h.count == 0 {
            return Ok(false);
        }
        self.rx.fill_to(self.fd, h.entries_len().min(proto::ENTRY_LEN), &mut mid_frame)?;
        Ok(proto::Entry::decode(self.rx.bytes(), 0).is_some_and(|e| self.shared.files.serves(&e.key)))
    }

    fn data_op(&mut self, h: &Header) -> io::Result<()> {
        // Header::decode bounded the count, so the table fits the buffer.
        let tlen = h.entries_len();
        self.rx.fill_to(self.fd, tlen, &mut mid_frame)?;
        let regions = self.shared.regions.read();
        let table = &self.rx.bytes()[..tlen];
        if let Err(e) = proto::check_entries(h, table, &*regions) {
            drop(regions);
            self.rx.consume(tlen);
            if h.ty == FrameType::Write {
                self.rx.discard(self.fd, h.len, &mut mid_frame)?;
            }
            tracing::debug!(agent = %self.shared.agent, peer = %self.peer, reason = %e, "TCP: refused a frame");
            return self.send_error(h.op, &e);
        }
        if proto::Entry::decode(table, 0).is_some_and(|e| self.shared.files.serves(&e.key)) {
            drop(regions);
            return self.file_op(h, tlen);
        }
        self.spans.clear();
        for i in 0..h.count as usize {
            // check_entries decoded every entry already.
            if let Some(e) = proto::Entry::decode(table, i) {
                self.spans.push((e.addr, e.len));
            }
        }
        self.rx.consume(tlen);
        if h.ty == FrameType::Write {
            // SAFETY: every span was just checked to lie inside a region registered
            // now, and the table stays read-locked until the copy ends, so the
            // registrant cannot deregister and free it meanwhile; the registrant
            // agreed that peers may write registered memory at any time.
            unsafe { self.rx.read_spans(self.fd, &self.spans, h.len, &mut mid_frame)? };
            drop(regions);
            let ack = Header::new(FrameType::Ack, h.op, 0, 0);
            sys::write_bufs(self.fd, &[&ack.encode()])
        } else {
            let head = Header::new(FrameType::Data, h.op, 0, h.len).encode();
            self.spans.insert(0, (head.as_ptr() as u64, HEADER_LEN as u64));
            // SAFETY: as above for the checked spans (read-locked, registered);
            // the first span is `head`, alive on this stack frame.
            let r = unsafe { sys::writev_all(self.fd, &self.spans) };
            drop(regions);
            r
        }
    }
}
