//! `SHM`: DRAM ↔ DRAM between processes of one host, by one of two paths
//! chosen per region at `prepare`, both done on the posting thread (`post`
//! returns `Done` once every byte has moved):
//!
//! * **Mapped memfd** (the fast path, SHM parameter `map`, default on): a
//!   region the owner registered from memfd-backed memory (an
//!   [`AlignedBuf`](crate::AlignedBuf)) is shared on request: the initiator
//!   asks for it over the control channel (MAP), the owner answers with the
//!   memfd (`SCM_RIGHTS`), and the initiator maps it into its own address
//!   space (`mapping.rs`); copies are then plain `memcpy` between local
//!   memory and the mapping. Only sealed, long-enough, non-hugetlbfs memfds
//!   are mapped, so no copy can fault whatever the owner does.
//! * **Cross-memory attach** (every other region, or `map=false`): one copy
//!   straight between the two address spaces (`process_vm_writev` for WRITE,
//!   `process_vm_readv` for READ), up to `IOV_MAX`
//!   descriptors per system call. The iovec arrays are built once, at
//!   `prepare`, and reused by every post.
//!
//! ```text
//!  initiator process                          owner process
//!  ┌───────────────┐  process_vm_writev/readv  ┌───────────────┐
//!  │ local regions │ ═════════════════════════▶│ its regions   │  (one copy, kernel)
//!  │  ShmXfer      │  memcpy ⇄ mapped memfd ⇄  │ memfd regions │  (mapped path)
//!  │  Link ────────┼── Unix socket (control) ──┼── Server       │
//!  └───────────────┘  NOTIF, QUERY, MAP ▶      └───────────────┘
//!                     ◀ STATUS, MAPPED (+fd), REVOKE
//! ```
//!
//! The control channel (`control.rs`: owner side in `owner.rs`, initiator
//! side in `link.rs`, what the initiator knows of the owner's regions in
//! `link_state.rs`, sockets in `socket.rs`, frames in [`wire`]) carries
//! notifications, liveness queries, map requests and revocations.
//!
//! **Reach.** Only peers on the same host ([`HostId::same_host`]: same boot
//! id and PID namespace) and whose process the kernel lets this one attach
//! to. Loading a peer's connection info reads a nonce out of its memory: a
//! refusal (`EPERM`, Yama `ptrace_scope`, different user) makes `load_remote`
//! fail with a clear error, and the agent uses TCP for that peer instead.
//!
//! **Who may connect.** The control socket's name is public and holds no
//! secret; both ends check the other's kernel-reported credentials
//! (`SO_PEERCRED`): same uid only, unless the `allowed_uids` parameter
//! lists more, and on the initiator side the listener must be the pid the
//! owner's metadata names. Then HELLO checks the nonce and the auth token.
//! Memfds received for mapping must be sealed against shrinking, long
//! enough and not on hugetlbfs (see `mapping.rs`); an owner that sends
//! another gets cross-memory attach for that region instead.
//!
//! **Choice.** Rank 10: preferred over TCP (50) for same-host peers; LOCAL
//! (0) stays first for agents of one process. Hints from the caller win.
//!
//! **Guarantees.** The owner cannot check each copy (the kernel or a plain
//! `memcpy` does it without asking it), so the initiator does: the agent
//! checks every remote range against the regions the peer published, the
//! backend checks at `prepare` that a mapped segment lies inside its
//! region's mapping, and at each post that each region's key is still live.
//! Keys are confirmed live by the owner over the control channel at
//! `prepare`, and revoked by it at deregistration: the initiator unmaps the
//! region and acknowledges once no copy into it is in flight, and the
//! owner's `deregister` returns once every connected initiator has
//! acknowledged, or after the agent's `peer_timeout`, closing the
//! connections that did not answer. A mapped copy also checks that the
//! owner's end of the control socket is still open, before and after.
//!
//! **Failures.** A peer that exited gives `RemoteDisconnect` (the kernel's
//! `ESRCH`, or the control connection's end) and is reported lost to the
//! agent. Stale connection info (the pid gone or reused by a restarted
//! process) is refused at load: the start time and the nonce must match.
//!
//! See `docs/SHM.md` for the full story and the measured performance.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use super::{
    Backend, BackendContext, BackendPlugin, BackendXfer, Capabilities, CostEstimate, PeerEvents, PeerInfo, Region,
    XferPlan,
};
use crate::error::{Error, ErrorKind, Result};
use crate::host::HostId;
use crate::params::{ParamSpec, Params};
use crate::sys;
use crate::types::{AccessKey, DataPath, MemType, XferOp, XferState};

// The wire format, the connection info and fd passing are public for the
// fuzzers and the hostile tests only.
use crate::sys::cma;
#[doc(hidden)]
pub use crate::sys::fdpass;
mod control;
#[doc(hidden)]
pub mod info;
mod link;
mod link_state;
mod mapping;
mod owner;
mod socket;
#[doc(hidden)]
pub mod wire;

use cma::{Cma, Iov};
use control::Access;
use info::ConnInfo;
use link::{Hello, Link};
use owner::{Exported, Server};

/// The `SHM` plugin.
#[derive(Debug)]
pub struct ShmPlugin;

const NAME: &str = "SHM";

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "ptracer_any",
        default: "false",
        doc: "Under Yama ptrace_scope=1, let any process of this user attach to this one \
              (prctl PR_SET_PTRACER_ANY) so that same-host peers that are not its ancestors can use SHM. \
              Process-wide. Default false: it widens who may read this process's memory; without it such \
              peers fall back to TCP.",
    },
    ParamSpec {
        name: "map",
        default: "true",
        doc: "The mapped fast path: share this agent's memfd-backed regions (AlignedBuf) with peers that \
              hold their keys, and map peers' such regions to copy with memcpy instead of cross-memory \
              attach. Default true (memcpy speed); false: cross-memory attach only, on both roles.",
    },
    ParamSpec {
        name: "allowed_uids",
        default: "",
        doc: "Comma-separated uids, besides this process's own, that may use the SHM control socket, both \
              roles: as owner, connections from other uids are refused at accept (SO_PEERCRED) before any \
              byte is read; as initiator, an owner socket held by another uid is not trusted. Default empty: \
              same uid only (a same-uid process could ptrace this one anyway). Admitting a uid lets it get \
              the memfds of this agent's regions whose keys it holds, i.e. read and write them.",
    },
];

/// Parses the `allowed_uids` parameter: comma-separated decimal uids.
fn parse_uids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>().map_err(|_| {
                Error::invalid(format!(
                    "SHM parameter allowed_uids: '{t}' is not a uid; give decimal uids separated by commas, e.g. \
                     allowed_uids=1001,1002"
                ))
            })
        })
        .collect()
}

/// Yama's `ptrace_scope` (`/proc/sys/kernel/yama/ptrace_scope`), if the
/// Yama LSM is present: 0 and 1 let SHM work (1 with `ptracer_any`), 2 only
/// for root, 3 never (the SHM plugin's probe says so).
pub fn ptrace_scope() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok()?.trim().parse().ok()
}

impl BackendPlugin for ShmPlugin {
    fn name(&self) -> &str {
        NAME
    }

    fn mem_types(&self) -> Vec<MemType> {
        vec![MemType::Dram]
    }

    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }

    fn probe(&self) -> Result<()> {
        cma::probe_self().map_err(|e| {
            Error::io(
                "SHM needs cross-memory attach (process_vm_readv), which this process may not use \
                 (kernel without CONFIG_CROSS_MEMORY_ATTACH, or a seccomp filter); use TCP",
                e,
            )
        })?;
        match ptrace_scope() {
            Some(2) if sys::effective_uid() != 0 => Err(Error::not_supported(
                "SHM: Yama ptrace_scope is 2 (admin-only attach), so processes cannot attach to each other; \
                 use TCP, or lower /proc/sys/kernel/yama/ptrace_scope to 0 or 1",
            )),
            Some(s) if s >= 3 => Err(Error::not_supported(
                "SHM: Yama ptrace_scope is 3 (no attach at all), so cross-memory attach is impossible; use TCP",
            )),
            _ => Ok(()),
        }
    }

    fn create(&self, ctx: BackendContext, params: &Params) -> Result<Arc<dyn Backend>> {
        let params = params.resolved(PARAMS);
        let map = params.parse_bool(NAME, "map")?;
        let access = Access::with_extra(parse_uids(params.raw("allowed_uids").unwrap_or(""))?);
        if params.parse_bool(NAME, "ptracer_any")? && ptrace_scope() == Some(1) {
            sys::allow_any_ptracer().map_err(|e| Error::io("SHM: prctl(PR_SET_PTRACER_ANY)", e))?;
        }
        let nonce = loop {
            let k = AccessKey::random()?;
            let n = u64::from_le_bytes(k.0[..8].try_into().unwrap_or([0; 8]));
            if n != 0 {
                break n;
            }
        };
        // Peers read this word through cross-memory attach; it never changes.
        let nonce_cell = Box::new(nonce);
        let me = HostId::current();
        // The name is public (/proc/net/unix): it must not carry the nonce.
        // A separate random part keeps names unique per backend instance.
        let tag = AccessKey::random()?;
        let socket = format!("kvferry-shm-{}-{:032x}", me.pid, u128::from_le_bytes(tag.0)).into_bytes();
        let server = Server::start(
            socket.clone(),
            ctx.agent_name.clone(),
            nonce,
            ctx.config.auth_token.clone(),
            ctx.notifs.clone(),
            ctx.config.connect_timeout,
            access.clone(),
        )?;
        let info = ConnInfo {
            pid: me.pid,
            start_time: me.start_time,
            nonce,
            nonce_addr: &*nonce_cell as *const u64 as u64,
            socket,
        };
        Ok(Arc::new(ShmBackend {
            ctx,
            params,
            map,
            info,
            _nonce_cell: nonce_cell,
            server,
            access,
            peers: RwLock::new(HashMap::new()),
        }))
    }
}

/// A loaded peer: its connection info and, once opened, the link to it.
#[derive(Debug)]
struct PeerSlot {
    info: ConnInfo,
    instance: u64,
    link: Mutex<Option<Arc<Link>>>,
}

/// The SHM backend instance of one agent.
#[derive(Debug)]
pub struct ShmBackend {
    ctx: BackendContext,
    params: Params,
    /// The `map` parameter: share and map memfd-backed regions.
    map: bool,
    info: ConnInfo,
    _nonce_cell: Box<u64>,
    server: Server,
    /// Which uids this backend talks to, both roles.
    access: Access,
    peers: RwLock<HashMap<Arc<str>, Arc<PeerSlot>>>,
}

impl Drop for ShmBackend {
    fn drop(&mut self) {
        for (_, p) in self.peers.write().drain() {
            if let Some(l) = p.link.lock().take() {
                l.close("the SHM backend was dropped");
            }
        }
    }
}

impl ShmBackend {
    /// The open link to `peer`, opening it on first use.
    fn link(&self, peer: &str) -> Result<Arc<Link>> {
        let slot = self.peers.read().get(peer).cloned().ok_or_else(|| {
            Error::disconnected(format!("SHM: agent '{peer}' is not loaded (invalidated or never loaded)"))
        })?;
        let mut g = slot.link.lock();
        if let Some(l) = g.as_ref() {
            return Ok(l.clone());
        }
        check_process(peer, &slot.info)?;
        let cfg = &self.ctx.config;
        let link = Link::connect(
            &slot.info.socket,
            Hello {
                agent: &self.ctx.agent_name,
                instance: self.ctx.instance,
                nonce: slot.info.nonce,
                token: cfg.auth_token.as_ref(),
            },
            peer.into(),
            slot.instance,
            slot.info.pid as i32,
            (cfg.connect_timeout, cfg.peer_timeout),
            self.ctx.peer_events.clone(),
            &self.access,
        )?;
        *g = Some(link.clone());
        Ok(link)
    }
}

/// Same host for cross-memory attach, and the same network namespace, which
/// scopes the abstract Unix socket of the control channel.
fn same_host_and_net(peer: &HostId) -> bool {
    let me = HostId::current();
    me.same_host(peer) && me.net_ns == peer.net_ns
}

/// Fails unless `info.pid` is still the process that published `info`.
fn check_process(peer: &str, info: &ConnInfo) -> Result<()> {
    match info::process_start_time(info.pid) {
        Some(t) if t == info.start_time => Ok(()),
        Some(_) => Err(Error::disconnected(format!(
            "SHM: agent '{peer}''s metadata is stale: pid {} now belongs to another process (the agent restarted?); fetch its fresh metadata",
            info.pid
        ))),
        None => Err(Error::disconnected(format!(
            "SHM: agent '{peer}''s metadata is stale: process {} is no longer running; fetch the metadata of its new process",
            info.pid
        ))),
    }
}

impl Backend for ShmBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { mem_types: vec![MemType::Dram], local: false, remote: true, notifications: true, rank: 10 }
    }

    fn params(&self) -> Params {
        self.params.clone()
    }

    fn conn_info(&self) -> Vec<u8> {
        self.info.encode()
    }

    fn register(&self, region: &Region) -> Result<Vec<u8>> {
        if region.mem_type != MemType::Dram {
            return Err(Error::not_supported(format!("SHM moves DRAM only, not {}", region.mem_type)));
        }
        let export = match &region.share {
            Some(share) if self.map => Some(Exported { share: share.clone(), addr: region.addr, len: region.len }),
            _ => None,
        };
        self.server.add(region.key, export);
        Ok(Vec::new())
    }

    fn deregister(&self, region: &Region) -> Result<()> {
        self.server.revoke(region.key, self.ctx.config.peer_timeout);
        Ok(())
    }

    fn reaches(&self, peer: &HostId) -> bool {
        same_host_and_net(peer)
    }

    fn load_remote(&self, peer: &PeerInfo) -> Result<()> {
        if !same_host_and_net(&peer.host) {
            return Err(Error::not_supported(format!(
                "SHM reaches agents on this host, in this PID and network namespace, only; '{}' runs on '{}' or in \
                 another namespace (TCP will be used)",
                peer.name, peer.host.hostname
            )));
        }
        let info = ConnInfo::decode(&peer.conn_info).map_err(|e| e.context(format!("agent '{}'", peer.name)))?;
        if info.pid != peer.host.pid || info.start_time != peer.host.start_time {
            return Err(Error::mismatch(format!(
                "SHM connection info of '{}' names pid {} (start {}) but its metadata says pid {} (start {})",
                peer.name, info.pid, info.start_time, peer.host.pid, peer.host.start_time
            )));
        }
        check_process(&peer.name, &info)?;
        match cma::read_u64(info.pid as i32, info.nonce_addr) {
            Ok(n) if n == info.nonce => {}
            Ok(_) => {
                return Err(Error::disconnected(format!(
                    "SHM: agent '{}''s metadata is stale: pid {} no longer holds the SHM backend that published it; fetch fresh metadata",
                    peer.name, info.pid
                )))
            }
            Err(e) => return Err(attach_error(&peer.name, info.pid, e)),
        }
        let slot = Arc::new(PeerSlot { info, instance: peer.instance, link: Mutex::new(None) });
        if let Some(old) = self.peers.write().insert(peer.name.clone(), slot) {
            if let Some(l) = old.link.lock().take() {
                l.close("the peer's metadata was replaced");
            }
        }
        Ok(())
    }

    fn unload_remote(&self, peer: &str) {
        let old = self.peers.write().remove(peer);
        if let Some(l) = old.and_then(|p| p.link.lock().take()) {
            l.close("the peer was unloaded (invalidated)");
        }
    }

    fn connect(&self, peer: &str) -> Result<()> {
        self.link(peer).map(drop)
    }

    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn BackendXfer>> {
        if plan.local_mem != MemType::Dram || plan.remote_mem != MemType::Dram {
            return Err(Error::not_supported("SHM moves DRAM ↔ DRAM only"));
        }
        if plan.loopback {
            return Err(Error::not_supported("SHM does not do transfers within one agent; use LOCAL"));
        }
        let link = self.link(&plan.peer)?;
        // Runs of segments share a region: skip repeats before sorting.
        let mut keys: Vec<AccessKey> = Vec::new();
        for s in &plan.segments {
            if keys.last() != Some(&s.remote_key) {
                keys.push(s.remote_key);
            }
        }
        keys.sort_unstable();
        keys.dedup();
        link.ensure_live(&keys, self.ctx.config.peer_timeout)?;
        if self.map {
            link.ensure_mapped(&keys, self.ctx.config.peer_timeout)?;
        }
        let mut mapped = Vec::new();
        let mut local = Vec::new();
        let mut remote = Vec::new();
        let mut cma_total = 0u64;
        {
            let st = link.state.read();
            if let Some(why) = &st.dead {
                return Err(link.dead_error(why));
            }
            // The mapping of the previous segment's key: runs of segments
            // share a region, so most lookups skip the hash.
            let mut last: Option<(AccessKey, Option<&_>)> = None;
            for (i, s) in plan.segments.iter().enumerate() {
                let len = usize::try_from(s.len).map_err(|_| Error::invalid("SHM: a segment is larger than memory"))?;
                let map = match last {
                    Some((k, m)) if k == s.remote_key => m,
                    _ => {
                        let m = st.maps.get(&s.remote_key);
                        last = Some((s.remote_key, m));
                        m
                    }
                };
                match map {
                    Some(m) => {
                        let remote = m.local_addr(s.remote_addr, s.len).ok_or_else(|| {
                            let (addr, len) = m.region();
                            Error::not_allowed(format!(
                                "SHM: segment {i} ({:#x}+{}) is not inside the region agent '{}' registered at \
                                 {addr:#x}+{len}; nothing was copied",
                                s.remote_addr, s.len, plan.peer
                            ))
                        })?;
                        if len >= POPULATE_MIN {
                            m.populate(remote, len, plan.op == XferOp::Write);
                        }
                        mapped.push(MappedCopy { local: s.local_addr as usize, remote, len });
                    }
                    None => {
                        local.push(Iov { base: s.local_addr as usize, len });
                        remote.push(Iov { base: s.remote_addr as usize, len });
                        cma_total += s.len;
                    }
                }
            }
        }
        Ok(Box::new(ShmXfer {
            link,
            op: plan.op,
            mapped,
            local,
            remote,
            keys,
            cma_total,
            cma: Cma::new(),
            frame: Vec::new(),
            events: self.ctx.peer_events.clone(),
        }))
    }

    fn send_notification(&self, peer: &str, msg: &[u8]) -> Result<()> {
        let link = self.link(peer)?;
        if let Some(why) = &link.state.read().dead {
            return Err(link.dead_error(why));
        }
        let mut buf = Vec::new();
        wire::encode_notif(msg, &mut buf);
        link.send_bytes(&buf)
    }

    fn estimate_cost(&self, plan: &XferPlan) -> CostEstimate {
        // About memcpy speed plus one system call per IOV_MAX segments.
        let calls = plan.segments.len().div_ceil(cma::IOV_MAX) as f64;
        let secs = plan.total_bytes as f64 / 8e9 + calls * 2e-6;
        CostEstimate {
            duration: Duration::from_secs_f64(secs),
            err_margin: Duration::from_secs_f64(secs / 2.0),
            method: "ANALYTICAL",
        }
    }
}

/// Turns a failed attach to `pid` into an error that says why and what to do.
fn attach_error(peer: &str, pid: u32, e: std::io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ESRCH) => Error::disconnected(format!("SHM: agent '{peer}' (pid {pid}) has exited")).with_source(e),
        Some(libc::EPERM) => Error::not_allowed(format!(
            "SHM: the kernel refuses cross-memory attach to agent '{peer}' (pid {pid}): EPERM. The processes run as \
             different users, or Yama ptrace_scope ({}) forbids it (set SHM parameter ptracer_any=true on the peer, \
             or ptrace_scope=0); TCP will be used for this peer",
            ptrace_scope().map_or("absent".to_string(), |s| s.to_string())
        ))
        .with_source(e),
        _ => Error::io(format!("SHM: cross-memory attach to agent '{peer}' (pid {pid})"), e),
    }
}

/// Segments of the mapped path at least this long have their pages of the
/// owner's mapping populated at prepare (`Mapping::populate`); smaller ones
/// fault a page or two at first use, cheaper than a system call each.
const POPULATE_MIN: usize = 1 << 20;

/// One segment of the mapped path: a local range and the same bytes of the
/// owner's region as mapped into this process.
#[derive(Clone, Copy, Debug)]
struct MappedCopy {
    local: usize,
    remote: usize,
    len: usize,
}

/// A prepared SHM transfer, posted many times: the segments whose remote
/// region is mapped here (memcpy), and iovec arrays for the others (CMA),
/// all built once at prepare.
#[derive(Debug)]
struct ShmXfer {
    link: Arc<Link>,
    op: XferOp,
    /// Segments copied with memcpy through the owner's mapped regions.
    mapped: Vec<MappedCopy>,
    /// Local ranges of the segments moved by cross-memory attach.
    local: Vec<Iov>,
    /// Remote ranges of the same, pairwise equal in length.
    remote: Vec<Iov>,
    /// The distinct remote region keys, checked live at each post.
    keys: Vec<AccessKey>,
    /// Bytes moved by cross-memory attach.
    cma_total: u64,
    cma: Cma,
    frame: Vec<u8>,
    events: PeerEvents,
}

impl ShmXfer {
    /// Fails if the owner's end of the control connection is closed: its
    /// process is gone, and a mapping of its memory would outlive it silently.
    fn check_owner_alive(&self, when: &str) -> Result<()> {
        if self.mapped.is_empty() || !self.link.hung_up() {
            return Ok(());
        }
        let why = format!("process {} exited or closed its SHM backend", self.link.pid);
        self.link.mark_dead(why.clone());
        self.link.report_lost();
        Err(Error::disconnected(format!(
            "SHM: agent '{}' (pid {}) is gone ({when}): {why}; load its fresh metadata if it was restarted",
            self.link.peer, self.link.pid
        )))
    }

    fn copy(&mut self) -> Result<()> {
        self.check_owner_alive("nothing was copied")?;
        let st = self.link.state.read();
        if let Some(why) = &st.dead {
            return Err(self.link.dead_error(why));
        }
        if let Some(k) = self.keys.iter().find(|k| !st.live.contains(*k)) {
            return Err(Error::not_allowed(format!(
                "SHM: agent '{}' deregistered region {k:?} since this request was prepared; nothing was copied",
                self.link.peer
            )));
        }
        for c in &self.mapped {
            let (src, dst) = match self.op {
                XferOp::Write => (c.local, c.remote),
                XferOp::Read => (c.remote, c.local),
            };
            // SAFETY: the local range lies in memory this agent registered (the
            // agent resolved it at request creation), which the registrant keeps
            // valid while registered. The remote range was checked at prepare to
            // lie inside the mapping of its region; every key is live (checked
            // above, under the read lock held until the copy ends), so by the
            // LinkState invariant that mapping is still in place: a revocation
            // or the link's death unmaps only under the write lock. The memfd
            // is sealed against shrinking, so no page of it can vanish. Each
            // byte is written once, front to back: the owner may watch its
            // memory while it lands (`copy_once`).
            unsafe { sys::copy_once(dst as *mut u8, src as *const u8, c.len) };
        }
        if self.local.is_empty() {
            drop(st);
            return self.check_owner_alive("it died during the copy, which may not have reached it");
        }
        // SAFETY: every local range lies in memory this agent registered (the
        // agent resolved it at request creation), which the registrant keeps
        // valid while registered; the kernel checks the remote ranges against
        // the peer's mappings. The read lock on the link state is held for the
        // whole copy, so a revocation (the owner deregistering) waits for it.
        let r = unsafe { self.cma.transfer(self.op, self.link.pid, &self.local, &self.remote) };
        drop(st);
        match r {
            Ok(n) if n == self.cma_total => {
                self.check_owner_alive("it died during the copy, which may not have reached it")
            }
            Ok(n) => Err(Error::internal(format!("SHM: moved {n} of {} bytes without an error", self.cma_total))),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                self.link.mark_dead(format!("process {} exited", self.link.pid));
                self.events.peer_lost(&self.link.peer, self.link.instance);
                Err(attach_error(&self.link.peer, self.link.pid as u32, e))
            }
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) || e.kind() == std::io::ErrorKind::WriteZero => {
                Err(Error::new(
                    ErrorKind::Backend,
                    format!(
                        "SHM: {} with agent '{}' hit unmapped memory: a range is no longer mapped in this process or \
                         in the peer (memory freed while still registered?): {e}",
                        self.op, self.link.peer
                    ),
                )
                .with_source(e))
            }
            Err(e) => Err(attach_error(&self.link.peer, self.link.pid as u32, e)),
        }
    }
}

impl BackendXfer for ShmXfer {
    fn post(&mut self, notif: Option<&[u8]>) -> Result<XferState> {
        self.copy()?;
        if let Some(n) = notif {
            // The copy returned: the data is in the peer's memory before it can see this.
            self.frame.clear();
            wire::encode_notif(n, &mut self.frame);
            self.link.send_bytes(&self.frame)?;
        }
        Ok(XferState::Done)
    }

    fn poll(&mut self) -> Result<XferState> {
        Ok(XferState::Done)
    }

    fn cancel(&mut self) {
        // Copies are synchronous: nothing is ever in flight after post returns.
    }

    fn data_path(&self) -> Option<DataPath> {
        Some(match (self.mapped.is_empty(), self.local.is_empty()) {
            (false, true) => DataPath::Mapped,
            (true, _) => DataPath::Cma,
            (false, false) => DataPath::Mixed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reach_needs_same_host_and_network_namespace() {
        let me = HostId::current();
        assert!(same_host_and_net(me));
        let mut other = me.clone();
        other.net_ns += 1;
        assert!(!same_host_and_net(&other), "abstract sockets do not cross network namespaces");
        let mut other = me.clone();
        other.boot_id = "another-host".into();
        assert!(!same_host_and_net(&other));
    }

    #[test]
    fn stale_process_identity_is_refused() {
        let me = HostId::current();
        let mut info =
            ConnInfo { pid: me.pid, start_time: me.start_time, nonce: 1, nonce_addr: 8, socket: b"x".to_vec() };
        check_process("me", &info).unwrap();
        info.start_time += 1;
        let e = check_process("me", &info).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::RemoteDisconnect);
        assert!(e.message().contains("another process"), "{e}");
        info.pid = i32::MAX as u32;
        assert!(check_process("me", &info).unwrap_err().message().contains("no longer running"));
    }

    #[test]
    fn attach_errors_say_what_to_do() {
        let e = attach_error("p", 7, std::io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(e.kind(), ErrorKind::NotAllowed);
        assert!(e.message().contains("ptrace") && e.message().contains("TCP"), "{e}");
        assert_eq!(
            attach_error("p", 7, std::io::Error::from_raw_os_error(libc::ESRCH)).kind(),
            ErrorKind::RemoteDisconnect
        );
    }
}
