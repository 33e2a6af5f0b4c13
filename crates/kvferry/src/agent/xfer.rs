//! Building requests: validation, resolution of every descriptor to its
//! region, merging of contiguous runs, and the choice of backend.
//!
//! Backend choice is deterministic: among the backends that support both
//! memory types, serve both sides' regions, have loaded the peer and can reach
//! it, the caller's hints win in the caller's order; without hints the lowest
//! [`Capabilities::rank`](crate::backend::Capabilities::rank) wins (LOCAL,
//! then SHM, POSIX, TCP), ties broken by creation order.

use std::fmt;
use std::sync::Arc;

use super::{Agent, AgentInner, BackendSlot, RemotePeer};
use crate::backend::{Segment, XferPlan};
use crate::desc::{XferDesc, XferDescList};
use crate::error::{Error, Result};
use crate::host::HostId;
use crate::request::{Request, RequestOwner, RequestParts};
use crate::types::{AccessKey, MemType, RegionId, XferOp};

/// One descriptor resolved to the region that holds it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Resolved {
    desc: XferDesc,
    region: RegionId,
    key: AccessKey,
    region_addr: u64,
    mask: u32,
}

/// A descriptor list resolved once against registrations (local side) or a
/// peer's published regions (remote side), for building many requests cheaply
/// with [`Agent::make_request`]. NIXL's prepped descriptor list handle.
pub struct PreparedList {
    agent: Agent,
    /// `None`: the local side. `Some`: the named agent's side (maybe this agent).
    peer: Option<Arc<str>>,
    peer_instance: u64,
    mem_type: MemType,
    entries: Vec<Resolved>,
}

impl fmt::Debug for PreparedList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedList")
            .field("agent", &self.agent.name())
            .field("side", &self.peer.as_deref().unwrap_or("<local>"))
            .field("mem_type", &self.mem_type)
            .field("len", &self.entries.len())
            .finish()
    }
}

impl PreparedList {
    /// Number of descriptors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Memory type of the list.
    pub fn mem_type(&self) -> MemType {
        self.mem_type
    }

    /// The agent whose memory the list describes (`None` for the local side).
    pub fn peer(&self) -> Option<&str> {
        self.peer.as_deref()
    }

    /// Releases the list (the same as dropping it).
    pub fn release(self) {}
}

/// The remote side of a request: this agent (loopback) or a loaded peer.
enum Target {
    Loopback,
    Peer(Arc<RemotePeer>),
}

impl Agent {
    /// Creates a request moving `local[i]` to or from `remote[i]` of
    /// `remote_agent` (this agent's own name for local transfers such as
    /// DRAM ↔ FILE). Counts and pairwise lengths must match, local memory must
    /// be registered, and remote ranges must lie in regions the peer published.
    ///
    /// The positional shorthand of
    /// `self.request(op).local(local).remote(remote_agent, remote)` with an
    /// optional [`notify`](crate::RequestBuilder::notify) (see [`request`](Self::request)).
    pub fn create_request(
        &self,
        op: XferOp,
        local: &XferDescList,
        remote: &XferDescList,
        remote_agent: &str,
        notif: Option<&[u8]>,
    ) -> Result<Request> {
        self.create_request_with(op, local, remote, remote_agent, notif, &[])
    }

    /// [`create_request`](Self::create_request) with backend hints: only the
    /// hinted backends are considered, the first that can serve wins (the
    /// builder's [`hints`](crate::RequestBuilder::hints)).
    pub fn create_request_with(
        &self,
        op: XferOp,
        local: &XferDescList,
        remote: &XferDescList,
        remote_agent: &str,
        notif: Option<&[u8]>,
        hints: &[&str],
    ) -> Result<Request> {
        pair_up("", "descriptors", local.len(), remote.len())?;
        for (i, (l, r)) in local.iter().zip(remote.iter()).enumerate() {
            if l.len != r.len {
                return Err(Error::mismatch(format!(
                    "descriptor {i}: local length {} differs from remote length {}",
                    l.len, r.len
                )));
            }
        }
        local.validate(false)?;
        let target = self.target(remote_agent)?;
        let l = self.resolve_local(local)?;
        let r = self.resolve_remote(&target, remote_agent, remote)?;
        let sides = Sides { local: local.mem_type(), remote: remote.mem_type(), count: l.len() };
        self.build(op, sides, l.iter().zip(&r).map(Ok), remote_agent, &target, notif, hints)
    }

    /// Resolves local `descs` once against this agent's registrations, for
    /// requests built from indices ([`RequestBuilder::local_prepared`](crate::RequestBuilder::local_prepared),
    /// [`make_request`](Self::make_request)). Every descriptor must lie in
    /// registered memory (else `NotAllowed`).
    pub fn prepare_local(&self, descs: &XferDescList) -> Result<PreparedList> {
        descs.validate(false)?;
        let entries = self.resolve_local(descs)?;
        Ok(PreparedList { agent: self.clone(), peer: None, peer_instance: 0, mem_type: descs.mem_type(), entries })
    }

    /// Resolves `descs` of the agent `peer` (this agent's own name for local
    /// transfers such as DRAM ↔ FILE) once against the regions it published,
    /// for requests built from indices ([`RequestBuilder::remote_prepared`](crate::RequestBuilder::remote_prepared),
    /// [`make_request`](Self::make_request)). A list prepared before the peer
    /// restarted is refused when a request is built from it.
    pub fn prepare_remote(&self, peer: &str, descs: &XferDescList) -> Result<PreparedList> {
        descs.validate(false)?;
        let target = self.target(peer)?;
        let peer_instance = match &target {
            Target::Loopback => self.inner.instance,
            Target::Peer(p) => p.instance,
        };
        let entries = self.resolve_remote(&target, peer, descs)?;
        Ok(PreparedList {
            agent: self.clone(),
            peer: Some(Arc::from(peer)),
            peer_instance,
            mem_type: descs.mem_type(),
            entries,
        })
    }

    /// Builds a request from entries of two prepared lists: `local[li[k]]`
    /// pairs with `remote[ri[k]]`. Runs contiguous on both sides are merged.
    ///
    /// The positional shorthand of
    /// `self.request(op).local_prepared(local, local_idx).remote_prepared(remote, remote_idx)`
    /// with [`notify`](crate::RequestBuilder::notify) and [`hints`](crate::RequestBuilder::hints)
    /// (see [`request`](Self::request)), which reads better.
    #[allow(clippy::too_many_arguments)]
    pub fn make_request<'p>(
        &self,
        op: XferOp,
        local: &'p PreparedList,
        local_idx: &[usize],
        remote: &'p PreparedList,
        remote_idx: &[usize],
        notif: Option<&[u8]>,
        hints: &[&str],
    ) -> Result<Request> {
        if local.peer.is_some() || !Arc::ptr_eq(&local.agent.inner, &self.inner) {
            return Err(Error::invalid(
                "make_request: the local list must be prepared by this agent with prepare_local",
            ));
        }
        let Some(peer_name) = remote.peer.as_deref() else {
            return Err(Error::invalid(
                "make_request: the remote list was prepared for the local side; prepare it with prepare_remote and the peer's name",
            ));
        };
        pair_up("make_request: ", "indices", local_idx.len(), remote_idx.len())?;
        let target = self.target(peer_name)?;
        let instance = match &target {
            Target::Loopback => self.inner.instance,
            Target::Peer(p) => p.instance,
        };
        if instance != remote.peer_instance {
            return Err(Error::invalid(format!(
                "make_request: agent '{peer_name}' was reloaded (restarted) since the remote list was prepared; prepare it again"
            )));
        }
        // One pass over the indices, straight into the plan's segments: no
        // copy of the picked entries (4096 of them would be ~600 KB of
        // fresh memory, and its page faults, per request).
        let entry = |list: &'p PreparedList, i: usize, side: &str| -> Result<&'p Resolved> {
            list.entries.get(i).ok_or_else(|| {
                Error::invalid(format!("make_request: {side} index {i} is out of range for a list of {}", list.len()))
            })
        };
        let pairs = local_idx.iter().zip(remote_idx).enumerate().map(|(k, (&li, &ri))| {
            let (a, b) = (entry(local, li, "local")?, entry(remote, ri, "remote")?);
            if a.desc.len != b.desc.len {
                return Err(Error::mismatch(format!(
                    "make_request: pair {k} (local {li}, remote {ri}): lengths {} and {} differ",
                    a.desc.len, b.desc.len
                )));
            }
            Ok((a, b))
        });
        let sides = Sides { local: local.mem_type, remote: remote.mem_type, count: local_idx.len() };
        self.build(op, sides, pairs, peer_name, &target, notif, hints)
    }

    fn target(&self, remote_agent: &str) -> Result<Target> {
        if remote_agent == self.name() {
            Ok(Target::Loopback)
        } else {
            Ok(Target::Peer(self.peer(remote_agent)?))
        }
    }

    fn resolve_local(&self, descs: &XferDescList) -> Result<Vec<Resolved>> {
        let mt = descs.mem_type();
        let table = self.inner.regions.read();
        descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (_, r) = table.covering(mt, d).ok_or_else(|| {
                    Error::not_allowed(format!(
                        "local {mt} descriptor {i} ({:#x}+{}, dev {}) is not inside memory registered on agent '{}'; register it first",
                        d.addr, d.len, d.dev_id, self.name()
                    ))
                })?;
                Ok(Resolved { desc: *d, region: r.region.id, key: r.region.key, region_addr: r.region.addr, mask: r.backend_mask })
            })
            .collect()
    }

    fn resolve_remote(&self, target: &Target, name: &str, descs: &XferDescList) -> Result<Vec<Resolved>> {
        let Target::Peer(peer) = target else { return self.resolve_local(descs) };
        let mt = descs.mem_type();
        descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (pos, r) = peer.regions.covering(mt, d).ok_or_else(|| {
                    if mt.is_storage() && peer.regions.overlapping(mt, d.dev_id, 0, 0).is_none() {
                        return Error::not_found(format!(
                            "remote {mt} descriptor {i}: agent '{name}' exports no {mt} with id {} (see remote_files)",
                            d.dev_id
                        ));
                    }
                    Error::not_allowed(format!(
                        "remote {mt} descriptor {i} ({:#x}+{}, dev {}) is not inside any region agent '{name}' published; fetch its newer metadata or fix the address",
                        d.addr, d.len, d.dev_id
                    ))
                })?;
                Ok(Resolved { desc: *d, region: 0, key: r.key, region_addr: pos.2, mask: r.local_mask })
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn build<'r>(
        &self,
        op: XferOp,
        sides: Sides,
        pairs: impl Iterator<Item = Result<(&'r Resolved, &'r Resolved)>>,
        peer_name: &str,
        target: &Target,
        notif: Option<&[u8]>,
        hints: &[&str],
    ) -> Result<Request> {
        if let Some(n) = notif {
            if n.len() > crate::types::MAX_NOTIF_LEN {
                return Err(Error::invalid(format!(
                    "notification is {} bytes, more than {}",
                    n.len(),
                    crate::types::MAX_NOTIF_LEN
                )));
            }
        }
        let mut mask = u32::MAX;
        let Sides { local: local_mem, remote: remote_mem, count } = sides;
        let mut segments: Vec<Segment> = Vec::with_capacity(count);
        let mut total = 0u64;
        for pair in pairs {
            let (l, r) = pair?;
            mask &= l.mask & r.mask;
            total += l.desc.len;
            if let Some(last) = segments.last_mut() {
                if last.local_addr + last.len == l.desc.addr
                    && last.remote_addr + last.len == r.desc.addr
                    && last.local_dev == l.desc.dev_id
                    && last.remote_dev == r.desc.dev_id
                    && last.local_region == l.region
                    && last.remote_key == r.key
                {
                    last.len += l.desc.len;
                    continue;
                }
            }
            segments.push(Segment {
                local_addr: l.desc.addr,
                local_dev: l.desc.dev_id,
                remote_addr: r.desc.addr,
                remote_dev: r.desc.dev_id,
                len: l.desc.len,
                local_region: l.region,
                remote_key: r.key,
                remote_region_addr: r.region_addr,
            });
        }
        let slot = self.choose_backend(local_mem, remote_mem, mask, peer_name, target, hints)?;
        let peer: Arc<str> = match target {
            Target::Loopback => self.inner.name.clone(),
            Target::Peer(p) => p.name.clone(),
        };
        let plan = XferPlan {
            op,
            peer: peer.clone(),
            loopback: matches!(target, Target::Loopback),
            local_mem,
            remote_mem,
            segments,
            total_bytes: total,
        };
        let n = plan.segments.len();
        let cost = slot.backend.estimate_cost(&plan);
        let xfer = slot.backend.prepare(plan)?;
        Ok(Request::new(RequestParts {
            owner: self.inner.clone(),
            backend: slot.name.clone(),
            op,
            metrics: self.inner.metrics.as_ref().map(|m| m.xfer(&slot.name, op, &peer)),
            peer,
            total_bytes: total,
            segments: n,
            cost,
            xfer,
            notif: notif.map(<[u8]>::to_vec),
        }))
    }

    fn choose_backend(
        &self,
        local_mem: MemType,
        remote_mem: MemType,
        mask: u32,
        peer_name: &str,
        target: &Target,
        hints: &[&str],
    ) -> Result<Arc<BackendSlot>> {
        let slots = self.slots();
        let why_not = |i: usize, s: &BackendSlot| -> Option<String> {
            if !s.caps.mem_types.contains(&local_mem) || !s.caps.mem_types.contains(&remote_mem) {
                return Some(format!("{} does not move {local_mem} ↔ {remote_mem}", s.name));
            }
            if mask & (1 << i) == 0 {
                return Some(format!(
                    "{}: not every descriptor lies in a region registered with it on both sides",
                    s.name
                ));
            }
            match target {
                Target::Loopback if !s.caps.local => Some(format!("{} does not do transfers within one agent", s.name)),
                Target::Peer(_) if !s.caps.remote => Some(format!("{} does not do transfers to other agents", s.name)),
                Target::Peer(p) if p.loaded_mask & (1 << i) == 0 => {
                    Some(format!("{}: agent '{peer_name}' published no connection info for it", s.name))
                }
                Target::Peer(p) if !s.backend.reaches(&p.host) => {
                    Some(format!("{} cannot reach agent '{peer_name}' from here", s.name))
                }
                _ => None,
            }
        };
        let mut reasons = Vec::new();
        if hints.is_empty() {
            let mut best: Option<(u16, usize)> = None;
            for (i, s) in slots.iter().enumerate() {
                match why_not(i, s) {
                    None if best.is_none_or(|(rank, _)| s.caps.rank < rank) => best = Some((s.caps.rank, i)),
                    None => {}
                    Some(r) => reasons.push(r),
                }
            }
            if let Some((_, i)) = best {
                return Ok(slots[i].clone());
            }
        } else {
            for h in hints {
                match slots.iter().enumerate().find(|(_, s)| s.name.eq_ignore_ascii_case(h)) {
                    None => reasons.push(format!("{} is not a backend of this agent", h.to_ascii_uppercase())),
                    Some((i, s)) => match why_not(i, s) {
                        None => return Ok(s.clone()),
                        Some(r) => reasons.push(r),
                    },
                }
            }
        }
        Err(Error::not_supported(format!(
            "no backend of agent '{}' can move {local_mem} ↔ {remote_mem} with '{peer_name}'{}: {}",
            self.name(),
            if hints.is_empty() { String::new() } else { format!(" among hints {hints:?}") },
            if reasons.is_empty() { "the agent has no backends".to_string() } else { reasons.join("; ") }
        )))
    }

    pub(crate) fn notif_backend(&self, peer: &str, hints: &[&str]) -> Result<Arc<BackendSlot>> {
        let target = self.target(peer)?;
        let slots = self.slots();
        let ok = |i: usize, s: &BackendSlot| {
            s.caps.notifications
                && match &target {
                    Target::Loopback => s.caps.local,
                    Target::Peer(p) => s.caps.remote && p.loaded_mask & (1 << i) != 0 && s.backend.reaches(&p.host),
                }
        };
        let mut order: Vec<usize> = (0..slots.len()).collect();
        if hints.is_empty() {
            order.sort_by_key(|&i| slots[i].caps.rank);
        } else {
            order = hints.iter().filter_map(|h| slots.iter().position(|s| s.name.eq_ignore_ascii_case(h))).collect();
        }
        order.into_iter().find(|&i| ok(i, &slots[i])).map(|i| slots[i].clone()).ok_or_else(|| {
            Error::not_supported(format!(
                "no backend of agent '{}' can send a notification to '{peer}' (backends: {:?}); create one with notification support that the peer also runs",
                self.name(),
                self.backends()
            ))
        })
    }

    /// The identity of this agent's process, as published in its metadata.
    pub fn host_id(&self) -> &'static HostId {
        HostId::current()
    }

    /// The backend a request will use (NIXL's `query_xfer_backend`).
    pub fn chosen_backend(&self, req: &Request) -> String {
        req.backend().to_string()
    }
}

impl RequestOwner for AgentInner {
    fn name(&self) -> &str {
        &self.name
    }
}

/// Checks that a request's two sides pair up one to one and are not empty;
/// `what` names the items (descriptors, indices), `ctx` prefixes messages.
fn pair_up(ctx: &str, what: &str, local: usize, remote: usize) -> Result<()> {
    if local != remote {
        return Err(Error::mismatch(format!(
            "{ctx}{local} local {what} but {remote} remote {what}; they pair up one to one"
        )));
    }
    if local == 0 {
        return Err(Error::invalid(format!("{ctx}a request needs at least one descriptor")));
    }
    Ok(())
}

/// The memory types of a request's two sides and how many pairs it has.
#[derive(Clone, Copy)]
struct Sides {
    local: MemType,
    remote: MemType,
    count: usize,
}
