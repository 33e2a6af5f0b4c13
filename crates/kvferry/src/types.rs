//! The vocabulary every layer shares: memory types, transfer directions and
//! states, region ids and access keys, agent-name rules and the size limits
//! that more than one layer enforces.
//!
//! This is the bottom layer: it imports only [`crate::error`], so that the
//! descriptors, the backends, the wire protocols, the metadata plane and the
//! agent can all name the same things without importing one another.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// Where the bytes a descriptor names live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MemType {
    /// Host memory: `addr` is a virtual address of the owning process, `dev_id` is 0.
    Dram,
    /// GPU memory: `addr` is a device address, `dev_id` the CUDA ordinal.
    Vram,
    /// A block device: `addr` is a byte offset, `dev_id` names the device.
    Block,
    /// An object in an object store: `addr` is an offset, `dev_id` the key id.
    Obj,
    /// A file: `addr` is a byte offset, `dev_id` a file descriptor or registered file id.
    File,
}

impl MemType {
    /// Every memory type, in a fixed order.
    pub const ALL: [MemType; 5] = [MemType::Dram, MemType::Vram, MemType::Block, MemType::Obj, MemType::File];

    /// NIXL's spelling: `DRAM`, `VRAM`, `BLOCK`, `OBJ`, `FILE`.
    pub fn as_str(self) -> &'static str {
        match self {
            MemType::Dram => "DRAM",
            MemType::Vram => "VRAM",
            MemType::Block => "BLOCK",
            MemType::Obj => "OBJ",
            MemType::File => "FILE",
        }
    }

    /// Whether a registration of length 0 means "the whole file, device or object".
    pub fn is_storage(self) -> bool {
        matches!(self, MemType::Block | MemType::Obj | MemType::File)
    }
}

impl fmt::Display for MemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MemType {
    type Err = Error;

    /// Parses NIXL's names case-insensitively, plus the aliases NIXL's Python
    /// API accepts (`cpu`, `cuda`, `gpu`, `BLK`, `OBJECT`).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_uppercase().as_str() {
            "DRAM" | "CPU" => Ok(MemType::Dram),
            "VRAM" | "CUDA" | "GPU" => Ok(MemType::Vram),
            "BLOCK" | "BLK" => Ok(MemType::Block),
            "OBJ" | "OBJECT" => Ok(MemType::Obj),
            "FILE" => Ok(MemType::File),
            _ => {
                Err(Error::invalid(format!("unknown memory type '{s}': expected one of DRAM, VRAM, BLOCK, OBJ, FILE")))
            }
        }
    }
}

/// Direction of a transfer, from the initiator's point of view. The one
/// direction type of kvferry: requests, transfer plans and cross-memory
/// copies and storage I/O use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum XferOp {
    /// Remote → local (for storage: file → memory).
    Read,
    /// Local → remote (for storage: memory → file).
    Write,
}

impl FromStr for XferOp {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_uppercase().as_str() {
            "READ" | "RD" => Ok(XferOp::Read),
            "WRITE" | "WR" => Ok(XferOp::Write),
            _ => Err(Error::invalid(format!("unknown operation '{s}': expected READ or WRITE"))),
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

/// Where a posted transfer stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XferState {
    /// Every byte moved and, for WRITE, was applied by the target.
    Done,
    /// Still moving.
    InProgress,
}

/// How a backend with more than one way to move bytes moves a request's
/// (SHM: memcpy through a mapping of the peer's memfd, or cross-memory
/// attach). For diagnostics and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataPath {
    /// memcpy into or out of the peer's memfd-backed memory, mapped here.
    Mapped,
    /// Cross-memory attach (`process_vm_readv`/`writev`).
    Cma,
    /// Some descriptors one way, some the other.
    Mixed,
}

impl DataPath {
    /// `"mapped"`, `"cma"` or `"mixed"`.
    pub fn as_str(self) -> &'static str {
        match self {
            DataPath::Mapped => "mapped",
            DataPath::Cma => "cma",
            DataPath::Mixed => "mixed",
        }
    }
}

impl fmt::Display for DataPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies a registered region inside one agent; assigned by the agent.
pub type RegionId = u64;

/// The unguessable key that grants access to one registered region.
///
/// Published in metadata; every remote access carries it, and the owner of
/// the memory checks it (with the bounds) before any byte moves.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AccessKey(pub [u8; 16]);

impl AccessKey {
    /// 128 fresh bits from the OS's random source.
    pub fn random() -> Result<Self> {
        let mut k = [0u8; 16];
        getrandom::fill(&mut k)
            .map_err(|e| Error::new(ErrorKind::Backend, format!("the OS random source failed: {e}")))?;
        Ok(AccessKey(k))
    }
}

impl fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a whole key: logs are not a place for secrets.
        write!(f, "AccessKey({:02x}{:02x}…)", self.0[0], self.0[1])
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

/// Longest agent name accepted, in bytes (metadata, TCP and SHM handshakes).
pub const MAX_NAME_LEN: usize = 256;

/// Most backends one agent may run and publish (a region's backends are a bit mask).
pub const MAX_BACKENDS: usize = 32;

/// Largest notification accepted, in bytes. Notifications are control
/// messages; bulk data belongs in a transfer.
pub const MAX_NOTIF_LEN: usize = 64 * 1024;

/// Checks an agent name: non-empty, at most [`MAX_NAME_LEN`] bytes, no control characters.
pub fn check_agent_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid("agent name is empty; give every agent a unique, non-empty name"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!("agent name is {} bytes, longer than {MAX_NAME_LEN}", name.len())));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::invalid(format!("agent name {name:?} contains control characters")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_type_names_round_trip() {
        for m in MemType::ALL {
            assert_eq!(m.as_str().parse::<MemType>().unwrap(), m);
        }
        assert_eq!("cuda".parse::<MemType>().unwrap(), MemType::Vram);
        let e = "HBM".parse::<MemType>().unwrap_err();
        assert!(e.message().contains("DRAM, VRAM"), "{e}");
    }

    #[test]
    fn xfer_op_names_round_trip() {
        for op in [XferOp::Read, XferOp::Write] {
            assert_eq!(op.to_string().parse::<XferOp>().unwrap(), op);
        }
        assert_eq!("wr".parse::<XferOp>().unwrap(), XferOp::Write);
        assert!("copy".parse::<XferOp>().unwrap_err().message().contains("READ or WRITE"));
    }

    #[test]
    fn agent_names_are_checked() {
        assert!(check_agent_name("prefill-0").is_ok());
        assert!(check_agent_name("").is_err());
        assert!(check_agent_name(&"x".repeat(MAX_NAME_LEN)).is_ok());
        assert!(check_agent_name(&"x".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(check_agent_name("a\nb").unwrap_err().message().contains("control"));
    }

    #[test]
    fn access_keys_are_random_and_redacted() {
        let (a, b) = (AccessKey::random().unwrap(), AccessKey::random().unwrap());
        assert_ne!(a, b);
        let shown = format!("{a:?}");
        assert!(shown.len() < 20, "{shown}");
    }
}
