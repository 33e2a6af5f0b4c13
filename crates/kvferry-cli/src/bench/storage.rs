//! `kvferry bench storage`: DRAM ↔ FILE/BLOCK bandwidth and IOPS through the
//! POSIX backend, in the shape of fio runs (block size, batch = queue depth,
//! O_DIRECT, sequential or random offsets).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use kvferry::{
    Agent, AgentConfig, AlignedBuf, Error, MemType, RegDesc, RegDescList, Request, Result, XferDesc, XferDescList,
    XferOp, XferState,
};

use super::report::{self, Point, Timings};
use super::{pattern, Common};

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

/// Arguments of `kvferry bench storage`.
#[derive(Args, Debug, Clone)]
pub struct StorageArgs {
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
    /// Engine of the POSIX backend: auto, uring or threads.
    #[arg(long, default_value = "auto")]
    pub engine: String,
    /// Open files with O_DIRECT (bypass the page cache).
    #[arg(long)]
    pub direct: bool,
    /// seq or rand offsets.
    #[arg(long, value_enum, default_value_t = Pattern::Seq)]
    pub pattern: Pattern,
    /// Block size (alias of --block-sizes with one value).
    #[arg(long)]
    pub block_size: Option<String>,
    /// Batch size (alias of --batch-sizes with one value).
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[command(flatten)]
    pub common: Common,
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

fn run_inner(a: &StorageArgs, print: bool) -> Result<Vec<Point>> {
    if a.mode != StorageMode::Local {
        return Err(Error::not_supported(
            "remote file segments (storage --mode target/initiator/loopback) are not available in this build yet; use --mode local",
        ));
    }
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
    let op: XferOp = c.op.parse()?;
    let points = super::sweep(&c)?;
    let files = prepare_files(a, op)?;
    let mut params = c.backend_params()?;
    params.set("engine", &a.engine);
    let agent = Agent::new(
        &format!("bench-storage-{}", std::process::id()),
        AgentConfig::default().with_backend("posix", params),
    )?;
    let mut regs = RegDescList::new(MemType::File);
    for (i, f) in files.iter().enumerate() {
        let mode = if a.direct { "rw,direct" } else { "rw" };
        regs.push(RegDesc::with_meta(0, 0, i as u64 + 1, format!("{mode}:{}", f.path.display())));
    }
    let _freg = agent.register_storage(&regs, &["posix"])?;
    let max = points.iter().map(|(b, n)| b * n).max().unwrap_or(0) * c.threads.max(1);
    let buf = AlignedBuf::new(max)?;
    let _breg = agent.register_buf(&buf)?;

    let bar = super::p2p::progress(points.len(), c.json);
    if print && !c.json {
        println!("{}", report::table_header(true));
    }
    let mut out = Vec::new();
    for (block, batch) in points {
        let t = run_point(&agent, &buf, &files, &c, a.pattern, op, block, batch)?;
        let mut p = t.point(
            "storage",
            "POSIX",
            &op.to_string(),
            Some(agent.backend_params("posix")?.raw("engine").unwrap_or("?").to_string()),
            block as u64,
            batch,
            c.threads.max(1),
            true,
        );
        p.verified = c.check_consistency.then_some(true);
        if print {
            bar.suspend(|| c.emit(&p));
        }
        bar.inc(1);
        out.push(p);
    }
    bar.finish_and_clear();
    Ok(out)
}

fn lcg(x: &mut u64) -> u64 {
    *x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *x >> 17
}

#[allow(clippy::too_many_arguments)]
fn run_point(
    agent: &Agent,
    buf: &AlignedBuf,
    files: &[BenchFile],
    c: &Common,
    pat: Pattern,
    op: XferOp,
    block: usize,
    batch: usize,
) -> Result<Timings> {
    let threads = c.threads.max(1);
    let iters = c.iters_for(block * batch);
    super::run_threads(threads, |t, barrier| {
        let span = block * batch;
        let local = buf.xfer_blocks(t * span, block, batch)?;
        // Each thread owns a slice of every file; requests rotate over distinct offsets.
        let slice = files[0].size / threads as u64;
        let blocks_per_slice = (slice / block as u64).max(1);
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
                let f = ((r * batch as u64 + i) % files.len() as u64) as usize;
                remote.push(XferDesc::new(t as u64 * slice + blk * block as u64, block as u64, f as u64 + 1));
            }
            let t0 = Instant::now();
            let req = agent.create_request(op, &local, &remote, agent.name(), None)?;
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
            verify(buf, &local, last, files, op)?;
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

fn verify(
    buf: &AlignedBuf,
    local: &XferDescList,
    remote: &XferDescList,
    files: &[BenchFile],
    op: XferOp,
) -> Result<()> {
    let data = buf.as_slice();
    for (l, r) in local.iter().zip(remote.iter()) {
        let lo = (l.addr - buf.addr()) as usize;
        let mem = &data[lo..lo + l.len as usize];
        let fi = (r.dev_id - 1) as usize;
        let ok = match op {
            XferOp::Read => pattern::first_mismatch(mem, r.addr, FILE_SEED.wrapping_add(fi as u8)).is_none(),
            XferOp::Write => read_back(&files[fi].path, r.addr, r.len)? == mem,
        };
        if !ok {
            return Err(Error::new(
                kvferry::ErrorKind::Backend,
                format!("{op} verification failed at {}:{}", files[fi].path.display(), r.addr),
            ));
        }
    }
    Ok(())
}

fn read_back(path: &Path, off: u64, len: u64) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(format!("reopening {}", path.display()), e))?;
    let mut v = vec![0u8; len as usize];
    f.read_exact_at(&mut v, off).map_err(|e| Error::io(format!("reading back {}", path.display()), e))?;
    Ok(v)
}
