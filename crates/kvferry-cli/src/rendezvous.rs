//! The benchmark's rendezvous: a TCP connection between initiator and target
//! over which they swap metadata and buffer descriptors before the run, and
//! which tells the target when the run is over (the initiator closes it).
//!
//! Frames: a 4-byte little-endian length, then a postcard [`Msg`]. Every read
//! is bounded by a timeout and a maximum frame size.
//!
//! A client's first frame is [`Msg::Auth`] with the shared token (empty when
//! none is configured), read with a small size cap; the server checks it
//! before it reads anything larger. [`Server`] accepts concurrently within
//! [`Limits`]: connections in all and per source address, and one deadline
//! for the whole handshake.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvferry::admission::ConnGate;
use kvferry::{AuthToken, Error, Result};
use serde::{Deserialize, Serialize};

const MAX_FRAME: usize = 64 << 20;
/// Largest first (`Auth`) frame: a token and postcard's framing.
const MAX_AUTH_FRAME: usize = kvferry::auth::MAX_TOKEN_LEN + 16;

/// What initiator and target say to each other.
#[derive(Debug, Serialize, Deserialize)]
pub enum Msg {
    /// Initiator → target: the backend, the buffer it needs, and the initiator's metadata.
    Hello { backend: String, buf_len: u64, pattern_seed: u8, metadata: Vec<u8> },
    /// Target → initiator: its metadata and the serialized descriptor list of what it exposes.
    Ready { metadata: Vec<u8>, descs: Vec<u8>, files: Vec<u8> },
    /// Either side: a failure, with its message.
    Failed(String),
    /// Client → server, first: the shared token (empty if none).
    Auth(Vec<u8>),
}

/// Writes one frame.
pub fn send(s: &mut TcpStream, m: &Msg) -> Result<()> {
    let body = postcard::to_allocvec(m).map_err(|e| Error::internal(format!("encoding a rendezvous frame: {e}")))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    s.write_all(&buf).map_err(|e| Error::io("rendezvous: sending to the peer", e))
}

/// Reads one frame, waiting at most `timeout`.
pub fn recv(s: &mut TcpStream, timeout: Duration) -> Result<Msg> {
    recv_until(s, Instant::now() + timeout, MAX_FRAME)
}

/// Fills `buf` before `deadline`: a peer trickling bytes is cut off there.
fn read_until(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Result<()> {
    kvferry::os::read_exact_by(s, buf, deadline).map_err(|e| Error::io("rendezvous: reading from the peer", e))
}

/// Reads one frame of at most `max` bytes before `deadline`.
pub fn recv_until(s: &mut TcpStream, deadline: Instant, max: usize) -> Result<Msg> {
    let mut len = [0u8; 4];
    read_until(s, &mut len, deadline)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(Error::malformed(format!("rendezvous frame of {len} bytes is larger than {max}")));
    }
    let mut body = vec![0u8; len];
    read_until(s, &mut body, deadline)?;
    let m: Msg =
        postcard::from_bytes(&body).map_err(|e| Error::malformed(format!("rendezvous frame does not decode: {e}")))?;
    if let Msg::Failed(why) = &m {
        return Err(Error::new(kvferry::ErrorKind::Backend, format!("the peer failed: {why}")));
    }
    Ok(m)
}

/// Connects to `addr` (retrying refused connections until `timeout`) and
/// presents `token` (the first frame every server expects).
pub fn connect_auth(addr: &str, timeout: Duration, token: Option<&AuthToken>) -> Result<TcpStream> {
    let mut s = connect(addr, timeout)?;
    send(&mut s, &Msg::Auth(token.map(|t| t.as_bytes().to_vec()).unwrap_or_default()))?;
    Ok(s)
}

/// Bounds of a rendezvous [`Server`].
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections in their handshake at once, from everyone. Default: 64.
    pub max_connections: usize,
    /// Connections in their handshake at once from one source (an IPv4
    /// address or an IPv6 /64, see [`kvferry::admission::source_of`]). Default: 8.
    pub max_connections_per_ip: usize,
    /// The whole handshake (token, `Hello`, the answer) must end within this. Default: 10 s.
    pub deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_connections: 64, max_connections_per_ip: 8, deadline: Duration::from_secs(10) }
    }
}

/// What a server does with an authenticated client's first message: the
/// stream (its handshake deadline is `deadline`), the client's address, the message.
pub type Handler = Arc<dyn Fn(&mut TcpStream, SocketAddr, Msg, Instant) -> Result<()> + Send + Sync>;

/// A rendezvous port served concurrently: every connection gets a thread
/// (within [`Limits`]), must present the token first, and its handshake
/// must end by the deadline.
pub struct Server {
    listener: TcpListener,
    limits: Limits,
    token: Option<AuthToken>,
}

impl Server {
    /// Serves `listener` with `limits`, admitting clients that present `token`
    /// (any client when `None`).
    pub fn new(listener: TcpListener, limits: Limits, token: Option<AuthToken>) -> Server {
        Server { listener, limits, token }
    }

    /// Accepts until `stop` is set (checked at least every 200 ms), running
    /// `handler` on each admitted client's first message on a thread of its own.
    pub fn run(self, stop: &AtomicBool, handler: Handler) -> Result<()> {
        let gate = ConnGate::new(self.limits.max_connections, self.limits.max_connections_per_ip);
        let token = self.token.map(Arc::new);
        self.listener.set_nonblocking(true).map_err(|e| Error::io("rendezvous: nonblocking", e))?;
        while !stop.load(Ordering::Relaxed) {
            let _ = kvferry::os::wait_readable(&self.listener, Duration::from_millis(200));
            loop {
                let (s, peer) = match self.listener.accept() {
                    Ok(c) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        eprintln!("rendezvous: accept: {e}");
                        break;
                    }
                };
                let admitted = gate.admit(peer.ip()).map_err(|why| format!("rendezvous: {why}"));
                let slot = match admitted {
                    Ok(slot) => slot,
                    Err(why) => {
                        // A fresh socket's buffer takes the short answer without blocking.
                        let mut s = s;
                        let _ = s.set_nonblocking(true);
                        let _ = send(&mut s, &Msg::Failed(why));
                        continue;
                    }
                };
                let (token, handler, deadline) = (token.clone(), handler.clone(), self.limits.deadline);
                let spawned = std::thread::Builder::new().name("kvf-rendezvous".into()).spawn(move || {
                    let _slot = slot;
                    let mut s = s;
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_nodelay(true);
                    let _ = s.set_write_timeout(Some(deadline));
                    let deadline = Instant::now() + deadline;
                    let r = admit(&mut s, deadline, token.as_deref()).and_then(|()| {
                        let m = recv_until(&mut s, deadline, MAX_FRAME)?;
                        handler(&mut s, peer, m, deadline)
                    });
                    if let Err(e) = r {
                        let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                        let _ = send(&mut s, &Msg::Failed(e.to_string()));
                        eprintln!("rendezvous: client {peer}: {e}");
                    }
                });
                if let Err(e) = spawned {
                    eprintln!("rendezvous: cannot spawn a connection thread: {e}");
                }
            }
        }
        Ok(())
    }
}

/// Checks that a client's first message is a `Hello` whose metadata
/// decodes, so that a garbage `Hello` is refused before a target gives its
/// place to it.
pub fn check_hello(peer: SocketAddr, m: &Msg) -> Result<()> {
    match m {
        Msg::Hello { metadata, .. } => kvferry::metadata::AgentMetadata::decode(metadata).map(drop).map_err(|e| {
            Error::malformed(format!("rendezvous: {peer}'s Hello carries metadata that does not decode: {e}"))
        }),
        _ => Err(Error::malformed(format!("rendezvous: {peer} did not start with Hello"))),
    }
}

/// Serves `listener` (within the default [`Limits`], admitting clients
/// that present `token`) until a client's first message passes `check`,
/// and hands that client over: its stream, address and message. Clients
/// that fail (no token, garbage, too slow, refused by `check`) get a
/// `Failed` answer and the wait goes on; handshakes run concurrently, so a
/// silent client cannot hold the port.
pub fn accept_first(
    listener: TcpListener,
    token: Option<AuthToken>,
    check: impl Fn(SocketAddr, &Msg) -> Result<()> + Send + Sync + 'static,
) -> Result<(TcpStream, SocketAddr, Msg)> {
    type Accepted = (TcpStream, SocketAddr, Msg);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Accepted>(1);
    let tx = std::sync::Mutex::new(Some(tx));
    let handler: Handler = Arc::new(move |s, peer, m, _deadline| {
        check(peer, &m)?;
        let mut slot = tx.lock().unwrap_or_else(|p| p.into_inner());
        let taken = || Error::not_allowed("this target already serves an initiator; start another target");
        let sender = slot.as_ref().ok_or_else(taken)?;
        let stream = s.try_clone().map_err(|e| Error::io("rendezvous: keeping the connection", e))?;
        sender.try_send((stream, peer, m)).map_err(|_| taken())?;
        *slot = None;
        Ok(())
    });
    let stop = Arc::new(AtomicBool::new(false));
    let server = Server::new(listener, Limits::default(), token);
    let st = stop.clone();
    let thread = std::thread::Builder::new()
        .name("kvf-rendezvous-accept".into())
        .spawn(move || server.run(&st, handler))
        .map_err(|e| Error::io("rendezvous: cannot spawn its thread", e))?;
    let accepted = rx.recv();
    stop.store(true, Ordering::Relaxed);
    let _ = thread.join();
    let (s, peer, m) =
        accepted.map_err(|_| Error::internal("rendezvous: the server stopped before an initiator arrived"))?;
    // The handshake's deadline is over: the session lasts as long as the initiator keeps it.
    let _ = s.set_write_timeout(Some(Duration::from_secs(60)));
    Ok((s, peer, m))
}

/// Reads the client's `Auth` frame (small) and checks its token.
fn admit(s: &mut TcpStream, deadline: Instant, token: Option<&AuthToken>) -> Result<()> {
    match recv_until(s, deadline, MAX_AUTH_FRAME)? {
        Msg::Auth(t) if AuthToken::admits(token, &t) => Ok(()),
        Msg::Auth(_) => Err(Error::not_allowed(
            "rendezvous: auth token missing or wrong; set the same KVFERRY_AUTH_TOKEN on both sides",
        )),
        _ => Err(Error::malformed("rendezvous: a client starts with its auth frame; run the same kvferry version")),
    }
}

/// Connects to `addr`, retrying refused connections until `timeout`.
pub fn connect(addr: &str, timeout: Duration) -> Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| Error::invalid(format!("'{addr}' is not a host:port address: {e}")))?
        .collect();
    loop {
        let mut last = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, Duration::from_secs(1)) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => last = Some(e),
            }
        }
        if Instant::now() >= deadline {
            let e = last.unwrap_or_else(|| std::io::Error::other("no address"));
            return Err(Error::io(format!("rendezvous: connecting to the target at {addr} (is `kvferry bench p2p --mode target` running there?)"), e));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Binds the target's rendezvous listener.
pub fn listen(ip: &str, port: u16) -> Result<TcpListener> {
    TcpListener::bind((ip, port)).map_err(|e| Error::io(format!("rendezvous: binding {ip}:{port}"), e))
}

/// Blocks until the peer closes the connection (or sends anything), or `timeout`.
pub fn wait_closed(s: &mut TcpStream, timeout: Option<Duration>) {
    let _ = s.set_read_timeout(timeout);
    let mut b = [0u8; 64];
    let _ = s.read(&mut b);
}
