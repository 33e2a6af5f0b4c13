//! The backend trait: the one interface every way of moving bytes implements.
//!
//! The agent validates everything first (descriptor counts and lengths,
//! registration of local memory, coverage of remote memory by the peer's
//! published regions) and hands a backend a [`XferPlan`] that is already
//! checked and merged. A backend still checks what its *own* side owns: a
//! target checks access key and bounds before a byte of its memory moves.
//!
//! Life cycle, after NIXL's backend engine: `prepare` → `post` →
//! `poll`/`poll_for` → drop (release). `post` and `poll` never block;
//! `poll_for` blocks at most for its timeout and reports the state then (it is
//! not [`Request::wait`](crate::Request::wait), which turns a timeout into an
//! error); dropping a [`BackendXfer`] cancels it and returns only once the
//! backend no longer touches the request's memory.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::AuthToken;
use crate::desc::RegDesc;
use crate::error::Result;
use crate::host::HostId;
use crate::mem::MemShare;
use crate::notif::NotifSink;
use crate::params::{ParamSpec, Params};
use crate::types::MemType;
pub use crate::types::{AccessKey, RegionId, XferOp, XferState};

pub mod local;
pub mod obj;
pub mod posix;
mod registry;
pub mod shm;
pub mod tcp;

pub use crate::types::FileInfo;
pub use registry::{plugin, plugins, register_plugin};

/// One local region as the agent hands it to a backend at registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// The agent's id for the region.
    pub id: RegionId,
    /// Memory type.
    pub mem_type: MemType,
    /// Start address or offset.
    pub addr: u64,
    /// Length (0 for "whole file/device/object").
    pub len: u64,
    /// Device id.
    pub dev_id: u64,
    /// Backend-specific bytes from the registration descriptor.
    pub meta_info: Vec<u8>,
    /// The region's access key.
    pub key: AccessKey,
    /// The memfd behind the region, when kvferry allocated it
    /// ([`Agent::register_buf`](crate::Agent::register_buf) of a memfd-backed
    /// [`AlignedBuf`](crate::AlignedBuf)); `None` for raw `register_mem` memory.
    /// A same-host backend may hand it to peers so that they map the region.
    pub share: Option<MemShare>,
}

impl Region {
    /// The region as the storage layer registers a FILE or BLOCK region.
    pub(crate) fn as_file(&self) -> crate::storage::FileRegistration<'_> {
        crate::storage::FileRegistration {
            key: self.key,
            mem_type: self.mem_type,
            addr: self.addr,
            len: self.len,
            dev_id: self.dev_id,
            meta_info: &self.meta_info,
        }
    }
}

/// What a backend can do, as data (NIXL's `supportsLocal/Remote/Notif` and `getSupportedMems`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Memory types the backend registers and moves.
    pub mem_types: Vec<MemType>,
    /// Transfers within one agent (agent to itself, DRAM ↔ FILE, ...).
    pub local: bool,
    /// Transfers to other agents.
    pub remote: bool,
    /// Notifications (standalone and attached to requests).
    pub notifications: bool,
    /// Preference when several backends can serve a request: lower wins.
    /// Built-ins: LOCAL 0, SHM 10, POSIX 20, OBJ 30, TCP 50; user backends default to 100.
    pub rank: u16,
}

/// One checked, merged piece of a transfer: `len` bytes between a local range
/// and a remote range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Local address (or offset).
    pub local_addr: u64,
    /// Local device id.
    pub local_dev: u64,
    /// Remote address (or offset).
    pub remote_addr: u64,
    /// Remote device id.
    pub remote_dev: u64,
    /// Bytes.
    pub len: u64,
    /// The local region the local range lies in.
    pub local_region: RegionId,
    /// The access key of the remote region the remote range lies in.
    pub remote_key: AccessKey,
    /// The remote region's start (lets a target find it without a search).
    pub remote_region_addr: u64,
}

/// A fully checked transfer the agent hands to [`Backend::prepare`].
#[derive(Clone, Debug)]
pub struct XferPlan {
    /// READ or WRITE.
    pub op: XferOp,
    /// The remote agent's name (this agent's own name for local transfers).
    pub peer: Arc<str>,
    /// Whether the "remote" side is this agent itself.
    pub loopback: bool,
    /// Memory type of the local side.
    pub local_mem: MemType,
    /// Memory type of the remote side.
    pub remote_mem: MemType,
    /// The merged segments, in request order.
    pub segments: Vec<Segment>,
    /// Sum of segment lengths.
    pub total_bytes: u64,
}

/// A remote agent as a backend sees it when its metadata is loaded.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The peer's agent name.
    pub name: Arc<str>,
    /// Where the peer runs.
    pub host: HostId,
    /// A random number drawn when the peer agent was created: tells a
    /// restarted agent of the same name from the old one.
    pub instance: u64,
    /// The connection info the peer's instance of this backend published.
    pub conn_info: Vec<u8>,
}

/// What a backend instance gets from its agent at creation.
#[derive(Clone, Debug)]
pub struct BackendContext {
    /// The owning agent's name.
    pub agent_name: Arc<str>,
    /// The owning agent's instance number (see [`PeerInfo::instance`]).
    pub instance: u64,
    /// Where incoming notifications go.
    pub notifs: NotifSink,
    /// What backends read of the agent's configuration.
    pub config: BackendConfig,
    /// Tells the agent that a peer is gone so it drops the peer's metadata.
    pub peer_events: PeerEvents,
}

/// The part of an agent's configuration a backend reads. The agent builds it
/// from its [`AgentConfig`](crate::AgentConfig) (see
/// [`AgentConfig::backend_config`](crate::AgentConfig::backend_config)), where
/// each field's default is documented; backends never see the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// How long to try to open a connection to a peer.
    pub connect_timeout: Duration,
    /// A peer that does not answer for this long is declared gone.
    pub peer_timeout: Duration,
    /// The shared secret every port the backend opens demands (`Debug` redacts it).
    pub auth_token: Option<AuthToken>,
    /// Threads the backend may use for its own work; 0: its own choice.
    pub worker_threads: usize,
}

type LostFn = dyn Fn(&str, u64) + Send + Sync;

/// A handle through which a backend reports that a peer disconnected.
#[derive(Clone)]
pub struct PeerEvents {
    pub(crate) on_lost: Arc<LostFn>,
}

impl PeerEvents {
    /// Reports that the peer `name` (the instance given) is gone: the agent
    /// invalidates its metadata unless a newer instance was loaded since.
    pub fn peer_lost(&self, name: &str, instance: u64) {
        (self.on_lost)(name, instance)
    }

    /// Events that go nowhere, for tests of a backend on its own.
    pub fn detached() -> Self {
        PeerEvents { on_lost: Arc::new(|_, _| {}) }
    }
}

impl fmt::Debug for PeerEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PeerEvents")
    }
}

/// A cost estimate for a request (NIXL's `estimateXferCost`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostEstimate {
    /// Expected duration.
    pub duration: Duration,
    /// Expected error of `duration`, either way.
    pub err_margin: Duration,
    /// How the estimate was made.
    pub method: &'static str,
}

/// Upper bounds (seconds) of the serve-time buckets of [`ServedStats`]:
/// 1 µs to about 4 s by factors of 4 (the same as the agent's histograms).
pub const SERVE_TIME_BOUNDS: [f64; 12] =
    [1e-6, 4e-6, 1.6e-5, 6.4e-5, 2.56e-4, 1.024e-3, 4.096e-3, 1.6384e-2, 6.5536e-2, 0.262144, 1.048576, 4.194304];

/// What a backend did for one peer as its target (a TCP target applying
/// its frames), for metrics. Backends whose peers move bytes themselves
/// (SHM, LOCAL) report nothing: the initiator counts those.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServedStats {
    /// Bytes the peer's WRITEs put into this agent's memory and files.
    pub write_bytes: u64,
    /// Bytes the peer's READs took from this agent's memory and files.
    pub read_bytes: u64,
    /// Frames (pieces of requests) applied for the peer.
    pub frames: u64,
    /// Frames refused (bad key, outside a registration, a storage error).
    pub refused: u64,
    /// Frames by serve time (from the frame's header to its answer sent):
    /// one count per bound of [`SERVE_TIME_BOUNDS`], then the rest.
    pub time_buckets: Vec<u64>,
    /// Total serve time of the frames counted.
    pub time_sum: Duration,
}

/// A way to move bytes. Implementations are shared between threads.
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// The canonical upper-case name (`TCP`, `SHM`, ...).
    fn name(&self) -> &str;

    /// What this backend can do.
    fn capabilities(&self) -> Capabilities;

    /// What it served so far as a target, per peer (as each names itself).
    /// Default: nothing.
    fn served(&self) -> Vec<(String, ServedStats)> {
        Vec::new()
    }

    /// The effective parameters (defaults overlaid with the caller's).
    fn params(&self) -> Params;

    /// Bytes peers need to reach this backend instance (address, port, ...).
    fn conn_info(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Starts serving `region`. Returns backend-specific public bytes to
    /// publish with the region (empty for most backends).
    fn register(&self, region: &Region) -> Result<Vec<u8>>;

    /// Stops serving the region; after it returns no peer can touch it.
    fn deregister(&self, region: &Region) -> Result<()>;

    /// Whether this backend can reach the peer at all (e.g. SHM: same host).
    fn reaches(&self, peer: &HostId) -> bool {
        let _ = peer;
        true
    }

    /// Takes in a peer's connection info (a new or replaced peer).
    fn load_remote(&self, peer: &PeerInfo) -> Result<()>;

    /// Forgets a peer and closes its connections.
    fn unload_remote(&self, peer: &str);

    /// Opens connections to a loaded peer now rather than on first use.
    fn connect(&self, peer: &str) -> Result<()> {
        let _ = peer;
        Ok(())
    }

    /// Turns a checked plan into a transfer that can be posted many times.
    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn BackendXfer>>;

    /// Sends a standalone notification to a loaded peer.
    fn send_notification(&self, peer: &str, msg: &[u8]) -> Result<()>;

    /// Describes the storage a registration descriptor names, without
    /// registering it: `Ok(None)` when it does not exist. Backends that do not
    /// know storage answer `NotSupported` (the default).
    fn query_mem(&self, mem_type: MemType, desc: &RegDesc) -> Result<Option<FileInfo>> {
        let _ = desc;
        Err(crate::Error::not_supported(format!("backend {} cannot query {mem_type} descriptors", self.name())))
    }

    /// Estimates how long `plan` takes.
    fn estimate_cost(&self, plan: &XferPlan) -> CostEstimate {
        // 5 GB/s and 20 µs per request: honest defaults for a backend that knows nothing better.
        let secs = plan.total_bytes as f64 / 5e9 + 20e-6;
        CostEstimate {
            duration: Duration::from_secs_f64(secs),
            err_margin: Duration::from_secs_f64(secs / 2.0),
            method: "ANALYTICAL",
        }
    }
}

/// One prepared transfer of a backend. Dropping it cancels what is in flight
/// and returns once the backend no longer touches the request's memory.
pub trait BackendXfer: Send + fmt::Debug + 'static {
    /// Starts the transfer, with an optional notification to deliver after the data.
    /// Never blocks on the data; may return `Done` when it finished at once.
    fn post(&mut self, notif: Option<&[u8]>) -> Result<XferState>;

    /// Reports progress without blocking. An error is final for this posting.
    fn poll(&mut self) -> Result<XferState>;

    /// Polls until done or until `timeout` passes, then reports the state:
    /// `InProgress` after the timeout is not an error. The default spins,
    /// yields, then sleeps 50 µs between polls; backends that can block on
    /// an event do better.
    fn poll_for(&mut self, timeout: Duration) -> Result<XferState> {
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            if self.poll()? == XferState::Done {
                return Ok(XferState::Done);
            }
            if Instant::now() >= deadline {
                return Ok(XferState::InProgress);
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else if spins < 256 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Stops the transfer. Returns once the backend no longer touches its memory.
    fn cancel(&mut self);

    /// How the bytes move, for backends with more than one way (SHM);
    /// `None` when there is only one. For diagnostics and tests.
    fn data_path(&self) -> Option<crate::types::DataPath> {
        None
    }
}

/// The state of a posting of a local backend (POSIX, OBJ) from its outcome
/// (`None`: still running): once it succeeded, the notification attached to
/// it (`notif`, taken) goes to the agent itself, after the data.
pub(crate) fn local_outcome(
    outcome: Option<Result<()>>,
    notifs: &NotifSink,
    agent: &Arc<str>,
    notif: &mut Option<Vec<u8>>,
) -> Result<XferState> {
    match outcome {
        None => Ok(XferState::InProgress),
        Some(Ok(())) => {
            if let Some(n) = notif.take() {
                notifs.push(agent.clone(), n)?;
            }
            Ok(XferState::Done)
        }
        Some(Err(e)) => Err(e),
    }
}

/// Makes backends: one per backend kind, kept in the process-wide registry.
pub trait BackendPlugin: Send + Sync + fmt::Debug + 'static {
    /// The canonical upper-case name.
    fn name(&self) -> &str;

    /// Memory types instances of this plugin support.
    fn mem_types(&self) -> Vec<MemType>;

    /// The parameter table: names, defaults, docs (the single source of defaults).
    fn params(&self) -> &'static [ParamSpec];

    /// Whether this plugin can work on this machine, and if not, why.
    fn probe(&self) -> Result<()> {
        Ok(())
    }

    /// Creates a backend instance. `params` holds only names in [`params`](Self::params).
    fn create(&self, ctx: BackendContext, params: &Params) -> Result<Arc<dyn Backend>>;
}
