//! The metadata listener's wire format, without I/O: one message per
//! connection each way, framed as
//!
//! ```text
//! "KVFL" | version u8 | op u8 | token_len u16 | body_len u32 | token | body
//! ```
//!
//! Requests: `SEND` (body: a metadata blob to load), `FETCH` (body: the name
//! the caller expects this agent to have; answered with `METADATA`),
//! `INVALIDATE` (body: instance u64 then the sender's name). Answers: `OK`,
//! `ERROR` (body: UTF-8 message), `METADATA` (body: the blob). Decoding
//! never trusts a length and never panics.

use crate::codec::{Reader, Writer};
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
        let mut r = Reader::new("listener message header", b);
        let magic = r.take(MAGIC.len())?;
        if magic != MAGIC {
            return Err(Error::malformed(format!(
                "not a kvferry metadata listener message (magic {magic:02x?}, expected \"KVFL\")"
            )));
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(Error::malformed(format!(
                "metadata listener framing version {version} (this build speaks {VERSION}); run the same kvferry version"
            )));
        }
        let op = r.u8()?;
        let op = Op::from_u8(op).ok_or_else(|| Error::malformed(format!("unknown listener message {op:#04x}")))?;
        let token_len = r.u16()?;
        let body_len = r.u32()?;
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
    out.put(MAGIC);
    out.put_u8(VERSION);
    out.put_u8(op as u8);
    out.put_u16(token.len() as u16);
    out.put_u32(body.len() as u32);
    out.put(token);
    out.put(body);
    Ok(out)
}

/// Splits a whole message from an untrusted peer into its header, token and
/// body: what the listener reads from a socket, without the socket.
/// Trailing bytes after the announced body are an error.
pub fn decode_msg(bytes: &[u8]) -> Result<(MsgHeader, &[u8], &[u8])> {
    let mut r = Reader::new("listener message", bytes);
    let hb: [u8; HEADER_LEN] = r.array().map_err(|_| {
        Error::malformed(format!("listener message of {} bytes is shorter than its header", bytes.len()))
    })?;
    let h = MsgHeader::decode(&hb)?;
    let (t, b) = (h.token_len as usize, h.body_len as usize);
    if r.left() != t + b {
        return Err(Error::malformed(format!(
            "listener message announces {t} bytes of token and {b} of body but carries {}",
            r.left()
        )));
    }
    Ok((h, r.take(t)?, r.rest()))
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
                let mut r = Reader::new("INVALIDATE body", &body);
                let instance = r.u64()?;
                ListenerRequest::Invalidate { name: String::from_utf8_lossy(r.rest()).into_owned(), instance }
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
}
