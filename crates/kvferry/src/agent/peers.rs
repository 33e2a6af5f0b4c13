//! Metadata: what this agent publishes, and the cache of what peers published.

use std::net::IpAddr;
use std::sync::Arc;

use super::ranges::{RangeMap, Span};
use super::Agent;
use crate::backend::PeerInfo;
use crate::desc::{RegDescList, XferDescList};
use crate::error::{Error, Result};
use crate::host::HostId;
use crate::metadata::{AgentMetadata, BackendMeta, RegionMeta};
use crate::types::AccessKey;

/// A region a peer published, with its backends translated to local slots.
#[derive(Clone, Debug)]
pub(crate) struct RemoteRegion {
    pub(crate) len: u64,
    pub(crate) key: AccessKey,
    /// Bit `i`: the peer registered the region with the backend in local slot `i`.
    pub(crate) local_mask: u32,
}

impl Span for RemoteRegion {
    fn span_len(&self) -> u64 {
        self.len
    }
}

/// How a peer's metadata got into this agent, which decides who may replace
/// or withdraw it and which caps apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The application loaded it (`load_remote_metadata`, the central store).
    Local,
    /// A peer at this address pushed it to one of our ports (a listener
    /// `SEND`, [`Agent::load_untrusted_metadata`]).
    Pushed(IpAddr),
    /// We fetched it from a listener at this address.
    Fetched(IpAddr),
}

impl Origin {
    /// Whether a peer at `ip` is where this metadata came from.
    pub(crate) fn is_from(self, ip: IpAddr) -> bool {
        matches!(self, Origin::Pushed(a) | Origin::Fetched(a) if a == ip)
    }

    /// Whether peers' caps apply (it came over the network unasked or from a listener).
    fn capped(self) -> bool {
        !matches!(self, Origin::Local)
    }
}

/// What this agent knows of one peer.
#[derive(Debug)]
pub(crate) struct RemotePeer {
    pub(crate) name: Arc<str>,
    pub(crate) instance: u64,
    pub(crate) host: HostId,
    pub(crate) backends: Vec<BackendMeta>,
    pub(crate) regions: RangeMap<RemoteRegion>,
    /// Bit `i`: the backend in local slot `i` loaded the peer's connection info.
    pub(crate) loaded_mask: u32,
    pub(crate) extensions: Vec<(String, Vec<u8>)>,
    /// Who loaded it.
    pub(crate) origin: Origin,
    /// Blob bytes this entry was built from (partial blobs add up): what
    /// `listener_limits.max_blob_bytes_total` charges.
    pub(crate) charged: u64,
}

impl Agent {
    /// This agent's full metadata: name, host, each backend's connection
    /// info, and every registered region with its access key. Hand it to
    /// peers through any channel; they load it with [`load_remote_metadata`](Self::load_remote_metadata).
    pub fn local_metadata(&self) -> Result<Vec<u8>> {
        let slots = self.slots();
        let regions = self.inner.regions.read();
        let md = AgentMetadata {
            name: self.name().to_string(),
            instance: self.inner.instance,
            host: HostId::current().clone(),
            partial: false,
            backends: slots
                .iter()
                .map(|s| BackendMeta { name: s.name.to_string(), conn_info: Some(s.backend.conn_info()) })
                .collect(),
            regions: regions
                .iter()
                .map(|(_, r)| RegionMeta {
                    mem_type: r.region.mem_type,
                    addr: r.region.addr,
                    len: r.region.len,
                    dev_id: r.region.dev_id,
                    key: r.region.key,
                    backend_mask: r.backend_mask,
                    public: r.public.clone(),
                })
                .collect(),
            extensions: self.files_extension().into_iter().collect(),
        };
        Ok(md.encode())
    }

    /// A partial blob: the regions that hold `descs` (each must be
    /// registered), only for `backends` (all if empty), with or without
    /// connection info. A peer that loads it adds to what it already knows.
    pub fn partial_metadata(&self, descs: &RegDescList, include_conn_info: bool, backends: &[&str]) -> Result<Vec<u8>> {
        let slots = self.slots();
        for b in backends {
            self.require_backend(b)?;
        }
        let chosen: Vec<usize> = (0..slots.len())
            .filter(|&i| backends.is_empty() || backends.iter().any(|b| slots[i].name.eq_ignore_ascii_case(b)))
            .collect();
        let remap = |mask: u32| -> u32 {
            chosen.iter().enumerate().filter(|(_, &i)| mask & (1 << i) != 0).fold(0, |m, (j, _)| m | (1 << j))
        };
        let regions = self.inner.regions.read();
        let mut out = Vec::with_capacity(descs.len());
        for (i, d) in descs.iter().enumerate() {
            let (_, r) = regions.covering(descs.mem_type(), &d.xfer()).ok_or_else(|| {
                Error::not_found(format!(
                    "partial_metadata: {} descriptor {i} ({:#x}+{}) is not registered on agent '{}'",
                    descs.mem_type(),
                    d.addr,
                    d.len,
                    self.name()
                ))
            })?;
            let mask = remap(r.backend_mask);
            if mask == 0 {
                return Err(Error::not_found(format!(
                    "partial_metadata: descriptor {i} is not registered with any of the backends {backends:?}"
                )));
            }
            let public = r
                .public
                .iter()
                .filter_map(|(b, p)| chosen.iter().position(|&c| c == usize::from(*b)).map(|j| (j as u8, p.clone())))
                .collect();
            out.push(RegionMeta {
                mem_type: r.region.mem_type,
                addr: r.region.addr,
                len: r.region.len,
                dev_id: r.region.dev_id,
                key: r.region.key,
                backend_mask: mask,
                public,
            });
        }
        let md = AgentMetadata {
            name: self.name().to_string(),
            instance: self.inner.instance,
            host: HostId::current().clone(),
            partial: true,
            backends: chosen
                .iter()
                .map(|&i| BackendMeta {
                    name: slots[i].name.to_string(),
                    conn_info: include_conn_info.then(|| slots[i].backend.conn_info()),
                })
                .collect(),
            regions: out,
            extensions: Vec::new(),
        };
        Ok(md.encode())
    }

    /// Loads a peer's metadata blob and returns the peer's name.
    ///
    /// A full blob replaces what was known of the peer; a partial blob of the
    /// same peer instance adds to it. A blob from a restarted peer (a new
    /// instance) replaces the old peer entirely. Garbage, truncated or
    /// future-version bytes and this agent's own metadata get clear errors.
    pub fn load_remote_metadata(&self, bytes: &[u8]) -> Result<String> {
        self.load_peer(bytes, Origin::Local, None)
    }

    /// Loads a metadata blob that a peer at `from` pushed to a port this
    /// agent serves, as the metadata listener does with a `SEND`: the caps of
    /// [`AgentConfig::listener_limits`](crate::AgentConfig::listener_limits)
    /// apply (peers pushed at once, regions per peer and in all), and, unless
    /// an auth token is configured (the sender then proved it holds it), it
    /// may not replace a peer that was loaded another way or from another
    /// address (`NotAllowed`). When a token is configured, the caller must
    /// have checked that the sender presented it (the listener and the
    /// rendezvous of `kvferry serve` do).
    pub fn load_untrusted_metadata(&self, bytes: &[u8], from: IpAddr) -> Result<String> {
        self.load_peer(bytes, Origin::Pushed(from), None)
    }

    /// Checks `md` against the caps for peers loaded through the network
    /// (`peers` is the table; the caller holds `loading`, so it cannot
    /// change before the load ends but through a backend's `peer_lost`,
    /// which only removes).
    fn check_caps(
        &self,
        md: &AgentMetadata,
        charged: u64,
        origin: Origin,
        peers: &std::collections::HashMap<Arc<str>, Arc<RemotePeer>>,
    ) -> Result<()> {
        let lim = &self.inner.config.listener_limits;
        let old = peers.get(md.name.as_str());
        let merged = old.filter(|p| p.instance == md.instance && md.partial).map_or(0, |p| p.regions.len());
        let regions = merged + md.regions.len();
        if regions > lim.max_regions_per_peer {
            return Err(Error::not_allowed(format!(
                "agent '{}' publishes {regions} regions; peers loaded through the network may publish at most {} (listener_limits.max_regions_per_peer): raise it or register fewer, larger regions",
                md.name, lim.max_regions_per_peer
            )));
        }
        if let (Origin::Pushed(ip), Some(old)) = (origin, old) {
            if self.inner.config.auth_token.is_none() && !old.origin.is_from(ip) {
                return Err(Error::not_allowed(format!(
                    "agent '{}' is already loaded ({}); metadata pushed from {ip} without an auth token may not replace it: invalidate it first, or configure KVFERRY_AUTH_TOKEN on both agents",
                    md.name,
                    match old.origin {
                        Origin::Local => "by the application".to_string(),
                        Origin::Pushed(a) => format!("pushed from {a}"),
                        Origin::Fetched(a) => format!("fetched from {a}"),
                    }
                )));
            }
        }
        let others = peers.values().filter(|p| p.origin.capped() && *p.name != *md.name);
        let (mut pushed, mut total, mut bytes) = (0usize, 0usize, 0u64);
        for p in others {
            pushed += usize::from(matches!(p.origin, Origin::Pushed(_)));
            total += p.regions.len();
            bytes += p.charged;
        }
        if bytes + charged > lim.max_blob_bytes_total {
            return Err(Error::not_allowed(format!(
                "agent '{}''s {charged} bytes of metadata would pass the {} bytes that peers loaded through the network may hold in all (listener_limits.max_blob_bytes_total)",
                md.name, lim.max_blob_bytes_total
            )));
        }
        if matches!(origin, Origin::Pushed(_)) && old.is_none() && pushed >= lim.max_peers {
            return Err(Error::not_allowed(format!(
                "{pushed} peers pushed through the network are loaded already (listener_limits.max_peers): agent '{}' is refused until one is invalidated",
                md.name
            )));
        }
        if total + regions > lim.max_regions_total {
            return Err(Error::not_allowed(format!(
                "agent '{}''s {regions} regions would pass the {} regions that peers loaded through the network may hold in all (listener_limits.max_regions_total)",
                md.name, lim.max_regions_total
            )));
        }
        Ok(())
    }

    /// Loads a blob from `origin`; with `expect`, a blob of another agent is
    /// refused before anything is loaded.
    pub(crate) fn load_peer(&self, bytes: &[u8], origin: Origin, expect: Option<&str>) -> Result<String> {
        let md = AgentMetadata::decode(bytes)?;
        if let Some(want) = expect.filter(|w| *w != md.name) {
            return Err(Error::mismatch(format!("the metadata served is agent '{}''s, not '{want}''s", md.name)));
        }
        if md.name == self.name() {
            return Err(Error::invalid(format!(
                "this is agent '{}''s own metadata; load a peer's metadata instead (transfers to itself need no loading)",
                md.name
            )));
        }
        // Backends are called below with no lock of the peer table held:
        // request creation read-locks it and must never wait on a backend's
        // `load_remote` (SHM reads /proc, TCP may dial). Loads and
        // invalidations are serialized among themselves by `loading`, so the
        // entry read here is still the one replaced at the end.
        let _loading = self.inner.loading.lock();
        let name: Arc<str> = md.name.as_str().into();
        let old = self.inner.peers.read().get(&name).cloned();
        let same_instance = old.as_ref().is_some_and(|p| p.instance == md.instance);
        let old_charged = old.as_ref().filter(|_| same_instance && md.partial).map_or(0, |p| p.charged);
        let charged = old_charged + bytes.len() as u64;
        if origin.capped() {
            self.check_caps(&md, charged, origin, &self.inner.peers.read())?;
        }
        if let Some(old) = old.as_ref().filter(|_| !same_instance) {
            tracing::info!(agent = %self.name(), peer = %name, "peer restarted: dropping its old metadata");
            self.unload_from_backends(old);
        }
        // A partial blob adds to what the same instance published; a full
        // one replaces it but keeps what backends already loaded.
        let base = old.as_deref().filter(|_| same_instance);
        let loaded = base.map_or(0, |p| p.loaded_mask);
        let merge_from = base.filter(|_| md.partial);
        let slots = self.slots();
        let loaded = match self.load_into_backends(&name, &md, &slots, loaded) {
            Ok(l) => l,
            Err(e) => {
                if old.is_some() && !same_instance {
                    // Its backends dropped the old instance above: so does the table.
                    self.inner.peers.write().remove(&name);
                }
                return Err(e);
            }
        };
        let peer = RemotePeer::merged(name.clone(), md, merge_from, &slots, loaded, origin, charged);
        let loaded_name = peer.name.to_string();
        self.inner.peers.write().insert(name, Arc::new(peer));
        Ok(loaded_name)
    }

    /// Hands `md`'s connection info to each local backend it names; returns
    /// `loaded` (the slots that hold the peer already) with those that
    /// loaded it now. Fails if no slot holds it then: a backend refused it,
    /// or it publishes none this agent has (each failure is logged otherwise).
    fn load_into_backends(
        &self,
        name: &Arc<str>,
        md: &AgentMetadata,
        slots: &[Arc<super::BackendSlot>],
        mut loaded: u32,
    ) -> Result<u32> {
        let mut failures = Vec::new();
        for b in md.backends.iter().filter(|b| b.conn_info.is_some()) {
            let Some(i) = slots.iter().position(|s| s.name.as_ref() == b.name) else { continue };
            let info = PeerInfo {
                name: name.clone(),
                host: md.host.clone(),
                instance: md.instance,
                conn_info: b.conn_info.clone().unwrap_or_default(),
            };
            match slots[i].backend.load_remote(&info) {
                Ok(()) => loaded |= 1 << i,
                Err(e) => failures.push(format!("{}: {e}", b.name)),
            }
        }
        if loaded == 0 && !failures.is_empty() {
            return Err(Error::new(
                crate::ErrorKind::Backend,
                format!("could not load agent '{name}' into any backend: {}", failures.join("; ")),
            ));
        }
        if loaded == 0 {
            // Loaded, it could be named in requests and notifications that
            // no backend can carry; and a peer fetched while it was still
            // creating its backends would stay unreachable. Refused, the
            // caller's fetch loop asks again.
            let theirs: Vec<&str> =
                md.backends.iter().filter(|b| b.conn_info.is_some()).map(|b| b.name.as_str()).collect();
            let ours: Vec<&str> = slots.iter().map(|s| s.name.as_ref()).collect();
            return Err(Error::new(
                crate::ErrorKind::Backend,
                format!(
                    "agent '{name}' publishes no backend in common with agent '{}' (it publishes [{}], this agent has [{}]): create a common backend (TCP, SHM or LOCAL) on both, or load its metadata again once it has created its backends",
                    self.name(),
                    theirs.join(", "),
                    ours.join(", ")
                ),
            ));
        }
        for f in &failures {
            tracing::warn!(agent = %self.name(), peer = %name, failure = %f, "a backend could not load the peer");
        }
        Ok(loaded)
    }

    fn unload_from_backends(&self, peer: &RemotePeer) {
        for (i, s) in self.slots().iter().enumerate() {
            if peer.loaded_mask & (1 << i) != 0 {
                s.backend.unload_remote(&peer.name);
            }
        }
    }

    /// Forgets a peer's metadata and closes its connections. Requests to it
    /// created before fail from then on.
    pub fn invalidate_remote(&self, name: &str) -> Result<()> {
        let _loading = self.inner.loading.lock();
        let removed = self.inner.peers.write().remove(name);
        match removed {
            Some(p) => {
                self.unload_from_backends(&p);
                Ok(())
            }
            None => Err(Error::not_found(format!("agent '{name}' is not loaded on agent '{}'", self.name()))),
        }
    }

    /// Forgets `name` if `allow` says so about the entry loaded now (checked
    /// under the table's lock, so the entry cannot change in between).
    /// `Ok(false)`: not loaded, or `allow` declined.
    pub(crate) fn invalidate_if(&self, name: &str, allow: impl FnOnce(&RemotePeer) -> Result<bool>) -> Result<bool> {
        let _loading = self.inner.loading.lock();
        let mut peers = self.inner.peers.write();
        let Some(p) = peers.get(name) else { return Ok(false) };
        if !allow(p)? {
            return Ok(false);
        }
        let p = peers.remove(name);
        drop(peers);
        if let Some(p) = p {
            self.unload_from_backends(&p);
        }
        Ok(true)
    }

    /// Called by backends (through `PeerEvents`) when a peer is gone.
    pub(crate) fn peer_lost(&self, name: &str, instance: u64) {
        let mut peers = self.inner.peers.write();
        if peers.get(name).is_some_and(|p| p.instance == instance) {
            if let Some(p) = peers.remove(name) {
                drop(peers);
                // Info: a peer's program ending is the usual cause. Work that
                // failed says so itself (its request's error, and TCP warns
                // when frames were in flight).
                tracing::info!(agent = %self.name(), peer = %name, "peer disconnected: metadata invalidated");
                self.unload_from_backends(&p);
            }
        }
    }

    /// Whether `name`'s metadata is loaded and, given `descs`, whether every
    /// descriptor lies inside a region the peer published.
    pub fn check_remote(&self, name: &str, descs: Option<&XferDescList>) -> bool {
        let peers = self.inner.peers.read();
        let Some(p) = peers.get(name) else { return false };
        descs.is_none_or(|l| l.iter().all(|d| p.regions.covering(l.mem_type(), d).is_some()))
    }

    /// Names of the peers whose metadata is loaded.
    pub fn remote_agents(&self) -> Vec<String> {
        self.inner.peers.read().keys().map(|k| k.to_string()).collect()
    }

    pub(crate) fn peer(&self, name: &str) -> Result<Arc<RemotePeer>> {
        self.inner.peers.read().get(name).cloned().ok_or_else(|| {
            Error::not_found(format!(
                "agent '{name}' is not loaded on agent '{}': load its metadata first (load_remote_metadata or fetch_remote_metadata)",
                self.name()
            ))
        })
    }
}

impl RemotePeer {
    /// The entry for `md`, on top of `base` (the same instance's entry, for
    /// a partial blob), with regions' backend masks translated from the
    /// peer's backend order to the local `slots`.
    fn merged(
        name: Arc<str>,
        md: AgentMetadata,
        base: Option<&RemotePeer>,
        slots: &[Arc<super::BackendSlot>],
        loaded_mask: u32,
        origin: Origin,
        charged: u64,
    ) -> RemotePeer {
        let to_local: Vec<Option<usize>> =
            md.backends.iter().map(|b| slots.iter().position(|s| s.name.as_ref() == b.name)).collect();
        let translate = |mask: u32| -> u32 {
            to_local.iter().enumerate().fold(0, |m, (j, l)| match l {
                Some(i) if mask & (1 << j) != 0 => m | (1 << i),
                _ => m,
            })
        };
        let (mut regions, mut backends, mut extensions) = match base {
            Some(p) => (p.regions_clone(), p.backends.clone(), p.extensions.clone()),
            None => (RangeMap::default(), Vec::new(), Vec::new()),
        };
        for b in &md.backends {
            match backends.iter_mut().find(|x: &&mut BackendMeta| x.name == b.name) {
                Some(x) if b.conn_info.is_some() => x.conn_info = b.conn_info.clone(),
                Some(_) => {}
                None => backends.push(b.clone()),
            }
        }
        for r in &md.regions {
            regions.insert(
                (r.mem_type, r.dev_id, r.addr),
                RemoteRegion { len: r.len, key: r.key, local_mask: translate(r.backend_mask) },
            );
        }
        for (k, v) in md.extensions {
            extensions.retain(|(n, _)| *n != k);
            extensions.push((k, v));
        }
        RemotePeer {
            name,
            instance: md.instance,
            host: md.host,
            backends,
            regions,
            loaded_mask,
            extensions,
            origin,
            charged,
        }
    }

    fn regions_clone(&self) -> RangeMap<RemoteRegion> {
        let mut m = RangeMap::default();
        for (p, r) in self.regions.iter() {
            m.insert(*p, r.clone());
        }
        m
    }
}
