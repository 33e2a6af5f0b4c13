//! `LOCAL`: transfers between agents of one process, and an agent to itself,
//! by `memcpy`. The reference backend and the fixture for the agent's tests.
//!
//! The target side's live registration table is consulted on every post: the
//! access key and bounds of each segment are checked against what the owner
//! has registered *now*, before any byte moves, so a region deregistered by
//! its owner cannot be touched even through an old request.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::RwLock;

use super::{Backend, BackendContext, BackendPlugin, BackendXfer, Capabilities, PeerInfo, Region, XferPlan};
use crate::error::{Error, Result};
use crate::host::HostId;
use crate::notif::NotifSink;
use crate::params::{ParamSpec, Params};
use crate::types::{AccessKey, MemType, XferOp, XferState};

/// The `LOCAL` plugin.
#[derive(Debug)]
pub struct LocalPlugin;

const PARAMS: &[ParamSpec] = &[];

impl BackendPlugin for LocalPlugin {
    fn name(&self) -> &str {
        "LOCAL"
    }

    fn mem_types(&self) -> Vec<MemType> {
        vec![MemType::Dram]
    }

    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }

    fn create(&self, ctx: BackendContext, params: &Params) -> Result<Arc<dyn Backend>> {
        let shared = Arc::new(Shared {
            agent: ctx.agent_name.clone(),
            instance: ctx.instance,
            regions: RwLock::new(HashMap::new()),
            notifs: ctx.notifs.clone(),
        });
        directory().write().insert((ctx.agent_name.to_string(), ctx.instance), Arc::downgrade(&shared));
        Ok(Arc::new(LocalBackend { shared, peers: Arc::default(), params: params.resolved(PARAMS) }))
    }
}

/// What other agents of the process may reach of one LOCAL instance.
#[derive(Debug)]
struct Shared {
    agent: Arc<str>,
    instance: u64,
    /// Live registrations by access key: `(addr, len)`.
    regions: RwLock<HashMap<AccessKey, (u64, u64)>>,
    notifs: NotifSink,
}

type Directory = RwLock<HashMap<(String, u64), Weak<Shared>>>;
type Peers = Arc<RwLock<HashMap<Arc<str>, Weak<Shared>>>>;

/// Every live LOCAL instance of the process, by agent name and instance.
fn directory() -> &'static Directory {
    static DIR: OnceLock<Directory> = OnceLock::new();
    DIR.get_or_init(Default::default)
}

/// The LOCAL backend instance of one agent.
#[derive(Debug)]
pub struct LocalBackend {
    shared: Arc<Shared>,
    /// Loaded peers; prepared transfers look them up at each post, so an
    /// invalidated peer cannot be reached through an old request.
    peers: Peers,
    params: Params,
}

impl Drop for LocalBackend {
    fn drop(&mut self) {
        directory().write().remove(&(self.shared.agent.to_string(), self.shared.instance));
    }
}

fn find_target(shared: &Arc<Shared>, peers: &Peers, peer: &str) -> Result<Arc<Shared>> {
    if peer == &*shared.agent {
        return Ok(shared.clone());
    }
    let weak = peers.read().get(peer).cloned().ok_or_else(|| {
        Error::disconnected(format!("LOCAL: agent '{peer}' is not loaded (invalidated or never loaded)"))
    })?;
    weak.upgrade().ok_or_else(|| Error::disconnected(format!("LOCAL: agent '{peer}' no longer exists in this process")))
}

impl Backend for LocalBackend {
    fn name(&self) -> &str {
        "LOCAL"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { mem_types: vec![MemType::Dram], local: true, remote: true, notifications: true, rank: 0 }
    }

    fn params(&self) -> Params {
        self.params.clone()
    }

    fn conn_info(&self) -> Vec<u8> {
        self.shared.instance.to_le_bytes().to_vec()
    }

    fn register(&self, region: &Region) -> Result<Vec<u8>> {
        if region.mem_type != MemType::Dram {
            return Err(Error::not_supported(format!("LOCAL moves DRAM only, not {}", region.mem_type)));
        }
        self.shared.regions.write().insert(region.key, (region.addr, region.len));
        Ok(Vec::new())
    }

    fn deregister(&self, region: &Region) -> Result<()> {
        self.shared.regions.write().remove(&region.key);
        Ok(())
    }

    fn reaches(&self, peer: &HostId) -> bool {
        HostId::current().same_process(peer)
    }

    fn load_remote(&self, peer: &PeerInfo) -> Result<()> {
        if !HostId::current().same_process(&peer.host) {
            return Err(Error::not_supported(format!(
                "LOCAL reaches agents of this process only; '{}' runs elsewhere (use TCP or SHM)",
                peer.name
            )));
        }
        let instance = <[u8; 8]>::try_from(peer.conn_info.as_slice())
            .map(u64::from_le_bytes)
            .map_err(|_| Error::malformed(format!("LOCAL connection info of '{}' is not 8 bytes", peer.name)))?;
        let weak = directory().read().get(&(peer.name.to_string(), instance)).cloned().ok_or_else(|| {
            Error::not_found(format!(
                "LOCAL: agent '{}' (instance {instance:#x}) does not exist in this process",
                peer.name
            ))
        })?;
        self.peers.write().insert(peer.name.clone(), weak);
        Ok(())
    }

    fn unload_remote(&self, peer: &str) {
        self.peers.write().remove(peer);
    }

    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn BackendXfer>> {
        if plan.local_mem != MemType::Dram || plan.remote_mem != MemType::Dram {
            return Err(Error::not_supported("LOCAL moves DRAM ↔ DRAM only"));
        }
        Ok(Box::new(LocalXfer { shared: self.shared.clone(), peers: self.peers.clone(), plan }))
    }

    fn send_notification(&self, peer: &str, msg: &[u8]) -> Result<()> {
        let t = find_target(&self.shared, &self.peers, peer)?;
        t.notifs.push(self.shared.agent.clone(), msg.to_vec())
    }
}

#[derive(Debug)]
struct LocalXfer {
    shared: Arc<Shared>,
    peers: Peers,
    plan: XferPlan,
}

impl BackendXfer for LocalXfer {
    fn post(&mut self, notif: Option<&[u8]>) -> Result<XferState> {
        let target = find_target(&self.shared, &self.peers, &self.plan.peer)?;
        // The owner's live table is read-locked for the whole copy, so the
        // owner cannot deregister (and free) a region mid-copy.
        let regions = target.regions.read();
        for (i, s) in self.plan.segments.iter().enumerate() {
            let ok = regions.get(&s.remote_key).is_some_and(|&(addr, len)| {
                s.remote_addr >= addr && s.remote_addr.checked_add(s.len).is_some_and(|e| e <= addr + len)
            });
            if !ok {
                return Err(Error::not_allowed(format!(
                    "LOCAL: agent '{}' refused segment {i} ({:#x}+{}): not inside a region it has registered with that key now",
                    target.agent, s.remote_addr, s.len
                )));
            }
        }
        for s in &self.plan.segments {
            let (src, dst) = match self.plan.op {
                XferOp::Write => (s.local_addr, s.remote_addr),
                XferOp::Read => (s.remote_addr, s.local_addr),
            };
            // SAFETY: the remote range was just checked against the owner's live
            // registration (held locked); the local range lies in memory this
            // agent registered, whose registrant promised it stays valid while
            // registered (`register_mem`'s contract, or an AlignedBuf kept alive).
            // Each byte is written once, front to back (the owner may watch its
            // memory while it lands); overlap (an agent moving within its own
            // region) is allowed.
            unsafe { crate::sys::copy_once(dst as *mut u8, src as *const u8, s.len as usize) };
        }
        drop(regions);
        if let Some(n) = notif {
            // The data moved; a full queue at the target fails the posting
            // so that the initiator learns the notification was not delivered.
            target.notifs.push(self.shared.agent.clone(), n.to_vec())?;
        }
        Ok(XferState::Done)
    }

    fn poll(&mut self) -> Result<XferState> {
        Ok(XferState::Done)
    }

    fn cancel(&mut self) {}
}
