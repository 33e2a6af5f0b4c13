//! The codec toolkit every wire format of kvferry is written with: a
//! checked little-endian [`Reader`] over untrusted bytes, [`Writer`]
//! helpers for `Vec<u8>` (and fixed buffers), and [`DecodeError`], which
//! says what was being decoded, where, and what was wrong.
//!
//! The TCP protocol (`backend/tcp/proto.rs`), the SHM control wire
//! (`backend/shm/wire.rs`), the metadata listener's framing and the
//! metadata blob's header all read and write through it, the way every TLS
//! message in rustls goes through `msgs/codec.rs`. Reading never panics and
//! never allocates: each read checks the bytes left first and returns an
//! error on short input; peer-supplied lengths are only ever compared with
//! what is there.
//!
//! ```
//! # use kvferry::codec::{Reader, Writer};
//! let mut out = Vec::new();
//! out.put_u16(7);
//! out.put_bytes_u32(b"name");
//! let mut r = Reader::new("example", &out);
//! assert_eq!(r.u16().unwrap(), 7);
//! assert_eq!(r.bytes_u32().unwrap(), b"name");
//! r.expect_end().unwrap();
//! assert!(Reader::new("example", &out[..3]).u32().unwrap_err().to_string().contains("example truncated"));
//! ```

use std::fmt;

use crate::error::Error;

/// What was wrong with bytes a [`Reader`] read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The input ended early: `needed` more bytes were wanted, `left` remained.
    Truncated {
        /// Bytes the read wanted.
        needed: usize,
        /// Bytes that were left.
        left: usize,
    },
    /// The input goes on after its end: `extra` bytes too many.
    Trailing {
        /// Bytes left over.
        extra: usize,
    },
}

/// Bytes that do not decode: what was being decoded (`what`), at which
/// byte of its input (`at`), and the [`Problem`]. Converts into a
/// [`Malformed`](crate::ErrorKind::Malformed) [`Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// The thing being decoded ("SHM control frame", "hello", ...).
    pub what: &'static str,
    /// Offset into the reader's input where the problem was found.
    pub at: usize,
    /// What was wrong.
    pub problem: Problem,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problem {
            Problem::Truncated { needed, left } => {
                write!(f, "{} truncated at byte {}: needed {needed} more bytes, {left} left", self.what, self.at)
            }
            Problem::Trailing { extra } => {
                write!(f, "{} has {extra} unexpected trailing bytes after byte {}", self.what, self.at)
            }
        }
    }
}

impl std::error::Error for DecodeError {}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Self {
        Error::malformed(e.to_string())
    }
}

/// A little-endian cursor over untrusted bytes: every read is checked and
/// returns a [`DecodeError`] naming `what` on short input.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`, which holds one `what` (named in errors).
    pub fn new(what: &'static str, buf: &'a [u8]) -> Self {
        Reader { buf, at: 0, what }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(self.error(Problem::Truncated { needed: n, left: self.buf.len() }));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        self.at += n;
        Ok(a)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// Skips `n` bytes.
    pub fn skip(&mut self, n: usize) -> Result<(), DecodeError> {
        self.take(n).map(|_| ())
    }

    /// A byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        self.array::<1>().map(|[b]| b)
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_le_bytes)
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_le_bytes)
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_le_bytes)
    }

    /// Bytes after a `u16` length prefix.
    pub fn bytes_u16(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    /// Bytes after a `u32` length prefix.
    pub fn bytes_u32(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()?;
        // A length that does not fit usize cannot fit the input either.
        self.take(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.at += self.buf.len();
        std::mem::take(&mut self.buf)
    }

    /// Bytes left.
    pub fn left(&self) -> usize {
        self.buf.len()
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.at
    }

    /// An error unless every byte was read.
    pub fn expect_end(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.error(Problem::Trailing { extra: self.buf.len() }))
        }
    }

    fn error(&self, problem: Problem) -> DecodeError {
        DecodeError { what: self.what, at: self.at, problem }
    }
}

/// Little-endian writing helpers, for `Vec<u8>` (grows) and `&mut [u8]`
/// (a fixed-size encoding, which advances through the slice).
pub trait Writer {
    /// Appends `bytes` as they are.
    fn put(&mut self, bytes: &[u8]);

    /// Appends a byte.
    fn put_u8(&mut self, v: u8) {
        self.put(&[v]);
    }

    /// Appends a little-endian `u16`.
    fn put_u16(&mut self, v: u16) {
        self.put(&v.to_le_bytes());
    }

    /// Appends a little-endian `u32`.
    fn put_u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }

    /// Appends a little-endian `u64`.
    fn put_u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }

    /// Appends `bytes` after a `u32` length prefix (the length is cut to
    /// `u32`: callers bound their fields far below it).
    fn put_bytes_u32(&mut self, bytes: &[u8]) {
        self.put_u32(bytes.len() as u32);
        self.put(bytes);
    }
}

impl Writer for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl Writer for &mut [u8] {
    /// Writes into the front of the slice and advances past it. A fixed
    /// encoding sized for its buffer never overflows; if one did, what does
    /// not fit is dropped (and debug builds stop), never written out of bounds.
    fn put(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.len());
        debug_assert_eq!(n, bytes.len(), "a fixed-size encoding overflowed its buffer");
        let (head, tail) = std::mem::take(self).split_at_mut(n);
        head.copy_from_slice(&bytes[..n]);
        *self = tail;
    }
}

/// A `u32` length prefix reserved in a `Vec<u8>`, filled in by
/// [`LenPrefix::finish`] with the bytes written after it.
#[derive(Debug)]
#[must_use = "finish() writes the length"]
pub struct LenPrefix {
    at: usize,
}

impl LenPrefix {
    /// Reserves the prefix at the end of `out`.
    pub fn start(out: &mut Vec<u8>) -> LenPrefix {
        let at = out.len();
        out.put_u32(0);
        LenPrefix { at }
    }

    /// Writes the number of bytes after the prefix into it.
    pub fn finish(self, out: &mut [u8]) {
        let len = (out.len() - self.at - 4) as u32;
        out[self.at..self.at + 4].copy_from_slice(&len.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_was_written() {
        let mut out = Vec::new();
        out.put_u8(1);
        out.put_u16(0x0203);
        out.put_u32(0x0405_0607);
        out.put_u64(u64::MAX - 1);
        out.put_bytes_u32(b"xyz");
        out.put(b"tail");
        let mut r = Reader::new("sample", &out);
        assert_eq!(r.u8().unwrap(), 1);
        assert_eq!(r.u16().unwrap(), 0x0203);
        assert_eq!(r.u32().unwrap(), 0x0405_0607);
        assert_eq!(r.u64().unwrap(), u64::MAX - 1);
        assert_eq!(r.bytes_u32().unwrap(), b"xyz");
        assert_eq!(r.position(), 1 + 2 + 4 + 8 + 4 + 3);
        assert!(r.expect_end().is_err());
        assert_eq!(r.rest(), b"tail");
        r.expect_end().unwrap();
        assert_eq!(&out[1..3], &[3, 2], "little-endian");
    }

    #[test]
    fn short_input_is_an_error_naming_what_and_where() {
        let mut r = Reader::new("thing", &[1, 2, 3]);
        r.u8().unwrap();
        let e = r.u32().unwrap_err();
        assert_eq!(e.problem, Problem::Truncated { needed: 4, left: 2 });
        assert_eq!(e.to_string(), "thing truncated at byte 1: needed 4 more bytes, 2 left");
        // A failed read consumes nothing.
        assert_eq!(r.u16().unwrap(), 0x0302);
        let mut big = Vec::new();
        big.put_u32(u32::MAX);
        assert!(Reader::new("len", &big).bytes_u32().is_err());
        assert!(Reader::new("len", &[5, 0, 1]).bytes_u16().is_err());
        let e: Error = Reader::new("x", &[1]).expect_end().unwrap_err().into();
        assert_eq!(e.kind(), crate::ErrorKind::Malformed);
        assert!(e.message().contains("trailing"), "{e}");
    }

    #[test]
    fn fixed_buffers_and_length_prefixes() {
        let mut b = [0u8; 6];
        let mut w = &mut b[..];
        w.put_u16(0xaabb);
        w.put_u32(1);
        assert!(w.is_empty());
        assert_eq!(b, [0xbb, 0xaa, 1, 0, 0, 0]);
        let mut out = vec![9];
        let p = LenPrefix::start(&mut out);
        out.put(b"abc");
        p.finish(&mut out);
        assert_eq!(out, [9, 3, 0, 0, 0, b'a', b'b', b'c']);
    }
}
