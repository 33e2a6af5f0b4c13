//! `kvferry bench storage`: DRAM ↔ FILE/BLOCK bandwidth and IOPS through the
//! POSIX backend, in the shape of fio runs (block size, batch = queue depth,
//! O_DIRECT, sequential or random offsets); and remote file segments, as in
//! Mooncake's NVMe-oF bench: a target exports files, an initiator on another
//! process or host moves bytes to and from them over TCP. `--backend obj`
//! measures S3 objects instead (`bench/obj.rs`).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use kvferry::{
    Agent, AgentConfig, AlignedBuf, Error, MemType, RegDesc, RegDescList, Request, Result, XferDesc, XferDescList,
    XferOp, XferState,
};

use super::mooncake::{self, MooncakeFlags};
use super::report::{self, Point, Timings};
use super::{pattern, BufferKind, Common};
use crate::rendezvous::{self, Msg};

/// Where this process plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StorageMode {
    /// DRAM ↔ local files or block devices.
    Local,
    /// Export files to remote initiators (remote file segments).
    Target,
    /// Move bytes to or from a target's exported files.
    Initiator,
    /// Initiator plus its own target process on 127.0.0.1.
    Loopback,
}

/// Offsets within the files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Pattern {
    /// Consecutive blocks.
    Seq,
    /// Uniformly random block-aligned offsets.
    Rand,
}

impl Pattern {
    /// The flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Pattern::Seq => "seq",
            Pattern::Rand => "rand",
        }
    }
}

/// The storage backend a run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StorageBackend {
    /// Files and block devices (the POSIX backend).
    Posix,
    /// Objects of an S3-compatible store (the OBJ backend): --bucket, --endpoint.
    Obj,
}

/// Arguments of `kvferry bench storage`.
#[derive(Args, Debug, Clone)]
pub struct StorageArgs {
    /// posix (files, block devices) or obj (S3 objects; local mode only).
    #[arg(long, value_enum, default_value_t = StorageBackend::Posix)]
    pub backend: StorageBackend,
    /// Where OBJ's objects live.
    #[command(flatten)]
    pub obj: super::obj::ObjFlags,
    /// local (default), or target / initiator / loopback for remote files.
    #[arg(long, value_enum, default_value_t = StorageMode::Local)]
    pub mode: StorageMode,
    /// Files or block devices to use (comma-separated). Files are created if missing.
    #[arg(long, value_delimiter = ',')]
    pub files: Vec<PathBuf>,
    /// Directory in which to create the bench files (when --files is not given).
    #[arg(long, default_value = "/var/tmp")]
    pub dir: PathBuf,
    /// Number of files to create in --dir.
    #[arg(long, default_value_t = 1)]
    pub num_files: usize,
    /// Size of each created file (e.g. 1G).
    #[arg(long, default_value = "1G")]
    pub file_size: String,
    /// Engine of the POSIX backend: auto, uring or threads (the POSIX
    /// parameter `engine`; unset, its default applies: see `kvferry info`).
    #[arg(long)]
    pub engine: Option<String>,
    /// Open files with O_DIRECT (bypass the page cache).
    #[arg(long)]
    pub direct: bool,
    /// seq or rand offsets.
    #[arg(long, value_enum, default_value_t = Pattern::Seq)]
    pub pattern: Pattern,
    /// Target address (initiator: where to connect; target: where to listen).
    #[arg(long, default_value = "127.0.0.1")]
    pub ip: String,
    /// Target rendezvous port (0 in target mode: any free port, printed on start).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Block size (alias of --block-sizes with one value).
    #[arg(long, alias = "block_size")]
    pub block_size: Option<String>,
    /// Batch size (alias of --batch-sizes with one value).
    #[arg(long, alias = "batch_size")]
    pub batch_size: Option<usize>,
    #[command(flatten)]
    pub common: Common,
    /// Mooncake's `transfer_engine_nvmeof_generic_bench` flags.
    #[command(flatten)]
    pub mooncake: MooncakeFlags,
}

struct BenchFile {
    path: PathBuf,
    size: u64,
    created: bool,
}

impl Drop for BenchFile {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

const FILE_SEED: u8 = 0x5A;

fn prepare_files(a: &StorageArgs, op: XferOp) -> Result<Vec<BenchFile>> {
    let size = kvferry::params::parse_size(&a.file_size)
        .filter(|&s| s > 0)
        .ok_or_else(|| Error::invalid(format!("--file-size '{}' is not a size like 1G", a.file_size)))?;
    if a.files.is_empty() {
        std::fs::create_dir_all(&a.dir).map_err(|e| Error::io(format!("creating --dir {}", a.dir.display()), e))?;
    }
    let paths: Vec<(PathBuf, bool)> = if a.files.is_empty() {
        (0..a.num_files.max(1))
            .map(|i| (a.dir.join(format!("kvferry-bench-{}-{i}.dat", std::process::id())), true))
            .collect()
    } else {
        a.files.iter().map(|p| (p.clone(), !p.exists())).collect()
    };
    let mut out = Vec::new();
    for (i, (path, create)) in paths.into_iter().enumerate() {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("opening bench file {}", path.display()), e))?;
        let bf = BenchFile { path: path.clone(), size, created: create };
        let is_block =
            f.metadata().map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type())).unwrap_or(false);
        let cur = if is_block { size } else { f.metadata().map(|m| m.len()).unwrap_or(0) };
        if op == XferOp::Read || cur < size {
            // Fill with the pattern so that reads have something to check.
            let chunk = 8 << 20;
            let mut buf = vec![0u8; chunk];
            let mut off = 0u64;
            while off < size {
                let n = chunk.min((size - off) as usize);
                pattern::fill(&mut buf[..n], off, FILE_SEED.wrapping_add(i as u8));
                f.write_all_at(&buf[..n], off).map_err(|e| Error::io(format!("filling {}", path.display()), e))?;
                off += n as u64;
            }
            f.sync_all().map_err(|e| Error::io(format!("syncing {}", path.display()), e))?;
        }
        out.push(bf);
    }
    Ok(out)
}

impl StorageArgs {
    /// Parses built-in flags (for the summary run).
    pub fn try_parse_storage(args: &[&str]) -> StorageArgs {
        #[derive(clap::Parser)]
        struct W {
            #[command(flatten)]
            a: StorageArgs,
        }
        let argv = std::iter::once("kvferry").chain(args.iter().copied());
        <W as clap::Parser>::try_parse_from(argv).expect("built-in storage flags parse").a
    }
}

/// Runs without printing (JSON mode hides the table and progress).
pub fn run_quiet(a: &StorageArgs) -> Result<Vec<Point>> {
    let mut a = a.clone();
    a.common.json = true;
    run_inner(&a, false)
}

/// `kvferry bench storage`.
pub fn run(a: &StorageArgs) -> Result<Vec<Point>> {
    run_inner(a, true)
}

/// The files a run moves bytes to and from, as the initiator names them.
struct Target {
    /// The agent that owns the files (the initiator itself in local mode).
    agent: String,
    /// `(dev_id, size, pattern seed)` per file.
    files: Vec<(u64, u64, u8)>,
}

/// Everything an initiator holds for one run.
struct Session {
    agent: Agent,
    /// Twice the largest span: the second half receives read-backs.
    buf: AlignedBuf,
    target: Target,
    backend: &'static str,
    engine: String,
    _keep: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

fn sweep_flags(a: &StorageArgs) -> Common {
    let mut c = a.common.clone();
    if let Some(b) = &a.block_size {
        c.block_sizes = vec![b.clone()];
    }
    if let Some(n) = a.batch_size {
        c.batch_sizes = vec![n];
    }
    if c.block_sizes.is_empty() && c.start_block_size.is_none() {
        c.block_sizes = vec!["1M".into()];
    }
    if c.batch_sizes.is_empty() && c.start_batch_size.is_none() {
        c.batch_sizes = vec![64];
    }
    c
}

fn posix_params(a: &StorageArgs, c: &Common) -> Result<kvferry::Params> {
    let mut params = kvferry::Params::new();
    if let Some(n) = mooncake::env_num_workers()? {
        params.set("threads", n.to_string());
    }
    for (k, v) in c.backend_params()?.iter() {
        params.set(k, v);
    }
    if let Some(e) = &a.engine {
        params.set("engine", e);
    }
    Ok(params)
}

/// The flags with Mooncake's spellings and environment folded in.
fn normalized(a: &StorageArgs) -> Result<StorageArgs> {
    a.mooncake.check()?;
    let mut a = a.clone();
    a.files = mooncake::split_files(&a.files);
    a.direct |= mooncake::env_direct_io();
    Ok(a)
}

fn run_inner(a: &StorageArgs, print: bool) -> Result<Vec<Point>> {
    let a = &normalized(a)?;
    let c = sweep_flags(a);
    let op: XferOp = c.op.parse()?;
    if a.backend == StorageBackend::Obj && a.mode != StorageMode::Local {
        return Err(Error::invalid(
            "--backend obj runs in --mode local: the agent moves its own DRAM to and from the store",
        ));
    }
    if a.mode == StorageMode::Target {
        return run_target(a, &c, op).map(|()| Vec::new());
    }
    let points = super::sweep(&c)?;
    if a.backend == StorageBackend::Obj {
        if print && !c.json {
            println!("{}", report::table_header(true));
        }
        return super::obj::run(&a.obj, &c, op, &points, print);
    }
    let max = points.iter().map(|(b, n)| b * n).max().unwrap_or(0) * c.threads.max(1);
    let s = match a.mode {
        StorageMode::Local => local_session(a, &c, op, max)?,
        _ => remote_session(a, &c, op, max)?,
    };
    let bar = super::p2p::progress(points.len(), c.json);
    if print && !c.json {
        println!("{}", report::table_header(true));
    }
    let mut out = Vec::new();
    for (block, batch) in points {
        let t = run_point(&s, &c, a.pattern, op, block, batch)?;
        let mut p = t.point(
            "storage",
            s.backend,
            &op.to_string(),
            Some(s.engine.clone()),
            block as u64,
            batch,
            c.threads.max(1),
            true,
        );
        p.verified = c.check_consistency.then_some(true);
        p.pattern = Some(a.pattern.as_str().to_string());
        if print {
            bar.suspend(|| c.emit(&p));
        }
        bar.inc(1);
        out.push(p);
    }
    bar.finish_and_clear();
    if print && !c.json {
        println!("{}", a.mooncake.completed_line(&out)?);
    }
    Ok(out)
}

fn local_session(a: &StorageArgs, c: &Common, op: XferOp, max: usize) -> Result<Session> {
    let files = prepare_files(a, op)?;
    let agent = Agent::new(
        &format!("bench-storage-{}", std::process::id()),
        AgentConfig::env_defaults().with_backend("posix", posix_params(a, c)?),
    )?;
    let mut regs = RegDescList::new(MemType::File);
    for (i, f) in files.iter().enumerate() {
        let mode = if a.direct { "rw,direct" } else { "rw" };
        regs.push(RegDesc::with_meta(0, 0, i as u64 + 1, format!("{mode}:{}", f.path.display())));
    }
    let freg = agent.register_storage(&regs, &["posix"])?;
    let buf = c.buffer_or(BufferKind::Huge).alloc(max * 2)?;
    let breg = agent.register_buf(&buf)?;
    let target = Target {
        agent: agent.name().to_string(),
        files: files.iter().enumerate().map(|(i, f)| (i as u64 + 1, f.size, FILE_SEED.wrapping_add(i as u8))).collect(),
    };
    let engine = agent.backend_params("posix")?.raw("engine").unwrap_or("?").to_string();
    Ok(Session {
        agent,
        buf,
        target,
        backend: "POSIX",
        engine,
        _keep: vec![Box::new(breg), Box::new(freg), Box::new(files)],
    })
}

/// Exports the files and serves one initiator over TCP (remote file segments).
fn run_target(a: &StorageArgs, c: &Common, op: XferOp) -> Result<()> {
    let files = prepare_files(a, op)?;
    let name =
        a.mooncake.local_server_name.clone().unwrap_or_else(|| format!("bench-storage-target-{}", std::process::id()));
    let config = AgentConfig::env_defaults()
        .with_backend("posix", posix_params(a, c)?)
        .with_backend("tcp", kvferry::Params::new());
    let agent = Agent::new(&name, a.mooncake.with_store(config)?)?;
    for f in &files {
        agent.register_local_file(&f.path, f.size, a.direct)?;
    }
    if a.mooncake.metadata_server.is_some() {
        return serve_published(&agent);
    }
    let listener = rendezvous::listen(&a.ip, a.port)?;
    let addr = listener.local_addr().map_err(|e| Error::io("rendezvous: local address", e))?;
    println!("KVFERRY-TARGET listening on {addr}");
    // Only an initiator with the agent's token (KVFERRY_AUTH_TOKEN) is
    // served; others are refused while the target keeps waiting, and so is
    // one whose metadata will not load.
    loop {
        let l = listener.try_clone().map_err(|e| Error::io("rendezvous: listener", e))?;
        let (mut s, peer, hello) =
            rendezvous::accept_first(l, agent.config().auth_token.clone(), rendezvous::check_hello)?;
        let Msg::Hello { metadata, .. } = hello else {
            return Err(Error::internal("rendezvous: accepted a client that did not send Hello"));
        };
        if let Err(e) = agent.load_remote_metadata(&metadata) {
            eprintln!("rendezvous: client {peer}: {e}; waiting for another initiator");
            let _ = rendezvous::send(&mut s, &Msg::Failed(e.to_string()));
            continue;
        }
        rendezvous::send(
            &mut s,
            &Msg::Ready { metadata: agent.local_metadata()?, descs: Vec::new(), files: Vec::new() },
        )?;
        rendezvous::wait_closed(&mut s, None);
        return Ok(());
    }
}

/// Mooncake's target: publishes the agent (its exported files included)
/// to the metadata service and serves initiators until SIGINT or SIGTERM.
fn serve_published(agent: &Agent) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| Error::io("installing signal handlers", e))?;
    }
    agent.send_local_metadata(kvferry::MetaPeer::Store)?;
    println!("KVFERRY-TARGET published as {}", agent.name());
    eprintln!("bench storage: target '{}' published; serving until SIGINT or SIGTERM", agent.name());
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = agent.invalidate_local_metadata(kvferry::MetaPeer::Store);
    Ok(())
}

/// Mooncake's initiator: finds the target `--segment_id` in the metadata
/// service (in loopback mode, first starts it as a child process).
fn store_session(a: &StorageArgs, c: &Common, max: usize) -> Result<Session> {
    let mut keep: Vec<Box<dyn std::any::Any + Send + Sync>> = Vec::new();
    let url = a.mooncake.metadata_server.clone().unwrap_or_default();
    let segment = match (&a.mooncake.segment_id, a.mode) {
        (Some(s), StorageMode::Initiator) => s.clone(),
        (None, StorageMode::Initiator) => {
            return Err(Error::invalid(
                "bench storage --mode initiator --metadata_server needs --segment_id: the target's name",
            ))
        }
        (seg, _) => {
            let name = seg.clone().unwrap_or_else(|| format!("bench-storage-target-{}", std::process::id()));
            let mut argv: Vec<String> =
                ["bench", "storage", "--mode", "target", "--op", &c.op, "--local_server_name", &name]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
            argv.extend(["--metadata_server".into(), url.clone()]);
            argv.extend(target_file_args(a));
            let (published, child) = super::p2p::spawn_child_saying(&argv, "KVFERRY-TARGET published as ")?;
            keep.push(Box::new(child));
            published
        }
    };
    let agent = Agent::new(
        &format!("bench-storage-initiator-{}", std::process::id()),
        a.mooncake.with_store(AgentConfig::env_defaults().with_backend("tcp", c.backend_params()?))?,
    )?;
    let buf = c.buffer_or(BufferKind::Huge).alloc(max * 2)?;
    let breg = agent.register_buf(&buf)?;
    agent.fetch_remote_metadata(&segment, None, kvferry::MetaPeer::Store)?;
    let target = remote_target(&agent, segment)?;
    keep.insert(0, Box::new(breg));
    Ok(Session { agent, buf, target, backend: "TCP", engine: "remote".into(), _keep: keep })
}

/// The flags a loopback run hands its child target about the files to
/// export: engine, size, directory, names, O_DIRECT.
fn target_file_args(a: &StorageArgs) -> Vec<String> {
    let mut argv = Vec::new();
    if let Some(e) = &a.engine {
        argv.extend(["--engine".into(), e.clone()]);
    }
    argv.extend(["--file-size".into(), a.file_size.clone()]);
    argv.extend(["--dir".into(), a.dir.display().to_string(), "--num-files".into(), a.num_files.to_string()]);
    if !a.files.is_empty() {
        argv.push("--files".into());
        argv.push(a.files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(","));
    }
    if a.direct {
        argv.push("--direct".into());
    }
    argv
}

/// The files the loaded target `name` exports, as a run addresses them.
fn remote_target(agent: &Agent, name: String) -> Result<Target> {
    let files = agent.remote_files(&name)?;
    if files.is_empty() {
        return Err(Error::not_found(format!("storage target '{name}' exports no files")));
    }
    let files = files.iter().enumerate().map(|(i, f)| (f.id, f.size, FILE_SEED.wrapping_add(i as u8))).collect();
    Ok(Target { agent: name, files })
}

fn remote_session(a: &StorageArgs, c: &Common, _op: XferOp, max: usize) -> Result<Session> {
    if a.mooncake.metadata_server.is_some() {
        return store_session(a, c, max);
    }
    let mut keep: Vec<Box<dyn std::any::Any + Send + Sync>> = Vec::new();
    let addr = if a.mode == StorageMode::Loopback {
        let mut argv: Vec<String> =
            ["bench", "storage", "--mode", "target", "--ip", "127.0.0.1", "--port", "0", "--op", &c.op]
                .iter()
                .map(|s| s.to_string())
                .collect();
        argv.extend(target_file_args(a));
        let (addr, child) = super::p2p::spawn_child(&argv)?;
        keep.push(Box::new(child));
        addr
    } else if a.port == 0 {
        return Err(Error::invalid(
            "bench storage --mode initiator needs --port: the port the target printed (KVFERRY-TARGET listening on …)",
        ));
    } else {
        format!("{}:{}", a.ip, a.port)
    };
    let agent = Agent::new(
        &format!("bench-storage-initiator-{}", std::process::id()),
        AgentConfig::env_defaults().with_backend("tcp", c.backend_params()?),
    )?;
    let buf = c.buffer_or(BufferKind::Huge).alloc(max * 2)?;
    let breg = agent.register_buf(&buf)?;
    let mut s = rendezvous::connect_auth(&addr, Duration::from_secs(60), agent.config().auth_token.as_ref())?;
    rendezvous::send(
        &mut s,
        &Msg::Hello { backend: "tcp".into(), buf_len: 0, pattern_seed: 0, metadata: agent.local_metadata()? },
    )?;
    let Msg::Ready { metadata, .. } = rendezvous::recv(&mut s, Duration::from_secs(120))? else {
        return Err(Error::malformed("rendezvous: the storage target did not answer Ready"));
    };
    let name = agent.load_remote_metadata(&metadata)?;
    let target = remote_target(&agent, name)?;
    keep.insert(0, Box::new(breg));
    // The rendezvous closes before the child guard waits for the target to leave.
    keep.insert(0, Box::new(s));
    Ok(Session { agent, buf, target, backend: "TCP", engine: "remote".into(), _keep: keep })
}

fn lcg(x: &mut u64) -> u64 {
    *x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *x >> 17
}

fn run_point(s: &Session, c: &Common, pat: Pattern, op: XferOp, block: usize, batch: usize) -> Result<Timings> {
    let threads = c.threads.max(1);
    let iters = c.iters_for(block * batch);
    let files = &s.target.files;
    super::run_threads(threads, |t, barrier| {
        let span = block * batch;
        let local = s.buf.xfer_blocks(t * span, block, batch)?;
        // Each thread owns a slice of every file; requests rotate over distinct offsets.
        let slice = files.iter().map(|f| f.1).min().unwrap_or(0) / threads as u64;
        let blocks_per_slice = slice / block as u64;
        if blocks_per_slice == 0 {
            return Err(Error::invalid(format!(
                "files of {slice} bytes per thread cannot hold a {block}-byte block; raise --file-size"
            )));
        }
        let nreq = (blocks_per_slice / batch as u64).clamp(1, 16);
        let mut seed = 0x1234_5678 + t as u64;
        let mut reqs: Vec<(Request, XferDescList)> = Vec::new();
        let mut tm = Timings::default();
        for r in 0..nreq {
            let mut remote = XferDescList::with_capacity(MemType::File, batch);
            for i in 0..batch as u64 {
                let blk = match pat {
                    Pattern::Seq => (r * batch as u64 + i) % blocks_per_slice,
                    Pattern::Rand => lcg(&mut seed) % blocks_per_slice,
                };
                let f = &files[((r * batch as u64 + i) % files.len() as u64) as usize];
                remote.push(XferDesc::new(t as u64 * slice + blk * block as u64, block as u64, f.0));
            }
            let t0 = Instant::now();
            let req = s.agent.create_request(op, &local, &remote, &s.target.agent, None)?;
            tm.prep.record(t0.elapsed());
            reqs.push((req, remote));
        }
        for k in 0..c.warmup {
            complete(&reqs[k as usize % reqs.len()].0)?;
        }
        barrier.wait();
        super::timed_loop(
            c,
            iters,
            span as u64,
            &mut tm,
            |k| &reqs[k as usize % reqs.len()].0,
            |req| req.wait(Duration::from_secs(120)),
        )?;
        if c.check_consistency {
            let last = &reqs[(tm.iters as usize + reqs.len() - 1) % reqs.len()].1;
            verify(s, &local, last, t * span, op)?;
        }
        Ok(tm)
    })
}

fn complete(req: &Request) -> Result<()> {
    if req.post(None)? != XferState::Done {
        req.wait(Duration::from_secs(120))?;
    }
    Ok(())
}

/// READ: the blocks hold the file pattern of the offsets they came from.
/// WRITE: reading the same file ranges back gives the bytes written.
fn verify(s: &Session, local: &XferDescList, remote: &XferDescList, off: usize, op: XferOp) -> Result<()> {
    let data = s.buf.as_slice();
    let seed_of = |dev: u64| s.target.files.iter().find(|f| f.0 == dev).map(|f| f.2).unwrap_or(0);
    if op == XferOp::Write {
        let half = s.buf.len() / 2;
        let block = remote[0].len as usize;
        let scratch = s.buf.xfer_blocks(half + off, block, remote.len())?;
        complete(&s.agent.create_request(XferOp::Read, &scratch, remote, &s.target.agent, None)?)?;
        let span = block * remote.len();
        if data[half + off..half + off + span] != data[off..off + span] {
            return Err(Error::new(
                kvferry::ErrorKind::Backend,
                "WRITE verification failed: reading the files back gave other bytes",
            ));
        }
        return Ok(());
    }
    for (l, r) in local.iter().zip(remote.iter()) {
        let lo = (l.addr - s.buf.addr()) as usize;
        if pattern::first_mismatch(&data[lo..lo + l.len as usize], r.addr, seed_of(r.dev_id)).is_some() {
            return Err(Error::new(
                kvferry::ErrorKind::Backend,
                format!("READ verification failed at file {} offset {}", r.dev_id, r.addr),
            ));
        }
    }
    Ok(())
}
