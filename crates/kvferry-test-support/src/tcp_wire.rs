//! A hand-written client for the TCP target: it speaks the wire format of
//! `docs/TCP.md` by hand (hello, WRITE / READ / NOTIF frames with whatever
//! entries and lengths the caller picks, raw bytes) and reads the target's
//! answers, so tests can do what kvferry's own initiator never would: mix
//! region kinds in one frame, point a key at another region's bytes, lie
//! about lengths, stop in the middle of a frame.
//!
//! [`crate::tcp_model`] holds the model-based property test built on it
//! (shared with the cargo-fuzz target `fuzz/fuzz_targets/tcp_target.rs`).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use kvferry::backend::tcp::proto::{
    ConnInfo, Entry, FrameType, Header, Hello, Status, Welcome, CAPS, HEADER_LEN, VERSION, WELCOME_FIXED,
};
use kvferry::metadata::AgentMetadata;
use kvferry::Agent;

/// A hello as `name` from instance `instance` to the target instance
/// `expect_instance`, with `token` (empty: none).
pub fn hello(instance: u64, expect_instance: u64, name: &str, token: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    Hello { version: VERSION, caps: CAPS, instance, expect_instance, name: name.into(), token: token.to_vec() }
        .encode(&mut b);
    b
}

/// Reads the target's welcome (fixed part, then the rest it announces).
pub fn read_welcome(s: &mut impl Read) -> io::Result<Welcome> {
    let mut fixed = [0u8; WELCOME_FIXED];
    s.read_exact(&mut fixed)?;
    let rest = Welcome::rest_len(&fixed).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.message))?;
    let mut all = fixed.to_vec();
    all.resize(WELCOME_FIXED + rest, 0);
    s.read_exact(&mut all[WELCOME_FIXED..])?;
    Welcome::decode(&all).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.message))
}

/// An honest frame: header, entries, data; the header's length is the sum
/// of the entries' lengths for a READ, the data's length otherwise.
pub fn frame(ty: FrameType, op: u64, entries: &[Entry], data: &[u8]) -> Vec<u8> {
    let len = if ty == FrameType::Read { entries.iter().map(|e| e.len).sum() } else { data.len() as u64 };
    let mut b = Header::new(ty, op, entries.len() as u32, len).encode().to_vec();
    for e in entries {
        e.encode(&mut b);
    }
    b.extend_from_slice(data);
    b
}

/// Reads one answer frame: the header, then the body its `len` announces
/// (at most 1 GiB, as the header decoder allows).
pub fn try_answer(s: &mut impl Read) -> io::Result<(Header, Vec<u8>)> {
    let mut hb = [0u8; HEADER_LEN];
    s.read_exact(&mut hb)?;
    let header = Header::decode(&hb).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.message))?;
    let mut body = vec![0u8; header.len as usize];
    s.read_exact(&mut body)?;
    Ok((header, body))
}

/// [`try_answer`] that panics when no well-formed answer arrives.
pub fn answer(s: &mut impl Read) -> (Header, Vec<u8>) {
    try_answer(s).unwrap_or_else(|e| panic!("no answer frame from the target: {e}"))
}

/// Whether the peer closed `s` within `within` (end of stream or a reset;
/// bytes that arrive meanwhile are skipped).
pub fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

/// How long the client waits for one answer before it calls the target hung.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a target listens and which instance it is, from its own metadata.
#[derive(Clone, Debug)]
pub struct TargetAddr {
    /// The TCP data port on 127.0.0.1.
    pub port: u16,
    /// The target's instance (the hello's `expect_instance`).
    pub instance: u64,
}

impl TargetAddr {
    /// Reads the TCP port and instance from `agent`'s metadata.
    pub fn of(agent: &Agent) -> TargetAddr {
        let md = AgentMetadata::decode(&agent.local_metadata().expect("local metadata")).expect("own metadata decodes");
        let tcp = md.backends.iter().find(|b| b.name == "TCP").expect("the agent has a TCP backend");
        let info = ConnInfo::decode(tcp.conn_info.as_ref().expect("TCP publishes connection info")).expect("conn info");
        TargetAddr { port: info.port, instance: md.instance }
    }
}

/// One answer frame from the target.
#[derive(Debug)]
pub struct Answer {
    /// The decoded header (type, status, op, len).
    pub header: Header,
    /// The bytes that followed it (DATA payload or ERROR message).
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as text (ERROR messages), lossily.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw connection to a TCP target, past the handshake.
#[derive(Debug)]
pub struct HostileClient {
    /// The socket; tests may write raw bytes to it.
    pub stream: TcpStream,
}

impl HostileClient {
    /// Connects to 127.0.0.1:`t.port`, sends a hello as `name` with `token`,
    /// and returns the client with the target's welcome (check its status).
    pub fn connect(t: &TargetAddr, name: &str, token: &[u8]) -> io::Result<(HostileClient, Welcome)> {
        let mut stream = TcpStream::connect(("127.0.0.1", t.port))?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        stream.set_nodelay(true)?;
        stream.write_all(&hello(0x686f_7374_696c_6521, t.instance, name, token))?;
        let w = read_welcome(&mut stream)?;
        Ok((HostileClient { stream }, w))
    }

    /// Connects and insists on an `Ok` welcome.
    pub fn connect_ok(t: &TargetAddr, name: &str, token: &[u8]) -> HostileClient {
        let (c, w) = HostileClient::connect(t, name, token).expect("connect to the target");
        assert_eq!(w.status, Status::Ok, "the target refused the hello: {}", w.message);
        c
    }

    /// Writes raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Writes one frame (see [`raw_frame`]).
    pub fn send(&mut self, ty: FrameType, op: u64, header_len: u64, entries: &[Entry], data: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(HEADER_LEN + entries.len() * 32 + data.len());
        raw_frame(&mut b, ty as u8, op, entries.len() as u32, header_len, entries, data);
        self.stream.write_all(&b)
    }

    /// Reads one answer frame (header, then the body its `len` announces,
    /// at most 1 GiB as the header decoder allows).
    pub fn answer(&mut self) -> io::Result<Answer> {
        let (header, body) = try_answer(&mut self.stream)?;
        Ok(Answer { header, body })
    }

    /// Whether the target closed the connection (end of stream or reset
    /// within the answer timeout, with no further bytes).
    pub fn closed_by_peer(&mut self) -> bool {
        let mut one = [0u8; 1];
        matches!(self.stream.read(&mut one), Ok(0) | Err(_))
    }
}

/// Appends a frame to `out`: a header with the raw type byte `ty`, `count`
/// and `header_len` exactly as given (they may lie), the entries, and `data`.
pub fn raw_frame(out: &mut Vec<u8>, ty: u8, op: u64, count: u32, header_len: u64, entries: &[Entry], data: &[u8]) {
    let mut h = Header::new(FrameType::Write, op, count, header_len).encode();
    h[0] = ty;
    out.extend_from_slice(&h);
    for e in entries {
        e.encode(out);
    }
    out.extend_from_slice(data);
}
