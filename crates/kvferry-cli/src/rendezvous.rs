//! The benchmark's rendezvous: a TCP connection between initiator and target
//! over which they swap metadata and buffer descriptors before the run, and
//! which tells the target when the run is over (the initiator closes it).
//!
//! Frames: a 4-byte little-endian length, then a postcard [`Msg`]. Every read
//! is bounded by a timeout and a maximum frame size.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use kvferry::{Error, Result};
use serde::{Deserialize, Serialize};

const MAX_FRAME: usize = 64 << 20;

/// What initiator and target say to each other.
#[derive(Debug, Serialize, Deserialize)]
pub enum Msg {
    /// Initiator → target: the backend, the buffer it needs, and the initiator's metadata.
    Hello { backend: String, buf_len: u64, pattern_seed: u8, metadata: Vec<u8> },
    /// Target → initiator: its metadata and the serialized descriptor list of what it exposes.
    Ready { metadata: Vec<u8>, descs: Vec<u8>, files: Vec<u8> },
    /// Either side: a failure, with its message.
    Failed(String),
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
    s.set_read_timeout(Some(timeout)).map_err(|e| Error::io("rendezvous: set timeout", e))?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).map_err(|e| Error::io("rendezvous: waiting for the peer", e))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(Error::malformed(format!("rendezvous frame of {len} bytes is larger than {MAX_FRAME}")));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| Error::io("rendezvous: reading a frame", e))?;
    let m: Msg =
        postcard::from_bytes(&body).map_err(|e| Error::malformed(format!("rendezvous frame does not decode: {e}")))?;
    if let Msg::Failed(why) = &m {
        return Err(Error::new(kvferry::ErrorKind::Backend, format!("the peer failed: {why}")));
    }
    Ok(m)
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
