//! The vocabulary every layer shares: the direction of a transfer, the key
//! that grants access to a region, what a file looks like.
//!
//! These types sit below every other module (the storage layer, the
//! backends, the agent all use them) and import nothing of kvferry but the
//! error type. Their public paths are `kvferry::XferOp` and
//! `kvferry::backend::{AccessKey, FileInfo, XferOp}`.

use std::fmt;

use crate::error::Result;

/// The unguessable key that grants access to one registered region.
///
/// Published in metadata; every remote access carries it, and the owner of
/// the memory checks it (with the bounds) before any byte moves.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct AccessKey(pub [u8; 16]);

impl AccessKey {
    /// 128 fresh bits from the OS's random source.
    pub fn random() -> Result<Self> {
        let mut k = [0u8; 16];
        getrandom::fill(&mut k)
            .map_err(|e| crate::Error::new(crate::ErrorKind::Backend, format!("the OS random source failed: {e}")))?;
        Ok(AccessKey(k))
    }
}

impl fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a whole key: logs are not a place for secrets.
        write!(f, "AccessKey({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

/// Direction of a transfer, from the initiator's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum XferOp {
    /// Remote → local.
    Read,
    /// Local → remote.
    Write,
}

impl std::str::FromStr for XferOp {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_uppercase().as_str() {
            "READ" | "RD" => Ok(XferOp::Read),
            "WRITE" | "WR" => Ok(XferOp::Write),
            _ => Err(crate::Error::invalid(format!("unknown operation '{s}': expected READ or WRITE"))),
        }
    }
}

impl fmt::Display for XferOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XferOp::Read => "READ",
            XferOp::Write => "WRITE",
        })
    }
}

/// What a file or block device looks like: the answer of
/// [`Backend::query_mem`](crate::backend::Backend::query_mem) (NIXL's `queryMem`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileInfo {
    /// Size in bytes (for a block device, the device's size).
    pub size: u64,
    /// Type and permission bits (`st_mode`).
    pub mode: u32,
    /// Last modification time.
    pub mtime: std::time::SystemTime,
}
