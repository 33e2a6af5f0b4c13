//! The metadata blob: `MAGIC`, a little-endian `u16` format version, then the
//! postcard encoding of [`AgentMetadata`]. Decoding checks the header, the
//! body and every invariant the agent relies on, and never panics.

use serde::{Deserialize, Serialize};

use crate::codec::{Reader, Writer};
use crate::error::{Error, Result};
use crate::host::HostId;
use crate::types::{check_agent_name, AccessKey, MemType, MAX_BACKENDS};

/// The first four bytes of every metadata blob.
pub const MAGIC: &[u8; 4] = b"KVFM";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;

/// One backend an agent runs, with the connection info peers need.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendMeta {
    /// Canonical backend name.
    pub name: String,
    /// Connection info, or `None` in a partial blob made without it.
    pub conn_info: Option<Vec<u8>>,
}

/// One registered region as peers see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionMeta {
    /// Memory type.
    pub mem_type: MemType,
    /// Start address or offset.
    pub addr: u64,
    /// Length (0: whole file/device/object).
    pub len: u64,
    /// Device id.
    pub dev_id: u64,
    /// The key that grants access.
    pub key: AccessKey,
    /// Bit `i` set: registered with `backends[i]`.
    pub backend_mask: u32,
    /// Per-backend public bytes, by backend index, where a backend published any.
    pub public: Vec<(u8, Vec<u8>)>,
}

/// Everything an agent publishes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMetadata {
    /// The agent's unique name.
    pub name: String,
    /// Random number drawn when the agent was created.
    pub instance: u64,
    /// Where the agent runs.
    pub host: HostId,
    /// A partial blob adds to what a peer already has instead of replacing it.
    pub partial: bool,
    /// The agent's backends.
    pub backends: Vec<BackendMeta>,
    /// Registered regions.
    pub regions: Vec<RegionMeta>,
    /// Named extension sections (exported files, ...), each its own encoding.
    pub extensions: Vec<(String, Vec<u8>)>,
}

impl AgentMetadata {
    /// Encodes the blob.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.regions.len() * 32);
        out.put(MAGIC);
        out.put_u16(FORMAT_VERSION);
        // Serializing plain data into a Vec cannot fail.
        postcard::to_extend(self, out).expect("postcard serialization into a Vec cannot fail")
    }

    /// Decodes and checks a blob from an untrusted source.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new("metadata header", bytes);
        let (Ok(magic), Ok(version)) = (r.array::<4>(), r.u16()) else {
            return Err(Error::malformed(format!(
                "metadata is {} bytes long, shorter than its 6-byte header; was it truncated in transit?",
                bytes.len()
            )));
        };
        if &magic != MAGIC {
            return Err(Error::malformed(format!(
                "these bytes are not kvferry agent metadata (magic {magic:02x?}, expected {MAGIC:02x?} \"KVFM\")"
            )));
        }
        if version != FORMAT_VERSION {
            let hint = if version > FORMAT_VERSION { "upgrade kvferry on this side" } else { "upgrade the peer" };
            return Err(Error::malformed(format!(
                "metadata format version {version} is not supported (this build reads version {FORMAT_VERSION}); {hint}"
            )));
        }
        let (md, rest): (AgentMetadata, &[u8]) = postcard::take_from_bytes(r.rest())
            .map_err(|e| Error::malformed(format!("metadata body is truncated or corrupt: {e}")))?;
        if !rest.is_empty() {
            return Err(Error::malformed(format!("metadata has {} unexpected trailing bytes", rest.len())));
        }
        md.check()?;
        Ok(md)
    }

    fn check(&self) -> Result<()> {
        check_agent_name(&self.name).map_err(|e| Error::malformed(e.message().to_string()))?;
        if self.backends.len() > MAX_BACKENDS {
            return Err(Error::malformed(format!(
                "metadata of '{}' lists {} backends, more than the {MAX_BACKENDS} allowed",
                self.name,
                self.backends.len()
            )));
        }
        let full_mask: u64 = (1u64 << self.backends.len()) - 1;
        for (i, r) in self.regions.iter().enumerate() {
            if r.addr.checked_add(r.len).is_none() {
                return Err(Error::malformed(format!(
                    "metadata of '{}': region {i} ({:#x}+{}) overflows 64 bits",
                    self.name, r.addr, r.len
                )));
            }
            if r.len == 0 && !r.mem_type.is_storage() {
                return Err(Error::malformed(format!(
                    "metadata of '{}': {} region {i} at {:#x} has zero length",
                    self.name, r.mem_type, r.addr
                )));
            }
            if u64::from(r.backend_mask) & !full_mask != 0
                || r.public.iter().any(|(b, _)| usize::from(*b) >= self.backends.len())
            {
                return Err(Error::malformed(format!(
                    "metadata of '{}': region {i} names a backend beyond the {} listed",
                    self.name,
                    self.backends.len()
                )));
            }
        }
        Ok(())
    }

    /// Looks up an extension section by name.
    pub fn extension(&self, name: &str) -> Option<&[u8]> {
        self.extensions.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(regions: usize) -> AgentMetadata {
        AgentMetadata {
            name: "prefill-0".into(),
            instance: 42,
            host: HostId::current().clone(),
            partial: false,
            backends: vec![
                BackendMeta { name: "TCP".into(), conn_info: Some(b"127.0.0.1:5555".to_vec()) },
                BackendMeta { name: "LOCAL".into(), conn_info: None },
            ],
            regions: (0..regions as u64)
                .map(|i| RegionMeta {
                    mem_type: MemType::Dram,
                    addr: 0x7f00_0000_0000 + i * (1 << 20),
                    len: 1 << 20,
                    dev_id: 0,
                    key: AccessKey([i as u8; 16]),
                    backend_mask: 0b11,
                    public: vec![],
                })
                .collect(),
            extensions: vec![],
        }
    }

    #[test]
    fn round_trip() {
        let md = sample(3);
        assert_eq!(AgentMetadata::decode(&md.encode()).unwrap(), md);
    }

    #[test]
    fn every_truncation_is_a_clear_error() {
        let b = sample(2).encode();
        for cut in 0..b.len() {
            let e = AgentMetadata::decode(&b[..cut]).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Malformed, "cut at {cut}: {e}");
        }
    }

    #[test]
    fn future_version_and_garbage() {
        let mut b = sample(1).encode();
        b[4] = 9;
        let e = AgentMetadata::decode(&b).unwrap_err();
        assert!(e.message().contains("version 9") && e.message().contains("upgrade kvferry"), "{e}");
        assert!(AgentMetadata::decode(b"hello world, not metadata").unwrap_err().message().contains("magic"));
    }

    #[test]
    fn invariants_are_checked() {
        let mut md = sample(1);
        md.regions[0].backend_mask = 0b100;
        assert!(AgentMetadata::decode(&md.encode()).unwrap_err().message().contains("beyond"));
        let mut md = sample(1);
        md.name.clear();
        assert!(AgentMetadata::decode(&md.encode()).is_err());
        let mut md = sample(1);
        md.regions[0].addr = u64::MAX;
        assert!(AgentMetadata::decode(&md.encode()).unwrap_err().message().contains("overflows"));
    }

    #[test]
    fn thousand_regions_stay_compact() {
        let n = sample(1000).encode().len();
        assert!(n < 40 * 1000, "1000 regions took {n} bytes");
    }
}
