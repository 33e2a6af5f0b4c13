//! Agent metadata: what an agent publishes so that peers can reach it.
//!
//! [`codec`] turns [`AgentMetadata`] into bytes and back, with no I/O and no
//! trust in the input. The transports that move the bytes (in memory, peer to
//! peer, a metadata server, etcd) live beside it.

pub mod codec;
mod http_common;
pub mod listener;
pub mod server;
pub mod store;

pub use codec::{AgentMetadata, BackendMeta, RegionMeta, FORMAT_VERSION, MAGIC};
