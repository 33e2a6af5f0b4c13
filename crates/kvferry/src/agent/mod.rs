//! The agent: one named endpoint that owns backends, registered memory, the
//! cache of peers' metadata, requests and notifications.
//!
//! The agent knows nothing about sockets or files: it validates, chooses a
//! backend, and hands the backend a fully checked [`XferPlan`](crate::backend::XferPlan).
//! Its methods are spread over files by concept: backends here, memory in
//! `memory.rs`, peers and metadata in `peers.rs`, requests in `xfer.rs`.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::backend::{self, Backend, BackendContext, Capabilities, PeerEvents};
use crate::error::{Error, ErrorKind, Result};
use crate::notif::{NotifSink, Notifications};
use crate::params::{ParamSpec, Params};
use crate::types::{check_agent_name, MemType};

mod builder;
mod central;
mod config;
mod files;
mod memory;
mod metrics;
mod p2p;
mod peers;
mod query;
pub(crate) mod ranges;
mod xfer;

/// Types of request building re-exported at the crate root.
pub mod xfer_types {
    pub use super::builder::RequestBuilder;
    pub use super::xfer::PreparedList;
}

pub use central::{MetaPeer, Store};
pub use config::AgentConfig;
pub use files::{ExportedFile, FILE_ID_BASE};
pub(crate) use memory::LocalRegion;
pub use memory::Registration;
pub(crate) use peers::RemotePeer;

/// One backend instance the agent created: its name, the instance and what it can do.
pub(super) struct BackendSlot {
    pub(super) name: Arc<str>,
    pub(super) backend: Arc<dyn Backend>,
    pub(super) caps: Capabilities,
}

/// The agent's state, private to the agent module: each field is owned by
/// the file that manages it (`memory.rs` the regions, `peers.rs` the peer
/// table and `loading`, `central.rs` the store link, `files.rs` the
/// exports, `p2p.rs` the listener, `mod.rs` the backends).
pub(crate) struct AgentInner {
    pub(super) name: Arc<str>,
    pub(super) instance: u64,
    pub(super) config: AgentConfig,
    /// Append-only: a slot's index is its bit in region backend masks.
    pub(super) backends: RwLock<Vec<Arc<BackendSlot>>>,
    pub(super) regions: RwLock<ranges::RangeMap<Arc<LocalRegion>>>,
    pub(super) next_region_id: AtomicU64,
    pub(super) peers: RwLock<std::collections::HashMap<Arc<str>, Arc<RemotePeer>>>,
    /// Serializes loading and invalidating peers (which call backends) among
    /// themselves, so that `peers` is locked only to read or swap an entry.
    pub(super) loading: Mutex<()>,
    pub(super) notifs: NotifSink,
    /// Serializes backend creation so two threads cannot create the same one.
    create_lock: Mutex<()>,
    /// The central metadata store link, opened on first use.
    pub(super) central: Mutex<Option<Arc<central::Central>>>,
    /// Files exported to remote initiators.
    pub(super) exports: Mutex<Vec<files::Export>>,
    /// The peer-to-peer metadata listener, when `config.listener` is on;
    /// dropping it (with the agent) stops its thread.
    pub(super) listener: Mutex<Option<crate::metadata::listener::ListenerHandle>>,
    /// Counters and histograms, when `config.telemetry` is on.
    pub(super) metrics: Option<Arc<crate::telemetry::AgentMetrics>>,
}

impl Drop for AgentInner {
    fn drop(&mut self) {
        if let Some(c) = self.central.get_mut().take() {
            c.shutdown();
        }
        live_names().lock().remove(&*self.name);
    }
}

fn live_names() -> &'static Mutex<HashSet<String>> {
    static NAMES: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    NAMES.get_or_init(Default::default)
}

/// A kvferry agent. Cheap to clone (a shared handle); `Send + Sync`, so any
/// thread may register, post and poll at once.
///
/// ```
/// use kvferry::{Agent, AgentConfig, AlignedBuf, XferOp};
/// let a = Agent::with_backends("doc-a", &["LOCAL"]).unwrap();
/// let b = Agent::with_backends("doc-b", &["LOCAL"]).unwrap();
/// let src = AlignedBuf::new(4096).unwrap();
/// let dst = AlignedBuf::new(4096).unwrap();
/// let _ra = a.register_buf(&src).unwrap();
/// let _rb = b.register_buf(&dst).unwrap();
/// a.load_remote_metadata(&b.local_metadata().unwrap()).unwrap();
/// let local = src.xfer_blocks(0, 4096, 1).unwrap();
/// let remote = dst.xfer_blocks(0, 4096, 1).unwrap();
/// let req = a.create_request(XferOp::Write, &local, &remote, "doc-b", Some(b"done")).unwrap();
/// req.post(None).unwrap();
/// req.wait(std::time::Duration::from_secs(1)).unwrap();
/// assert_eq!(b.take_notifications()["doc-a"], vec![b"done".to_vec()]);
/// ```
#[derive(Clone)]
pub struct Agent {
    pub(crate) inner: Arc<AgentInner>,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent").field("name", &self.inner.name).field("backends", &self.backends()).finish()
    }
}

impl Agent {
    /// Creates an agent named `name` (unique among live agents of this
    /// process) and the backends `config.backends` names.
    pub fn new(name: &str, config: AgentConfig) -> Result<Agent> {
        check_agent_name(name)?;
        if !live_names().lock().insert(name.to_string()) {
            return Err(Error::invalid(format!(
                "an agent named '{name}' already exists in this process; agent names must be unique"
            )));
        }
        let mut instance = [0u8; 8];
        if let Err(e) = getrandom::fill(&mut instance) {
            live_names().lock().remove(name);
            return Err(Error::new(ErrorKind::Backend, format!("the OS random source failed: {e}")));
        }
        let backends = config.backends.clone();
        let notif_limits = config.notif_limits;
        let metrics = if config.telemetry { Some(Arc::new(crate::telemetry::AgentMetrics::new(name)?)) } else { None };
        let agent = Agent {
            inner: Arc::new(AgentInner {
                name: name.into(),
                instance: u64::from_le_bytes(instance),
                config,
                backends: RwLock::new(Vec::new()),
                regions: RwLock::new(Default::default()),
                next_region_id: AtomicU64::new(1),
                peers: RwLock::new(Default::default()),
                loading: Mutex::new(()),
                notifs: NotifSink::with_limits(notif_limits),
                create_lock: Mutex::new(()),
                central: Mutex::new(None),
                exports: Mutex::new(Vec::new()),
                listener: Mutex::new(None),
                metrics,
            }),
        };
        agent.with_all(&backends)?;
        if agent.inner.config.listener {
            agent.start_listener(agent.inner.config.listen_port)?;
        }
        Ok(agent)
    }

    /// Creates an agent with every backend in `backends`, default parameters
    /// and [`AgentConfig::default`] (the environment is not read: see
    /// [`from_env`](Self::from_env)). All or nothing: the error names each
    /// backend that failed and why.
    pub fn with_backends(name: &str, backends: &[&str]) -> Result<Agent> {
        let list: Vec<(String, Params)> = backends.iter().map(|b| (b.to_string(), Params::new())).collect();
        Agent::new(name, AgentConfig { backends: list, ..AgentConfig::default() })
    }

    /// Creates an agent configured from the environment (see [`AgentConfig::from_env`]).
    pub fn from_env(name: &str) -> Result<Agent> {
        Agent::new(name, AgentConfig::from_env()?)
    }

    fn with_all(&self, backends: &[(String, Params)]) -> Result<()> {
        let failures: Vec<String> = backends
            .iter()
            .filter_map(|(b, p)| self.create_backend(b, p).err().map(|e| format!("{}: {e}", b.to_ascii_uppercase())))
            .collect();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Backend,
                format!(
                    "agent '{}': {} backend(s) failed to start: {}",
                    self.name(),
                    failures.len(),
                    failures.join("; ")
                ),
            ))
        }
    }

    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The agent's configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.inner.config
    }

    /// Names of every plugin this process knows, built-ins first.
    pub fn available_plugins() -> Vec<String> {
        backend::plugins().iter().map(|p| p.name().to_string()).collect()
    }

    /// A plugin's memory types and parameter table (NIXL's `get_plugin_params`).
    pub fn plugin_params(name: &str) -> Result<(Vec<MemType>, &'static [ParamSpec])> {
        let p = backend::plugin(name)?;
        Ok((p.mem_types(), p.params()))
    }

    /// Creates the backend `name` (case-insensitive) with `params` overlaid on
    /// its defaults. Creating one that exists already is a no-op if the
    /// parameters agree. Unknown names and parameters get errors listing the valid ones.
    pub fn create_backend(&self, name: &str, params: &Params) -> Result<()> {
        let plugin = backend::plugin(name)?;
        params.check_names(plugin.name(), plugin.params())?;
        let _serial = self.inner.create_lock.lock();
        if let Some(slot) = self.slot(plugin.name()) {
            let want = params.resolved(plugin.params());
            if slot.backend.params() == want {
                return Ok(());
            }
            return Err(Error::invalid(format!(
                "backend {} already exists on agent '{}' with other parameters",
                plugin.name(),
                self.name()
            )));
        }
        if self.inner.backends.read().len() >= crate::types::MAX_BACKENDS {
            return Err(Error::invalid("an agent can run at most 32 backends"));
        }
        plugin.probe().map_err(|e| e.context(format!("backend {} cannot run here", plugin.name())))?;
        let backend = plugin.create(self.context(), params)?;
        let caps = backend.capabilities();
        let slot = BackendSlot { name: plugin.name().into(), backend, caps };
        self.inner.backends.write().push(Arc::new(slot));
        tracing::debug!(agent = %self.name(), backend = plugin.name(), "backend created");
        Ok(())
    }

    fn context(&self) -> BackendContext {
        let weak: Weak<AgentInner> = Arc::downgrade(&self.inner);
        BackendContext {
            agent_name: self.inner.name.clone(),
            instance: self.inner.instance,
            notifs: self.inner.notifs.clone(),
            config: self.inner.config.backend_config(),
            peer_events: PeerEvents {
                on_lost: Arc::new(move |peer, instance| {
                    if let Some(inner) = weak.upgrade() {
                        Agent { inner }.peer_lost(peer, instance);
                    }
                }),
            },
        }
    }

    pub(crate) fn slot(&self, name: &str) -> Option<Arc<BackendSlot>> {
        self.inner.backends.read().iter().find(|s| s.name.eq_ignore_ascii_case(name)).cloned()
    }

    pub(crate) fn slots(&self) -> Vec<Arc<BackendSlot>> {
        self.inner.backends.read().clone()
    }

    /// Whether the backend `name` (case-insensitive) was created.
    pub fn has_backend(&self, name: &str) -> bool {
        self.slot(name).is_some()
    }

    /// Names of the created backends, in creation order.
    pub fn backends(&self) -> Vec<String> {
        self.inner.backends.read().iter().map(|s| s.name.to_string()).collect()
    }

    /// Fails unless the backend `name` exists; the error lists those that do.
    pub fn require_backend(&self, name: &str) -> Result<()> {
        if self.has_backend(name) {
            return Ok(());
        }
        let have = self.backends();
        Err(Error::not_found(format!(
            "agent '{}' has no {} backend; it has: {}. Create it with create_backend(\"{}\") or KVFERRY_BACKENDS",
            self.name(),
            name.to_ascii_uppercase(),
            if have.is_empty() { "none".to_string() } else { have.join(", ") },
            name.to_ascii_lowercase()
        )))
    }

    /// The effective parameters of a created backend.
    pub fn backend_params(&self, name: &str) -> Result<Params> {
        self.require_backend(name)?;
        Ok(self.slot(name).map(|s| s.backend.params()).unwrap_or_default())
    }

    /// The capabilities of a created backend.
    pub fn backend_capabilities(&self, name: &str) -> Result<Capabilities> {
        self.require_backend(name)?;
        Ok(self.slot(name).map(|s| s.caps.clone()).unwrap_or_else(|| unreachable!("checked above")))
    }

    /// Sends a standalone notification to `peer` (which may be this agent).
    ///
    /// The backend is the first, in preference order (or in `hints` order),
    /// that supports notifications and can reach the peer.
    pub fn send_notification(&self, peer: &str, msg: &[u8], hints: &[&str]) -> Result<()> {
        if msg.len() > crate::types::MAX_NOTIF_LEN {
            return Err(Error::invalid(format!(
                "notification is {} bytes, more than the {} allowed; send bulk data as a transfer",
                msg.len(),
                crate::types::MAX_NOTIF_LEN
            )));
        }
        let slot = self.notif_backend(peer, hints)?;
        slot.backend.send_notification(peer, msg)
    }

    /// Takes every notification received so far, by sender, in arrival order.
    pub fn take_notifications(&self) -> Notifications {
        self.inner.notifs.take()
    }

    /// Blocks until a notification is queued or `timeout` passes; returns whether one is.
    pub fn wait_notifications(&self, timeout: Duration) -> bool {
        self.inner.notifs.wait(timeout)
    }

    pub(crate) fn next_region_id(&self) -> u64 {
        self.inner.next_region_id.fetch_add(1, Ordering::Relaxed)
    }
}

// An agent must stay shareable between threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Agent>();
};
