//! SHM between two processes against single-thread memcpy, in one run.
//!
//! `cargo bench -p kvferry --bench shm` (release profile). The bench starts
//! its own peer process (this binary again, with `KVFERRY_SHM_BENCH_PEER`
//! set), which registers 64 MiB and publishes its metadata on stdout.
//! Every figure is the median of `RUNS` samples; memcpy is measured in the
//! same process between two 64 MiB buffers, like `memcpy_bw.c`.
//!
//! Workloads: 64 MiB WRITE and READ (one descriptor), 4 KiB WRITE latency,
//! 4096 descriptors of 16 KiB WRITE and READ scattered on the remote side (a
//! permutation: nothing merges), and the same contiguous (merged into one).
//! Both buffers are memfd-backed `AlignedBuf`s, so SHM takes its mapped path
//! (memcpy); a second initiator agent with `map=false` measures cross-memory
//! attach on the same workloads for comparison. memcpy split over two
//! threads is measured too, to tell whether splitting a large copy pays here.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvferry::{Agent, AgentConfig, AlignedBuf, MemType, Params, Request, XferDesc, XferDescList, XferOp, XferState};

const PEER_ENV: &str = "KVFERRY_SHM_BENCH_PEER";
const SIZE: usize = 64 << 20;
const BLOCK: usize = 16 << 10;
const BLOCKS: usize = SIZE / BLOCK;
const RUNS: usize = 7;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex")).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn peer() {
    let a = Agent::with_backends("shm-bench-target", &["SHM"]).expect("agent");
    let mut buf = AlignedBuf::new(SIZE).expect("buffer");
    buf.as_mut_slice().fill(1);
    let _r = a.register_buf(&buf).expect("register");
    println!("MD {} {}", hex(&a.local_metadata().expect("metadata")), buf.addr());
    std::io::stdout().flush().expect("stdout");
    // Serve until the initiator closes our stdin.
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

/// Posts `req` once and waits for it (SHM finishes inside post).
fn run(req: &Request) {
    if req.post(None).expect("post") == XferState::InProgress {
        req.wait(Duration::from_secs(10)).expect("wait");
    }
}

/// GB/s of `req` moving `bytes`, median of RUNS samples of `iters` posts.
fn bandwidth(req: &Request, bytes: usize, iters: usize) -> f64 {
    run(req);
    median(
        (0..RUNS)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..iters {
                    run(req);
                }
                (bytes * iters) as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .collect(),
    )
}

fn memcpy_gbps(src: &AlignedBuf, dst: &mut AlignedBuf, iters: usize) -> f64 {
    median(
        (0..RUNS)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..iters {
                    dst.as_mut_slice().copy_from_slice(src.as_slice());
                    std::hint::black_box(dst.as_mut_ptr());
                }
                (SIZE * iters) as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .collect(),
    )
}

/// memcpy of 64 MiB split in two halves, one per thread (a scoped thread per copy).
fn memcpy2_gbps(src: &AlignedBuf, dst: &mut AlignedBuf, iters: usize) -> f64 {
    median(
        (0..RUNS)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..iters {
                    let (d1, d2) = dst.as_mut_slice().split_at_mut(SIZE / 2);
                    let (s1, s2) = src.as_slice().split_at(SIZE / 2);
                    std::thread::scope(|sc| {
                        sc.spawn(|| d2.copy_from_slice(s2));
                        d1.copy_from_slice(s1);
                    });
                    std::hint::black_box(dst.as_mut_ptr());
                }
                (SIZE * iters) as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .collect(),
    )
}

fn main() {
    if std::env::var_os(PEER_ENV).is_some() {
        return peer();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .env(PEER_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the peer");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("peer metadata");
    let mut w = line.trim().strip_prefix("MD ").expect("MD line").split(' ');
    let md = unhex(w.next().expect("metadata"));
    let raddr: u64 = w.next().expect("address").parse().expect("address");

    let a = Agent::with_backends("shm-bench-init", &["SHM"]).expect("agent");
    let mut buf = AlignedBuf::new(SIZE).expect("buffer");
    buf.as_mut_slice().fill(2);
    let _r = a.register_buf(&buf).expect("register");
    a.load_remote_metadata(&md).expect("load peer");
    let peer = "shm-bench-target";
    let remote = |offsets: &mut dyn Iterator<Item = usize>, len: usize| {
        XferDescList::from_descs(
            MemType::Dram,
            offsets.map(|o| XferDesc::new(raddr + o as u64, len as u64, 0)).collect(),
        )
    };

    let mut dst = AlignedBuf::new(SIZE).expect("buffer");
    dst.as_mut_slice().fill(3);
    let memcpy = memcpy_gbps(&buf, &mut dst, 16);
    let memcpy2 = memcpy2_gbps(&buf, &mut dst, 16);
    drop(dst);

    let whole_l = buf.xfer_blocks(0, SIZE, 1).expect("descs");
    let whole_r = remote(&mut std::iter::once(0), SIZE);
    let w64 = a.create_request(XferOp::Write, &whole_l, &whole_r, peer, None).expect("request");
    let r64 = a.create_request(XferOp::Read, &whole_l, &whole_r, peer, None).expect("request");
    assert_eq!(w64.data_path(), Some(kvferry::DataPath::Mapped));
    let write64 = bandwidth(&w64, SIZE, 16);
    let read64 = bandwidth(&r64, SIZE, 16);

    let small_l = buf.xfer_blocks(0, 4096, 1).expect("descs");
    let small_r = remote(&mut std::iter::once(0), 4096);
    let w4k = a.create_request(XferOp::Write, &small_l, &small_r, peer, None).expect("request");
    run(&w4k);
    let lat = median(
        (0..RUNS)
            .map(|_| {
                let n = 100_000;
                let t = Instant::now();
                for _ in 0..n {
                    run(&w4k);
                }
                t.elapsed().as_secs_f64() / n as f64 * 1e6
            })
            .collect(),
    );

    let perm = |i: usize| (i * 1237) % BLOCKS;
    let blocks_l = buf.xfer_blocks(0, BLOCK, BLOCKS).expect("descs");
    let scattered_r = remote(&mut (0..BLOCKS).map(|i| perm(i) * BLOCK), BLOCK);
    let ws = a.create_request(XferOp::Write, &blocks_l, &scattered_r, peer, None).expect("request");
    let rs = a.create_request(XferOp::Read, &blocks_l, &scattered_r, peer, None).expect("request");
    assert_eq!(ws.segments(), BLOCKS);
    let write_sc = bandwidth(&ws, SIZE, 16);
    let read_sc = bandwidth(&rs, SIZE, 16);
    let contiguous_r = remote(&mut (0..BLOCKS).map(|i| i * BLOCK), BLOCK);
    let wc = a.create_request(XferOp::Write, &blocks_l, &contiguous_r, peer, None).expect("request");
    let write_ct = bandwidth(&wc, SIZE, 16);

    // The same through cross-memory attach: an initiator that does not map.
    let cma = Agent::new("shm-bench-cma", AgentConfig::default().with_backend("SHM", Params::new().with("map", false)))
        .expect("agent");
    let mut cbuf = AlignedBuf::new(SIZE).expect("buffer");
    cbuf.as_mut_slice().fill(4);
    let _cr = cma.register_buf(&cbuf).expect("register");
    cma.load_remote_metadata(&md).expect("load peer");
    let cw64 = cma
        .create_request(XferOp::Write, &cbuf.xfer_blocks(0, SIZE, 1).expect("descs"), &whole_r, peer, None)
        .expect("request");
    assert_eq!(cw64.data_path(), Some(kvferry::DataPath::Cma));
    let cma_write64 = bandwidth(&cw64, SIZE, 16);
    let cws = cma
        .create_request(XferOp::Write, &cbuf.xfer_blocks(0, BLOCK, BLOCKS).expect("descs"), &scattered_r, peer, None)
        .expect("request");
    let cma_write_sc = bandwidth(&cws, SIZE, 16);

    println!("SHM bench: two processes, medians of {RUNS} runs; mapped path (memcpy) unless said");
    println!("  memcpy 64 MiB (single thread, same run) {memcpy:6.2} GB/s");
    println!("  memcpy 64 MiB split over 2 threads      {memcpy2:6.2} GB/s  {:.2}x memcpy", memcpy2 / memcpy);
    println!("  64 MiB WRITE                            {write64:6.2} GB/s  {:.2}x memcpy", write64 / memcpy);
    println!("  64 MiB READ                             {read64:6.2} GB/s  {:.2}x memcpy", read64 / memcpy);
    println!("  4 KiB WRITE                             {lat:6.2} us average");
    println!("  4096x16 KiB WRITE (scattered)           {write_sc:6.2} GB/s  {:.2}x memcpy", write_sc / memcpy);
    println!("  4096x16 KiB READ  (scattered)           {read_sc:6.2} GB/s  {:.2}x memcpy", read_sc / memcpy);
    println!("  4096x16 KiB WRITE (contiguous, merged)  {write_ct:6.2} GB/s  {:.2}x memcpy", write_ct / memcpy);
    println!("  64 MiB WRITE, CMA (map=false)           {cma_write64:6.2} GB/s  {:.2}x memcpy", cma_write64 / memcpy);
    println!("  4096x16 KiB WRITE (scattered), CMA      {cma_write_sc:6.2} GB/s  {:.2}x memcpy", cma_write_sc / memcpy);

    drop(child.stdin.take());
    let _ = child.wait();
}
