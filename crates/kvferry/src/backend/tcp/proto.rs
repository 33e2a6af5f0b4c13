//! The TCP wire protocol, without I/O: handshake messages, frame headers,
//! segment entries, status codes, connection info, and the checks a target
//! makes before it trusts any of them.
//!
//! Nothing here touches a socket or a clock; the driver (`conn.rs`,
//! `server.rs`) moves bytes, this module says what they mean. Every decoder
//! takes untrusted bytes and returns an error instead of panicking, so each
//! can be fed to a fuzzer as is.
//!
//! # Wire format (all integers little-endian)
//!
//! ```text
//! Hello   (initiator → target, once per connection)
//!   "KVFT" | version u16 | flags u16 | caps u32 | instance u64 | expect_instance u64
//!   | name_len u16 | token_len u16 | name | token
//! Welcome (target → initiator)
//!   "KVFT" | version u16 | status u16 | caps u32 | instance u64 | name_len u16 | msg_len u16 | name | msg
//!
//! Frame header (24 bytes), then `count` entries (32 bytes each), then `len` bytes
//!   type u8 | flags u8 | status u16 | count u32 | op u64 | len u64
//! Entry: key [u8; 16] | addr u64 | len u64
//!
//!   WRITE  count entries, then len = Σ entry.len bytes of data   → ACK or ERROR
//!   READ   count entries, len = Σ entry.len (bytes wanted)       → DATA or ERROR
//!   NOTIF  no entries, len bytes of message                      → nothing
//!   ACK    the WRITE `op` was applied at the target
//!   DATA   len bytes of data for the READ `op`
//!   ERROR  status code, len bytes of UTF-8 message for `op`
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::codec::{DecodeError, Reader, Writer};
use crate::error::{Error, ErrorKind, Result};
use crate::types::AccessKey;

/// First four bytes of every handshake message.
pub const MAGIC: &[u8; 4] = b"KVFT";
/// The protocol version this build speaks; peers must speak the same.
pub const VERSION: u16 = 1;
/// Length of a frame header.
pub const HEADER_LEN: usize = 24;
/// Length of one segment entry.
pub const ENTRY_LEN: usize = 32;
/// Most entries in one frame (`IOV_MAX` is 1024; one iovec is the header).
pub const MAX_ENTRIES: u32 = 1000;
/// Most data bytes one WRITE, READ or DATA frame may carry.
pub const MAX_FRAME_DATA: u64 = 1 << 30;
/// Most bytes of a notification message.
pub const MAX_NOTIF: u64 = crate::types::MAX_NOTIF_LEN as u64;
/// Most bytes of an ERROR message.
pub const MAX_ERROR_MSG: u64 = 4096;
/// Longest agent name in a handshake.
pub const MAX_NAME: usize = crate::types::MAX_NAME_LEN;
/// Longest auth token in a handshake.
pub const MAX_TOKEN: usize = 1024;
/// Fixed part of a [`Hello`].
pub const HELLO_FIXED: usize = 4 + 2 + 2 + 4 + 8 + 8 + 2 + 2;
/// Fixed part of a [`Welcome`].
pub const WELCOME_FIXED: usize = 4 + 2 + 2 + 4 + 8 + 2 + 2;

/// Capability bit: this side serves READ.
pub const CAP_READ: u32 = 1;
/// Capability bit: this side serves WRITE.
pub const CAP_WRITE: u32 = 2;
/// Capability bit: this side takes notifications.
pub const CAP_NOTIF: u32 = 4;
/// Every capability this build has.
pub const CAPS: u32 = CAP_READ | CAP_WRITE | CAP_NOTIF;

/// Frame types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Data to apply at the target.
    Write = 1,
    /// A request for the target's data.
    Read = 2,
    /// A notification message.
    Notif = 3,
    /// A WRITE was applied.
    Ack = 0x81,
    /// The data a READ asked for.
    Data = 0x82,
    /// An operation failed at the target.
    Error = 0x83,
}

impl FrameType {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => FrameType::Write,
            2 => FrameType::Read,
            3 => FrameType::Notif,
            0x81 => FrameType::Ack,
            0x82 => FrameType::Data,
            0x83 => FrameType::Error,
            _ => return None,
        })
    }

    /// Whether an initiator sends this type (a target answers the others).
    pub fn is_request(self) -> bool {
        matches!(self, FrameType::Write | FrameType::Read | FrameType::Notif)
    }
}

/// Why a target refused an operation or a handshake, as sent on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// The key is unknown or the range is outside its region.
    NotAllowed = 1,
    /// The frame did not decode or broke a rule.
    Malformed = 2,
    /// The protocol version differs.
    BadVersion = 3,
    /// The auth token is missing or wrong.
    AuthRefused = 4,
    /// The initiator expected another instance of this agent (it restarted).
    WrongInstance = 5,
    /// The target cannot do this (capability missing).
    NotSupported = 6,
    /// The target is shutting down.
    Closing = 7,
    /// The target's storage failed (a short read at end of file, ENOSPC, EIO).
    Storage = 8,
    /// The operation breaks a rule of the target's storage (O_DIRECT alignment, access mode).
    Invalid = 9,
}

impl Status {
    /// Decodes a status; unknown codes read as `Malformed`.
    pub fn from_u16(v: u16) -> Status {
        match v {
            0 => Status::Ok,
            1 => Status::NotAllowed,
            3 => Status::BadVersion,
            4 => Status::AuthRefused,
            5 => Status::WrongInstance,
            6 => Status::NotSupported,
            7 => Status::Closing,
            8 => Status::Storage,
            9 => Status::Invalid,
            _ => Status::Malformed,
        }
    }

    /// The error kind an initiator reports for this status.
    pub fn error_kind(self) -> ErrorKind {
        match self {
            Status::Ok => ErrorKind::Internal,
            Status::NotAllowed | Status::AuthRefused => ErrorKind::NotAllowed,
            Status::Malformed => ErrorKind::Malformed,
            Status::BadVersion | Status::NotSupported => ErrorKind::NotSupported,
            Status::WrongInstance | Status::Closing => ErrorKind::RemoteDisconnect,
            Status::Storage => ErrorKind::Backend,
            Status::Invalid => ErrorKind::InvalidParam,
        }
    }
}

/// A protocol violation found while decoding untrusted bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtoError {
    /// The status to send back, where one is sent.
    pub status: Status,
    /// What was received against what was expected.
    pub message: String,
}

impl ProtoError {
    pub(crate) fn malformed(message: impl Into<String>) -> Self {
        ProtoError { status: Status::Malformed, message: message.into() }
    }
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<ProtoError> for Error {
    fn from(e: ProtoError) -> Self {
        Error::new(e.status.error_kind(), e.message)
    }
}

impl From<DecodeError> for ProtoError {
    fn from(e: DecodeError) -> Self {
        ProtoError::malformed(e.to_string())
    }
}

/// The initiator's opening message on every connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version.
    pub version: u16,
    /// Capabilities of the initiator.
    pub caps: u32,
    /// The initiator agent's instance number.
    pub instance: u64,
    /// The target instance the initiator loaded metadata of (0: any).
    pub expect_instance: u64,
    /// The initiator agent's name.
    pub name: String,
    /// The shared secret, if the initiator has one.
    pub token: Vec<u8>,
}

impl Hello {
    /// Appends the encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put(MAGIC);
        out.put_u16(self.version);
        out.put_u16(0);
        out.put_u32(self.caps);
        out.put_u64(self.instance);
        out.put_u64(self.expect_instance);
        out.put_u16(self.name.len().min(u16::MAX as usize) as u16);
        out.put_u16(self.token.len().min(u16::MAX as usize) as u16);
        out.put(self.name.as_bytes());
        out.put(&self.token);
    }

    /// Checks the fixed part and says how many more bytes the message has.
    pub fn rest_len(fixed: &[u8; HELLO_FIXED]) -> Result<usize, ProtoError> {
        let mut r = Reader::new("hello", fixed);
        let magic = r.take(4)?;
        if magic != MAGIC {
            return Err(ProtoError::malformed(format!(
                "connection does not speak the kvferry TCP protocol (magic {magic:02x?}, expected \"KVFT\")"
            )));
        }
        // version, flags, caps, instance, expect_instance
        r.skip(2 + 2 + 4 + 8 + 8)?;
        let name = usize::from(r.u16()?);
        let token = usize::from(r.u16()?);
        if name == 0 || name > MAX_NAME {
            return Err(ProtoError::malformed(format!("hello: agent name of {name} bytes (1..={MAX_NAME} allowed)")));
        }
        if token > MAX_TOKEN {
            return Err(ProtoError::malformed(format!("hello: auth token of {token} bytes (at most {MAX_TOKEN})")));
        }
        Ok(name + token)
    }

    /// Decodes a whole message (fixed part and rest).
    pub fn decode(bytes: &[u8]) -> Result<Hello, ProtoError> {
        let fixed: &[u8; HELLO_FIXED] = bytes.get(..HELLO_FIXED).and_then(|b| b.try_into().ok()).ok_or_else(|| {
            ProtoError::malformed(format!("hello is {} bytes, shorter than {HELLO_FIXED}", bytes.len()))
        })?;
        let rest = Hello::rest_len(fixed)?;
        if bytes.len() != HELLO_FIXED + rest {
            return Err(ProtoError::malformed(format!(
                "hello is {} bytes, expected {}",
                bytes.len(),
                HELLO_FIXED + rest
            )));
        }
        let mut r = Reader::new("hello", bytes);
        r.skip(MAGIC.len())?;
        let version = r.u16()?;
        let _flags = r.u16()?;
        let caps = r.u32()?;
        let instance = r.u64()?;
        let expect_instance = r.u64()?;
        let name_len = usize::from(r.u16()?);
        let token_len = usize::from(r.u16()?);
        let name = r.take(name_len)?;
        let token = r.take(token_len)?.to_vec();
        r.expect_end()?;
        let name =
            std::str::from_utf8(name).map_err(|_| ProtoError::malformed("hello: agent name is not UTF-8"))?.to_string();
        Ok(Hello { version, caps, instance, expect_instance, name, token })
    }

    /// The target's verdict on this hello: `Ok` or the status and message to refuse with.
    pub fn check(&self, my_instance: u64, token: Option<&crate::auth::AuthToken>) -> Result<(), ProtoError> {
        // The same rules as agent names everywhere (no control characters reach logs).
        if let Err(e) = crate::types::check_agent_name(&self.name) {
            return Err(ProtoError::malformed(format!("hello: {}", e.message())));
        }
        if self.version != VERSION {
            return Err(ProtoError {
                status: Status::BadVersion,
                message: format!(
                    "peer '{}' speaks TCP protocol version {}, this agent speaks {VERSION}; run the same kvferry version on both",
                    self.name, self.version
                ),
            });
        }
        if !crate::auth::AuthToken::admits(token, &self.token) {
            return Err(ProtoError {
                status: Status::AuthRefused,
                message: format!(
                    "agent '{}' presented {} auth token; set the same KVFERRY_AUTH_TOKEN (or AgentConfig::auth_token) on both agents",
                    self.name,
                    if self.token.is_empty() { "no" } else { "a wrong" }
                ),
            });
        }
        if self.expect_instance != 0 && self.expect_instance != my_instance {
            return Err(ProtoError {
                status: Status::WrongInstance,
                message: format!(
                    "agent '{}' holds metadata of an earlier instance of this agent (it restarted); fetch its metadata again",
                    self.name
                ),
            });
        }
        Ok(())
    }
}

/// The target's answer to a [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Protocol version.
    pub version: u16,
    /// `Ok`, or why the connection is refused (then it is closed).
    pub status: Status,
    /// Capabilities of the target.
    pub caps: u32,
    /// The target agent's instance.
    pub instance: u64,
    /// The target agent's name.
    pub name: String,
    /// Why it refused, empty on success.
    pub message: String,
}

impl Welcome {
    /// Appends the encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let msg = truncate_utf8(&self.message, MAX_ERROR_MSG as usize);
        let name = &self.name.as_bytes()[..self.name.len().min(MAX_NAME)];
        out.put(MAGIC);
        out.put_u16(self.version);
        out.put_u16(self.status as u16);
        out.put_u32(self.caps);
        out.put_u64(self.instance);
        out.put_u16(name.len() as u16);
        out.put_u16(msg.len() as u16);
        out.put(name);
        out.put(msg.as_bytes());
    }

    /// Checks the fixed part and says how many more bytes the message has.
    pub fn rest_len(fixed: &[u8; WELCOME_FIXED]) -> Result<usize, ProtoError> {
        let mut r = Reader::new("welcome", fixed);
        let magic = r.take(4)?;
        if magic != MAGIC {
            return Err(ProtoError::malformed(format!(
                "the peer's port does not speak the kvferry TCP protocol (magic {magic:02x?}, expected \"KVFT\")"
            )));
        }
        // version, status, caps, instance
        r.skip(2 + 2 + 4 + 8)?;
        let name = usize::from(r.u16()?);
        let msg = usize::from(r.u16()?);
        if name > MAX_NAME || msg as u64 > MAX_ERROR_MSG {
            return Err(ProtoError::malformed(format!("welcome: name of {name} bytes or message of {msg} bytes")));
        }
        Ok(name + msg)
    }

    /// Decodes a whole message.
    pub fn decode(bytes: &[u8]) -> Result<Welcome, ProtoError> {
        let fixed: &[u8; WELCOME_FIXED] =
            bytes.get(..WELCOME_FIXED).and_then(|b| b.try_into().ok()).ok_or_else(|| {
                ProtoError::malformed(format!("welcome is {} bytes, shorter than {WELCOME_FIXED}", bytes.len()))
            })?;
        let rest = Welcome::rest_len(fixed)?;
        if bytes.len() != WELCOME_FIXED + rest {
            return Err(ProtoError::malformed("welcome has the wrong length"));
        }
        let mut r = Reader::new("welcome", bytes);
        r.skip(MAGIC.len())?;
        let version = r.u16()?;
        let status = Status::from_u16(r.u16()?);
        let caps = r.u32()?;
        let instance = r.u64()?;
        let name_len = usize::from(r.u16()?);
        let msg_len = usize::from(r.u16()?);
        let name = String::from_utf8_lossy(r.take(name_len)?).into_owned();
        let message = String::from_utf8_lossy(r.take(msg_len)?).into_owned();
        r.expect_end()?;
        Ok(Welcome { version, status, caps, instance, name, message })
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Frame type.
    pub ty: FrameType,
    /// Status (ERROR frames); 0 otherwise.
    pub status: Status,
    /// Number of entries following the header.
    pub count: u32,
    /// The operation this frame belongs to (chosen by the initiator).
    pub op: u64,
    /// Bytes following the entries.
    pub len: u64,
}

impl Header {
    /// A header for `ty`.
    pub fn new(ty: FrameType, op: u64, count: u32, len: u64) -> Self {
        Header { ty, status: Status::Ok, count, op, len }
    }

    /// The encoding.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        let mut w = &mut b[..];
        w.put_u8(self.ty as u8);
        w.put_u8(0);
        w.put_u16(self.status as u16);
        w.put_u32(self.count);
        w.put_u64(self.op);
        w.put_u64(self.len);
        b
    }

    /// The `op` field of a header that may not decode, to address the
    /// ERROR answer to it.
    pub fn raw_op(b: &[u8; HEADER_LEN]) -> u64 {
        let mut r = Reader::new("frame header", b);
        r.skip(8).and_then(|()| r.u64()).unwrap_or(0)
    }

    /// Decodes and checks a header from an untrusted peer: unknown types,
    /// counts or lengths beyond the limits of the type are rejected.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, ProtoError> {
        let mut r = Reader::new("frame header", b);
        let ty = r.u8()?;
        let ty =
            FrameType::from_u8(ty).ok_or_else(|| ProtoError::malformed(format!("unknown frame type {ty:#04x}")))?;
        let _flags = r.u8()?;
        let status = Status::from_u16(r.u16()?);
        let (count, op, len) = (r.u32()?, r.u64()?, r.u64()?);
        let h = Header { ty, status, count, op, len };
        let (max_count, max_len) = match ty {
            FrameType::Write | FrameType::Read => (MAX_ENTRIES, MAX_FRAME_DATA),
            FrameType::Data => (0, MAX_FRAME_DATA),
            FrameType::Notif => (0, MAX_NOTIF),
            FrameType::Error => (0, MAX_ERROR_MSG),
            FrameType::Ack => (0, 0),
        };
        if h.count > max_count {
            return Err(ProtoError::malformed(format!("{ty:?} frame with {} entries (at most {max_count})", h.count)));
        }
        if h.len > max_len {
            return Err(ProtoError::malformed(format!("{ty:?} frame announces {} bytes (at most {max_len})", h.len)));
        }
        if matches!(ty, FrameType::Write | FrameType::Read) && h.count == 0 {
            return Err(ProtoError::malformed(format!("{ty:?} frame without entries")));
        }
        Ok(h)
    }

    /// Bytes of entries that follow the header.
    pub fn entries_len(&self) -> usize {
        self.count as usize * ENTRY_LEN
    }
}

/// One remote range of a WRITE or READ: the region's key and the range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The access key of the region the range lies in.
    pub key: AccessKey,
    /// Start address at the target.
    pub addr: u64,
    /// Bytes.
    pub len: u64,
}

impl Entry {
    /// Appends the encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put(&self.key.0);
        out.put_u64(self.addr);
        out.put_u64(self.len);
    }

    /// Decodes entry `i` of `table` (which holds whole entries).
    pub fn decode(table: &[u8], i: usize) -> Option<Entry> {
        let b = table.get(i.checked_mul(ENTRY_LEN)?..i.checked_add(1)?.checked_mul(ENTRY_LEN)?)?;
        let mut r = Reader::new("entry", b);
        Some(Entry { key: AccessKey(r.array().ok()?), addr: r.u64().ok()?, len: r.u64().ok()? })
    }
}

/// Looks up a region by key: `(addr, len)` of what is registered now.
pub trait RegionLookup {
    /// The registered range for `key`, if any.
    fn lookup(&self, key: &AccessKey) -> Option<(u64, u64)>;
}

impl<S: std::hash::BuildHasher> RegionLookup for std::collections::HashMap<AccessKey, (u64, u64), S> {
    fn lookup(&self, key: &AccessKey) -> Option<(u64, u64)> {
        self.get(key).copied()
    }
}

/// The target's check of a WRITE or READ before any byte of its memory
/// moves: every entry names a live region by key and lies inside it, no
/// entry is empty, and the lengths add up to the header's `len`.
pub fn check_entries(h: &Header, table: &[u8], regions: &impl RegionLookup) -> Result<(), ProtoError> {
    if table.len() != h.entries_len() {
        return Err(ProtoError::malformed("entry table length does not match the header"));
    }
    let mut sum = 0u64;
    for i in 0..h.count as usize {
        let e = Entry::decode(table, i).ok_or_else(|| ProtoError::malformed("entry table truncated"))?;
        if e.len == 0 {
            return Err(ProtoError::malformed(format!("entry {i} is empty")));
        }
        sum = sum.checked_add(e.len).ok_or_else(|| ProtoError::malformed(format!("entry {i}: lengths overflow")))?;
        let inside = regions.lookup(&e.key).is_some_and(|(addr, len)| {
            e.addr >= addr
                && e.addr.checked_add(e.len).is_some_and(|end| addr.checked_add(len).is_some_and(|rend| end <= rend))
        });
        if !inside {
            return Err(ProtoError {
                status: Status::NotAllowed,
                message: format!(
                    "entry {i} ({:#x}+{}) is not inside a region registered now with the key {:?}",
                    e.addr, e.len, e.key
                ),
            });
        }
    }
    if sum != h.len {
        return Err(ProtoError::malformed(format!("entries add up to {sum} bytes but the frame announces {}", h.len)));
    }
    Ok(())
}

/// What a TCP backend publishes for peers: its port and addresses to try in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// Port of the data listener.
    pub port: u16,
    /// Addresses to try, best first.
    pub addrs: Vec<IpAddr>,
}

impl ConnInfo {
    /// Encodes: version u8 = 1, port u16, count u8, then per address a family
    /// byte (4 or 6) and 4 or 16 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![1u8];
        out.put_u16(self.port);
        let addrs = &self.addrs[..self.addrs.len().min(32)];
        out.put_u8(addrs.len() as u8);
        for a in addrs {
            match a {
                IpAddr::V4(v) => {
                    out.put_u8(4);
                    out.put(&v.octets());
                }
                IpAddr::V6(v) => {
                    out.put_u8(6);
                    out.put(&v.octets());
                }
            }
        }
        out
    }

    /// Decodes connection info a peer published.
    pub fn decode(b: &[u8]) -> Result<ConnInfo> {
        let bad = |what: &str| {
            Error::malformed(format!("TCP connection info: {what}; is the peer's kvferry version the same?"))
        };
        let truncated = |e: DecodeError| bad(&format!("truncated at byte {}", e.at));
        let mut r = Reader::new("TCP connection info", b);
        let v = r.u8().map_err(|_| bad("empty"))?;
        if v != 1 {
            return Err(bad(&format!("version {v}, expected 1")));
        }
        let port = r.u16().map_err(truncated)?;
        let n = r.u8().map_err(truncated)?;
        let mut addrs = Vec::with_capacity(n as usize);
        for _ in 0..n {
            match r.u8().map_err(truncated)? {
                4 => addrs.push(IpAddr::V4(Ipv4Addr::from(r.array::<4>().map_err(truncated)?))),
                6 => addrs.push(IpAddr::V6(Ipv6Addr::from(r.array::<16>().map_err(truncated)?))),
                f => return Err(bad(&format!("address family {f}"))),
            }
        }
        if r.left() != 0 || port == 0 || addrs.is_empty() {
            return Err(bad("trailing bytes, port 0 or no address"));
        }
        Ok(ConnInfo { port, addrs })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn hello() -> Hello {
        Hello {
            version: VERSION,
            caps: CAPS,
            instance: 7,
            expect_instance: 9,
            name: "a".into(),
            token: b"tok".to_vec(),
        }
    }

    #[test]
    fn hello_round_trip_and_checks() {
        let h = hello();
        let mut b = Vec::new();
        h.encode(&mut b);
        let fixed: [u8; HELLO_FIXED] = b[..HELLO_FIXED].try_into().unwrap();
        assert_eq!(Hello::rest_len(&fixed).unwrap(), 4);
        assert_eq!(Hello::decode(&b).unwrap(), h);
        let tok = crate::auth::AuthToken::new("tok").unwrap();
        let other = crate::auth::AuthToken::new("other").unwrap();
        assert!(h.check(9, Some(&tok)).is_ok());
        assert_eq!(h.check(9, Some(&other)).unwrap_err().status, Status::AuthRefused);
        assert_eq!(h.check(8, None).unwrap_err().status, Status::WrongInstance);
        let old = Hello { version: 0, ..h.clone() };
        assert_eq!(old.check(9, None).unwrap_err().status, Status::BadVersion);
        // Names follow the agent-name rules: no control characters reach the logs.
        for bad in ["a\nb", "\u{1b}[31m", "x\u{7f}"] {
            let e = Hello { name: bad.into(), ..h.clone() }.check(9, Some(&tok)).unwrap_err();
            assert_eq!(e.status, Status::Malformed, "{bad:?}");
            assert!(e.message.contains("control characters"), "{}", e.message);
        }
        // Every truncation is an error, never a panic.
        for n in 0..b.len() {
            assert!(Hello::decode(&b[..n]).is_err());
        }
        b[0] = b'X';
        assert!(Hello::decode(&b).is_err());
    }

    #[test]
    fn welcome_round_trip() {
        let w = Welcome {
            version: VERSION,
            status: Status::AuthRefused,
            caps: CAPS,
            instance: 3,
            name: "b".into(),
            message: "no".into(),
        };
        let mut b = Vec::new();
        w.encode(&mut b);
        assert_eq!(Welcome::decode(&b).unwrap(), w);
        for n in 0..b.len() {
            assert!(Welcome::decode(&b[..n]).is_err());
        }
    }

    #[test]
    fn headers_reject_unknown_types_and_absurd_lengths() {
        let h = Header::new(FrameType::Write, 42, 3, 300);
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let mut b = h.encode();
        b[0] = 0x55;
        assert!(Header::decode(&b).unwrap_err().message.contains("unknown frame type"));
        let big = Header::new(FrameType::Write, 1, 1, MAX_FRAME_DATA + 1);
        assert!(Header::decode(&big.encode()).is_err());
        let many = Header::new(FrameType::Read, 1, MAX_ENTRIES + 1, 10);
        assert!(Header::decode(&many.encode()).is_err());
        let notif = Header::new(FrameType::Notif, 1, 0, MAX_NOTIF + 1);
        assert!(Header::decode(&notif.encode()).is_err());
        let ack = Header::new(FrameType::Ack, 1, 0, 1);
        assert!(Header::decode(&ack.encode()).is_err());
        assert!(Header::decode(&Header::new(FrameType::Write, 1, 0, 0).encode()).is_err());
    }

    #[test]
    fn entries_are_checked_against_live_regions() {
        let k = AccessKey([1; 16]);
        let mut regions = HashMap::new();
        regions.insert(k, (0x1000u64, 0x1000u64));
        let table = |es: &[Entry]| {
            let mut t = Vec::new();
            for e in es {
                e.encode(&mut t);
            }
            t
        };
        let ok = [Entry { key: k, addr: 0x1000, len: 0x800 }, Entry { key: k, addr: 0x1800, len: 0x800 }];
        let h = Header::new(FrameType::Write, 1, 2, 0x1000);
        assert!(check_entries(&h, &table(&ok), &regions).is_ok());
        // Lengths that do not add up.
        let h2 = Header::new(FrameType::Write, 1, 2, 0x1001);
        assert_eq!(check_entries(&h2, &table(&ok), &regions).unwrap_err().status, Status::Malformed);
        // Out of bounds by one byte, before the start, a wrong key, overflow.
        for bad in [
            Entry { key: k, addr: 0x1801, len: 0x800 },
            Entry { key: k, addr: 0xfff, len: 1 },
            Entry { key: AccessKey([2; 16]), addr: 0x1000, len: 1 },
            Entry { key: k, addr: u64::MAX, len: 2 },
        ] {
            let h = Header::new(FrameType::Read, 1, 1, bad.len);
            assert_eq!(check_entries(&h, &table(&[bad]), &regions).unwrap_err().status, Status::NotAllowed, "{bad:?}");
        }
    }

    #[test]
    fn conn_info_round_trip() {
        let c = ConnInfo { port: 4242, addrs: vec!["10.0.0.1".parse().unwrap(), "::1".parse().unwrap()] };
        let b = c.encode();
        assert_eq!(ConnInfo::decode(&b).unwrap(), c);
        for n in 0..b.len() {
            assert!(ConnInfo::decode(&b[..n]).is_err());
        }
    }
}
