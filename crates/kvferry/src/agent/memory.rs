//! Registration: telling the agent and its backends that a region may take
//! part in transfers. Only registered regions can be touched by peers.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use super::ranges::{Pos, Span};
use super::{Agent, BackendSlot};
use crate::backend::Region;
use crate::desc::{RegDesc, RegDescList};
use crate::error::{Error, Result};
use crate::mem::{AlignedBuf, MemShare};
use crate::types::{AccessKey, MemType, RegionId};

/// One registered local region and the backends that serve it.
#[derive(Debug)]
pub(crate) struct LocalRegion {
    pub(crate) region: Region,
    /// Bit `i`: registered with backend slot `i`.
    pub(crate) backend_mask: u32,
    /// Public bytes by backend slot, where a backend returned any.
    pub(crate) public: Vec<(u8, Vec<u8>)>,
}

impl Span for Arc<LocalRegion> {
    fn span_len(&self) -> u64 {
        self.region.len
    }
}

impl LocalRegion {
    pub(crate) fn pos(&self) -> Pos {
        (self.region.mem_type, self.region.dev_id, self.region.addr)
    }
}

/// A live registration. Dropping it deregisters its regions (unless they were
/// already deregistered through [`Agent::deregister_mem`]); it also keeps an
/// [`AlignedBuf`]'s memory alive for as long as it is registered.
#[must_use = "dropping a Registration deregisters its memory at once"]
pub struct Registration {
    agent: Agent,
    list: RegDescList,
    ids: Vec<(Pos, RegionId)>,
    _keepalive: Option<Arc<dyn Any + Send + Sync>>,
    armed: bool,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("agent", &self.agent.name())
            .field("mem_type", &self.list.mem_type())
            .field("regions", &self.ids.len())
            .finish()
    }
}

impl Registration {
    /// The registered descriptors.
    pub fn descs(&self) -> &RegDescList {
        &self.list
    }

    /// Deregisters now, reporting errors that `Drop` would swallow.
    pub fn deregister(mut self) -> Result<()> {
        self.armed = false;
        self.agent.deregister_ids(&self.ids)
    }

    /// Leaves the regions registered after this handle is gone; they stay
    /// until [`Agent::deregister_mem`] is called with the same descriptors.
    /// For memory whose lifetime is managed elsewhere (Python, C callers).
    pub fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = self.agent.deregister_ids(&self.ids) {
                tracing::debug!(agent = %self.agent.name(), error = %e, "deregistration on drop");
            }
        }
    }
}

impl Agent {
    /// Registers an [`AlignedBuf`] (DRAM) with every backend that supports DRAM.
    /// The registration keeps the buffer's memory alive.
    pub fn register_buf(&self, buf: &AlignedBuf) -> Result<Registration> {
        let mut reg = self.register_list(&buf.reg_list(), &[], buf.share())?;
        reg._keepalive = Some(buf.keepalive());
        Ok(reg)
    }

    /// Registers storage (FILE, BLOCK or OBJ descriptors) with the backends
    /// that support its type, or only with `hints`. Safe: no process memory is
    /// exposed by it.
    pub fn register_storage(&self, list: &RegDescList, hints: &[&str]) -> Result<Registration> {
        if !list.mem_type().is_storage() {
            return Err(Error::invalid(format!(
                "register_storage takes FILE, BLOCK or OBJ descriptors, not {}; use register_buf or register_mem for memory",
                list.mem_type()
            )));
        }
        self.register_list(list, hints, None)
    }

    /// Registers raw memory (DRAM, VRAM) or storage owned elsewhere, with
    /// every backend that supports its type, or only with `hints`.
    ///
    /// # Safety
    ///
    /// For DRAM and VRAM every descriptor must name memory that stays
    /// allocated, and is not otherwise relied on being unchanged, until the
    /// registration is dropped or deregistered: peers the agent loads may read
    /// and write it at any time in between. Descriptors of other memory types
    /// carry no memory-safety obligation.
    pub unsafe fn register_mem(&self, list: &RegDescList, hints: &[&str]) -> Result<Registration> {
        self.register_list(list, hints, None)
    }

    /// `share`: the memfd behind a one-descriptor list (an [`AlignedBuf`]), if any.
    fn register_list(&self, list: &RegDescList, hints: &[&str], share: Option<MemShare>) -> Result<Registration> {
        let mt = list.mem_type();
        list.validate(mt.is_storage())?;
        list.check_no_overlap()?;
        if mt == MemType::Vram {
            for d in list.iter() {
                crate::cuda::check_vram(d.addr, d.len, d.dev_id)?;
            }
        }
        let slots = self.registration_backends(mt, hints)?;
        let mut table = self.inner.regions.write();
        for (i, d) in list.iter().enumerate() {
            if let Some((pos, _)) = table.overlapping(mt, d.dev_id, d.addr, d.len) {
                return Err(Error::invalid(format!(
                    "{mt} descriptor {i} ({:#x}+{}, dev {}) overlaps the region already registered at {:#x} on agent '{}'; deregister it first or register each range once",
                    d.addr, d.len, d.dev_id, pos.2, self.name()
                )));
            }
        }
        let mut done: Vec<Arc<LocalRegion>> = Vec::with_capacity(list.len());
        for d in list.iter() {
            match self.register_one(mt, d, &slots, share.clone()) {
                Ok(r) => done.push(r),
                Err(e) => {
                    for r in &done {
                        self.deregister_backends(r);
                    }
                    return Err(e);
                }
            }
        }
        let ids = done.iter().map(|r| (r.pos(), r.region.id)).collect();
        for r in done {
            table.insert(r.pos(), r);
        }
        Ok(Registration { agent: self.clone(), list: list.clone(), ids, _keepalive: None, armed: true })
    }

    fn registration_backends(&self, mt: MemType, hints: &[&str]) -> Result<Vec<(usize, Arc<BackendSlot>)>> {
        let all = self.slots();
        if hints.is_empty() {
            // Storage registered without hints stays local (POSIX); serving it to
            // remote initiators takes an explicit export (register_local_file) or hints.
            let v: Vec<_> = all
                .into_iter()
                .enumerate()
                .filter(|(_, s)| s.caps.mem_types.contains(&mt) && (!mt.is_storage() || s.caps.local))
                .collect();
            if v.is_empty() {
                let have: Vec<String> =
                    self.slots().iter().map(|s| format!("{} {:?}", s.name, s.caps.mem_types)).collect();
                return Err(Error::not_supported(format!(
                    "no backend of agent '{}' supports {mt} memory (backends: {}); create one that does first",
                    self.name(),
                    if have.is_empty() { "none".to_string() } else { have.join(", ") }
                )));
            }
            return Ok(v);
        }
        let mut v = Vec::with_capacity(hints.len());
        for h in hints {
            self.require_backend(h)?;
            let (i, s) = all
                .iter()
                .enumerate()
                .find(|(_, s)| s.name.eq_ignore_ascii_case(h))
                .map(|(i, s)| (i, s.clone()))
                .unwrap_or_else(|| unreachable!("required above"));
            if !s.caps.mem_types.contains(&mt) {
                return Err(Error::not_supported(format!(
                    "backend {} does not support {mt} memory (it supports {:?})",
                    s.name, s.caps.mem_types
                )));
            }
            v.push((i, s));
        }
        Ok(v)
    }

    fn register_one(
        &self,
        mt: MemType,
        d: &RegDesc,
        slots: &[(usize, Arc<BackendSlot>)],
        share: Option<MemShare>,
    ) -> Result<Arc<LocalRegion>> {
        let region = Region {
            id: self.next_region_id(),
            mem_type: mt,
            addr: d.addr,
            len: d.len,
            dev_id: d.dev_id,
            meta_info: d.meta_info.clone(),
            key: AccessKey::random()?,
            share,
        };
        let mut lr = LocalRegion { region, backend_mask: 0, public: Vec::new() };
        for (i, s) in slots {
            match s.backend.register(&lr.region) {
                Ok(public) => {
                    lr.backend_mask |= 1 << i;
                    if !public.is_empty() {
                        lr.public.push((*i as u8, public));
                    }
                }
                Err(e) => {
                    self.deregister_backends(&lr);
                    return Err(e.context(format!("registering {mt} {:#x}+{} with {}", d.addr, d.len, s.name)));
                }
            }
        }
        Ok(Arc::new(lr))
    }

    fn deregister_backends(&self, r: &LocalRegion) {
        for (i, s) in self.slots().iter().enumerate() {
            if r.backend_mask & (1 << i) != 0 {
                if let Err(e) = s.backend.deregister(&r.region) {
                    tracing::warn!(backend = %s.name, error = %e, "deregistration failed");
                }
            }
        }
    }

    /// Deregisters exactly the regions registered with these descriptors.
    /// Every descriptor must match a registration (address, length, device and
    /// `meta_info`), or nothing is deregistered and the error names the first
    /// that does not.
    pub fn deregister_mem(&self, list: &RegDescList) -> Result<()> {
        let mt = list.mem_type();
        let mut table = self.inner.regions.write();
        for (i, d) in list.iter().enumerate() {
            let pos = (mt, d.dev_id, d.addr);
            match table.get(&pos) {
                Some(r) if r.region.len == d.len && r.region.meta_info == d.meta_info => {}
                Some(r) => {
                    return Err(Error::mismatch(format!(
                        "deregister: {mt} descriptor {i} ({:#x}+{}) does not match the registration at that address ({:#x}+{}); pass the descriptors exactly as registered",
                        d.addr, d.len, r.region.addr, r.region.len
                    )))
                }
                None => {
                    return Err(Error::not_found(format!(
                        "deregister: {mt} descriptor {i} ({:#x}+{}, dev {}) is not registered on agent '{}'",
                        d.addr, d.len, d.dev_id, self.name()
                    )))
                }
            }
        }
        for d in list.iter() {
            if let Some(r) = table.remove(&(mt, d.dev_id, d.addr)) {
                self.deregister_backends(&r);
            }
        }
        Ok(())
    }

    /// Deregisters the regions of a [`Registration`] that are still registered
    /// (the same position *and* id: a later registration at the same address is left alone).
    fn deregister_ids(&self, ids: &[(Pos, RegionId)]) -> Result<()> {
        let mut table = self.inner.regions.write();
        for (pos, id) in ids {
            if table.get(pos).is_some_and(|r| r.region.id == *id) {
                if let Some(r) = table.remove(pos) {
                    self.deregister_backends(&r);
                }
            }
        }
        Ok(())
    }

    /// Number of regions registered now.
    pub fn registered_regions(&self) -> usize {
        self.inner.regions.read().len()
    }
}
