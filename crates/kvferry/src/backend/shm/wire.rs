//! The SHM control channel's frames: encode and decode, no I/O.
//!
//! Every frame is `len: u32 LE` (bytes after this field) then `kind: u8`
//! then the body. Integers are little-endian. Decoding never panics: short,
//! long or unknown input is a [`Malformed`](crate::ErrorKind::Malformed) error.
//!
//! ```text
//! initiator → owner                       owner → initiator
//!   HELLO   version, instance, nonce,       WELCOME
//!           token, name                     REFUSE   reason
//!   NOTIF   message                         STATUS   id, one byte per key (1: live)
//!   QUERY   id, keys                        REVOKE   seq, key
//!   ACK     seq                             MAPPED   id, status, region addr, len,
//!   MAP     id, key                                  file offset (+ the memfd, SCM_RIGHTS)
//! ```
//!
//! A MAPPED frame whose status is [`MapStatus::Fd`] carries the region's
//! memfd as `SCM_RIGHTS` ancillary data on its first byte; the frame codec
//! only describes it.

use crate::codec::{LenPrefix, Reader, Writer};
use crate::error::{Error, Result};
use crate::types::{AccessKey, MAX_NOTIF_LEN};

/// Version of the control protocol, checked in HELLO.
pub const VERSION: u16 = 2;

/// Largest frame body accepted (a notification plus room for headers).
pub const MAX_FRAME: usize = MAX_NOTIF_LEN + 1024;

/// Most keys one QUERY may carry.
pub const MAX_QUERY_KEYS: usize = (MAX_FRAME - 16) / 16;

const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const REFUSE: u8 = 3;
const NOTIF: u8 = 4;
const QUERY: u8 = 5;
const STATUS: u8 = 6;
const REVOKE: u8 = 7;
const ACK: u8 = 8;
const MAP: u8 = 9;
const MAPPED: u8 = 10;

/// The owner's answer to a MAP request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapStatus {
    /// The key names no live region (deregistered): nothing may be copied.
    Gone,
    /// The region is live but cannot be mapped (raw memory, or the owner does
    /// not share): use cross-memory attach.
    NoFd,
    /// The region's memfd travels with the frame: map it.
    Fd,
}

impl MapStatus {
    fn to_u8(self) -> u8 {
        match self {
            MapStatus::Gone => 0,
            MapStatus::NoFd => 1,
            MapStatus::Fd => 2,
        }
    }

    fn from_u8(b: u8) -> Result<Self> {
        match b {
            0 => Ok(MapStatus::Gone),
            1 => Ok(MapStatus::NoFd),
            2 => Ok(MapStatus::Fd),
            _ => Err(Error::malformed(format!("SHM MAPPED: unknown status {b}"))),
        }
    }
}

/// One control message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Opens a connection: who the initiator is, and the owner's nonce from
    /// the metadata it loaded (proves it holds current metadata of the owner).
    Hello {
        /// Protocol version.
        version: u16,
        /// The initiator agent's instance.
        instance: u64,
        /// The owner backend's nonce, as published in its connection info.
        nonce: u64,
        /// The auth token the initiator is configured with (empty if none).
        token: Vec<u8>,
        /// The initiator agent's name.
        name: String,
    },
    /// The owner accepted the HELLO.
    Welcome,
    /// The owner refused the HELLO; the connection closes after it.
    Refuse(String),
    /// A notification for the owner's agent.
    Notif(Vec<u8>),
    /// Asks whether regions are still registered (by key).
    Query {
        /// Matches the STATUS answer.
        id: u64,
        /// The keys asked about.
        keys: Vec<AccessKey>,
    },
    /// Answers a QUERY: one entry per key, in order.
    Status {
        /// The QUERY's id.
        id: u64,
        /// Whether each key names a live registration.
        live: Vec<bool>,
    },
    /// The owner deregistered the region with this key: never touch it again,
    /// and ACK once no copy into it is in flight.
    Revoke {
        /// Sequence number to acknowledge.
        seq: u64,
        /// The region's key.
        key: AccessKey,
    },
    /// Acknowledges every REVOKE up to `seq`.
    Ack(u64),
    /// Asks for the memfd behind the region with this key, to map it.
    Map {
        /// Matches the MAPPED answer.
        id: u64,
        /// The region's key.
        key: AccessKey,
    },
    /// Answers a MAP.
    Mapped {
        /// The MAP's id.
        id: u64,
        /// Whether the region is live and mappable.
        status: MapStatus,
        /// The region's start address in the owner.
        region_addr: u64,
        /// The region's length.
        region_len: u64,
        /// Where the region starts in the memfd.
        offset: u64,
    },
}

impl Frame {
    /// Appends the encoded frame (length prefix included) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let len = LenPrefix::start(out);
        match self {
            Frame::Hello { version, instance, nonce, token, name } => {
                out.put_u8(HELLO);
                out.put_u16(*version);
                out.put_u64(*instance);
                out.put_u64(*nonce);
                out.put_bytes_u32(token);
                out.put_bytes_u32(name.as_bytes());
            }
            Frame::Welcome => out.put_u8(WELCOME),
            Frame::Refuse(why) => {
                out.put_u8(REFUSE);
                out.put(why.as_bytes());
            }
            Frame::Notif(msg) => {
                out.put_u8(NOTIF);
                out.put(msg);
            }
            Frame::Query { id, keys } => {
                out.put_u8(QUERY);
                out.put_u64(*id);
                for k in keys {
                    out.put(&k.0);
                }
            }
            Frame::Status { id, live } => {
                out.put_u8(STATUS);
                out.put_u64(*id);
                out.extend(live.iter().map(|&b| u8::from(b)));
            }
            Frame::Revoke { seq, key } => {
                out.put_u8(REVOKE);
                out.put_u64(*seq);
                out.put(&key.0);
            }
            Frame::Ack(seq) => {
                out.put_u8(ACK);
                out.put_u64(*seq);
            }
            Frame::Map { id, key } => {
                out.put_u8(MAP);
                out.put_u64(*id);
                out.put(&key.0);
            }
            Frame::Mapped { id, status, region_addr, region_len, offset } => {
                out.put_u8(MAPPED);
                out.put_u64(*id);
                out.put_u8(status.to_u8());
                out.put_u64(*region_addr);
                out.put_u64(*region_len);
                out.put_u64(*offset);
            }
        }
        len.finish(out);
    }

    /// Decodes one frame body (the bytes after the length prefix).
    pub fn decode(body: &[u8]) -> Result<Frame> {
        let mut r = Reader::new("SHM control frame", body);
        let kind = r.u8().map_err(|_| Error::malformed("SHM control frame is empty"))?;
        let f = match kind {
            HELLO => {
                let version = r.u16()?;
                let instance = r.u64()?;
                let nonce = r.u64()?;
                let token = r.bytes_u32()?.to_vec();
                let name = String::from_utf8(r.bytes_u32()?.to_vec())
                    .map_err(|_| Error::malformed("SHM HELLO: the agent name is not UTF-8"))?;
                Frame::Hello { version, instance, nonce, token, name }
            }
            WELCOME => Frame::Welcome,
            REFUSE => Frame::Refuse(String::from_utf8_lossy(r.rest()).into_owned()),
            NOTIF => Frame::Notif(r.rest().to_vec()),
            QUERY => {
                let id = r.u64()?;
                let rest = r.rest();
                if rest.len() % 16 != 0 {
                    return Err(Error::malformed(format!(
                        "SHM QUERY: {} key bytes is not a multiple of 16",
                        rest.len()
                    )));
                }
                let keys = rest
                    .chunks_exact(16)
                    .map(|c| {
                        let mut k = [0u8; 16];
                        k.copy_from_slice(c);
                        AccessKey(k)
                    })
                    .collect();
                Frame::Query { id, keys }
            }
            STATUS => {
                let id = r.u64()?;
                Frame::Status { id, live: r.rest().iter().map(|&b| b != 0).collect() }
            }
            REVOKE => {
                let seq = r.u64()?;
                let key = AccessKey(r.array()?);
                Frame::Revoke { seq, key }
            }
            ACK => Frame::Ack(r.u64()?),
            MAP => {
                let id = r.u64()?;
                Frame::Map { id, key: AccessKey(r.array()?) }
            }
            MAPPED => {
                let id = r.u64()?;
                let status = MapStatus::from_u8(r.u8()?)?;
                Frame::Mapped { id, status, region_addr: r.u64()?, region_len: r.u64()?, offset: r.u64()? }
            }
            k => return Err(Error::malformed(format!("SHM control frame of unknown kind {k}"))),
        };
        if r.left() != 0 {
            return Err(Error::malformed(format!("SHM control frame of kind {kind} has {} trailing bytes", r.left())));
        }
        Ok(f)
    }
}

/// Appends a NOTIF frame carrying `msg` to `out` without building a [`Frame`] (no copy of `msg` but this one).
pub fn encode_notif(msg: &[u8], out: &mut Vec<u8>) {
    out.reserve(msg.len() + 5);
    out.put_u32((msg.len() + 1) as u32);
    out.put_u8(NOTIF);
    out.put(msg);
}

/// Parses the 4-byte length prefix, refusing lengths over [`MAX_FRAME`].
pub fn frame_len(prefix: [u8; 4]) -> Result<usize> {
    let n = u32::from_le_bytes(prefix) as usize;
    if n == 0 || n > MAX_FRAME {
        return Err(Error::malformed(format!("SHM control frame of {n} bytes (allowed: 1 to {MAX_FRAME})")));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(f: Frame) {
        let mut buf = Vec::new();
        f.encode(&mut buf);
        let n = frame_len(buf[..4].try_into().unwrap()).unwrap();
        assert_eq!(n, buf.len() - 4);
        assert_eq!(Frame::decode(&buf[4..]).unwrap(), f);
        // Every strict prefix of a fixed-size body fails cleanly (never panics).
        for cut in 0..buf.len() - 4 {
            let _ = Frame::decode(&buf[4..4 + cut]);
        }
    }

    #[test]
    fn frames_round_trip() {
        let k = AccessKey([7; 16]);
        round_trip(Frame::Hello { version: VERSION, instance: 9, nonce: 42, token: b"t".to_vec(), name: "a".into() });
        round_trip(Frame::Welcome);
        round_trip(Frame::Refuse("no".into()));
        round_trip(Frame::Notif(b"hello".to_vec()));
        round_trip(Frame::Query { id: 3, keys: vec![k, AccessKey([1; 16])] });
        round_trip(Frame::Status { id: 3, live: vec![true, false] });
        round_trip(Frame::Revoke { seq: 5, key: k });
        round_trip(Frame::Ack(5));
        round_trip(Frame::Map { id: 4, key: k });
        for status in [MapStatus::Gone, MapStatus::NoFd, MapStatus::Fd] {
            round_trip(Frame::Mapped { id: 4, status, region_addr: 0x1000, region_len: 1 << 20, offset: 0 });
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode_notif(b"xyz", &mut a);
        Frame::Notif(b"xyz".to_vec()).encode(&mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn bad_input_is_malformed() {
        assert!(Frame::decode(&[]).is_err());
        assert!(Frame::decode(&[99]).is_err());
        assert!(Frame::decode(&[ACK, 1, 2]).is_err());
        assert!(Frame::decode(&[QUERY, 0, 0, 0, 0, 0, 0, 0, 0, 1]).is_err());
        assert!(Frame::decode(&[WELCOME, 0]).is_err());
        let mut m = vec![MAPPED];
        m.extend_from_slice(&[0; 8]);
        m.push(3);
        m.extend_from_slice(&[0; 24]);
        assert!(Frame::decode(&m).unwrap_err().message().contains("status 3"));
        let mut h = vec![HELLO];
        h.extend_from_slice(&[0; 18]);
        h.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Frame::decode(&h).is_err());
        assert!(frame_len(0u32.to_le_bytes()).is_err());
        assert!(frame_len((MAX_FRAME as u32 + 1).to_le_bytes()).is_err());
    }
}
