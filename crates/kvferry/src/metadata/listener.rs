//! Peer-to-peer metadata exchange: a listener that serves this agent's
//! metadata on a port, and the client calls peers make to it.
//!
//! One message per connection each way, framed as
//!
//! ```text
//! "KVFL" | version u8 | op u8 | token_len u16 | body_len u32 | token | body
//! ```
//!
//! Requests: `SEND` (body: a metadata blob to load), `FETCH` (body: the name
//! the caller expects this agent to have; answered with `METADATA`),
//! `INVALIDATE` (body: instance u64 then the sender's name). Answers: `OK`,
//! `ERROR` (body: UTF-8 message), `METADATA` (body: the blob). The framing
//! ([`MsgHeader`], [`encode_msg`]) does no I/O and never trusts a length.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::auth::AuthToken;
use crate::error::{Error, Result};

/// First four bytes of every listener message.
pub const MAGIC: &[u8; 4] = b"KVFL";
/// Framing version.
pub const VERSION: u8 = 1;
/// Length of a message header.
pub const HEADER_LEN: usize = 12;
/// Largest body accepted (a metadata blob of a very large registration).
pub const MAX_BODY: u32 = 64 << 20;
/// Largest auth token accepted.
pub const MAX_TOKEN: u16 = 1024;

/// Message kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Load the metadata in the body.
    Send = 1,
    /// Answer with your metadata.
    Fetch = 2,
    /// Forget the sender.
    Invalidate = 3,
    /// Done.
    Ok = 0x80,
    /// Failed; the body says why.
    Error = 0x81,
    /// The body is a metadata blob.
    Metadata = 0x82,
}

impl Op {
    fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Send,
            2 => Op::Fetch,
            3 => Op::Invalidate,
            0x80 => Op::Ok,
            0x81 => Op::Error,
            0x82 => Op::Metadata,
            _ => return None,
        })
    }
}

/// A decoded message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsgHeader {
    /// Kind.
    pub op: Op,
    /// Bytes of token after the header.
    pub token_len: u16,
    /// Bytes of body after the token.
    pub body_len: u32,
}

impl MsgHeader {
    /// Decodes and checks a header from an untrusted peer.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<MsgHeader> {
        if &b[..4] != MAGIC {
            return Err(Error::malformed(format!(
                "not a kvferry metadata listener message (magic {:02x?}, expected \"KVFL\")",
                &b[..4]
            )));
        }
        if b[4] != VERSION {
            return Err(Error::malformed(format!(
                "metadata listener framing version {} (this build speaks {VERSION}); run the same kvferry version",
                b[4]
            )));
        }
        let op =
            Op::from_u8(b[5]).ok_or_else(|| Error::malformed(format!("unknown listener message {:#04x}", b[5])))?;
        let token_len = u16::from_le_bytes([b[6], b[7]]);
        let body_len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if token_len > MAX_TOKEN || body_len > MAX_BODY {
            return Err(Error::malformed(format!(
                "listener message with a {token_len}-byte token and a {body_len}-byte body (limits {MAX_TOKEN}, {MAX_BODY})"
            )));
        }
        Ok(MsgHeader { op, token_len, body_len })
    }
}

/// Encodes a whole message. Tokens and bodies beyond the limits are a caller bug and are refused.
pub fn encode_msg(op: Op, token: &[u8], body: &[u8]) -> Result<Vec<u8>> {
    if token.len() > MAX_TOKEN as usize || body.len() > MAX_BODY as usize {
        return Err(Error::invalid(format!(
            "listener message too large ({} bytes of token, {} of body)",
            token.len(),
            body.len()
        )));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + token.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(op as u8);
    out.extend_from_slice(&(token.len() as u16).to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(token);
    out.extend_from_slice(body);
    Ok(out)
}

/// Splits a whole message from an untrusted peer into its header, token and
/// body: what the listener reads from a socket, without the socket.
/// Trailing bytes after the announced body are an error.
pub fn decode_msg(bytes: &[u8]) -> Result<(MsgHeader, &[u8], &[u8])> {
    let hb: &[u8; HEADER_LEN] = bytes.get(..HEADER_LEN).and_then(|b| b.try_into().ok()).ok_or_else(|| {
        Error::malformed(format!("listener message of {} bytes is shorter than its header", bytes.len()))
    })?;
    let h = MsgHeader::decode(hb)?;
    let rest = &bytes[HEADER_LEN..];
    let (t, b) = (h.token_len as usize, h.body_len as usize);
    if rest.len() != t + b {
        return Err(Error::malformed(format!(
            "listener message announces {t} bytes of token and {b} of body but carries {}",
            rest.len()
        )));
    }
    Ok((h, &rest[..t], &rest[t..]))
}

/// A request a listener hands to its agent.
#[derive(Debug, PartialEq, Eq)]
pub enum ListenerRequest {
    /// Load this metadata blob.
    Send(Vec<u8>),
    /// Answer with the agent's metadata if its name is this one.
    Fetch(String),
    /// Drop agent `name` if instance `instance` of it is loaded.
    Invalidate {
        /// The agent to drop.
        name: String,
        /// Its instance.
        instance: u64,
    },
}

impl ListenerRequest {
    /// Decodes the body of a request of kind `op` (from an untrusted peer).
    pub fn decode(op: Op, body: Vec<u8>) -> Result<ListenerRequest> {
        Ok(match op {
            Op::Send => ListenerRequest::Send(body),
            Op::Fetch => ListenerRequest::Fetch(String::from_utf8_lossy(&body).into_owned()),
            Op::Invalidate if body.len() >= 8 => {
                let mut inst = [0u8; 8];
                inst.copy_from_slice(&body[..8]);
                ListenerRequest::Invalidate {
                    name: String::from_utf8_lossy(&body[8..]).into_owned(),
                    instance: u64::from_le_bytes(inst),
                }
            }
            Op::Invalidate => {
                return Err(Error::malformed(format!(
                    "metadata listener: an INVALIDATE body has an 8-byte instance, not {} bytes",
                    body.len()
                )))
            }
            other => return Err(Error::malformed(format!("metadata listener: {other:?} is not a request"))),
        })
    }
}

/// What the agent does with a request: `Ok(Some(blob))` answers METADATA,
/// `Ok(None)` OK, `Err(msg)` ERROR.
pub(crate) type Handler = Arc<dyn Fn(ListenerRequest) -> std::result::Result<Option<Vec<u8>>, String> + Send + Sync>;

/// A running listener. Dropping it stops the thread.
pub(crate) struct ListenerHandle {
    port: u16,
    fd: RawFd,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ListenerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerHandle").field("port", &self.port).finish()
    }
}

impl ListenerHandle {
    /// Binds `addr` and serves requests with `handler` on a thread of its own.
    pub(crate) fn start(
        addr: SocketAddr,
        timeout: Duration,
        token: Option<AuthToken>,
        handler: Handler,
    ) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::io(format!("metadata listener: cannot bind {addr}; pick another listen_port"), e))?;
        let port = listener.local_addr().map_err(|e| Error::io("metadata listener address", e))?.port();
        let fd = listener.as_raw_fd();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kvf-md-listen-{port}"))
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::Acquire) {
                        break;
                    }
                    match conn {
                        Ok(s) => {
                            if let Err(e) = serve_one(&s, timeout, token.as_ref(), &handler) {
                                tracing::debug!(error = %e, "metadata listener: request failed");
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
            .map_err(|e| Error::io("metadata listener: cannot spawn its thread", e))?;
        Ok(ListenerHandle { port, fd, stop, thread: Some(thread) })
    }

    /// The bound port.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for ListenerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // SAFETY: fd is the listening socket, owned by the thread until it exits;
        // shutdown wakes its accept() (Linux) and is harmless if it already exited.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            // The agent may be dropped by the listener thread itself (its
            // handler held the last handle): it exits by itself then.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

fn read_msg(s: &mut TcpStream) -> Result<(MsgHeader, Vec<u8>, Vec<u8>)> {
    let mut hb = [0u8; HEADER_LEN];
    s.read_exact(&mut hb).map_err(|e| Error::io("metadata listener: reading a message", e))?;
    let h = MsgHeader::decode(&hb)?;
    let mut token = vec![0u8; h.token_len as usize];
    s.read_exact(&mut token).map_err(|e| Error::io("metadata listener: reading a message", e))?;
    let mut body = vec![0u8; h.body_len as usize];
    s.read_exact(&mut body).map_err(|e| Error::io("metadata listener: reading a message", e))?;
    Ok((h, token, body))
}

fn serve_one(s: &TcpStream, timeout: Duration, token: Option<&AuthToken>, handler: &Handler) -> Result<()> {
    let mut s = s.try_clone().map_err(|e| Error::io("metadata listener", e))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    let reply = |s: &mut TcpStream, op: Op, body: &[u8]| -> Result<()> {
        s.write_all(&encode_msg(op, &[], body)?).map_err(|e| Error::io("metadata listener: answering", e))
    };
    let (h, tok, body) = match read_msg(&mut s) {
        Ok(m) => m,
        Err(e) => {
            let _ = reply(&mut s, Op::Error, e.message().as_bytes());
            return Err(e);
        }
    };
    if !AuthToken::admits(token, &tok) {
        let msg = "metadata listener: auth token missing or wrong; set the same KVFERRY_AUTH_TOKEN on both agents";
        reply(&mut s, Op::Error, msg.as_bytes())?;
        return Err(Error::not_allowed(msg));
    }
    let req = match ListenerRequest::decode(h.op, body) {
        Ok(r) => r,
        Err(e) => {
            reply(&mut s, Op::Error, e.message().as_bytes())?;
            return Err(e);
        }
    };
    match handler(req) {
        Ok(Some(blob)) => reply(&mut s, Op::Metadata, &blob),
        Ok(None) => reply(&mut s, Op::Ok, &[]),
        Err(msg) => reply(&mut s, Op::Error, msg.as_bytes()),
    }
}

/// Sends one request to the listener at `addr` and returns the answer's
/// kind and body; every step is bounded by `timeout`.
pub(crate) fn call(
    addr: SocketAddr,
    timeout: Duration,
    token: Option<&AuthToken>,
    op: Op,
    body: &[u8],
) -> Result<(Op, Vec<u8>)> {
    let ctx = |what: &str| format!("metadata listener at {addr}: {what}");
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| Error::io(ctx("cannot connect"), e))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    let msg = encode_msg(op, token.map(AuthToken::as_bytes).unwrap_or_default(), body)?;
    s.write_all(&msg).map_err(|e| Error::io(ctx("sending"), e))?;
    let (h, _, body) = read_msg(&mut s).map_err(|e| e.context(ctx("answer")))?;
    if h.op == Op::Error {
        return Err(Error::new(crate::ErrorKind::NotAllowed, ctx(&String::from_utf8_lossy(&body))));
    }
    Ok((h.op, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_round_trip_and_rejects() {
        let m = encode_msg(Op::Fetch, b"tok", b"peer").unwrap();
        let h = MsgHeader::decode(m[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(h, MsgHeader { op: Op::Fetch, token_len: 3, body_len: 4 });
        let mut bad = m.clone();
        bad[5] = 9;
        assert!(MsgHeader::decode(bad[..HEADER_LEN].try_into().unwrap()).is_err());
        let mut big = m.clone();
        big[8..12].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
        assert!(MsgHeader::decode(big[..HEADER_LEN].try_into().unwrap()).is_err());
        let mut magic = m;
        magic[0] = b'X';
        assert!(MsgHeader::decode(magic[..HEADER_LEN].try_into().unwrap()).is_err());
    }

    #[test]
    fn serves_and_stops() {
        let handler: Handler = Arc::new(|r| match r {
            ListenerRequest::Fetch(n) if n == "me" => Ok(Some(b"blob".to_vec())),
            _ => Err("no".into()),
        });
        let t = AuthToken::new("t").unwrap();
        let l = ListenerHandle::start("127.0.0.1:0".parse().unwrap(), Duration::from_secs(2), Some(t.clone()), handler)
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
