//! Peer-to-peer metadata exchange: a listener that serves this agent's
//! metadata on a port, and the client calls peers make to it.
//!
//! One message per connection each way; the framing and the requests
//! ([`MsgHeader`], [`encode_msg`], [`decode_msg`], [`ListenerRequest`]) are
//! in `listener/wire.rs`, which does no I/O. This file is the serving part:
//! threads, sockets, deadlines and budgets.
//!
//! The listener serves connections concurrently within [`ListenerLimits`]:
//! a cap on connections in flight (in all and per source address), one
//! deadline for the whole exchange, a cap on body bytes held at once, and the
//! token checked before a body is read.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::admission::{ConnGate, ConnSlot, Refusal};
use crate::auth::AuthToken;
use crate::error::{Error, Result};
use crate::sys;

mod wire;

pub use wire::{
    decode_msg, encode_msg, ListenerRequest, MsgHeader, Op, HEADER_LEN, MAGIC, MAX_BODY, MAX_TOKEN, VERSION,
};

/// The bounds of a metadata listener and of what peers may leave in the
/// agent through it. Every field is a hard cap; the defaults fit a cluster of
/// a thousand agents and keep a hostile client's reach to a few hundred MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections served at once, from everyone; more are answered `ERROR`
    /// and closed at once. Default: 64.
    pub max_connections: usize,
    /// Connections served at once from one source (an IPv4 address or an
    /// IPv6 /64, see [`crate::admission::source_of`]). Default: 8, so that
    /// one host cannot take every slot.
    pub max_connections_per_ip: usize,
    /// The whole exchange (header, token, body, the agent's work, the
    /// answer) must finish within this; a client that sends a byte every few
    /// seconds is cut off here. Default: 5 s.
    pub request_deadline: Duration,
    /// Largest request body the listener reads (at most [`MAX_BODY`]).
    /// Default: 16 MiB (an agent with 1000 regions publishes about 29 KiB).
    pub max_body: u32,
    /// Bytes of request bodies held by all connections at once; a request
    /// that would pass it is refused before its body is read. Default: 128 MiB.
    pub max_inflight_bytes: u64,
    /// Peers loaded through the listener (`SEND`) held at once; a new one
    /// past it is refused until one is invalidated. Default: 1024.
    pub max_peers: usize,
    /// Regions one peer loaded through the listener (or fetched from a
    /// listener) may publish. Default: 65 536.
    pub max_regions_per_peer: usize,
    /// Regions of all peers loaded through listeners together (about 110
    /// bytes of memory each). Default: 1 Mi (about 110 MiB).
    pub max_regions_total: usize,
    /// Metadata bytes (connection info, exported files, regions) of all
    /// peers loaded through listeners together. Default: 256 MiB.
    pub max_blob_bytes_total: u64,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            max_connections: 64,
            max_connections_per_ip: 8,
            request_deadline: Duration::from_secs(5),
            max_body: 16 << 20,
            max_inflight_bytes: 128 << 20,
            max_peers: 1024,
            max_regions_per_peer: 1 << 16,
            max_regions_total: 1 << 20,
            max_blob_bytes_total: 256 << 20,
        }
    }
}

/// Who sent a request to the listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Caller {
    /// The peer's address as the socket saw it.
    pub(crate) addr: SocketAddr,
    /// A token is configured and the caller presented it.
    pub(crate) authenticated: bool,
}

/// What the agent does with a request: `Ok(Some(blob))` answers METADATA,
/// `Ok(None)` OK, `Err(msg)` ERROR.
pub(crate) type Handler =
    Arc<dyn Fn(Caller, ListenerRequest) -> std::result::Result<Option<Vec<u8>>, String> + Send + Sync>;

/// One admitted connection: its place in the listener's [`ConnGate`] and
/// the body bytes it holds of `max_inflight_bytes`. Dropping it gives both back.
struct Slot {
    _conn: ConnSlot,
    budget: Arc<Mutex<u64>>,
    bytes: u64,
}

impl Slot {
    /// Reserves `n` body bytes against `max_inflight_bytes`.
    fn reserve(&mut self, n: u64, limits: &ListenerLimits) -> Result<()> {
        let mut held = self.budget.lock();
        if *held + n > limits.max_inflight_bytes {
            return Err(Error::not_allowed(format!(
                "metadata listener busy: a {n}-byte body would pass the {} bytes all requests may hold at once (max_inflight_bytes); retry shortly",
                limits.max_inflight_bytes
            )));
        }
        *held += n;
        self.bytes += n;
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *self.budget.lock() -= self.bytes;
    }
}

/// A running listener. Dropping it stops accepting; connections in flight
/// end by their deadline.
pub(crate) struct ListenerHandle {
    addr: SocketAddr,
    fd: RawFd,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ListenerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerHandle").field("addr", &self.addr).finish()
    }
}

impl ListenerHandle {
    /// Binds `addr` and serves requests with `handler`: an accept thread and
    /// one short-lived thread per admitted connection, within `limits`.
    pub(crate) fn start(
        addr: SocketAddr,
        limits: ListenerLimits,
        token: Option<AuthToken>,
        handler: Handler,
    ) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::io(format!("metadata listener: cannot bind {addr}; pick another listen_port"), e))?;
        let bound = listener.local_addr().map_err(|e| Error::io("metadata listener address", e))?;
        let fd = listener.as_raw_fd();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let gate = ConnGate::new(limits.max_connections, limits.max_connections_per_ip);
        let budget = Arc::new(Mutex::new(0u64));
        let token = token.map(Arc::new);
        let thread = std::thread::Builder::new()
            .name(format!("kvf-md-listen-{}", bound.port()))
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::Acquire) {
                        break;
                    }
                    let s = match conn {
                        Ok(s) => s,
                        Err(_) => {
                            // Out of descriptors or a reset before accept: back off a little.
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    };
                    let Ok(peer) = s.peer_addr() else { continue };
                    let slot = match gate.admit(peer.ip()) {
                        Ok(conn) => Slot { _conn: conn, budget: budget.clone(), bytes: 0 },
                        Err(why) => {
                            let cap = match why {
                                Refusal::Busy { .. } => "max_connections",
                                Refusal::SourceBusy { .. } => "max_connections_per_ip",
                            };
                            refuse(s, &format!("metadata listener: {why} ({cap})"));
                            continue;
                        }
                    };
                    let (token, handler) = (token.clone(), handler.clone());
                    let spawned = std::thread::Builder::new().name("kvf-md-conn".into()).spawn(move || {
                        let mut slot = slot;
                        if let Err(e) = serve_one(s, peer, &limits, &mut slot, token.as_deref(), &handler) {
                            tracing::debug!(%peer, error = %e, "metadata listener: request failed");
                        }
                    });
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, "metadata listener: cannot spawn a connection thread");
                    }
                }
            })
            .map_err(|e| Error::io("metadata listener: cannot spawn its thread", e))?;
        Ok(ListenerHandle { addr: bound, fd, stop, thread: Some(thread) })
    }

    /// The bound port.
    pub(crate) fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The bound address.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ListenerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // fd is the listening socket, owned by the thread until it exits;
        // shutdown wakes its accept() (Linux) and is harmless if it already exited.
        sys::shutdown(self.fd);
        if let Some(t) = self.thread.take() {
            // The agent may be dropped by a listener thread itself (its
            // handler held the last handle): the accept thread exits by itself then.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// Answers `ERROR msg` to a connection over a cap without ever blocking the
/// accept thread (the message fits in a fresh socket's buffer), then closes it.
fn refuse(mut s: TcpStream, msg: &str) {
    let _ = s.set_nonblocking(true);
    if let Ok(m) = encode_msg(Op::Error, &[], msg.as_bytes()) {
        let _ = s.write(&m);
    }
}

/// Fills `buf` from `s` before `deadline` (a whole-message deadline, not a
/// per-read one: a peer trickling bytes is cut off at the deadline).
fn read_until(s: &mut TcpStream, buf: &mut [u8], deadline: Instant, what: &str) -> Result<()> {
    sys::read_exact_by(s, buf, deadline).map_err(|e| Error::io(format!("metadata listener: {what}"), e))
}

/// Writes all of `bytes` before `deadline`.
fn write_until(s: &mut TcpStream, bytes: &[u8], deadline: Instant) -> Result<()> {
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
    s.set_write_timeout(Some(left)).map_err(|e| Error::io("metadata listener: set a timeout", e))?;
    s.write_all(bytes).map_err(|e| Error::io("metadata listener: answering", e))
}

/// Reads one message: header, then token (checked before the body is read
/// or even allocated), then body (reserved against the in-flight budget).
fn read_request(
    s: &mut TcpStream,
    deadline: Instant,
    limits: &ListenerLimits,
    slot: &mut Slot,
    token: Option<&AuthToken>,
) -> Result<(MsgHeader, Vec<u8>)> {
    let mut hb = [0u8; HEADER_LEN];
    read_until(s, &mut hb, deadline, "reading a header")?;
    let h = MsgHeader::decode(&hb)?;
    let mut tok = vec![0u8; h.token_len as usize];
    read_until(s, &mut tok, deadline, "reading the token")?;
    if !AuthToken::admits(token, &tok) {
        return Err(Error::not_allowed(
            "metadata listener: auth token missing or wrong; set the same KVFERRY_AUTH_TOKEN on both agents",
        ));
    }
    if h.body_len > limits.max_body {
        return Err(Error::not_allowed(format!(
            "metadata listener: a {}-byte body is larger than this listener accepts ({} bytes, max_body)",
            h.body_len, limits.max_body
        )));
    }
    slot.reserve(u64::from(h.body_len), limits)?;
    let mut body = vec![0u8; h.body_len as usize];
    read_until(s, &mut body, deadline, "reading the body")?;
    Ok((h, body))
}

fn serve_one(
    mut s: TcpStream,
    peer: SocketAddr,
    limits: &ListenerLimits,
    slot: &mut Slot,
    token: Option<&AuthToken>,
    handler: &Handler,
) -> Result<()> {
    let deadline = Instant::now() + limits.request_deadline;
    let reply = |s: &mut TcpStream, op: Op, body: &[u8]| -> Result<()> {
        write_until(s, &encode_msg(op, &[], body)?, deadline)
    };
    let (h, body) = match read_request(&mut s, deadline, limits, slot, token) {
        Ok(m) => m,
        Err(e) => {
            let _ = reply(&mut s, Op::Error, e.message().as_bytes());
            return Err(e);
        }
    };
    let req = match ListenerRequest::decode(h.op, body) {
        Ok(r) => r,
        Err(e) => {
            reply(&mut s, Op::Error, e.message().as_bytes())?;
            return Err(e);
        }
    };
    let caller = Caller { addr: peer, authenticated: token.is_some() };
    match handler(caller, req) {
        Ok(Some(blob)) => reply(&mut s, Op::Metadata, &blob),
        Ok(None) => reply(&mut s, Op::Ok, &[]),
        Err(msg) => reply(&mut s, Op::Error, msg.as_bytes()),
    }
}

/// Sends one request to the listener at `addr` and returns the answer's
/// kind and body; the whole exchange is bounded by `timeout`.
pub(crate) fn call(
    addr: SocketAddr,
    timeout: Duration,
    token: Option<&AuthToken>,
    op: Op,
    body: &[u8],
) -> Result<(Op, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let ctx = |what: &str| format!("metadata listener at {addr}: {what}");
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| Error::io(ctx("cannot connect"), e))?;
    let msg = encode_msg(op, token.map(AuthToken::as_bytes).unwrap_or_default(), body)?;
    write_until(&mut s, &msg, deadline).map_err(|e| e.context(ctx("sending")))?;
    let mut hb = [0u8; HEADER_LEN];
    read_until(&mut s, &mut hb, deadline, "reading the answer").map_err(|e| e.context(ctx("answer")))?;
    let h = MsgHeader::decode(&hb).map_err(|e| e.context(ctx("answer")))?;
    let mut rest = vec![0u8; h.token_len as usize + h.body_len as usize];
    read_until(&mut s, &mut rest, deadline, "reading the answer").map_err(|e| e.context(ctx("answer")))?;
    let body = rest.split_off(h.token_len as usize);
    if h.op == Op::Error {
        return Err(Error::new(crate::ErrorKind::NotAllowed, ctx(&String::from_utf8_lossy(&body))));
    }
    Ok((h.op, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_and_stops() {
        let handler: Handler = Arc::new(|_, r| match r {
            ListenerRequest::Fetch(n) if n == "me" => Ok(Some(b"blob".to_vec())),
            _ => Err("no".into()),
        });
        let t = AuthToken::new("t").unwrap();
        let l =
            ListenerHandle::start("127.0.0.1:0".parse().unwrap(), ListenerLimits::default(), Some(t.clone()), handler)
                .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", l.port()).parse().unwrap();
        let (op, body) = call(addr, Duration::from_secs(2), Some(&t), Op::Fetch, b"me").unwrap();
        assert_eq!((op, body.as_slice()), (Op::Metadata, &b"blob"[..]));
        let e = call(addr, Duration::from_secs(2), None, Op::Fetch, b"me").unwrap_err();
        assert!(e.message().contains("auth token"), "{e}");
        drop(l);
        assert!(call(addr, Duration::from_secs(1), Some(&t), Op::Fetch, b"me").is_err());
    }
}
