//! `kvferry bench` with no subcommand: the main job. A short point-to-point
//! sweep over every backend that works here and a local storage sweep, then
//! one summary table with single-thread memcpy measured in the same run.

use std::path::Path;
use std::time::Instant;

use clap::Parser;
use indicatif::ProgressBar;
use kvferry::{Agent, Result};

use super::p2p::{self, Mode, P2pArgs};
use super::report::{size_str, summary_header, summary_row, Point};
use super::storage::{self, StorageArgs};
use super::Common;

/// Single-thread memcpy bandwidth of `len` bytes in GB/s (median of 5).
pub fn memcpy_gbps(len: usize) -> f64 {
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    dst.copy_from_slice(&src); // fault the pages in
    let mut v: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            len as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[2]
}

fn common(args: &[&str]) -> Common {
    #[derive(Parser)]
    struct W {
        #[command(flatten)]
        c: Common,
    }
    let argv = std::iter::once("kvferry").chain(args.iter().copied());
    W::try_parse_from(argv).expect("built-in summary flags parse").c
}

/// Runs the summary and prints its table (or JSON lines with `json`), and
/// writes its chart to `plot` when given (SVG or PNG by the extension).
pub fn run(json: bool, plot: Option<&Path>) -> Result<()> {
    super::plot::check(plot)?;
    let started = Instant::now();
    let memcpy = memcpy_gbps(64 << 20);
    let mut rows: Vec<Point> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    let plugins = Agent::available_plugins();
    let bar = p2p::spinner(json);
    p2p_rows(&plugins, &mut rows, &mut skipped, &bar)?;
    storage_rows(&plugins, &mut rows, &mut skipped, &bar);
    bar.finish_and_clear();
    if json {
        for p in &rows {
            println!("{}", serde_json::to_string(p).unwrap_or_default());
        }
    } else {
        print_table(started, memcpy, &rows, &skipped);
    }
    plot.map_or(Ok(()), |path| super::plot::write(path, &rows, "kvferry bench (summary)"))
}

/// The point-to-point rows of every memory backend this build has and this
/// machine can run (the others are named in `skipped`).
fn p2p_rows(plugins: &[String], rows: &mut Vec<Point>, skipped: &mut Vec<String>, bar: &ProgressBar) -> Result<()> {
    for backend in ["LOCAL", "SHM", "TCP"] {
        if !plugins.iter().any(|p| p == backend) {
            skipped.push(format!("{backend}: not in this build"));
            continue;
        }
        if let Err(e) = kvferry::backend::plugin(backend).and_then(|p| p.probe()) {
            skipped.push(format!("{backend}: {e}"));
            continue;
        }
        for (op, blocks, batches) in
            [("write", "4K,64K,1M,64M", "1"), ("write", "16K", "4096"), ("read", "4K,64M", "1")]
        {
            let c = common(&[
                "--op",
                op,
                "--block-sizes",
                blocks,
                "--batch-sizes",
                batches,
                "--warmup",
                "5",
                "--check-consistency",
            ]);
            let args = P2pArgs {
                mode: Mode::Loopback,
                backend: backend.to_string(),
                ip: "127.0.0.1".into(),
                port: 0,
                max_buffer: None,
                store: Default::default(),
                common: c.clone(),
            };
            let session = p2p::connect(&args, super::sweep(&c)?.iter().map(|(b, n)| b * n).max().unwrap_or(0));
            let s = match session {
                Ok(s) => s,
                Err(e) => {
                    skipped.push(format!("{backend} {op}: {e}"));
                    continue;
                }
            };
            for (block, batch) in super::sweep(&c)? {
                bar.set_message(format!("{backend} {op} {} x{batch}", size_str(block as u64)));
                let t = p2p::run_point(&s, &c, op.parse()?, block, batch)?;
                let mut p = t.point("p2p", backend, &op.to_uppercase(), None, block as u64, batch, 1, false);
                p.verified = Some(true);
                rows.push(p);
            }
        }
    }
    Ok(())
}

/// The storage rows (POSIX, O_DIRECT on a 256 MiB file).
fn storage_rows(plugins: &[String], rows: &mut Vec<Point>, skipped: &mut Vec<String>, bar: &ProgressBar) {
    if plugins.iter().any(|p| p == "POSIX") {
        for (op, block, batch, pat) in
            [("write", "1M", 64, "seq"), ("read", "1M", 64, "seq"), ("read", "4K", 64, "rand")]
        {
            let a = StorageArgs::try_parse_storage(&[
                "--op",
                op,
                "--block-size",
                block,
                "--batch-size",
                &batch.to_string(),
                "--pattern",
                pat,
                "--file-size",
                "256M",
                "--direct",
                "--iters",
                "20",
                "--warmup",
                "2",
                "--check-consistency",
            ]);
            bar.set_message(format!("POSIX {op} {block} x{batch} {pat}"));
            match storage::run_quiet(&a) {
                Ok(mut v) => rows.append(&mut v),
                Err(e) => skipped.push(format!("POSIX {op} {block}: {e}")),
            }
        }
    } else {
        skipped.push("POSIX: not in this build".into());
    }
}

fn print_table(started: Instant, memcpy: f64, rows: &[Point], skipped: &[String]) {
    println!(
        "kvferry {} summary ({:.1} s); single-thread memcpy of 64 MiB here: {memcpy:.2} GB/s",
        env!("CARGO_PKG_VERSION"),
        started.elapsed().as_secs_f64()
    );
    println!("{}", summary_header());
    for p in rows {
        println!("{}", summary_row(p));
    }
    for s in skipped {
        println!("skipped: {s}");
    }
    println!("every point verified byte for byte; details: kvferry bench p2p --help, kvferry bench storage --help");
}
