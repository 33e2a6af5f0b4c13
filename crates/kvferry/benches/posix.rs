//! POSIX backend against `fio` on the same file, in the same run.
//!
//! ```text
//! cargo bench -p kvferry --bench posix
//! KVFERRY_BENCH_DIR=/var/tmp/kvb KVFERRY_BENCH_RUNS=7 KVFERRY_BENCH_MB=256 cargo bench -p kvferry --bench posix
//! ```
//!
//! Workloads (all O_DIRECT, one file of `KVFERRY_BENCH_MB` MiB):
//! - WRITE and READ of 1 MiB blocks, a batch of (size / 1 MiB) descriptors,
//!   queue depth 256; fio: `--bs=1M --iodepth=256 --direct=1 --ioengine=io_uring`.
//! - 4 KiB random READ of every block once, queue depth 64; fio:
//!   `--rw=randread --bs=4k --iodepth=64`.
//!
//! `KVFERRY_BENCH_ONLY=seq|rand` runs one kind of workload,
//! `KVFERRY_BENCH_ENGINES=uring|threads` one engine, `KVFERRY_BENCH_RING=64`
//! makes the random reads reuse 64 DRAM pages as fio does (default: every
//! read has its own page, as KV-cache blocks do).
//!
//! kvferry and fio runs alternate so that drift on a shared machine hits both;
//! medians are compared. fio is skipped (loudly) when it is not installed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kvferry::{
    Agent, AgentConfig, AlignedBuf, MemType, Params, RegDesc, RegDescList, Request, XferDesc, XferDescList, XferOp,
};

const MIB: u64 = 1 << 20;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs fio and returns (bytes/s, IOPS) of the job's direction.
fn fio(file: &Path, rw: &str, bs: &str, depth: u32, size_mb: u64) -> Option<(f64, f64)> {
    let out = Command::new("fio")
        .args([
            "--name=kvferry-ref",
            &format!("--filename={}", file.display()),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={depth}"),
            "--direct=1",
            "--ioengine=io_uring",
            &format!("--size={size_mb}M"),
            "--minimal",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = line.trim().split(';').collect();
    // Terse v3: read bw (KiB/s) and IOPS at 6 and 7, write at 47 and 48.
    let (bw, iops) = if rw.contains("write") { (47, 48) } else { (6, 7) };
    let bw: f64 = f.get(bw)?.parse().ok()?;
    let iops: f64 = f.get(iops)?.parse().ok()?;
    Some((bw * 1024.0, iops))
}

struct Setup {
    agent: Agent,
    _regs: Vec<kvferry::Registration>,
    buf: AlignedBuf,
}

fn setup(name: &str, params: Params, file: &Path, size: u64) -> Setup {
    let agent = Agent::new(name, AgentConfig { backends: vec![("POSIX".into(), params)], ..AgentConfig::default() })
        .expect("POSIX backend");
    let buf = AlignedBuf::new(size as usize).expect("buffer");
    let mut regs = vec![agent.register_buf(&buf).expect("register DRAM")];
    let files = RegDescList::from_descs(
        MemType::File,
        vec![RegDesc::with_meta(0, 0, 1, format!("rw,direct,create:{}", file.display()))],
    );
    regs.push(agent.register_storage(&files, &[]).expect("register file"));
    Setup { agent, _regs: regs, buf }
}

fn timed(req: &Request) -> Duration {
    let t = Instant::now();
    req.post(None).expect("post");
    req.wait(Duration::from_secs(120)).expect("transfer");
    t.elapsed()
}

fn main() {
    let dir = PathBuf::from(std::env::var("KVFERRY_BENCH_DIR").unwrap_or_else(|_| "/var/tmp/kvferry-bench".into()));
    let runs = env_or("KVFERRY_BENCH_RUNS", 5) as usize;
    let size_mb = env_or("KVFERRY_BENCH_MB", 256);
    let size = size_mb * MIB;
    std::fs::create_dir_all(&dir).expect("bench dir");
    let file = dir.join("posix-bench.dat");
    let have_fio = Command::new("fio").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have_fio {
        eprintln!("\n!!!!!!!! fio is not installed: no reference figures (apt-get install fio) !!!!!!!!\n");
    }
    println!("file {} ({size_mb} MiB), {runs} runs each, medians; O_DIRECT everywhere", file.display());

    let only = std::env::var("KVFERRY_BENCH_ONLY").unwrap_or_default();
    let engines: Vec<&str> = match std::env::var("KVFERRY_BENCH_ENGINES") {
        Ok(v) if v == "uring" => vec!["uring"],
        Ok(v) if v == "threads" => vec!["threads"],
        _ => vec!["uring", "threads"],
    };
    for engine in engines {
        // 1 MiB blocks, batch of size/1MiB, depth 256.
        if only != "rand" {
            let p = Params::new().with("engine", engine).with("queue_depth", 256).with("threads", 16);
            let s = setup(&format!("bench-seq-{engine}"), p, &file, size);
            let blocks = size / MIB;
            let dram = XferDescList::from_descs(
                MemType::Dram,
                (0..blocks).map(|i| XferDesc::new(s.buf.addr() + i * MIB, MIB, 0)).collect(),
            );
            let fl =
                XferDescList::from_descs(MemType::File, (0..blocks).map(|i| XferDesc::new(i * MIB, MIB, 1)).collect());
            let name = s.agent.name().to_string();
            let w = s.agent.create_request(XferOp::Write, &dram, &fl, &name, None).expect("write request");
            let r = s.agent.create_request(XferOp::Read, &dram, &fl, &name, None).expect("read request");
            timed(&w); // lay the file out once
            for (label, req, rw) in [("WRITE 1M qd256", &w, "write"), ("READ  1M qd256", &r, "read")] {
                let (mut ours, mut theirs) = (Vec::new(), Vec::new());
                for _ in 0..runs {
                    if have_fio && engine == "uring" {
                        if let Some((bw, _)) = fio(&file, rw, "1M", 256, size_mb) {
                            theirs.push(bw / 1e9);
                        }
                    }
                    ours.push(size as f64 / timed(req).as_secs_f64() / 1e9);
                }
                report(label, engine, "GB/s", &mut ours, &mut theirs);
            }
            drop((w, r, s));
        }
        if only == "seq" {
            continue;
        }

        // 4 KiB random reads of every block once, depth 64.
        let p = Params::new().with("engine", engine).with("queue_depth", 64).with("threads", 64);
        let s = setup(&format!("bench-rand-{engine}"), p, &file, size);
        let n = size / 4096;
        let order = permutation(n as usize, 0x5eed);
        let ring = env_or("KVFERRY_BENCH_RING", n);
        let dram = XferDescList::from_descs(
            MemType::Dram,
            (0..n).map(|i| XferDesc::new(s.buf.addr() + (i % ring) * 4096, 4096, 0)).collect(),
        );
        let fl = XferDescList::from_descs(
            MemType::File,
            order.iter().map(|&b| XferDesc::new(b as u64 * 4096, 4096, 1)).collect(),
        );
        let name = s.agent.name().to_string();
        let r = s.agent.create_request(XferOp::Read, &dram, &fl, &name, None).expect("randread request");
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            if have_fio && engine == "uring" {
                if let Some((_, iops)) = fio(&file, "randread", "4k", 64, size_mb) {
                    theirs.push(iops / 1e3);
                }
            }
            ours.push(n as f64 / timed(&r).as_secs_f64() / 1e3);
        }
        report("RANDREAD 4K qd64", engine, "kIOPS", &mut ours, &mut theirs);
    }
}

/// Prints medians, and for fio runs the ratio of medians and the median of
/// per-pair ratios (each kvferry run against the fio run just before it).
fn report(label: &str, engine: &str, unit: &str, ours: &mut [f64], theirs: &mut [f64]) {
    let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" ");
    println!(
        "{label:<18} kvferry/{engine:<7}: median {:>8.2} {unit}   runs [{}]",
        median(&mut ours.to_vec()),
        fmt(ours)
    );
    if !theirs.is_empty() {
        let (m_ours, m_fio) = (median(&mut ours.to_vec()), median(&mut theirs.to_vec()));
        let mut pairs: Vec<f64> = ours.iter().zip(theirs.iter()).map(|(a, b)| a / b).collect();
        println!(
            "{label:<18} fio/io_uring     : median {m_fio:>8.2} {unit}   runs [{}]   kvferry/fio: ratio of medians {:.3}, median of paired ratios {:.3}",
            fmt(theirs),
            m_ours / m_fio,
            median(&mut pairs)
        );
    }
}

fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..n).rev() {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        v.swap(i, (x >> 33) as usize % (i + 1));
    }
    v
}
