//! The owner side of the SHM control channel ([`Server`]): a listener
//! thread that admits connections by their kernel-reported uid, one thread
//! per connection that checks its HELLO and answers QUERY and MAP (the
//! region's memfd goes with the answer), and [`Server::revoke`], which tells
//! every connected initiator that a region is gone and waits (bounded) for
//! their acknowledgements. See [`control`](super::control).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use super::control::{read_frame, Access};
use super::fdpass;
use super::socket::{abstract_addr, connect_abstract, peer_cred};
use super::wire::{Frame, MapStatus, VERSION};
use crate::auth::AuthToken;
use crate::error::{Error, Result};
use crate::mem::MemShare;
use crate::notif::NotifSink;
use crate::types::AccessKey;

/// Most connections an owner serves at once (one thread each); more are
/// refused with a REFUSE frame naming the limit.
pub const MAX_CONNS: usize = 1024;

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
    #[cfg(test)]
    pub(super) fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Connections closed so far because a notification of theirs found the
    /// agent's notification queue full.
    #[cfg(test)]
    pub(super) fn flooded(&self) -> u64 {
        self.shared.flooded.load(Ordering::Relaxed)
    }

    /// Lowers (or raises) the most connections served at once, [`MAX_CONNS`]
    /// by default; for tests of the bound.
    #[cfg(test)]
    pub(super) fn set_max_conns(&self, n: usize) {
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
                Some(w) => crate::sys::send_within(&*w, &buf, deadline).is_ok(),
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
        if !handle(shared, &conn, f, &mut out) {
            break;
        }
    }
    conn.shutdown();
    shared.conns.lock().retain(|c| !Arc::ptr_eq(c, &conn));
    // Wake any revoke waiting on this connection: it will never ack now.
    conn.acked_cv.notify_all();
}

/// Handles one frame from an initiator (`out` is reused for answers);
/// `false`: the connection ends.
fn handle(shared: &ServerShared, conn: &ServerConn, f: Frame, out: &mut Vec<u8>) -> bool {
    match f {
        Frame::Notif(msg) => take_notif(shared, conn, msg),
        Frame::Query { id, keys } => {
            // Hold the writer while reading the table: a REVOKE for a key
            // read as live here is then written after this STATUS.
            let mut w = conn.writer.lock();
            let live = {
                let t = shared.live.read();
                keys.iter().map(|k| t.contains_key(k)).collect()
            };
            out.clear();
            Frame::Status { id, live }.encode(out);
            w.write_all(out).is_ok()
        }
        Frame::Map { id, key } => answer_map(shared, conn, id, key, out),
        Frame::Ack(seq) => {
            let mut a = conn.acked.lock();
            *a = (*a).max(seq);
            conn.acked_cv.notify_all();
            true
        }
        other => {
            tracing::debug!(agent = %shared.agent, peer = %conn.peer, frame = ?other, "SHM: unexpected frame; closing");
            false
        }
    }
}

/// Queues a notification. A full queue refuses it (counted by the sink):
/// the sender is told why and its connection closed (`false`), so that a
/// flood costs the owner nothing more than the queue's bound.
fn take_notif(shared: &ServerShared, conn: &ServerConn, msg: Vec<u8>) -> bool {
    let Err(e) = shared.sink.push(conn.peer.clone(), msg) else { return true };
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
    false
}

/// Answers a MAP: MAPPED with the region's memfd, or why there is none.
/// As for QUERY, the answer is written before any REVOKE of this key.
fn answer_map(shared: &ServerShared, conn: &ServerConn, id: u64, key: AccessKey, out: &mut Vec<u8>) -> bool {
    let w = conn.writer.lock();
    let export = match shared.live.read().get(&key) {
        None => Err(MapStatus::Gone),
        Some(None) => Err(MapStatus::NoFd),
        Some(Some(e)) => Ok(e.clone()),
    };
    out.clear();
    let sent = match export {
        Err(status) => {
            Frame::Mapped { id, status, region_addr: 0, region_len: 0, offset: 0 }.encode(out);
            (&*w).write_all(out)
        }
        Ok(e) => {
            let status = MapStatus::Fd;
            Frame::Mapped { id, status, region_addr: e.addr, region_len: e.len, offset: e.share.offset() }.encode(out);
            fdpass::send_with_fd(&w, out, e.share.fd())
        }
    };
    sent.is_ok()
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
    if crate::types::check_agent_name(&name).is_err() {
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

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::super::link::{Hello, Link};
    use super::*;
    use crate::backend::PeerEvents;

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
