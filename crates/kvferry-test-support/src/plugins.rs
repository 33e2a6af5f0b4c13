//! Dummy backends for agent-level tests: they move no bytes, and say what a
//! test needs them to say. [`GATED`] finishes its transfers only while the
//! test holds its [`Gate`] open, so in-flight states can be observed
//! without timing; [`FAKETCP`] stands in for TCP (remote only, TCP's rank)
//! in backend-choice tests.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvferry::backend::{
    Backend, BackendContext, BackendPlugin, BackendXfer, Capabilities, PeerInfo, Region, XferPlan, XferState,
};
use kvferry::{MemType, ParamSpec, Params, Result};

/// Whether a gated backend's transfers may finish, and how often one was canceled.
#[derive(Debug)]
pub struct Gate {
    /// Open: posted transfers complete; closed: they stay in progress.
    pub open: AtomicBool,
    /// Cancels of gated transfers so far.
    pub cancels: AtomicU64,
}

/// The gate of [`GATED`].
pub static GATE: Gate = Gate { open: AtomicBool::new(true), cancels: AtomicU64::new(0) };

/// A dummy backend plugin: a name, parameters, capabilities, and the bytes
/// it publishes. Its transfers complete at once, or, with a gate, when the
/// gate is open.
#[derive(Debug)]
pub struct DummyPlugin {
    /// The plugin name.
    pub name: &'static str,
    /// Its parameter table; a parameter `rank` (a u16) sets the rank.
    pub params: &'static [ParamSpec],
    /// The rank when there is no `rank` parameter.
    pub rank: u16,
    /// Capabilities: same-agent transfers.
    pub local: bool,
    /// Capabilities: transfers to other agents.
    pub remote: bool,
    /// Capabilities: notifications (sending one succeeds; otherwise it is refused).
    pub notifications: bool,
    /// What `conn_info` publishes.
    pub conn_info: &'static [u8],
    /// What `register` returns for every region.
    pub public: &'static [u8],
    /// The gate its transfers wait on, if any.
    pub gate: Option<&'static Gate>,
}

/// The parameters of [`GATED`].
pub const GATED_PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "rank", default: "100", doc: "preference rank" },
    ParamSpec { name: "color", default: "blue", doc: "an opaque value tests read back" },
];

/// `GATED`: local and remote, no notifications, rank 100 (parameter
/// `rank`), transfers held by [`GATE`].
pub static GATED: DummyPlugin = DummyPlugin {
    name: "GATED",
    params: GATED_PARAMS,
    rank: 100,
    local: true,
    remote: true,
    notifications: false,
    conn_info: b"",
    public: b"gated-public",
    gate: Some(&GATE),
};

/// `FAKETCP`: remote only, with notifications, TCP's rank (50); its
/// transfers complete at once without moving anything.
pub static FAKETCP: DummyPlugin = DummyPlugin {
    name: "FAKETCP",
    params: &[],
    rank: 50,
    local: false,
    remote: true,
    notifications: true,
    conn_info: b"fake",
    public: b"",
    gate: None,
};

/// Adds `plugin` to the process-wide registry, once per process however
/// often it is called.
pub fn register(plugin: &'static DummyPlugin) {
    static DONE: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if done.get_or_insert_with(HashSet::new).insert(plugin.name) {
        kvferry::backend::register_plugin(Arc::new(Registered(plugin)))
            .unwrap_or_else(|e| panic!("registering {}: {e}", plugin.name));
    }
}

#[derive(Debug)]
struct Registered(&'static DummyPlugin);

impl BackendPlugin for Registered {
    fn name(&self) -> &str {
        self.0.name
    }
    fn mem_types(&self) -> Vec<MemType> {
        vec![MemType::Dram]
    }
    fn params(&self) -> &'static [ParamSpec] {
        self.0.params
    }
    fn create(&self, _ctx: BackendContext, params: &Params) -> Result<Arc<dyn Backend>> {
        let params = params.resolved(self.0.params);
        let rank = if self.0.params.iter().any(|p| p.name == "rank") {
            params.parse::<u16>(self.0.name, "rank")?
        } else {
            self.0.rank
        };
        Ok(Arc::new(Dummy { spec: self.0, params, rank }))
    }
}

#[derive(Debug)]
struct Dummy {
    spec: &'static DummyPlugin,
    params: Params,
    rank: u16,
}

impl Backend for Dummy {
    fn name(&self) -> &str {
        self.spec.name
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            mem_types: vec![MemType::Dram],
            local: self.spec.local,
            remote: self.spec.remote,
            notifications: self.spec.notifications,
            rank: self.rank,
        }
    }
    fn params(&self) -> Params {
        self.params.clone()
    }
    fn conn_info(&self) -> Vec<u8> {
        self.spec.conn_info.to_vec()
    }
    fn register(&self, _region: &Region) -> Result<Vec<u8>> {
        Ok(self.spec.public.to_vec())
    }
    fn deregister(&self, _region: &Region) -> Result<()> {
        Ok(())
    }
    fn load_remote(&self, _peer: &PeerInfo) -> Result<()> {
        Ok(())
    }
    fn unload_remote(&self, _peer: &str) {}
    fn prepare(&self, _plan: XferPlan) -> Result<Box<dyn BackendXfer>> {
        Ok(Box::new(DummyXfer { gate: self.spec.gate }))
    }
    fn send_notification(&self, _peer: &str, _msg: &[u8]) -> Result<()> {
        if self.spec.notifications {
            Ok(())
        } else {
            Err(kvferry::Error::not_supported(format!("{} has no notifications", self.spec.name)))
        }
    }
}

#[derive(Debug)]
struct DummyXfer {
    gate: Option<&'static Gate>,
}

impl BackendXfer for DummyXfer {
    fn post(&mut self, _notif: Option<&[u8]>) -> Result<XferState> {
        self.poll()
    }
    fn poll(&mut self) -> Result<XferState> {
        Ok(match self.gate {
            Some(g) if !g.open.load(Ordering::SeqCst) => XferState::InProgress,
            _ => XferState::Done,
        })
    }
    fn cancel(&mut self) {
        if let Some(g) = self.gate {
            g.cancels.fetch_add(1, Ordering::SeqCst);
        }
    }
}
