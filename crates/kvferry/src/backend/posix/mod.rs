//! `POSIX`: transfers between an agent's DRAM and its files and block
//! devices (DRAM ↔ FILE, DRAM ↔ BLOCK), with io_uring or a thread pool.
//!
//! The agent is its own "remote": the user registers DRAM and FILE/BLOCK
//! regions on one agent and creates a request with the agent's own name. A
//! WRITE moves DRAM → file, a READ file → DRAM.
//!
//! ```no_run
//! use kvferry::{Agent, AlignedBuf, MemType, RegDesc, RegDescList, XferDesc, XferDescList, XferOp};
//! let agent = Agent::with_backends("ssd-tier", &["POSIX"])?;
//! let buf = AlignedBuf::new(4 << 20)?;
//! let _mem = agent.register_buf(&buf)?;
//! // Path mode: the backend opens the file; dev_id 1 is our name for it.
//! let mut files = RegDescList::new(MemType::File);
//! files.push(RegDesc::with_meta(0, 0, 1, "rw,direct,create:/var/tmp/kv.bin"));
//! let _file = agent.register_storage(&files, &[])?;
//! let dram = buf.xfer_blocks(0, 1 << 20, 4)?;
//! let file = XferDescList::from_descs(MemType::File, (0..4).map(|i| XferDesc::new(i << 20, 1 << 20, 1)).collect());
//! let req = agent.create_request(XferOp::Write, &dram, &file, "ssd-tier", None)?;
//! req.post(None)?;
//! req.wait(std::time::Duration::from_secs(10))?;
//! # Ok::<(), kvferry::Error>(())
//! ```
//!
//! Layout: this module is a thin adapter — the plugin and its parameters,
//! the backend (registration, `prepare`), and the request state
//! (`PosixXfer`: post, poll, wait, cancel) — over `crate::storage`, which
//! owns the open-file table, the one `plan` of lookup, access, bounds,
//! O_DIRECT and chunking, the engines (io_uring, thread pool) and the raw OS
//! calls. `prepare` plans a request once; each `post` runs the plan as a job.
//!
//! Guarantees: a request is done only when every byte of every descriptor
//! moved (short transfers are retried for the remainder; end of file,
//! ENOSPC and any OS error fail the request); an error or a cancel is
//! reported only once no I/O of the request is in flight, so its memory may
//! be released at once.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use super::{Backend, BackendContext, BackendPlugin, BackendXfer, Capabilities, FileInfo, PeerInfo, Region, XferPlan};
use crate::desc::RegDesc;
use crate::error::{Error, ErrorKind, Result};
use crate::notif::NotifSink;
use crate::params::{ParamSpec, Params};
use crate::types::{AccessKey, MemType, XferState};

use crate::storage::{self, Engine, EngineSpec, FileTable, IoBatch, Job};

/// The `POSIX` plugin.
#[derive(Debug)]
pub struct PosixPlugin;

/// Whether the io_uring engine works on this machine: what `engine=auto`
/// prefers and `engine=uring` requires. A ring can be created, a NOP
/// completes, and the kernel has the operations the engine uses (READ,
/// WRITE, POLL_ADD). Probed once per process; the error says why not and
/// what to do. The plugin itself works without it ([`PosixPlugin`]'s probe
/// passes): `engine=threads` runs everywhere.
///
/// ```
/// match kvferry::backend::posix::probe_io_uring() {
///     Ok(()) => println!("POSIX can use io_uring"),
///     Err(e) => println!("POSIX uses its thread pool: {e}"),
/// }
/// ```
pub fn probe_io_uring() -> Result<()> {
    storage::probe_io_uring()
}

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "engine",
        default: "auto",
        doc: "auto | uring | threads. auto picks io_uring when the start-up probe (ring + NOP + opcode probe) succeeds, else the thread pool",
    },
    ParamSpec {
        name: "queue_depth",
        default: "64",
        doc: "io_uring: I/Os in flight per backend instance (1..=4096), shared by all requests; refilled as completions arrive",
    },
    ParamSpec {
        name: "queue_bytes",
        default: "0",
        doc: "io_uring: most bytes of I/O in flight (K/M/G suffixes), on top of queue_depth; 0 = no byte limit. \
              Disks that complete a whole queue at once answer sooner with a smaller budget",
    },
    ParamSpec {
        name: "threads",
        default: "8",
        doc: "thread-pool engine: worker threads doing pread/pwrite (1..=1024), which is also its number of I/Os in flight",
    },
    ParamSpec {
        name: "max_io_size",
        default: "1M",
        doc: "longest single I/O (4K..=1G, a multiple of 4096); longer descriptors and merged runs are split so many I/Os run in parallel",
    },
    ParamSpec {
        name: "busy_poll_us",
        default: "1000",
        doc: "microseconds a thread waiting for a request (at the start of each posting's first wait), and the \
              idle io_uring thread waiting for work, poll (yielding the CPU between looks) before they sleep \
              (0..=1000000). Saves two thread wake-ups per request, tens of µs each on a virtual machine; 0 sleeps \
              at once",
    },
    ParamSpec {
        name: "sqpoll",
        default: "false",
        doc: "io_uring: let a kernel thread poll the submission queue (saves a syscall per batch, costs a busy core)",
    },
];

const NAME: &str = "POSIX";

impl BackendPlugin for PosixPlugin {
    fn name(&self) -> &str {
        NAME
    }

    fn mem_types(&self) -> Vec<MemType> {
        vec![MemType::Dram, MemType::File, MemType::Block]
    }

    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }

    fn create(&self, ctx: BackendContext, params: &Params) -> Result<Arc<dyn Backend>> {
        let params = params.resolved(PARAMS);
        let cfg = Config::from_params(&params)?;
        let engine = storage::start_engine(&cfg.engine)?;
        tracing::info!(agent = %ctx.agent_name, engine = engine.name(), "POSIX backend created");
        Ok(Arc::new(PosixBackend {
            inner: Arc::new(Inner {
                agent: ctx.agent_name,
                notifs: ctx.notifs,
                table: RwLock::new(FileTable::default()),
                engine,
                max_io: cfg.max_io,
                busy_poll: cfg.engine.busy_poll,
            }),
            params,
        }))
    }
}

/// The parsed parameters.
#[derive(Debug)]
struct Config {
    engine: EngineSpec,
    max_io: u64,
}

impl Config {
    fn from_params(p: &Params) -> Result<Config> {
        let engine = p.raw("engine").unwrap_or("auto").trim().to_ascii_lowercase();
        let engine = match engine.as_str() {
            "auto" | "uring" | "threads" => engine,
            "io_uring" | "iouring" => "uring".to_string(),
            "thread" | "pool" | "threadpool" => "threads".to_string(),
            other => {
                return Err(Error::invalid(format!(
                    "backend POSIX: parameter 'engine' = '{other}' is not one of auto, uring, threads"
                )))
            }
        };
        let queue_depth: u32 = p.parse(NAME, "queue_depth")?;
        if !(1..=4096).contains(&queue_depth) {
            return Err(Error::invalid(format!("backend POSIX: queue_depth = {queue_depth} is outside 1..=4096")));
        }
        let threads: usize = p.parse(NAME, "threads")?;
        if !(1..=1024).contains(&threads) {
            return Err(Error::invalid(format!("backend POSIX: threads = {threads} is outside 1..=1024")));
        }
        let max_io = p.parse_size(NAME, "max_io_size")?;
        if !(4096..=storage::MAX_OP_LEN).contains(&max_io) || max_io % 4096 != 0 {
            return Err(Error::invalid(format!(
                "backend POSIX: max_io_size = {max_io} must be a multiple of 4096 between 4K and 1G"
            )));
        }
        let sqpoll = p.parse_bool(NAME, "sqpoll")?;
        let queue_bytes = match p.parse_size(NAME, "queue_bytes")? {
            0 => u64::MAX,
            b => b,
        };
        let busy_poll_us: u64 = p.parse(NAME, "busy_poll_us")?;
        if busy_poll_us > 1_000_000 {
            return Err(Error::invalid(format!("backend POSIX: busy_poll_us = {busy_poll_us} is outside 0..=1000000")));
        }
        let busy_poll = Duration::from_micros(busy_poll_us);
        Ok(Config { engine: EngineSpec { kind: engine, queue_depth, queue_bytes, threads, sqpoll, busy_poll }, max_io })
    }
}

#[derive(Debug)]
struct Inner {
    agent: Arc<str>,
    notifs: NotifSink,
    table: RwLock<FileTable>,
    engine: Arc<dyn Engine>,
    max_io: u64,
    /// How long `wait` polls before it sleeps.
    busy_poll: Duration,
}

/// The POSIX backend instance of one agent.
#[derive(Debug)]
pub struct PosixBackend {
    inner: Arc<Inner>,
    params: Params,
}

impl PosixBackend {
    /// The engine in use: `uring` or `threads`.
    pub fn engine(&self) -> &'static str {
        self.inner.engine.name()
    }
}

impl Backend for PosixBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            mem_types: vec![MemType::Dram, MemType::File, MemType::Block],
            local: true,
            remote: false,
            notifications: false,
            rank: 20,
        }
    }

    fn params(&self) -> Params {
        self.params.clone()
    }

    fn register(&self, region: &Region) -> Result<Vec<u8>> {
        match region.mem_type {
            // DRAM needs nothing: the agent checks local memory, the kernel reads it.
            MemType::Dram => Ok(Vec::new()),
            MemType::File | MemType::Block => {
                self.inner.table.write().register(&region.as_file())?;
                Ok(Vec::new())
            }
            other => Err(Error::not_supported(format!("POSIX moves DRAM, FILE and BLOCK, not {other}"))),
        }
    }

    fn deregister(&self, region: &Region) -> Result<()> {
        match region.mem_type {
            MemType::File | MemType::Block => self.inner.table.write().deregister(&region.as_file()),
            _ => Ok(()),
        }
    }

    fn load_remote(&self, _peer: &PeerInfo) -> Result<()> {
        // Nothing to load: POSIX serves this agent's own files only.
        Ok(())
    }

    fn unload_remote(&self, _peer: &str) {}

    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn BackendXfer>> {
        if !plan.loopback {
            return Err(Error::not_supported(format!(
                "POSIX moves bytes between this agent's DRAM and its own files; '{}' is another agent (use a network backend)",
                plan.peer
            )));
        }
        if plan.local_mem != MemType::Dram || !matches!(plan.remote_mem, MemType::File | MemType::Block) {
            return Err(Error::not_supported(format!(
                "POSIX moves DRAM ↔ FILE and DRAM ↔ BLOCK, not {} ↔ {}",
                plan.local_mem, plan.remote_mem
            )));
        }
        let entries = plan.segments.iter().map(|s| storage::Entry {
            key: s.remote_key,
            offset: s.remote_addr,
            len: s.len,
            buf: s.local_addr,
        });
        let opts = storage::PlanOpts { naming: storage::Naming::POSIX, max_io: self.inner.max_io };
        let planned = storage::plan(&self.inner.table.read(), plan.op, entries, opts)?;
        // Only the keys are kept: each post looks the files up again, so a
        // request never holds a deregistered file open.
        let keys = planned.files().iter().map(|f| (f.key, f.first)).collect();
        let batch = planned.batch().clone();
        Ok(Box::new(PosixXfer {
            inner: self.inner.clone(),
            mem: plan.remote_mem,
            keys,
            batch,
            job: None,
            notif: None,
            poll_left: Duration::ZERO,
        }))
    }

    fn send_notification(&self, _peer: &str, _msg: &[u8]) -> Result<()> {
        Err(Error::not_supported("POSIX does not send notifications"))
    }

    fn query_mem(&self, mem_type: MemType, desc: &RegDesc) -> Result<Option<FileInfo>> {
        match mem_type {
            MemType::File | MemType::Block => storage::query(desc),
            other => Err(Error::not_supported(format!("POSIX queries FILE and BLOCK descriptors, not {other}"))),
        }
    }
}

/// One prepared POSIX transfer.
#[derive(Debug)]
struct PosixXfer {
    inner: Arc<Inner>,
    mem: MemType,
    /// The file regions the I/Os use (index = `IoOp::file`), with the first segment on each.
    keys: Vec<(AccessKey, u32)>,
    batch: IoBatch,
    job: Option<Arc<Job>>,
    /// The notification to deliver to this agent after the data.
    notif: Option<Vec<u8>>,
    /// Polling left to this posting's first wait (`busy_poll_us`): later
    /// waits, such as the short slices of a long `Request::wait`, sleep.
    poll_left: Duration,
}

impl PosixXfer {
    fn outcome(&mut self) -> Result<XferState> {
        let Some(job) = &self.job else {
            return Err(Error::invalid("POSIX: the transfer was never posted"));
        };
        super::local_outcome(job.outcome(), &self.inner.notifs, &self.inner.agent, &mut self.notif)
    }
}

impl BackendXfer for PosixXfer {
    fn post(&mut self, notif: Option<&[u8]>) -> Result<XferState> {
        if let Some(job) = &self.job {
            if job.outcome().is_none() {
                return Err(Error::new(ErrorKind::RepostActive, "POSIX: the transfer is still in flight"));
            }
        }
        let files = {
            let table = self.inner.table.read();
            self.keys
                .iter()
                .map(|(k, seg)| {
                    table.region(k).map(|r| r.file.clone()).ok_or_else(|| {
                        Error::not_found(format!(
                            "POSIX: the {} region of segment {seg} was deregistered after this request was created; register it again and create a new request",
                            self.mem
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?
        };
        let job = Job::new(self.batch.clone(), files)?;
        self.notif = notif.map(<[u8]>::to_vec);
        self.inner.engine.submit(job.clone())?;
        self.job = Some(job);
        self.poll_left = self.inner.busy_poll;
        Ok(XferState::InProgress)
    }

    fn poll(&mut self) -> Result<XferState> {
        self.outcome()
    }

    fn poll_for(&mut self, timeout: Duration) -> Result<XferState> {
        if let Some(job) = &self.job {
            job.wait(timeout, std::mem::take(&mut self.poll_left));
        }
        self.outcome()
    }

    fn cancel(&mut self) {
        if let Some(job) = &self.job {
            job.cancel();
        }
    }
}

impl Drop for PosixXfer {
    fn drop(&mut self) {
        self.cancel();
    }
}
