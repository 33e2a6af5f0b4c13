//! TCP backend bench between two processes on loopback, against iperf3.
//!
//! `cargo bench -p kvferry --bench tcp` (release). It re-executes itself as
//! the target process, then measures, as medians of `KVF_BENCH_RUNS` runs
//! (default 5): 64 MiB WRITE and READ bandwidth, 4 KiB WRITE round trip, and
//! a request of 4096 scattered 16 KiB descriptors; then a single-stream
//! `iperf3` on 127.0.0.1 for the ratio, when iperf3 is installed.
//! `KVF_BENCH_LANES` sets the lanes parameter (default: the plugin default).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvferry::{Agent, AgentConfig, AlignedBuf, MemType, Params, XferDesc, XferDescList, XferOp};

const BUF: usize = 128 << 20;
const BIG: usize = 64 << 20;

fn params() -> Params {
    let mut p = Params::new();
    if let Ok(l) = std::env::var("KVF_BENCH_LANES") {
        p.set("lanes", l);
    }
    if let Ok(extra) = std::env::var("KVF_BENCH_PARAMS") {
        for kv in extra.split(',').filter(|s| !s.is_empty()) {
            if let Some((k, v)) = kv.split_once('=') {
                p.set(k, v);
            }
        }
    }
    p
}

fn target() {
    let agent =
        Agent::new("bench-target", AgentConfig::default().with_listener(0).with_backend("TCP", params())).unwrap();
    let buf = AlignedBuf::new(BUF).unwrap();
    let _r = agent.register_buf(&buf).unwrap();
    println!("READY {} {}", agent.listen_port().unwrap(), buf.addr());
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time_req(req: &kvferry::Request, iters: usize) -> Duration {
    let t0 = Instant::now();
    for _ in 0..iters {
        req.post(None).unwrap();
        req.wait(Duration::from_secs(60)).unwrap();
    }
    t0.elapsed()
}

fn iperf3() -> Option<f64> {
    let mut srv = Command::new("iperf3")
        .args(["-s", "-1", "-p", "5299"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("iperf3").args(["-c", "127.0.0.1", "-p", "5299", "-t", "3", "-f", "g"]).output().ok()?;
    let _ = srv.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("receiver"))?;
    let w: Vec<&str> = line.split_whitespace().collect();
    let i = w.iter().position(|x| *x == "Gbits/sec")?;
    w[i - 1].parse::<f64>().ok().map(|gbit| gbit / 8.0)
}

fn main() {
    if std::env::var("KVF_BENCH_ROLE").as_deref() == Ok("target") {
        return target();
    }
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` probes bench binaries; nothing to list.
    }
    let runs: usize = std::env::var("KVF_BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("KVF_BENCH_ROLE", "target")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines.next().unwrap().unwrap();
    let w: Vec<&str> = ready.split_whitespace().collect();
    let (port, raddr): (u16, u64) = (w[1].parse().unwrap(), w[2].parse().unwrap());

    let a = Agent::new("bench-init", AgentConfig::default().with_backend("TCP", params())).unwrap();
    a.fetch_remote_metadata("bench-target", None, kvferry::MetaPeer::addr("127.0.0.1", port).unwrap()).unwrap();
    let t0 = Instant::now();
    while !a.check_remote("bench-target", None) {
        assert!(t0.elapsed() < Duration::from_secs(10), "no metadata");
        std::thread::sleep(Duration::from_millis(2));
    }
    let buf = AlignedBuf::new(BUF).unwrap();
    let _r = a.register_buf(&buf).unwrap();
    a.make_connection("bench-target").unwrap();
    let remote = |off: usize, block: usize, n: usize| {
        let mut l = XferDescList::new(MemType::Dram);
        for i in 0..n {
            l.push(XferDesc::new(raddr + (off + i * block) as u64, block as u64, 0));
        }
        l
    };
    let lanes = a.backend_params("TCP").unwrap().raw("lanes").unwrap_or("?").to_string();
    println!("kvferry TCP bench, two processes on loopback, lanes={lanes}, {runs} runs (medians)");

    let mut results = Vec::new();
    for op in [XferOp::Write, XferOp::Read] {
        let req = a
            .create_request(op, &buf.xfer_blocks(0, BIG, 1).unwrap(), &remote(0, BIG, 1), "bench-target", None)
            .unwrap();
        time_req(&req, 3);
        let v: Vec<f64> = (0..runs).map(|_| (10 * BIG) as f64 / time_req(&req, 10).as_secs_f64() / 1e9).collect();
        let m = median(v.clone());
        println!("64 MiB {op:<5}: {m:6.2} GB/s  (runs: {v:.2?})");
        results.push((format!("64MiB {op}"), m));
    }
    {
        let req = a
            .create_request(
                XferOp::Write,
                &buf.xfer_blocks(0, 4096, 1).unwrap(),
                &remote(0, 4096, 1),
                "bench-target",
                None,
            )
            .unwrap();
        time_req(&req, 2000);
        let iters = 20000;
        let v: Vec<f64> = (0..runs).map(|_| time_req(&req, iters).as_secs_f64() / iters as f64 * 1e6).collect();
        println!("4 KiB WRITE round trip: {:6.1} µs average (median of runs: {v:.1?})", median(v.clone()));
    }
    for op in [XferOp::Write, XferOp::Read] {
        // 4096 descriptors of 16 KiB, remote order reversed: nothing merges.
        let (n, block) = (4096, 16 << 10);
        let mut rl = XferDescList::new(MemType::Dram);
        for i in 0..n {
            rl.push(XferDesc::new(raddr + ((n - 1 - i) * block) as u64, block as u64, 0));
        }
        let req = a.create_request(op, &buf.xfer_blocks(0, block, n).unwrap(), &rl, "bench-target", None).unwrap();
        assert_eq!(req.segments(), n);
        time_req(&req, 3);
        let v: Vec<f64> = (0..runs).map(|_| (10 * n * block) as f64 / time_req(&req, 10).as_secs_f64() / 1e9).collect();
        let m = median(v.clone());
        let single = results.iter().find(|(k, _)| *k == format!("64MiB {op}")).map(|r| r.1).unwrap_or(f64::NAN);
        println!(
            "4096 x 16 KiB {op:<5}: {m:6.2} GB/s = {:.2}x the single-descriptor 64 MiB {op} (runs: {v:.2?})",
            m / single
        );
    }
    drop(child.stdin.take());
    let _ = child.wait();
    match iperf3() {
        Some(gbs) => {
            println!("iperf3 -c 127.0.0.1 single stream: {gbs:6.2} GB/s");
            for (k, v) in &results {
                println!("  {k}: {:.2}x iperf3", v / gbs);
            }
        }
        None => println!("iperf3 not found or failed: install it (apt-get install iperf3) for the ratio"),
    }
}
