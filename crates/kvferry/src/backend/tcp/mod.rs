//! `TCP`: READ and WRITE of DRAM between agents in different processes or
//! on different hosts, with notifications.
//!
//! ```text
//!  initiator                                   target
//!  post ─┬─ small: the posting thread writes ─▶ accept loop
//!        └─ large: lane workers (striped)   ─▶ one thread per connection:
//!  lane reader threads ◀── ACK / DATA / ERROR ─   check key+bounds, readv/writev
//!    complete frames; the last one queues the     straight into/from registered
//!    notification (sent after every ACK)          memory, answer
//! ```
//!
//! Each peer gets `lanes` connections, opened lazily (or by `connect`). A
//! request is cut into frames at prepare time (at most `frame_max` bytes and
//! 1000 descriptors each); a request of at least `stripe_threshold` bytes
//! spreads its frames over every lane. Data moves with `writev`/`readv`
//! straight from and into registered memory. The wire format is in
//! [`proto`], the protocol's decisions (which answer fits which frame, how a
//! target dispatches a frame) in `state.rs`; design, parameters and failure
//! semantics in `docs/TCP.md`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use super::{
    Backend, BackendContext, BackendPlugin, BackendXfer, Capabilities, CostEstimate, PeerEvents, PeerInfo, Region,
    XferPlan,
};
use crate::error::{Error, Result};
use crate::host::HostId;
use crate::storage::FileServer;

/// DRAM moves both ways; FILE and BLOCK regions a target registered are served
/// to remote initiators (remote file segments).
const MEM_TYPES: [MemType; 3] = [MemType::Dram, MemType::File, MemType::Block];
use crate::notif::NotifSink;
use crate::params::{ParamSpec, Params};
use crate::sys;
use crate::types::{AccessKey, MemType};

mod conn;
#[cfg(test)]
mod pair;
mod posting;
// The wire format is public for the fuzzers and the hostile tests only.
#[doc(hidden)]
pub mod proto;
mod served;
mod server;
mod state;
mod xfer;

use conn::Peer;

/// The `TCP` plugin.
#[derive(Debug)]
pub struct TcpPlugin;

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "lanes",
        default: "2",
        doc: "Parallel TCP connections per peer. Requests of at least stripe_threshold bytes are spread over \
              all of them. 2 measured best on a 2-core loopback; use 4-8 across hosts with fast NICs.",
    },
    ParamSpec {
        name: "port",
        default: "0",
        doc: "Port the data listener binds; 0 picks a free one (published in metadata).",
    },
    ParamSpec {
        name: "bind",
        default: "0.0.0.0",
        doc: "Address the data listener binds. 0.0.0.0 serves every interface.",
    },
    ParamSpec {
        name: "ip",
        default: "auto",
        doc: "Comma-separated addresses peers should dial, best first. auto: every interface address that is \
              up (peers in another network namespace skip loopback ones), or the bind address if it is specific.",
    },
    ParamSpec {
        name: "nodelay",
        default: "true",
        doc: "TCP_NODELAY on every connection: small frames (ACKs, 4 KiB writes) leave at once.",
    },
    ParamSpec {
        name: "sockbuf",
        default: "0",
        doc: "SO_SNDBUF/SO_RCVBUF in bytes (K/M suffixes). 0 keeps kernel autotuning, which grows buffers up \
              to net.ipv4.tcp_wmem/tcp_rmem and measured fastest on loopback.",
    },
    ParamSpec {
        name: "stripe_threshold",
        default: "1M",
        doc: "Requests of at least this many bytes are striped over all lanes; smaller ones use one lane \
              (chosen round-robin per post).",
    },
    ParamSpec {
        name: "frame_max",
        default: "4M",
        doc: "Most data bytes per frame. Bounds how long a cancel waits for a frame in flight; large enough \
              that per-frame costs vanish.",
    },
    ParamSpec {
        name: "inline_max",
        default: "64K",
        doc: "Requests up to this many bytes are written by the posting thread itself when the lane is \
              connected and idle (no thread hop: lowest latency). Larger ones go to lane worker threads.",
    },
    ParamSpec {
        name: "max_conns",
        default: "1024",
        doc: "Most incoming connections the data port holds at once (in handshake or authenticated). At the \
              cap a new connection evicts the oldest one still in handshake, or is closed at once.",
    },
    ParamSpec {
        name: "max_conns_per_ip",
        default: "64",
        doc: "Most incoming connections from one source address (same eviction rule as max_conns). Each \
              initiator agent opens `lanes` connections.",
    },
    ParamSpec {
        name: "max_handshakes",
        default: "32",
        doc: "Most incoming connections still in handshake at once; beyond, the oldest is dropped. A hello \
              must arrive whole within connect_timeout, so half-sent hellos cannot starve peers with the token.",
    },
    ParamSpec {
        name: "idle_timeout_s",
        default: "600",
        doc: "An authenticated incoming connection that sends no frame for this many seconds is closed (its \
              initiator reconnects on its next request). 0: never.",
    },
    ParamSpec {
        name: "staging_max",
        default: "256M",
        doc: "Staging memory for frames on exported files, shared by all incoming connections. A file frame \
              larger than this is refused; one that does not fit now waits up to peer_timeout for room.",
    },
    ParamSpec {
        name: "busy_poll_us",
        default: "50",
        doc: "Microseconds a thread polls a connection (yielding the CPU between tries) before it sleeps: a \
              target between frames, a thread waiting for a small request. Saves the wake-up of a sleeping \
              thread (tens of µs on a virtual machine); 0 sleeps at once.",
    },
];

/// Parsed parameters.
#[derive(Clone, Debug)]
struct Cfg {
    lanes: usize,
    port: u16,
    bind: IpAddr,
    ip: Vec<IpAddr>,
    nodelay: bool,
    sockbuf: u64,
    stripe_threshold: u64,
    frame_max: u64,
    inline_max: u64,
    busy_poll: Duration,
    max_conns: usize,
    max_conns_per_ip: usize,
    max_handshakes: usize,
    /// `None`: authenticated connections may idle forever.
    idle_timeout: Option<Duration>,
    staging_max: u64,
}

impl Cfg {
    fn parse(p: &Params) -> Result<Cfg> {
        let lanes: usize = p.parse("TCP", "lanes")?;
        if !(1..=64).contains(&lanes) {
            return Err(Error::invalid(format!("backend TCP: lanes = {lanes}; use 1 to 64")));
        }
        let ip_raw = p.raw("ip").unwrap_or("auto").trim();
        let ip = if ip_raw.eq_ignore_ascii_case("auto") || ip_raw.is_empty() {
            Vec::new()
        } else {
            ip_raw
                .split(',')
                .map(|s| {
                    s.trim().parse::<IpAddr>().map_err(|_| {
                        Error::invalid(format!("backend TCP: ip = '{ip_raw}': '{s}' is not an IP address"))
                    })
                })
                .collect::<Result<_>>()?
        };
        let frame_max = p.parse_size("TCP", "frame_max")?;
        if !(4096..=proto::MAX_FRAME_DATA).contains(&frame_max) {
            return Err(Error::invalid(format!(
                "backend TCP: frame_max = {frame_max}; use 4K to {}",
                proto::MAX_FRAME_DATA
            )));
        }
        let count = |name: &str| -> Result<usize> {
            let v: usize = p.parse("TCP", name)?;
            if !(1..=1 << 20).contains(&v) {
                return Err(Error::invalid(format!("backend TCP: {name} = {v}; use 1 to 1048576")));
            }
            Ok(v)
        };
        let idle: u64 = p.parse("TCP", "idle_timeout_s")?;
        let staging_max = p.parse_size("TCP", "staging_max")?;
        if staging_max < 1 << 20 {
            return Err(Error::invalid(format!("backend TCP: staging_max = {staging_max}; use at least 1M")));
        }
        Ok(Cfg {
            max_conns: count("max_conns")?,
            max_conns_per_ip: count("max_conns_per_ip")?,
            max_handshakes: count("max_handshakes")?,
            idle_timeout: (idle > 0).then(|| Duration::from_secs(idle.min(u32::MAX as u64))),
            staging_max,
            lanes,
            port: p.parse("TCP", "port")?,
            bind: p.parse("TCP", "bind")?,
            ip,
            nodelay: p.parse_bool("TCP", "nodelay")?,
            sockbuf: p.parse_size("TCP", "sockbuf")?,
            stripe_threshold: p.parse_size("TCP", "stripe_threshold")?,
            frame_max,
            inline_max: p.parse_size("TCP", "inline_max")?,
            busy_poll: Duration::from_micros(p.parse::<u64>("TCP", "busy_poll_us")?.min(1_000_000)),
        })
    }
}

impl BackendPlugin for TcpPlugin {
    fn name(&self) -> &str {
        "TCP"
    }

    fn mem_types(&self) -> Vec<MemType> {
        MEM_TYPES.to_vec()
    }

    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }

    fn create(&self, ctx: BackendContext, params: &Params) -> Result<Arc<dyn Backend>> {
        let params = params.resolved(PARAMS);
        let cfg = Cfg::parse(&params)?;
        let listener = TcpListener::bind(SocketAddr::new(cfg.bind, cfg.port))
            .map_err(|e| Error::io(format!("TCP: cannot listen on {}:{}", cfg.bind, cfg.port), e))?;
        let port = listener.local_addr().map_err(|e| Error::io("TCP: listener address", e))?.port();
        let mut addrs = if !cfg.ip.is_empty() {
            cfg.ip.clone()
        } else if cfg.bind.is_unspecified() {
            sys::interface_addrs()
        } else {
            vec![cfg.bind]
        };
        addrs.truncate(32);
        let cfg_staging = cfg.staging_max;
        let shared = Arc::new(Shared {
            agent: ctx.agent_name.clone(),
            instance: ctx.instance,
            cfg,
            peer_timeout: ctx.config.peer_timeout.max(Duration::from_millis(10)),
            connect_timeout: ctx.config.connect_timeout.max(Duration::from_millis(10)),
            auth_token: ctx.config.auth_token.clone(),
            notifs: ctx.notifs.clone(),
            events: ctx.peer_events.clone(),
            regions: RwLock::new(HashMap::new()),
            next_region: AtomicU64::new(1),
            files: FileServer::default(),
            staging: server::Staging::new(cfg_staging),
            peers: RwLock::new(HashMap::new()),
            closing: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            listen_fd: listener.as_raw_fd(),
            served: served::ServedTable::default(),
        });
        let sh = shared.clone();
        let h = std::thread::Builder::new()
            .name(format!("kvf-tcp-accept-{}", ctx.agent_name))
            .spawn(move || server::accept_loop(sh, listener))
            .map_err(|e| Error::io("TCP: cannot spawn the accept thread", e))?;
        shared.track(h);
        tracing::debug!(agent = %ctx.agent_name, port, ?addrs, "TCP backend listening");
        Ok(Arc::new(TcpBackend { shared, params, info: proto::ConnInfo { port, addrs } }))
    }
}

/// What the backend's threads share.
pub(crate) struct Shared {
    agent: Arc<str>,
    instance: u64,
    cfg: Cfg,
    peer_timeout: Duration,
    connect_timeout: Duration,
    auth_token: Option<crate::auth::AuthToken>,
    notifs: NotifSink,
    events: PeerEvents,
    /// Live DRAM registrations by key. Only memory: a key found here names
    /// process memory, never a file. Read-locked by a target connection only
    /// while it checks a frame and publishes which regions the frame uses
    /// (never across socket I/O); `deregister` then waits for (or aborts)
    /// the frames that use the region.
    regions: RwLock<HashMap<AccessKey, MemRegion>>,
    /// Ids for [`MemRegion`]s (a key registered again is another region).
    next_region: AtomicU64,
    /// The FILE and BLOCK regions, with their open files: a table of its own,
    /// whose `(offset, len)` are file offsets and never become memory spans.
    files: FileServer,
    /// Staging memory of frames on exported files, over all connections.
    staging: server::Staging,
    peers: RwLock<HashMap<Arc<str>, Arc<Peer>>>,
    closing: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Accepted connections by id: for the caps, for `deregister` (which
    /// aborts the frames using a region) and to shut down when the backend closes.
    conns: Mutex<HashMap<u64, Arc<server::Slot>>>,
    next_id: AtomicU64,
    listen_fd: std::os::fd::RawFd,
    /// What the target served, per peer.
    served: served::ServedTable,
}

/// A live DRAM registration as the target checks frames against it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MemRegion {
    /// Unique per registration (a frame in progress names the regions it uses by id).
    id: u64,
    addr: u64,
    len: u64,
}

impl proto::RegionLookup for HashMap<AccessKey, MemRegion> {
    fn lookup(&self, key: &AccessKey) -> Option<(u64, u64)> {
        self.get(key).map(|r| (r.addr, r.len))
    }
}

/// Slowest rate a frame's payload may arrive or leave at once its header
/// is in: a frame of `len` bytes must finish within
/// `peer_timeout + len / MIN_RATE` ([`frame_budget`]).
const MIN_RATE: f64 = (16u64 << 20) as f64;

/// How long a frame (or an answer) of `len` payload bytes may take, whole.
pub(crate) fn frame_budget(peer_timeout: Duration, len: u64) -> Duration {
    peer_timeout + Duration::from_secs_f64(len as f64 / MIN_RATE)
}

impl Shared {
    /// Keeps a thread's handle for joining at shutdown (and forgets finished ones).
    fn track(&self, h: JoinHandle<()>) {
        let mut t = self.threads.lock();
        t.retain(|h| !h.is_finished());
        t.push(h);
    }

    fn peer(&self, name: &str) -> Result<Arc<Peer>> {
        self.peers.read().get(name).cloned().ok_or_else(|| {
            Error::disconnected(format!(
                "TCP: agent '{name}' is not loaded on agent '{}' (invalidated, lost, or never loaded); fetch its metadata again",
                self.agent
            ))
        })
    }
}

/// The TCP backend of one agent.
pub struct TcpBackend {
    shared: Arc<Shared>,
    params: Params,
    info: proto::ConnInfo,
}

impl std::fmt::Debug for TcpBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpBackend").field("agent", &self.shared.agent).field("info", &self.info).finish()
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpShared").field("agent", &self.agent).finish()
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        let sh = &self.shared;
        sh.closing.store(true, Ordering::Release);
        sys::shutdown(sh.listen_fd);
        let peers: Vec<Arc<Peer>> = sh.peers.write().drain().map(|(_, p)| p).collect();
        for p in peers {
            p.close("the local TCP backend is shutting down");
        }
        for s in sh.conns.lock().values() {
            s.abort("the TCP backend is shutting down");
        }
        let me = std::thread::current().id();
        let threads = std::mem::take(&mut *sh.threads.lock());
        for h in threads {
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
    }
}

impl Backend for TcpBackend {
    fn name(&self) -> &str {
        "TCP"
    }

    fn served(&self) -> Vec<(String, crate::backend::ServedStats)> {
        self.shared.served.snapshot()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { mem_types: MEM_TYPES.to_vec(), local: false, remote: true, notifications: true, rank: 50 }
    }

    fn params(&self) -> Params {
        self.params.clone()
    }

    fn conn_info(&self) -> Vec<u8> {
        self.info.encode()
    }

    fn register(&self, region: &Region) -> Result<Vec<u8>> {
        if region.addr.checked_add(region.len).is_none() {
            return Err(Error::invalid("TCP: region end overflows the address space"));
        }
        match region.mem_type {
            MemType::Dram => {
                let id = self.shared.next_region.fetch_add(1, Ordering::Relaxed);
                let r = MemRegion { id, addr: region.addr, len: region.len };
                self.shared.regions.write().insert(region.key, r);
            }
            // Served to remote initiators by the storage layer (crate::storage), from
            // the file table only: (offset, len) there is a file range.
            MemType::File | MemType::Block => self.shared.files.register(&region.as_file())?,
            other => {
                return Err(Error::not_supported(format!("TCP moves DRAM, and serves FILE and BLOCK, not {other}")))
            }
        }
        Ok(Vec::new())
    }

    fn deregister(&self, region: &Region) -> Result<()> {
        match region.mem_type {
            MemType::Dram => {
                let removed = self.shared.regions.write().remove(&region.key);
                if let Some(r) = removed {
                    // Frames that still use the region are aborted, not waited
                    // for; returns once none of them touches it any more.
                    server::release_region(&self.shared, r.id);
                }
                Ok(())
            }
            // A served file operation holds its open file, not the region.
            MemType::File | MemType::Block => self.shared.files.deregister(&region.as_file()),
            _ => Ok(()),
        }
    }

    fn load_remote(&self, peer: &PeerInfo) -> Result<()> {
        let info = proto::ConnInfo::decode(&peer.conn_info)
            .map_err(|e| e.context(format!("loading agent '{}'", peer.name)))?;
        let me = HostId::current();
        let same_netns = me.boot_id == peer.host.boot_id && me.net_ns == peer.host.net_ns && me.net_ns != 0;
        let mut ips: Vec<IpAddr> = info.addrs.clone();
        if same_netns {
            // Same network stack: loopback is the shortest way, if the peer listens there.
            ips.sort_by_key(|a| !a.is_loopback());
            if ips.iter().any(|a| a.is_unspecified()) || !ips.iter().any(|a| a.is_loopback()) {
                ips.insert(0, IpAddr::V4(Ipv4Addr::LOCALHOST));
            }
        } else {
            ips.retain(|a| !a.is_loopback());
        }
        ips.dedup();
        if ips.is_empty() {
            return Err(Error::not_supported(format!(
                "TCP: agent '{}' published only loopback addresses and runs in another network namespace; \
                 set its TCP parameter ip to an address reachable from here",
                peer.name
            )));
        }
        let addrs: Vec<SocketAddr> = ips.into_iter().map(|ip| SocketAddr::new(ip, info.port)).collect();
        let mut peers = self.shared.peers.write();
        if let Some(old) = peers.get(&peer.name) {
            if old.instance == peer.instance && old.addrs == addrs {
                return Ok(());
            }
        }
        let new = Arc::new(Peer::new(peer.name.clone(), peer.instance, addrs, self.shared.cfg.lanes));
        if let Some(old) = peers.insert(peer.name.clone(), new) {
            drop(peers);
            old.close("the agent was reloaded (restarted or moved)");
        }
        Ok(())
    }

    fn unload_remote(&self, peer: &str) {
        let removed = self.shared.peers.write().remove(peer);
        if let Some(p) = removed {
            p.close("the agent's metadata was invalidated");
        }
    }

    fn connect(&self, peer: &str) -> Result<()> {
        let p = self.shared.peer(peer)?;
        for lane in &p.lanes {
            lane.ensure(&self.shared, &p)?;
        }
        Ok(())
    }

    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn BackendXfer>> {
        if plan.local_mem != MemType::Dram || !MEM_TYPES.contains(&plan.remote_mem) {
            return Err(Error::not_supported(format!(
                "TCP moves local DRAM to and from remote DRAM, FILE or BLOCK, not {} ↔ {}",
                plan.local_mem, plan.remote_mem
            )));
        }
        if plan.loopback {
            return Err(Error::not_supported("TCP does not do transfers within one agent; use LOCAL"));
        }
        xfer::TcpXfer::prepare(self.shared.clone(), plan)
    }

    fn send_notification(&self, peer: &str, msg: &[u8]) -> Result<()> {
        let p = self.shared.peer(peer)?;
        conn::send_notif(&self.shared, &p, msg)
    }

    fn estimate_cost(&self, plan: &XferPlan) -> CostEstimate {
        // Loopback measurements (docs/PERFORMANCE.md): ~25 µs per round trip, ~3 GB/s.
        let secs = plan.total_bytes as f64 / 3e9 + 25e-6;
        CostEstimate {
            duration: Duration::from_secs_f64(secs),
            err_margin: Duration::from_secs_f64(secs / 2.0),
            method: "ANALYTICAL",
        }
    }
}
