//! `kvferry bench`: point-to-point and storage benchmarks, and the summary
//! run (the main job) when no subcommand is given.

use std::path::PathBuf;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use clap::Args;
use kvferry::params::parse_size;
use kvferry::{Error, Params, Request, Result, XferState};

use report::Timings;

pub mod meta;
pub mod mooncake;
pub mod obj;
pub mod p2p;
pub mod pattern;
pub mod plot;
pub mod report;
pub mod storage;
pub mod summary;

/// Flags shared by every benchmark (nixlbench's spellings accepted as aliases).
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// write or read.
    #[arg(long, alias = "op_type", alias = "operation", default_value = "write")]
    pub op: String,
    /// Block sizes to measure, e.g. 4K,64K,1M,64M.
    #[arg(long, value_delimiter = ',')]
    pub block_sizes: Vec<String>,
    /// Sweep block sizes by doubling from here (with --max-block-size).
    #[arg(long, alias = "start_block_size")]
    pub start_block_size: Option<String>,
    /// Largest block size of a doubling sweep.
    #[arg(long, alias = "max_block_size")]
    pub max_block_size: Option<String>,
    /// Descriptors per request, e.g. 1,64,4096.
    #[arg(long, value_delimiter = ',')]
    pub batch_sizes: Vec<usize>,
    /// Sweep batch sizes by doubling from here (with --max-batch-size).
    #[arg(long, alias = "start_batch_size")]
    pub start_batch_size: Option<usize>,
    /// Largest batch size of a doubling sweep.
    #[arg(long, alias = "max_batch_size")]
    pub max_batch_size: Option<usize>,
    /// Timed requests per point; 0 picks enough to move about 1 GiB (10..10000).
    #[arg(long, alias = "num_iter", default_value_t = 0)]
    pub iters: u64,
    /// Untimed requests before each point.
    #[arg(long, alias = "warmup_iter", default_value_t = 10)]
    pub warmup: u64,
    /// Threads posting at once, each on its own slice of the buffers.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Verify every byte after each point.
    #[arg(long, alias = "check_consistency")]
    pub check_consistency: bool,
    /// Run each point for this many seconds instead of a count.
    #[arg(long)]
    pub duration: Option<f64>,
    /// One JSON object per line instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write a chart of bandwidth and latency against block size here: an
    /// SVG or a PNG, told by the extension (.svg, .png).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Backend parameter NAME=VALUE (repeatable), e.g. --param lanes=4.
    #[arg(long)]
    pub param: Vec<String>,
    /// Pages of the bench buffers: shared (memfd, mappable by same-host
    /// peers) or huge (private, transparent huge pages). Default: huge for
    /// storage, shared for p2p.
    #[arg(long, value_enum)]
    pub buffer: Option<BufferKind>,
}

/// How the bench allocates its buffers (see [`kvferry::AlignedBuf`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BufferKind {
    /// `AlignedBuf::new`: a memfd that SHM peers map for plain memcpy.
    Shared,
    /// `AlignedBuf::huge`: private memory with transparent huge pages.
    Huge,
}

impl BufferKind {
    /// The flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BufferKind::Shared => "shared",
            BufferKind::Huge => "huge",
        }
    }

    /// Allocates `len` bytes of this kind, every page written (a pattern):
    /// untouched anonymous memory reads as the kernel's shared zero page, so
    /// a WRITE from it would send one cached page over and over instead of
    /// memory, flattering the figure (fio writes real buffers too).
    pub fn alloc(self, len: usize) -> Result<kvferry::AlignedBuf> {
        let mut buf = match self {
            BufferKind::Shared => kvferry::AlignedBuf::new(len)?,
            BufferKind::Huge => kvferry::AlignedBuf::huge(len)?,
        };
        pattern::fill(buf.as_mut_slice(), 0, 0x5c);
        Ok(buf)
    }
}

impl Common {
    /// The buffer kind asked for, or `default`.
    pub fn buffer_or(&self, default: BufferKind) -> BufferKind {
        self.buffer.unwrap_or(default)
    }

    /// The backend parameters given with --param.
    pub fn backend_params(&self) -> Result<Params> {
        let mut p = Params::new();
        for kv in &self.param {
            let (k, v) =
                kv.split_once('=').ok_or_else(|| Error::invalid(format!("--param '{kv}' is not NAME=VALUE")))?;
            p.set(k.trim(), v.trim());
        }
        Ok(p)
    }

    /// Timed iterations for a request of `bytes`.
    pub fn iters_for(&self, bytes: usize) -> u64 {
        if self.iters > 0 {
            self.iters
        } else {
            ((1u64 << 30) / bytes.max(1) as u64).clamp(10, 10_000)
        }
    }

    /// Prints a point as a table row or a JSON line.
    pub fn emit(&self, p: &report::Point) {
        if self.json {
            println!("{}", serde_json::to_string(p).unwrap_or_default());
        } else {
            println!("{}", report::table_row(p));
        }
    }

    /// Writes the chart if --plot was given (see [`plot::write`]).
    pub fn plot(&self, points: &[report::Point], title: &str) -> Result<()> {
        self.plot.as_deref().map_or(Ok(()), |path| plot::write(path, points, title))
    }
}

/// Runs `body(t, barrier)` on `threads` threads and merges their timings.
/// Each body waits on the barrier right before its timed loop, so all
/// threads start timing together.
pub fn run_threads(threads: usize, body: impl Fn(usize, &Barrier) -> Result<Timings> + Sync) -> Result<Timings> {
    let barrier = Barrier::new(threads);
    let results: Vec<Result<Timings>> = std::thread::scope(|scope| {
        let (body, barrier) = (&body, &barrier);
        let handles: Vec<_> = (0..threads).map(|t| scope.spawn(move || body(t, barrier))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::internal("a bench thread panicked"))))
            .collect()
    });
    let mut total = Timings::default();
    for r in results {
        total.merge(&r?);
    }
    Ok(total)
}

/// The timed loop: posts `pick(n)` until `iters` requests (or `--duration`)
/// completed, finishing each with `finish`, recording post and completion
/// times and `span` bytes per request.
pub fn timed_loop<'r>(
    c: &Common,
    iters: u64,
    span: u64,
    tm: &mut Timings,
    mut pick: impl FnMut(u64) -> &'r Request,
    finish: impl Fn(&Request) -> Result<()>,
) -> Result<()> {
    let start = Instant::now();
    let deadline = c.duration.map(|d| start + Duration::from_secs_f64(d));
    let mut n = 0u64;
    loop {
        let req = pick(n);
        let t0 = Instant::now();
        let st = req.post(None)?;
        tm.post.record(t0.elapsed());
        if st != XferState::Done {
            finish(req)?;
        }
        tm.complete.record(t0.elapsed());
        n += 1;
        match deadline {
            Some(d) if Instant::now() >= d => break,
            None if n >= iters => break,
            _ => {}
        }
    }
    tm.elapsed = start.elapsed();
    tm.iters = n;
    tm.bytes = n * span;
    Ok(())
}

fn size(s: &str, flag: &str) -> Result<usize> {
    parse_size(s)
        .filter(|&n| n > 0)
        .map(|n| n as usize)
        .ok_or_else(|| Error::invalid(format!("{flag} '{s}' is not a size like 4096, 64K or 1M")))
}

fn doubling(from: usize, to: usize, flag: &str) -> Result<Vec<usize>> {
    if from == 0 || from > to {
        return Err(Error::invalid(format!(
            "{flag}: the start ({from}) must be at least 1 and at most the maximum ({to})"
        )));
    }
    let mut v = vec![from];
    while let Some(n) = v.last().map(|n| n * 2).filter(|&n| n <= to) {
        v.push(n);
    }
    Ok(v)
}

/// The (block, batch) points of a sweep, from the flags.
pub fn sweep(c: &Common) -> Result<Vec<(usize, usize)>> {
    let blocks = match (&c.start_block_size, &c.max_block_size) {
        (Some(a), Some(b)) => doubling(size(a, "--start-block-size")?, size(b, "--max-block-size")?, "block sizes")?,
        (Some(_), None) | (None, Some(_)) => {
            return Err(Error::invalid("--start-block-size and --max-block-size go together"))
        }
        (None, None) if c.block_sizes.is_empty() => vec![4 << 10, 64 << 10, 1 << 20, 64 << 20],
        (None, None) => c.block_sizes.iter().map(|s| size(s, "--block-sizes")).collect::<Result<_>>()?,
    };
    let batches = match (c.start_batch_size, c.max_batch_size) {
        (Some(a), Some(b)) => doubling(a, b, "batch sizes")?,
        (Some(_), None) | (None, Some(_)) => {
            return Err(Error::invalid("--start-batch-size and --max-batch-size go together"))
        }
        (None, None) if c.batch_sizes.is_empty() => vec![1],
        (None, None) => c.batch_sizes.clone(),
    };
    if batches.contains(&0) {
        return Err(Error::invalid("--batch-sizes: a batch needs at least one descriptor"));
    }
    let mut v = Vec::new();
    for &n in &batches {
        for &b in &blocks {
            if b.checked_mul(n).is_none_or(|t| t > 4 << 30) {
                return Err(Error::invalid(format!(
                    "block {b} × batch {n} needs more than 4 GiB per thread; lower one of them"
                )));
            }
            v.push((b, n));
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        c: Common,
    }

    fn common(args: &[&str]) -> Common {
        T::try_parse_from(std::iter::once("t").chain(args.iter().copied())).unwrap().c
    }

    #[test]
    fn sweeps() {
        assert_eq!(sweep(&common(&[])).unwrap().len(), 4);
        let c = common(&["--start_block_size", "4K", "--max_block_size", "32K", "--batch-sizes", "1,8"]);
        let s = sweep(&c).unwrap();
        assert_eq!(s.len(), 8);
        assert_eq!(s[3], (32 << 10, 1));
        assert!(sweep(&common(&["--start-block-size", "4K"])).is_err());
        assert!(sweep(&common(&["--block-sizes", "4Q"])).unwrap_err().message().contains("4Q"));
        assert!(sweep(&common(&["--batch-sizes", "0"])).is_err());
        assert!(sweep(&common(&["--block-sizes", "1G", "--batch-sizes", "8"])).is_err());
        assert_eq!(common(&["--num_iter", "7"]).iters_for(1), 7);
        assert_eq!(common(&[]).iters_for(64 << 20), 16);
        assert!(common(&["--param", "x"]).backend_params().is_err());
    }
}
