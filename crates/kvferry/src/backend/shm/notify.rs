//! The same-host control channel: one abstract-namespace Unix socket per SHM
//! backend instance, with the frames of [`wire`](super::wire).
//!
//! Each initiator opens one connection to each owner it transfers to (lazily,
//! on first use, then kept). Over it the initiator sends notifications, asks
//! whether region keys are still live and asks for the memfd of mappable
//! regions (the owner answers with the descriptor, `SCM_RIGHTS`); the owner
//! sends revocations when it deregisters a region, and waits (bounded) for
//! their acknowledgement, which the initiator sends only once no copy into
//! the region is in flight and its mapping of the region is gone.
//!
//! * [`Server`] — the owner side: a listener thread, one reader thread per
//!   incoming connection, the owner's table of live keys.
//! * [`Link`] — the initiator side of one connection: the keys known live,
//!   the owner's regions mapped here, whether the peer is gone, and one
//!   reader thread.
//!
//! Abstract sockets vanish with their last descriptor: nothing to clean up on
//! disk. Their names are visible to every user (`/proc/net/unix`), so the
//! name carries no secret; who may talk on the socket is decided by the
//! kernel-reported credentials of the other end (`SO_PEERCRED`), checked on
//! both sides ([`Access`]): the owner accepts only its own uid (and the uids
//! it was told to allow), before any byte is read or any thread started; the
//! initiator accepts an owner only if the socket's listener is the pid its
//! metadata names, running as an allowed uid. The nonce and the auth token
//! are checked on top, in HELLO.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use super::fdpass::{self, FdReader};
use super::mapping::Mapping;
use super::wire::{frame_len, Frame, MapStatus, MAX_QUERY_KEYS, VERSION};
use crate::auth::AuthToken;
use crate::backend::{AccessKey, PeerEvents};
use crate::error::{Error, Result};
use crate::mem::MemShare;
use crate::notif::NotifSink;
use crate::sys::{self, connect_abstract, peer_cred};

/// Reads one frame; `buf` is reused between calls.
fn read_frame(s: &mut impl Read, buf: &mut Vec<u8>) -> Result<Frame> {
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix).map_err(|e| Error::io("SHM control channel: read", e))?;
    let n = frame_len(prefix)?;
    buf.clear();
    buf.resize(n, 0);
    s.read_exact(buf).map_err(|e| Error::io("SHM control channel: read", e))?;
    Frame::decode(buf)
}

fn abstract_addr(name: &[u8]) -> Result<SocketAddr> {
    SocketAddr::from_abstract_name(name).map_err(|e| Error::io("SHM: abstract socket name", e))
}

/// Which local users may use an SHM control socket, either side: this
/// process's effective uid always, plus the uids listed in the SHM parameter
/// `allowed_uids`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// This process's effective uid.
    pub me: u32,
    /// Other uids allowed (the `allowed_uids` parameter).
    pub extra: Vec<u32>,
}

impl Access {
    /// This process's own uid only.
    pub fn own_uid() -> Access {
        Access { me: sys::effective_uid(), extra: Vec::new() }
    }

    /// This process's uid plus `extra`.
    pub fn with_extra(extra: Vec<u32>) -> Access {
        Access { extra, ..Access::own_uid() }
    }

    /// Whether `uid` may use the socket.
    pub fn admits(&self, uid: u32) -> bool {
        uid == self.me || self.extra.contains(&uid)
    }
}

/// Most connections an owner serves at once (one thread each); more are
/// refused with a REFUSE frame naming the limit.
pub const MAX_CONNS: usize = 1024;

// ───────────────────────────── owner side ─────────────────────────────

/// A registered region whose memory peers may map: its memfd, and where it is.
#[derive(Clone, Debug)]
pub struct Exported {
    /// The memfd and the region's offset in it.
    pub share: MemShare,
    /// The region's start address in this process.
    pub addr: u64,
    /// The region's length.
    pub len: u64,
}

/// What the owner side shares between its threads.
#[derive(Debug)]
struct ServerShared {
    agent: Arc<str>,
    nonce: u64,
    token: Option<AuthToken>,
    sink: NotifSink,
    handshake_timeout: Duration,
    /// Keys of the regions registered with this backend now, with the memfd
    /// of those that peers may map.
    live: RwLock<HashMap<AccessKey, Option<Exported>>>,
    conns: Mutex<Vec<Arc<ServerConn>>>,
    /// Who may connect (checked on `SO_PEERCRED` at accept).
    access: Access,
    /// Connections being served now (handshake included).
    serving: AtomicUsize,
    /// Most connections served at once ([`MAX_CONNS`] unless a test lowers it).
    max_conns: AtomicUsize,
    /// Connections refused at accept (wrong uid, too many).
    refused: AtomicU64,
    /// Connections closed because their notifications overflowed the queue.
    flooded: AtomicU64,
    stop: AtomicBool,
}

/// One accepted connection from an initiator.
#[derive(Debug)]
struct ServerConn {
    peer: Arc<str>,
    writer: Mutex<UnixStream>,
    /// Another handle on the same socket, to shut it down without waiting
    /// for a writer the peer may be stalling.
    control: UnixStream,
    next_seq: AtomicU64,
    acked: Mutex<u64>,
    acked_cv: Condvar,
}

impl ServerConn {
    fn shutdown(&self) {
        let _ = self.control.shutdown(std::net::Shutdown::Both);
    }
}

/// The owner side of the control channel of one SHM backend.
#[derive(Debug)]
pub struct Server {
    shared: Arc<ServerShared>,
    name: Vec<u8>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds the abstract socket `name` and starts the listener thread, which
    /// accepts connections only from the uids `access` admits.
    pub fn start(
        name: Vec<u8>,
        agent: Arc<str>,
        nonce: u64,
        token: Option<AuthToken>,
        sink: NotifSink,
        handshake_timeout: Duration,
        access: Access,
    ) -> Result<Server> {
        let listener = UnixListener::bind_addr(&abstract_addr(&name)?).map_err(|e| {
            Error::io(format!("SHM: binding the control socket @{}", String::from_utf8_lossy(&name)), e)
        })?;
        let shared = Arc::new(ServerShared {
            agent,
            nonce,
            token,
            sink,
            handshake_timeout,
            live: RwLock::new(HashMap::new()),
            conns: Mutex::new(Vec::new()),
            access,
            serving: AtomicUsize::new(0),
            max_conns: AtomicUsize::new(MAX_CONNS),
            refused: AtomicU64::new(0),
            flooded: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("kvferry-shm-accept".into())
            .spawn(move || accept_loop(listener, s))
            .map_err(|e| Error::io("SHM: starting the control listener thread", e))?;
        Ok(Server { shared, name, accept: Some(accept) })
    }

    /// Connections refused at accept so far: a uid not allowed, or more than
    /// [`MAX_CONNS`] at once.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Connections closed so far because a notification of theirs found the
    /// agent's notification queue full.
    pub fn flooded(&self) -> u64 {
        self.shared.flooded.load(Ordering::Relaxed)
    }

    /// Lowers (or raises) the most connections served at once, [`MAX_CONNS`]
    /// by default; for tests of the bound.
    pub fn set_max_conns(&self, n: usize) {
        self.shared.max_conns.store(n, Ordering::Relaxed);
    }

    /// Marks a region live (registered); `export`: its memfd, for peers to map.
    pub fn add(&self, key: AccessKey, export: Option<Exported>) {
        self.shared.live.write().insert(key, export);
    }

    /// Deregisters a region: from now on QUERY answers say it is gone, every
    /// connected initiator is told, and this waits until each acknowledged
    /// (which it does only once no copy into the region is in flight) or
    /// `timeout` passes. A connection that does not acknowledge in time is
    /// closed, so that its initiator can no longer post to this backend.
    pub fn revoke(&self, key: AccessKey, timeout: Duration) {
        if self.shared.live.write().remove(&key).is_none() {
            return;
        }
        let conns = self.shared.conns.lock().clone();
        if conns.is_empty() {
            return;
        }
        // One deadline for everything: taking each connection's writer,
        // writing its REVOKE and waiting for its ACK. A connection that
        // cannot take the frame in time (its writer held by an answer the
        // peer does not read, or its socket buffer full) is closed, so a
        // thousand stuck peers cost this call `timeout`, not a thousand.
        let deadline = Instant::now() + timeout;
        let mut buf = Vec::with_capacity(32);
        let mut waiting = Vec::with_capacity(conns.len());
        for c in conns {
            let seq = c.next_seq.fetch_add(1, Ordering::Relaxed) + 1;
            buf.clear();
            Frame::Revoke { seq, key }.encode(&mut buf);
            let sent = match c.writer.try_lock_until(deadline) {
                Some(w) => sys::send_within(&*w, &buf, deadline).is_ok(),
                None => false,
            };
            if sent {
                waiting.push((c, seq));
            } else {
                tracing::warn!(
                    agent = %self.shared.agent, peer = %c.peer,
                    "SHM: peer did not take a deregistration within {timeout:?}; closing its connection"
                );
                c.shutdown();
            }
        }
        for (c, seq) in waiting {
            let mut acked = c.acked.lock();
            while *acked < seq {
                if c.acked_cv.wait_until(&mut acked, deadline).timed_out() {
                    break;
                }
            }
            if *acked < seq {
                drop(acked);
                tracing::warn!(
                    agent = %self.shared.agent, peer = %c.peer,
                    "SHM: peer did not acknowledge a deregistration within {timeout:?}; closing its connection"
                );
                c.shutdown();
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for c in self.shared.conns.lock().drain(..) {
            c.shutdown();
        }
        // Wake the blocking accept with a connection of our own (bounded: if
        // the backlog is full, the accept has connections to return anyway).
        let _ = connect_abstract(&self.name, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<ServerShared>) {
    loop {
        let stream = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        match stream {
            Ok((s, _)) => {
                if let Err(why) = admit(&s, &shared) {
                    shared.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(agent = %shared.agent, "SHM: connection refused: {why}");
                    refuse_now(&s, &why);
                    continue;
                }
                shared.serving.fetch_add(1, Ordering::SeqCst);
                let sh = shared.clone();
                let spawned = std::thread::Builder::new().name("kvferry-shm-conn".into()).spawn(move || {
                    serve(s, &sh);
                    sh.serving.fetch_sub(1, Ordering::SeqCst);
                });
                if let Err(e) = spawned {
                    shared.serving.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!(error = %e, "SHM: cannot start a connection thread; connection dropped");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "SHM: accept failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Decides, from the kernel's word on who connected (`SO_PEERCRED`) and how
/// many are served, whether an accepted connection gets a thread; the reason
/// otherwise. Nothing is read from the peer before this.
fn admit(s: &UnixStream, shared: &ServerShared) -> std::result::Result<(), String> {
    let cred = peer_cred(s).map_err(|e| format!("SO_PEERCRED failed ({e}); cannot tell who connected"))?;
    if !shared.access.admits(cred.uid) {
        return Err(format!(
            "process {} runs as uid {}, and agent '{}' (uid {}) admits only its own uid{} on its SHM control \
             socket; set the SHM parameter allowed_uids on the owner to admit it",
            cred.pid,
            cred.uid,
            shared.agent,
            shared.access.me,
            if shared.access.extra.is_empty() { String::new() } else { format!(" and {:?}", shared.access.extra) }
        ));
    }
    let n = shared.serving.load(Ordering::SeqCst);
    if n >= shared.max_conns.load(Ordering::Relaxed) {
        return Err(format!(
            "agent '{}' already serves {n} SHM connections (the most it serves at once); process {} (uid {}) \
             must retry later",
            shared.agent, cred.pid, cred.uid
        ));
    }
    Ok(())
}

/// Tells a refused peer why, without waiting on it: one non-blocking write of
/// a REFUSE frame (dropped if its socket buffer is full), then the socket closes.
fn refuse_now(s: &UnixStream, why: &str) {
    let mut out = Vec::new();
    Frame::Refuse(why.to_string()).encode(&mut out);
    if s.set_nonblocking(true).is_ok() {
        let _ = (&*s).write(&out);
    }
}

/// Serves one incoming connection until it closes.
fn serve(mut s: UnixStream, shared: &ServerShared) {
    let mut buf = Vec::new();
    let conn = match handshake(&mut s, shared, &mut buf) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(agent = %shared.agent, error = %e, "SHM: connection refused");
            return;
        }
    };
    let mut out = Vec::new();
    loop {
        let f = match read_frame(&mut s, &mut buf) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(agent = %shared.agent, peer = %conn.peer, error = %e, "SHM: connection closed");
                break;
            }
        };
        match f {
            Frame::Notif(msg) => {
                // A full queue refuses (counted by the sink): the sender is
                // told why and its connection closed, so that a flood costs
                // the owner nothing more than the queue's bound.
                if let Err(e) = shared.sink.push(conn.peer.clone(), msg) {
                    shared.flooded.fetch_add(1, Ordering::Relaxed);
                    let why = format!(
                        "agent '{}' closed this SHM connection: a notification from '{}' was refused ({}); \
                         the target must take its notifications faster, or raise AgentConfig.notif_limits",
                        shared.agent,
                        conn.peer,
                        e.message()
                    );
                    tracing::warn!(agent = %shared.agent, peer = %conn.peer, "SHM: {why}");
                    // Non-blocking: a flooder that does not read cannot hold the writer (and a revoke).
                    refuse_now(&conn.writer.lock(), &why);
                    break;
                }
            }
            Frame::Query { id, keys } => {
                // Hold the writer while reading the table: a REVOKE for a key
                // read as live here is then written after this STATUS.
                let mut w = conn.writer.lock();
                let live = {
                    let t = shared.live.read();
                    keys.iter().map(|k| t.contains_key(k)).collect()
                };
                out.clear();
                Frame::Status { id, live }.encode(&mut out);
                if w.write_all(&out).is_err() {
                    break;
                }
            }
            Frame::Map { id, key } => {
                // As for QUERY: the answer is written before any REVOKE of this key.
                let w = conn.writer.lock();
                let export = match shared.live.read().get(&key) {
                    None => Err(MapStatus::Gone),
                    Some(None) => Err(MapStatus::NoFd),
                    Some(Some(e)) => Ok(e.clone()),
                };
                out.clear();
                let sent = match export {
                    Err(status) => {
                        Frame::Mapped { id, status, region_addr: 0, region_len: 0, offset: 0 }.encode(&mut out);
                        (&*w).write_all(&out)
                    }
                    Ok(e) => {
                        let status = MapStatus::Fd;
                        Frame::Mapped { id, status, region_addr: e.addr, region_len: e.len, offset: e.share.offset() }
                            .encode(&mut out);
                        fdpass::send_with_fd(&w, &out, e.share.fd())
                    }
                };
                if sent.is_err() {
                    break;
                }
            }
            Frame::Ack(seq) => {
                let mut a = conn.acked.lock();
                *a = (*a).max(seq);
                conn.acked_cv.notify_all();
            }
            other => {
                tracing::debug!(agent = %shared.agent, peer = %conn.peer, frame = ?other, "SHM: unexpected frame; closing");
                break;
            }
        }
    }
    conn.shutdown();
    shared.conns.lock().retain(|c| !Arc::ptr_eq(c, &conn));
    // Wake any revoke waiting on this connection: it will never ack now.
    conn.acked_cv.notify_all();
}

fn handshake(s: &mut UnixStream, shared: &ServerShared, buf: &mut Vec<u8>) -> Result<Arc<ServerConn>> {
    s.set_read_timeout(Some(shared.handshake_timeout)).map_err(|e| Error::io("SHM: set_read_timeout", e))?;
    s.set_write_timeout(Some(shared.handshake_timeout)).map_err(|e| Error::io("SHM: set_write_timeout", e))?;
    let refuse = |s: &mut UnixStream, why: String| -> Error {
        let mut out = Vec::new();
        Frame::Refuse(why.clone()).encode(&mut out);
        let _ = s.write_all(&out);
        Error::not_allowed(why)
    };
    let (version, nonce, token, name) = match read_frame(s, buf)? {
        Frame::Hello { version, instance: _, nonce, token, name } => (version, nonce, token, name),
        other => return Err(refuse(s, format!("expected HELLO, got {other:?}"))),
    };
    if version != VERSION {
        return Err(refuse(s, format!("control protocol version {version}, this agent speaks {VERSION}")));
    }
    if nonce != shared.nonce {
        return Err(refuse(
            s,
            format!(
                "agent '{}' was restarted or re-created since its metadata was fetched; fetch it again",
                shared.agent
            ),
        ));
    }
    if !AuthToken::admits(shared.token.as_ref(), &token) {
        return Err(refuse(s, "auth token does not match (set the same KVFERRY_AUTH_TOKEN on both agents)".into()));
    }
    if crate::metadata::codec::check_agent_name(&name).is_err() {
        return Err(refuse(s, "the HELLO's agent name is not a valid agent name".into()));
    }
    let mut out = Vec::new();
    Frame::Welcome.encode(&mut out);
    // The writer keeps the write timeout: a stuck peer cannot block a revoke forever.
    let writer = s.try_clone().map_err(|e| Error::io("SHM: cloning a socket", e))?;
    let control = s.try_clone().map_err(|e| Error::io("SHM: cloning a socket", e))?;
    let conn = Arc::new(ServerConn {
        peer: name.into(),
        writer: Mutex::new(writer),
        control,
        next_seq: AtomicU64::new(0),
        acked: Mutex::new(0),
        acked_cv: Condvar::new(),
    });
    // Register before WELCOME: once the initiator hears it, revocations reach it.
    shared.conns.lock().push(conn.clone());
    if let Err(e) = s.write_all(&out) {
        shared.conns.lock().retain(|c| !Arc::ptr_eq(c, &conn));
        return Err(Error::io("SHM: sending WELCOME", e));
    }
    s.set_read_timeout(None).map_err(|e| Error::io("SHM: set_read_timeout", e))?;
    Ok(conn)
}

// ─────────────────────────── initiator side ───────────────────────────

/// What an initiator knows of one connection's owner.
///
/// Invariant: `maps` and `cma_only` hold only keys that are in `live`; a
/// mapping is inserted once per key and removed only together with the key
/// (revocation) or when the link dies. So a copy that finds its keys live,
/// under the read lock, may use the mappings it looked up at prepare.
#[derive(Debug, Default)]
pub struct LinkState {
    /// Keys the owner confirmed live and has not revoked since.
    pub live: HashSet<AccessKey>,
    /// The owner's regions mapped into this process, by key.
    pub maps: HashMap<AccessKey, Mapping>,
    /// Live regions the owner cannot share (raw memory): cross-memory attach.
    pub cma_only: HashSet<AccessKey>,
    /// Why the link is unusable, once it is.
    pub dead: Option<String>,
}

impl LinkState {
    /// Forgets `key`; its mapping, if any, is returned for the caller to drop (unmap).
    fn revoke(&mut self, key: &AccessKey) -> Option<Mapping> {
        self.live.remove(key);
        self.cma_only.remove(key);
        self.maps.remove(key)
    }
}

/// How a MAP request ended, as the reader thread applied it.
#[derive(Debug)]
enum MapOutcome {
    Gone,
    Cma,
    Mapped,
}

#[derive(Debug)]
enum Query {
    Pending(Vec<AccessKey>),
    Answered(Vec<bool>),
    PendingMap(AccessKey),
    AnsweredMap(MapOutcome),
}

/// The initiator side of a connection to one owner.
///
/// Posts hold `state` read-locked for the whole copy; the reader thread
/// write-locks it to apply a REVOKE, so its ACK means no copy into the
/// revoked region is in flight or will start.
#[derive(Debug)]
pub struct Link {
    /// The owner agent's name.
    pub peer: Arc<str>,
    /// The owner agent's instance.
    pub instance: u64,
    /// The owner's process id.
    pub pid: i32,
    /// Keys known live, and whether the link is dead.
    pub state: RwLock<LinkState>,
    writer: Mutex<UnixStream>,
    /// The writer's descriptor, polled without its lock to see the owner hang up.
    sock: RawFd,
    queries: Mutex<HashMap<u64, Query>>,
    queries_cv: Condvar,
    next_query: AtomicU64,
    closing: AtomicBool,
    events: PeerEvents,
}

/// What the initiator says in its HELLO.
#[derive(Debug)]
pub struct Hello<'a> {
    /// This agent's name.
    pub agent: &'a str,
    /// This agent's instance.
    pub instance: u64,
    /// The owner's nonce from its connection info.
    pub nonce: u64,
    /// This agent's auth token, if any.
    pub token: Option<&'a AuthToken>,
}

impl Link {
    /// Connects to the owner's socket, checks that the process listening on
    /// it is `pid` running as a uid `access` admits (`SO_PEERCRED`; anyone
    /// can bind an abstract name, so the name alone proves nothing), says
    /// HELLO, waits (bounded) for WELCOME and starts the reader thread.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        socket: &[u8],
        hello: Hello<'_>,
        peer: Arc<str>,
        instance: u64,
        pid: i32,
        timeouts: (Duration, Duration),
        events: PeerEvents,
        access: &Access,
    ) -> Result<Arc<Link>> {
        let (connect_timeout, peer_timeout) = timeouts;
        let mut s = connect_abstract(socket, connect_timeout).map_err(|e| {
            Error::io(format!("SHM: connecting to agent '{peer}' (pid {pid}): its control socket does not answer"), e)
        })?;
        let io = |what: &'static str| move |e: io::Error| Error::io(format!("SHM: {what}"), e);
        let cred = peer_cred(&s).map_err(io("SO_PEERCRED on the control socket"))?;
        if cred.pid != pid || !access.admits(cred.uid) {
            return Err(Error::not_allowed(format!(
                "SHM: the control socket of agent '{peer}' is held by process {} (uid {}), not by the agent's \
                 process {pid} running as an allowed uid ({}{}); refusing to trust it (another process bound the \
                 name, or the agent restarted: fetch its metadata again; set allowed_uids to admit another uid)",
                cred.pid,
                cred.uid,
                access.me,
                if access.extra.is_empty() { String::new() } else { format!(", {:?}", access.extra) }
            )));
        }
        s.set_read_timeout(Some(connect_timeout)).map_err(io("set_read_timeout"))?;
        s.set_write_timeout(Some(peer_timeout)).map_err(io("set_write_timeout"))?;
        let mut out = Vec::new();
        Frame::Hello {
            version: VERSION,
            instance: hello.instance,
            nonce: hello.nonce,
            token: hello.token.map(|t| t.as_bytes().to_vec()).unwrap_or_default(),
            name: hello.agent.to_string(),
        }
        .encode(&mut out);
        s.write_all(&out).map_err(io("sending HELLO"))?;
        let mut buf = Vec::new();
        match read_frame(&mut s, &mut buf).map_err(|e| e.context(format!("SHM: handshake with agent '{peer}'")))? {
            Frame::Welcome => {}
            Frame::Refuse(why) => {
                return Err(Error::not_allowed(format!("SHM: agent '{peer}' refused the connection: {why}")))
            }
            other => return Err(Error::malformed(format!("SHM: agent '{peer}' answered HELLO with {other:?}"))),
        }
        s.set_read_timeout(None).map_err(io("set_read_timeout"))?;
        let reader = FdReader::new(s.try_clone().map_err(io("cloning a socket"))?);
        let sock = s.as_raw_fd();
        let link = Arc::new(Link {
            peer,
            instance,
            pid,
            state: RwLock::new(LinkState::default()),
            writer: Mutex::new(s),
            sock,
            queries: Mutex::new(HashMap::new()),
            queries_cv: Condvar::new(),
            next_query: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            events,
        });
        let l = link.clone();
        std::thread::Builder::new()
            .name("kvferry-shm-link".into())
            .spawn(move || l.read_loop(reader, buf))
            .map_err(io("starting the link reader thread"))?;
        Ok(link)
    }

    /// Sends one frame (encoded into `buf`, which is reused).
    pub fn send(&self, frame: &Frame, buf: &mut Vec<u8>) -> Result<()> {
        buf.clear();
        frame.encode(buf);
        self.send_bytes(buf)
    }

    /// Sends bytes holding whole encoded frames; a failure marks the link dead.
    pub fn send_bytes(&self, bytes: &[u8]) -> Result<()> {
        let r = self.writer.lock().write_all(bytes);
        r.map_err(|e| {
            let e = Error::io(format!("SHM: sending to agent '{}'", self.peer), e);
            self.mark_dead(e.message().to_string());
            e
        })
    }

    /// The error a post returns on a dead link.
    pub fn dead_error(&self, why: &str) -> Error {
        Error::disconnected(format!(
            "SHM: agent '{}' (pid {}) is unreachable: {why}; load its fresh metadata if it was restarted",
            self.peer, self.pid
        ))
    }

    /// Makes sure the owner still has every key registered, asking it about
    /// those not yet known live (bounded by `timeout`).
    pub fn ensure_live(&self, keys: &[AccessKey], timeout: Duration) -> Result<()> {
        let missing: Vec<AccessKey> = {
            let st = self.state.read();
            if let Some(why) = &st.dead {
                return Err(self.dead_error(why));
            }
            keys.iter().filter(|k| !st.live.contains(k)).copied().collect()
        };
        let deadline = Instant::now() + timeout;
        let mut buf = Vec::new();
        for chunk in missing.chunks(MAX_QUERY_KEYS) {
            let id = self.next_query.fetch_add(1, Ordering::Relaxed);
            self.queries.lock().insert(id, Query::Pending(chunk.to_vec()));
            if let Err(e) = self.send(&Frame::Query { id, keys: chunk.to_vec() }, &mut buf) {
                self.queries.lock().remove(&id);
                return Err(e);
            }
            let mut q = self.queries.lock();
            let live = loop {
                if let Some(Query::Answered(_)) = q.get(&id) {
                    match q.remove(&id) {
                        Some(Query::Answered(l)) => break l,
                        _ => unreachable!("checked just above under the same lock"),
                    }
                }
                if let Some(why) = self.state.read().dead.clone() {
                    q.remove(&id);
                    return Err(self.dead_error(&why));
                }
                if self.queries_cv.wait_until(&mut q, deadline).timed_out() {
                    q.remove(&id);
                    return Err(Error::timeout(format!(
                        "SHM: agent '{}' did not answer a region query within {timeout:?}",
                        self.peer
                    )));
                }
            };
            drop(q);
            if let Some(i) = live.iter().position(|&l| !l) {
                return Err(Error::not_allowed(format!(
                    "SHM: agent '{}' no longer has region {:?} registered (deregistered since its metadata was fetched); fetch fresh metadata",
                    self.peer, chunk[i]
                )));
            }
            if live.len() != chunk.len() {
                return Err(Error::malformed(format!(
                    "SHM: agent '{}' answered {} statuses for {} keys",
                    self.peer,
                    live.len(),
                    chunk.len()
                )));
            }
        }
        Ok(())
    }

    /// Asks the owner for the memfd of each live key not yet mapped (or known
    /// unmappable) and maps those it shares, bounded by `timeout`. Keys the
    /// owner cannot share stay on cross-memory attach; a key found
    /// deregistered is a `NotAllowed` error.
    pub fn ensure_mapped(&self, keys: &[AccessKey], timeout: Duration) -> Result<()> {
        let missing: Vec<AccessKey> = {
            let st = self.state.read();
            if let Some(why) = &st.dead {
                return Err(self.dead_error(why));
            }
            keys.iter().filter(|k| !st.maps.contains_key(k) && !st.cma_only.contains(k)).copied().collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        let mut buf = Vec::new();
        let mut ids = Vec::with_capacity(missing.len());
        let forget = |ids: &[(u64, AccessKey)]| {
            let mut q = self.queries.lock();
            for (id, _) in ids {
                q.remove(id);
            }
        };
        // All requests first, then all answers: one round trip for many regions.
        for &key in &missing {
            let id = self.next_query.fetch_add(1, Ordering::Relaxed);
            self.queries.lock().insert(id, Query::PendingMap(key));
            ids.push((id, key));
            if let Err(e) = self.send(&Frame::Map { id, key }, &mut buf) {
                forget(&ids);
                return Err(e);
            }
        }
        let mut q = self.queries.lock();
        for (n, &(id, key)) in ids.iter().enumerate() {
            let outcome = loop {
                if let Some(Query::AnsweredMap(_)) = q.get(&id) {
                    match q.remove(&id) {
                        Some(Query::AnsweredMap(o)) => break o,
                        _ => unreachable!("checked just above under the same lock"),
                    }
                }
                let dead = self.state.read().dead.clone();
                let timed_out = dead.is_none() && self.queries_cv.wait_until(&mut q, deadline).timed_out();
                if dead.is_some() || timed_out {
                    for (id, _) in &ids[n..] {
                        q.remove(id);
                    }
                    return Err(match dead {
                        Some(why) => self.dead_error(&why),
                        None => Error::timeout(format!(
                            "SHM: agent '{}' did not answer a region map request within {timeout:?}",
                            self.peer
                        )),
                    });
                }
            };
            if let MapOutcome::Gone = outcome {
                for (id, _) in &ids[n + 1..] {
                    q.remove(id);
                }
                return Err(Error::not_allowed(format!(
                    "SHM: agent '{}' no longer has region {key:?} registered (deregistered since its metadata was fetched); fetch fresh metadata",
                    self.peer
                )));
            }
        }
        Ok(())
    }

    /// Whether the owner's end of the control connection is closed (the owner
    /// exited, was killed or dropped its backend): one `poll`, no waiting.
    /// A process's sockets close as it exits, before it can be reaped.
    pub fn hung_up(&self) -> bool {
        // `sock` stays open as long as this Link (it is `writer`'s
        // descriptor, which is shut down but never closed before).
        sys::hung_up(self.sock)
    }

    /// Marks the link dead (first reason wins), unmaps the owner's regions
    /// (waiting for copies in flight) and wakes waiting queries.
    pub fn mark_dead(&self, why: String) {
        let unmapped = {
            let mut st = self.state.write();
            if st.dead.is_none() {
                st.dead = Some(why);
            }
            st.live.clear();
            st.cma_only.clear();
            std::mem::take(&mut st.maps)
        };
        drop(unmapped);
        let _q = self.queries.lock();
        self.queries_cv.notify_all();
    }

    /// Whether the link was closed on purpose (unload, drop).
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Closes the link on purpose: posts fail from now on, the reader exits,
    /// and the peer is not reported lost.
    pub fn close(&self, why: &str) {
        self.closing.store(true, Ordering::SeqCst);
        self.mark_dead(why.to_string());
        let _ = self.writer.lock().shutdown(std::net::Shutdown::Both);
    }

    /// Reports the owner as lost (unless the link was closed on purpose).
    pub fn report_lost(&self) {
        if !self.is_closing() {
            self.events.peer_lost(&self.peer, self.instance);
        }
    }

    /// Applies a MAPPED answer (in stream order, so a later REVOKE wins):
    /// maps the memfd `fd` when the owner sent one.
    fn apply_mapped(&self, id: u64, status: MapStatus, fd: Option<std::os::fd::OwnedFd>, region: (u64, u64, u64)) {
        let mut q = self.queries.lock();
        let Some(Query::PendingMap(key)) = q.get(&id) else { return };
        let key = *key;
        let outcome = match (status, fd) {
            (MapStatus::Gone, _) => MapOutcome::Gone,
            (MapStatus::NoFd, _) => {
                let mut st = self.state.write();
                st.live.insert(key);
                st.cma_only.insert(key);
                MapOutcome::Cma
            }
            (MapStatus::Fd, fd) => {
                let (addr, len, offset) = region;
                let mapped = fd
                    .ok_or_else(|| Error::malformed("SHM: a MAPPED answer came without its descriptor"))
                    .and_then(|fd| Mapping::map(fd, offset, addr, len));
                let mut st = self.state.write();
                st.live.insert(key);
                match mapped {
                    Ok(m) => {
                        // Never replace a mapping: copies may be using it.
                        st.maps.entry(key).or_insert(m);
                        MapOutcome::Mapped
                    }
                    Err(e) => {
                        tracing::warn!(peer = %self.peer, error = %e, "SHM: cannot map a peer's region; using cross-memory attach for it");
                        st.cma_only.insert(key);
                        MapOutcome::Cma
                    }
                }
            }
        };
        q.insert(id, Query::AnsweredMap(outcome));
        self.queries_cv.notify_all();
    }

    fn read_loop(self: Arc<Self>, mut s: FdReader, mut buf: Vec<u8>) {
        let mut out = Vec::with_capacity(16);
        let why = loop {
            let frame = read_frame(&mut s, &mut buf);
            if let Ok(Frame::Mapped { id, status, region_addr, region_len, offset }) = frame {
                let fd = s.take_fd();
                s.clear_fds();
                self.apply_mapped(id, status, fd, (region_addr, region_len, offset));
                continue;
            }
            // Descriptors are expected only with MAPPED: close any other.
            s.clear_fds();
            match frame {
                Ok(Frame::Status { id, live }) => {
                    let mut q = self.queries.lock();
                    if let Some(Query::Pending(keys)) = q.get(&id) {
                        // Applied here, in stream order, so a later REVOKE wins.
                        let mut st = self.state.write();
                        for (k, _) in keys.iter().zip(&live).filter(|(_, &l)| l) {
                            st.live.insert(*k);
                        }
                        drop(st);
                        q.insert(id, Query::Answered(live));
                        self.queries_cv.notify_all();
                    }
                }
                Ok(Frame::Revoke { seq, key }) => {
                    // Waits for copies in flight (they hold the read lock),
                    // then unmaps the region before acknowledging.
                    let unmapped = self.state.write().revoke(&key);
                    drop(unmapped);
                    if let Err(e) = self.send(&Frame::Ack(seq), &mut out) {
                        break e.message().to_string();
                    }
                }
                Ok(Frame::Refuse(why)) => {
                    tracing::warn!(peer = %self.peer, "SHM: the owner closed the control connection: {why}");
                    break format!("the owner closed the control connection: {why}");
                }
                Ok(other) => break format!("unexpected frame from the owner: {other:?}"),
                Err(e) => break format!("control connection closed ({})", e.message()),
            }
        };
        self.mark_dead(why);
        self.report_lost();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AlignedBuf;

    fn pair(name: &str) -> (Server, Arc<Link>) {
        let socket = format!("kvferry-shm-test-{}-{name}", std::process::id()).into_bytes();
        let t = Duration::from_secs(5);
        let server =
            Server::start(socket.clone(), "owner".into(), 7, None, NotifSink::new(), t, Access::own_uid()).unwrap();
        let hello = Hello { agent: "init", instance: 1, nonce: 7, token: None };
        let pid = std::process::id() as i32;
        let link =
            Link::connect(&socket, hello, "owner".into(), 1, pid, (t, t), PeerEvents::detached(), &Access::own_uid())
                .unwrap();
        (server, link)
    }

    #[test]
    fn map_revoke_and_hang_up() {
        let (server, link) = pair("map");
        let t = Duration::from_secs(5);
        let mut buf = AlignedBuf::new(8192).unwrap();
        buf.as_mut_slice()[100] = 9;
        let (shared, raw, gone) = (AccessKey([1; 16]), AccessKey([2; 16]), AccessKey([3; 16]));
        server.add(shared, Some(Exported { share: buf.share().unwrap(), addr: 0x1000, len: 8192 }));
        server.add(raw, None);
        link.ensure_live(&[shared, raw], t).unwrap();
        link.ensure_mapped(&[shared, raw], t).unwrap();
        {
            let st = link.state.read();
            assert!(st.cma_only.contains(&raw) && !st.maps.contains_key(&raw));
            let p = st.maps[&shared].local_addr(0x1000 + 100, 1).unwrap();
            // SAFETY: p lies in the live mapping of `buf`'s memfd.
            assert_eq!(unsafe { *(p as *const u8) }, 9, "the mapping shows the owner's bytes");
        }
        // Asking again costs nothing: both answers are cached.
        link.ensure_mapped(&[shared, raw], t).unwrap();
        let e = link.ensure_mapped(&[gone], t).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::NotAllowed, "{e}");

        // Revocation returns once the initiator unmapped and acknowledged.
        server.revoke(shared, t);
        {
            let st = link.state.read();
            assert!(!st.maps.contains_key(&shared) && !st.live.contains(&shared) && st.dead.is_none());
        }
        assert!(!link.hung_up());
        // The owner going away is visible at once, without the reader thread.
        drop(server);
        assert!(link.hung_up());
    }

    #[test]
    fn access_admits_own_uid_and_listed_ones() {
        let a = Access::own_uid();
        assert!(a.admits(a.me));
        assert!(!a.admits(a.me.wrapping_add(1)));
        let b = Access::with_extra(vec![a.me.wrapping_add(1)]);
        assert!(b.admits(a.me) && b.admits(a.me.wrapping_add(1)) && !b.admits(a.me.wrapping_add(2)));
    }

    /// An abstract name can be bound by anyone: the initiator trusts a socket
    /// only if its listener is the expected pid, as an admitted uid.
    #[test]
    fn initiator_refuses_a_socket_held_by_another_process_or_uid() {
        let name = format!("kvferry-shm-test-{}-squat", std::process::id()).into_bytes();
        let _squatter = UnixListener::bind_addr(&abstract_addr(&name).unwrap()).unwrap();
        let t = Duration::from_secs(2);
        let hello = || Hello { agent: "init", instance: 1, nonce: 7, token: None };
        let me = std::process::id() as i32;
        let e = Link::connect(
            &name,
            hello(),
            "owner".into(),
            1,
            me + 1,
            (t, t),
            PeerEvents::detached(),
            &Access::own_uid(),
        )
        .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::NotAllowed, "{e}");
        assert!(e.message().contains(&format!("held by process {me}")), "{e}");
        let stranger = Access { me: Access::own_uid().me.wrapping_add(1), extra: Vec::new() };
        let e = Link::connect(&name, hello(), "owner".into(), 1, me, (t, t), PeerEvents::detached(), &stranger)
            .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::NotAllowed, "{e}");
    }

    /// The owner refuses, at accept, a uid it does not admit: a REFUSE frame
    /// naming the uid and the parameter, then EOF; no HELLO is even read.
    #[test]
    fn owner_refuses_a_uid_it_does_not_admit() {
        let name = format!("kvferry-shm-test-{}-uid", std::process::id()).into_bytes();
        let t = Duration::from_secs(5);
        let stranger = Access { me: Access::own_uid().me.wrapping_add(1), extra: Vec::new() };
        let server = Server::start(name.clone(), "owner".into(), 7, None, NotifSink::new(), t, stranger).unwrap();
        let mut s = UnixStream::connect_addr(&abstract_addr(&name).unwrap()).unwrap();
        s.set_read_timeout(Some(t)).unwrap();
        let mut buf = Vec::new();
        match read_frame(&mut s, &mut buf).unwrap() {
            Frame::Refuse(why) => assert!(why.contains("allowed_uids") && why.contains("uid"), "{why}"),
            other => panic!("expected REFUSE, got {other:?}"),
        }
        assert_eq!(s.read(&mut [0u8; 16]).unwrap(), 0, "then EOF");
        assert_eq!(server.refused(), 1);
    }

    /// A listener that never accepts (backlog full) cannot hold a connecting
    /// initiator: the connect gives up after its timeout.
    #[test]
    fn connect_to_a_full_backlog_is_bounded() {
        let name = format!("kvferry-shm-test-{}-backlog", std::process::id()).into_bytes();
        let _listener = UnixListener::bind_addr(&abstract_addr(&name).unwrap()).unwrap();
        let t = Duration::from_millis(100);
        let mut held = Vec::new();
        let start = Instant::now();
        let err = loop {
            match connect_abstract(&name, t) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() <= 5000, "the backlog never filled");
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(start.elapsed() < Duration::from_secs(10), "bounded: {:?}", start.elapsed());
        assert!(connect_abstract(b"kvferry-shm-test-nobody-listens", t).is_err());
    }

    /// A hand-built hostile owner (same process, so SO_PEERCRED passes)
    /// answers MAP with memfds it could later truncate or that are too short:
    /// the initiator maps none of them and uses cross-memory attach for those
    /// regions, so no copy can ever SIGBUS it.
    #[test]
    fn initiator_does_not_map_a_hostile_owners_memfd() {
        use std::os::fd::AsFd;
        let name = format!("kvferry-shm-test-{}-hostile-owner", std::process::id()).into_bytes();
        let listener = UnixListener::bind_addr(&abstract_addr(&name).unwrap()).unwrap();
        let keys = [AccessKey([1; 16]), AccessKey([2; 16])];
        let owner = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            assert!(matches!(read_frame(&mut s, &mut buf).unwrap(), Frame::Hello { .. }));
            let mut out = Vec::new();
            Frame::Welcome.encode(&mut out);
            s.write_all(&out).unwrap();
            for n in 0..2 {
                let Frame::Map { id, .. } = read_frame(&mut s, &mut buf).unwrap() else { panic!("expected MAP") };
                let fd = sys::memfd_create(c"evil", libc::MFD_ALLOW_SEALING).unwrap();
                // n = 0: unsealed, 1 MiB (truncatable later); n = 1: sealed but 4 KiB for a 1 MiB region.
                let size = if n == 0 { 1 << 20 } else { 4096 };
                sys::set_len(fd.as_raw_fd(), size).unwrap();
                if n == 1 {
                    sys::add_seals(fd.as_raw_fd(), libc::F_SEAL_SHRINK).unwrap();
                }
                out.clear();
                let status = MapStatus::Fd;
                Frame::Mapped { id, status, region_addr: 0x10_0000, region_len: 1 << 20, offset: 0 }.encode(&mut out);
                fdpass::send_with_fd(&s, &out, fd.as_fd()).unwrap();
            }
            // Hold the connection until the initiator is done.
            let _ = read_frame(&mut s, &mut buf);
        });
        let t = Duration::from_secs(5);
        let hello = Hello { agent: "init", instance: 1, nonce: 7, token: None };
        let me = std::process::id() as i32;
        let link =
            Link::connect(&name, hello, "owner".into(), 1, me, (t, t), PeerEvents::detached(), &Access::own_uid())
                .unwrap();
        link.ensure_mapped(&keys, t).unwrap();
        {
            let st = link.state.read();
            assert!(st.maps.is_empty(), "no hostile memfd was mapped");
            assert!(keys.iter().all(|k| st.cma_only.contains(k) && st.live.contains(k)), "both fall back to CMA");
        }
        link.close("test over");
        owner.join().unwrap();
    }

    /// Same-uid clients that connect and say nothing hold a connection slot
    /// each, up to the cap, and only for the handshake timeout: one more is
    /// refused with a REFUSE naming the limit, and once the idle ones time
    /// out a legitimate initiator connects.
    #[test]
    fn connection_cap_and_idle_handshakes_are_bounded() {
        let name = format!("kvferry-shm-test-{}-cap", std::process::id()).into_bytes();
        let t = Duration::from_millis(500);
        let server =
            Server::start(name.clone(), "owner".into(), 7, None, NotifSink::new(), t, Access::own_uid()).unwrap();
        server.set_max_conns(4);
        let addr = abstract_addr(&name).unwrap();
        let idle: Vec<UnixStream> = (0..4).map(|_| UnixStream::connect_addr(&addr).unwrap()).collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.shared.serving.load(Ordering::SeqCst) < 4 {
            assert!(Instant::now() < deadline, "the idle connections were not accepted");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut extra = UnixStream::connect_addr(&addr).unwrap();
        extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        match read_frame(&mut extra, &mut Vec::new()).unwrap() {
            Frame::Refuse(why) => assert!(why.contains("already serves 4"), "{why}"),
            other => panic!("expected REFUSE, got {other:?}"),
        }
        assert_eq!(server.refused(), 1);
        // The idle ones are dropped after the handshake timeout; then a real initiator gets in.
        while server.shared.serving.load(Ordering::SeqCst) > 0 {
            assert!(Instant::now() < deadline, "idle handshakes were not timed out");
            std::thread::sleep(Duration::from_millis(10));
        }
        let me = std::process::id() as i32;
        let hello = Hello { agent: "legit", instance: 2, nonce: 7, token: None };
        let tt = Duration::from_secs(5);
        Link::connect(&name, hello, "owner".into(), 1, me, (tt, tt), PeerEvents::detached(), &Access::own_uid())
            .unwrap();
        drop(idle);
    }

    /// A hand-built client floods NOTIF frames: the queue stays within its
    /// per-sender bound, the flooder is told why and closed, and another
    /// sender's notifications still arrive.
    #[test]
    fn notif_flood_is_bounded_and_the_flooder_closed() {
        let name = format!("kvferry-shm-test-{}-flood", std::process::id()).into_bytes();
        let t = Duration::from_secs(5);
        let limits = crate::notif::NotifLimits { per_peer_bytes: 64 << 10, total_bytes: 1 << 20 };
        let sink = NotifSink::with_limits(limits);
        let server = Server::start(name.clone(), "owner".into(), 7, None, sink.clone(), t, Access::own_uid()).unwrap();
        let mut s = UnixStream::connect_addr(&abstract_addr(&name).unwrap()).unwrap();
        s.set_read_timeout(Some(t)).unwrap();
        s.set_write_timeout(Some(t)).unwrap();
        let mut out = Vec::new();
        let hello = Frame::Hello { version: VERSION, instance: 1, nonce: 7, token: Vec::new(), name: "flooder".into() };
        hello.encode(&mut out);
        s.write_all(&out).unwrap();
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut s, &mut buf).unwrap(), Frame::Welcome);
        out.clear();
        Frame::Notif(vec![0xab; 1000]).encode(&mut out);
        let mut sent = 0usize;
        // 10 000 × 1 KB = 10 MB offered, 150 × the sender's share.
        while sent < 10_000 && s.write_all(&out).is_ok() {
            sent += 1;
        }
        match read_frame(&mut s, &mut buf).unwrap() {
            Frame::Refuse(why) => assert!(why.contains("refused") && why.contains("notif_limits"), "{why}"),
            other => panic!("expected REFUSE, got {other:?}"),
        }
        assert!(sent < 10_000, "the owner closed the flooding connection (sent {sent})");
        assert!(sink.queued_bytes() <= limits.per_peer_bytes, "{} bytes queued", sink.queued_bytes());
        assert!(sink.dropped() >= 1);
        assert_eq!(server.flooded(), 1);
        // A legitimate sender still gets through.
        let hello = Hello { agent: "legit", instance: 2, nonce: 7, token: None };
        let me = std::process::id() as i32;
        let link =
            Link::connect(&name, hello, "owner".into(), 1, me, (t, t), PeerEvents::detached(), &Access::own_uid())
                .unwrap();
        let mut f = Vec::new();
        link.send(&Frame::Notif(b"still here".to_vec()), &mut f).unwrap();
        let deadline = Instant::now() + t;
        let got = loop {
            sink.wait(Duration::from_millis(100));
            let n = sink.take();
            if let Some(m) = n.get("legit") {
                break m.clone();
            }
            assert!(Instant::now() < deadline, "the legit notification did not arrive");
        };
        assert_eq!(got, vec![b"still here".to_vec()]);
    }
}
