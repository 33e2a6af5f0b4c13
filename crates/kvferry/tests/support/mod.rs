//! Shared helpers for integration tests: unique names and a user-defined
//! backend plugin ("GATED") whose transfers finish only when the test opens
//! a gate, so in-flight states can be observed without timing.

#![allow(dead_code, missing_docs)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};

use kvferry::backend::{
    Backend, BackendContext, BackendPlugin, BackendXfer, Capabilities, PeerInfo, Region, XferPlan, XferState,
};
use kvferry::{MemType, ParamSpec, Params, Result};

/// A process-unique agent name with a readable prefix.
pub fn name(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Open means posted transfers complete.
pub static GATE_OPEN: AtomicBool = AtomicBool::new(true);
pub static CANCELS: AtomicU64 = AtomicU64::new(0);

#[derive(Debug)]
pub struct GatedPlugin;

pub const GATED_PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "rank", default: "100", doc: "preference rank" },
    ParamSpec { name: "color", default: "blue", doc: "an opaque value tests read back" },
];

impl BackendPlugin for GatedPlugin {
    fn name(&self) -> &str {
        "GATED"
    }
    fn mem_types(&self) -> Vec<MemType> {
        vec![MemType::Dram]
    }
    fn params(&self) -> &'static [ParamSpec] {
        GATED_PARAMS
    }
    fn create(&self, _ctx: BackendContext, params: &Params) -> Result<Arc<dyn Backend>> {
        let params = params.resolved(GATED_PARAMS);
        let rank = params.parse::<u16>("GATED", "rank")?;
        Ok(Arc::new(Gated { params, rank }))
    }
}

#[derive(Debug)]
struct Gated {
    params: Params,
    rank: u16,
}

impl Backend for Gated {
    fn name(&self) -> &str {
        "GATED"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            mem_types: vec![MemType::Dram],
            local: true,
            remote: true,
            notifications: false,
            rank: self.rank,
        }
    }
    fn params(&self) -> Params {
        self.params.clone()
    }
    fn register(&self, _region: &Region) -> Result<Vec<u8>> {
        Ok(b"gated-public".to_vec())
    }
    fn deregister(&self, _region: &Region) -> Result<()> {
        Ok(())
    }
    fn load_remote(&self, _peer: &PeerInfo) -> Result<()> {
        Ok(())
    }
    fn unload_remote(&self, _peer: &str) {}
    fn prepare(&self, _plan: XferPlan) -> Result<Box<dyn BackendXfer>> {
        Ok(Box::new(GatedXfer { posted: false }))
    }
    fn send_notification(&self, _peer: &str, _msg: &[u8]) -> Result<()> {
        Err(kvferry::Error::not_supported("GATED has no notifications"))
    }
}

#[derive(Debug)]
struct GatedXfer {
    posted: bool,
}

impl BackendXfer for GatedXfer {
    fn post(&mut self, _notif: Option<&[u8]>) -> Result<XferState> {
        self.posted = true;
        self.poll()
    }
    fn poll(&mut self) -> Result<XferState> {
        Ok(if GATE_OPEN.load(Ordering::SeqCst) { XferState::Done } else { XferState::InProgress })
    }
    fn cancel(&mut self) {
        CANCELS.fetch_add(1, Ordering::SeqCst);
    }
}

/// Registers the GATED plugin once per process.
pub fn gated_plugin() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| kvferry::backend::register_plugin(Arc::new(GatedPlugin)).unwrap());
}
