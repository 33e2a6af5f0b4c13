//! kvferry moves bytes between the memories and storage of AI inference
//! workers: KV-cache blocks from prefill to decode workers, blocks to and from
//! SSD tiers, weights between processes and hosts.
//!
//! It does what NVIDIA NIXL and Mooncake's Transfer Engine do, in Rust:
//! [`Agent`]s register memory, exchange [metadata], and post
//! READ/WRITE [`Request`]s over pluggable [backends](crate::backend), with
//! [notifications](crate::notif) that arrive after the data.
//!
//! ```text
//!   Agent ── registry of backends, regions, peers, requests, notifications
//!     │  validates, resolves every descriptor to a registered region,
//!     │  merges contiguous runs, chooses a backend
//!   Backend trait ── LOCAL │ TCP │ SHM │ POSIX …
//!     │
//!   wire protocol (no I/O)       metadata codec (no I/O)
//! ```
//!
//! What kvferry does not do: it does not allocate GPU memory or manage
//! KV-cache layouts; it moves the bytes it is told to, between regions their
//! owners registered, and nothing else.
//!
//! # Example: two agents in one process
//!
//! ```
//! use std::time::Duration;
//! use kvferry::{Agent, AlignedBuf, XferOp};
//!
//! let prefill = Agent::with_backends("prefill", &["local"])?;
//! let decode = Agent::with_backends("decode", &["local"])?;
//! let mut kv = AlignedBuf::new(64 << 10)?;
//! kv.as_mut_slice().fill(7);
//! let dst = AlignedBuf::new(64 << 10)?;
//! let _r1 = prefill.register_buf(&kv)?;
//! let _r2 = decode.register_buf(&dst)?;
//!
//! prefill.load_remote_metadata(&decode.local_metadata()?)?;
//! let req = prefill
//!     .request(XferOp::Write)
//!     .local(&kv.xfer_blocks(0, 16 << 10, 4)?)
//!     .remote("decode", &dst.xfer_blocks(0, 16 << 10, 4)?)
//!     .notify(b"layer-0")
//!     .build()?;
//! req.post(None)?;
//! req.wait(Duration::from_secs(5))?;
//! assert!(dst.as_slice().iter().all(|&b| b == 7));
//! assert_eq!(decode.take_notifications()["prefill"], vec![b"layer-0".to_vec()]);
//! # Ok::<(), kvferry::Error>(())
//! ```

// The public surface: the types at the root (one path each), and a few
// namespaces for those who extend or embed kvferry (backend plugins, the
// metadata plane, auth and admission, the OS helpers the CLI shares).
// Everything else is private; what the fuzzers and the hostile tests need
// of the internals is `#[doc(hidden)]`.
pub mod admission;
mod agent;
pub mod auth;
pub mod backend;
#[doc(hidden)]
pub mod codec;
mod cuda;
mod desc;
mod error;
mod host;
mod mem;
pub mod metadata;
pub mod notif;
pub mod os;
pub mod params;
mod request;
mod storage;
mod sys;
pub mod telemetry;
mod types;

pub use agent::xfer_types::{PreparedList, RequestBuilder};
pub use agent::{Agent, AgentConfig, ExportedFile, MetaPeer, Registration, Store, FILE_ID_BASE};
pub use auth::AuthToken;
pub use cuda::{cuda_status, CudaDevice, CudaStatus, DeviceBuf};
pub use desc::{DescList, RegDesc, RegDescList, XferDesc, XferDescList};
pub use error::{Error, ErrorKind, Result};
pub use host::HostId;
pub use mem::MemShare;
pub use mem::{page_size, AlignedBuf, HUGE_PAGE};
pub use notif::Notifications;
pub use params::{ParamSpec, Params};
pub use request::Request;
pub use telemetry::{AgentMetrics, MetricsServer, XferTelemetry};
pub use types::{check_agent_name, AccessKey, FileInfo, RegionId, MAX_BACKENDS, MAX_NAME_LEN, MAX_NOTIF_LEN};
pub use types::{DataPath, MemType, XferOp, XferState};

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
