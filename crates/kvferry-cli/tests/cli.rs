//! The `kvferry` command end to end: help, argument errors, short real runs
//! in each mode, JSON that parses.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kvferry_test_support::Child;

/// How long a started command may take to print its first line.
const FIRST_LINE: Duration = Duration::from_secs(60);

fn kvferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvferry")).args(args).output().expect("kvferry runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn every_command_has_help() {
    for (args, expect) in [
        (&["--help"][..], "bench"),
        (&["bench", "--help"][..], "p2p"),
        (&["bench", "p2p", "--help"][..], "--check-consistency"),
        (&["bench", "p2p", "--help"][..], "--max-buffer"),
        (&["serve", "--help"][..], "KVFERRY_AUTH_TOKEN"),
        (&["bench", "storage", "--help"][..], "--engine"),
        (&["info", "--help"][..], "--json"),
        (&["serve", "--help"][..], "--mem-size"),
    ] {
        let o = kvferry(args);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(expect), "{args:?} help lacks {expect}: {}", text(&o));
    }
}

#[test]
fn argument_errors_are_clear() {
    let o = kvferry(&["bench", "p2p", "--backend", "local", "--op", "sideways"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("expected READ or WRITE"), "{}", text(&o));
    let o = kvferry(&["bench", "p2p", "--backend", "local", "--block-sizes", "4Q"]);
    assert!(text(&o).contains("'4Q'"), "{}", text(&o));
    let o = kvferry(&["bench", "p2p", "--mode", "sideways"]);
    assert_eq!(o.status.code(), Some(2), "clap rejects unknown values");
    let o = kvferry(&["bench", "p2p", "--backend", "nosuch", "--block-sizes", "4K"]);
    assert!(text(&o).contains("available plugins"), "{}", text(&o));
    let o = kvferry(&["bench", "p2p", "--backend", "local", "--param", "bogus=1"]);
    assert!(text(&o).contains("'bogus'"), "{}", text(&o));
    let o = kvferry(&["bench", "storage", "--mode", "initiator"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("needs --port"), "{}", text(&o));
}

#[test]
fn p2p_loopback_json_parses_and_verifies() {
    let o = kvferry(&[
        "bench",
        "p2p",
        "--backend",
        "local",
        "--block-sizes",
        "4K,64K",
        "--batch-sizes",
        "1,8",
        "--num_iter",
        "20",
        "--json",
        "--check-consistency",
        "--op_type",
        "READ",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 4);
    for l in &lines {
        for k in [
            "bench",
            "backend",
            "op",
            "block_size",
            "batch_size",
            "iters",
            "bytes",
            "seconds",
            "gbps",
            "lat_us_avg",
            "lat_us_p50",
            "lat_us_p99",
            "prep_us_avg",
        ] {
            assert!(l.get(k).is_some(), "missing {k} in {l}");
        }
        assert_eq!(l["iters"], 20);
        assert_eq!(l["verified"], true);
        assert!(l["gbps"].as_f64().unwrap() > 0.0);
    }
}

/// `--buffer huge` reaches both sides (the loopback target is its own
/// process) and every byte still arrives.
#[test]
fn p2p_with_huge_page_buffers_verifies() {
    let o = kvferry(&[
        "bench",
        "p2p",
        "--backend",
        "tcp",
        "--block-sizes",
        "4K,4M",
        "--num_iter",
        "10",
        "--json",
        "--check-consistency",
        "--buffer",
        "huge",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["verified"] == true), "{lines:?}");
    let o = kvferry(&["bench", "p2p", "--buffer", "gigantic"]);
    assert!(!o.status.success() && text(&o).contains("shared"), "{}", text(&o));
}

#[test]
fn p2p_duration_table_and_plot() {
    let dir = std::env::temp_dir().join(format!("kvferry-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("bw.svg");
    let o = kvferry(&[
        "bench",
        "p2p",
        "--backend",
        "local",
        "--start-block-size",
        "4K",
        "--max-block-size",
        "16K",
        "--duration",
        "0.05",
        "--threads",
        "2",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("GB/s") && out.contains("prep p50"), "{out}");
    assert_eq!(out.lines().count(), 4, "header and three block sizes: {out}");
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.contains("LOCAL WRITE, 2 threads"), "{chart}");
    let png = dir.join("bw.png");
    let o = kvferry(&["bench", "p2p", "--backend", "local", "--block-sizes", "4K", "--plot", png.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    // A name that is neither .svg nor .png fails before the run: no table.
    let o = kvferry(&["bench", "p2p", "--backend", "local", "--block-sizes", "4K", "--plot", "bw.jpg"]);
    assert!(!o.status.success() && text(&o).contains(".svg") && text(&o).contains(".png"), "{}", text(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("GB/s"), "{}", text(&o));
    let o = kvferry(&["bench", "--plot", "summary.txt"]);
    assert!(!o.status.success() && text(&o).contains(".png"), "{}", text(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn info_reports_checks_with_hints() {
    let o = kvferry(&["info", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["plugins"].as_array().unwrap().iter().any(|p| p == "LOCAL"));
    let checks = v["checks"].as_array().unwrap();
    for what in ["io_uring", "cross-memory attach", "network namespaces", "GPU", "etcd"] {
        let c = checks.iter().find(|c| c["what"] == what).unwrap_or_else(|| panic!("no {what} check"));
        if c["ok"] == false {
            assert!(c["hint"].as_str().is_some_and(|h| !h.is_empty()), "a 'no' comes with a hint: {c}");
        }
    }
    let o = kvferry(&["info"]);
    assert!(text(&o).contains("plugin LOCAL"), "{}", text(&o));
}

#[test]
fn summary_runs() {
    let o = kvferry(&["bench"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("memcpy") && out.contains("LOCAL    WRITE"), "{out}");
}

#[test]
fn serve_answers_and_stops_on_sigterm() {
    let (mut child, line) = start(
        "serve",
        Command::new(env!("CARGO_BIN_EXE_kvferry"))
            .args(["serve", "--backends", "local", "--mem-size", "1M", "--ip", "127.0.0.1", "--port", "0"])
            .stderr(Stdio::null()),
    );
    assert!(line.starts_with("KVFERRY-TARGET listening on 127.0.0.1:"), "{line}");
    child.signal(libc::SIGTERM).unwrap();
    let st = child.exits_within(Duration::from_secs(10)).expect("serve did not stop within 10 s of SIGTERM");
    assert!(st.success(), "serve exits cleanly on SIGTERM: {st}");
}

#[test]
fn serve_exports_prometheus_metrics() {
    let (mut child, line) = start(
        "serve",
        Command::new(env!("CARGO_BIN_EXE_kvferry"))
            .args(["serve", "--backends", "tcp", "--mem-size", "1M", "--ip", "127.0.0.1", "--port", "0"])
            .args(["--metrics-port", "0"])
            .stderr(Stdio::null()),
    );
    let url = line.strip_prefix("KVFERRY-METRICS http://").unwrap_or_else(|| panic!("{line}"));
    let addr = url.trim_end_matches("/metrics");
    let (status, body) = http(addr, "GET /metrics", None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("kvferry_registered_bytes{agent=\"kvferry-target\"} 1048576"), "{body}");
    assert!(body.contains("# TYPE kvferry_loaded_peers gauge"), "{body}");
    assert_eq!(http(addr, "GET /", None).0, 404);
    child.signal(libc::SIGTERM).unwrap();
    child.exits_within(Duration::from_secs(10)).expect("serve stops on SIGTERM");
}

#[test]
fn mooncake_nvmeof_bench_flags_target_initiator_and_loopback() {
    let srv = kvferry::metadata::server::MetaServer::start("127.0.0.1:0").unwrap();
    let meta = format!("{}/metadata", srv.url());
    let dir = format!("/var/tmp/kvferry-mc-{}", std::process::id());
    std::fs::create_dir_all(&dir).unwrap();
    let seg = format!("127.0.0.1:{}", 20000 + std::process::id() % 10000);
    let files = format!("{dir}/f0 {dir}/f1");
    let (mut target, line) = start(
        "mooncake target",
        Command::new(env!("CARGO_BIN_EXE_kvferry"))
            .args(["bench", "storage", "--mode=target", &format!("--local_server_name={seg}")])
            .args([format!("--metadata_server={meta}"), "--trtype=tcp".into(), "--traddr=127.0.0.1".into()])
            .args(["--trsvcid=4420".to_string(), format!("--files={files}"), "--file-size=8M".into()])
            .stderr(Stdio::null()),
    );
    assert_eq!(line.trim(), format!("KVFERRY-TARGET published as {seg}"));
    let o = kvferry(&[
        "bench",
        "storage",
        "--mode=initiator",
        "--local_server_name=127.0.0.1:8082",
        &format!("--metadata_server={meta}"),
        "--operation=write",
        &format!("--segment_id={seg}"),
        "--batch_size=8",
        "--block_size=65536",
        "--duration=0.5",
        "--threads=1",
        "--report_unit=MB",
    ]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let row = out.lines().find(|l| l.starts_with("TCP ")).unwrap_or_else(|| panic!("{out}"));
    assert_eq!(row.split_whitespace().take(4).collect::<Vec<_>>(), ["TCP", "WRITE", "64K", "8"], "{out}");
    let done = out.lines().find(|l| l.starts_with("Test completed: duration ")).unwrap_or_else(|| panic!("{out}"));
    assert!(done.contains(", batch count ") && done.ends_with(" MB/s"), "{done}");
    assert!(std::fs::metadata(format!("{dir}/f1")).unwrap().len() >= 8 << 20, "both files were exported");
    target.signal(libc::SIGTERM).unwrap();
    assert!(target.exits_within(Duration::from_secs(10)).expect("the target stops on SIGTERM").success());
    assert!(!std::path::Path::new(&format!("{dir}/f1")).exists(), "the files it created are removed");

    // Loopback: the target is a child process, found through the store too;
    // Mooncake's environment variable turns O_DIRECT on.
    let o = Command::new(env!("CARGO_BIN_EXE_kvferry"))
        .env("MC_NVMEOF_GENERIC_DIRECT_IO", "on")
        .env("MC_NVMEOF_GENERIC_NUM_WORKERS", "4")
        .args(["bench", "storage", "--mode=loopback", &format!("--metadata_server={meta}"), "--operation=read"])
        .args([format!("--segment_id={seg}-lb"), "--batch_size=4".into(), "--block_size=4096".into()])
        .args([
            "--duration=0.3",
            "--report_unit=GiB",
            &format!("--files={dir}/g0"),
            "--file-size=4M",
            "--check-consistency",
        ])
        .output()
        .unwrap();
    let out = text(&o);
    assert!(o.status.success() && out.contains("Test completed: ") && out.contains(" GiB/s"), "{out}");
    let o = Command::new(env!("CARGO_BIN_EXE_kvferry"))
        .env("MC_NVMEOF_GENERIC_NUM_WORKERS", "many")
        .args(["bench", "storage", "--file-size=4M", "--block-size=4K", "--batch-size=1", "--iters=1"])
        .output()
        .unwrap();
    assert!(!o.status.success() && text(&o).contains("expected 1..=1024"), "{}", text(&o));
    let bad = kvferry(&["bench", "storage", "--report_unit=TB"]);
    assert!(!bad.status.success() && text(&bad).contains("expected GB, GiB, Gb or MB"), "{}", text(&bad));
    let lost = kvferry(&["bench", "storage", "--mode=initiator", "--segment_id=x"]);
    assert!(!lost.status.success() && text(&lost).contains("--segment_id needs --metadata_server"), "{}", text(&lost));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Starts `cmd` (killed when the returned handle drops) and returns it with
/// the first line it prints.
fn start(what: &str, cmd: &mut Command) -> (Child, String) {
    let mut child = Child::spawn(what, cmd, "");
    let line = child.line(FIRST_LINE);
    (child, line)
}

/// One raw HTTP request (`"METHOD /path"`) with `Connection: close`; the status and the body.
fn http(addr: &str, line: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!("{line} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 1\r\nConnection: close\r\n\r\nv");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

#[test]
fn meta_server_survives_running_out_of_file_descriptors() {
    // 64 descriptors: the server runs out long before the test does.
    let (mut srv, line) = start(
        "meta-server",
        Command::new("sh")
            .args(["-c", "ulimit -n 64 && exec \"$0\" meta-server --port 0 --header-timeout-ms 60000"])
            .arg(env!("CARGO_BIN_EXE_kvferry"))
            .stderr(Stdio::null()),
    );
    let addr = line.split_whitespace().nth(3).expect("meta-server prints its address").to_string();
    let sock: std::net::SocketAddr = addr.parse().unwrap();
    assert_eq!(http(&addr, "PUT /v1/kv/before", None).0, 200);
    // Hold idle connections until the server can accept no more (the rest
    // wait in the kernel's backlog or time out connecting).
    let mut held = Vec::new();
    for _ in 0..150 {
        match std::net::TcpStream::connect_timeout(&sock, Duration::from_millis(300)) {
            Ok(c) => held.push(c),
            Err(_) => break,
        }
    }
    assert!(held.len() > 64, "only {} connections", held.len());
    std::thread::sleep(Duration::from_millis(300));
    assert!(srv.running(), "the server exited");
    drop(held);
    // It serves again once descriptors are free, and says it ran out.
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        let (st, body) = http(&addr, "GET /v1/health", None);
        if st == 200 {
            break body;
        }
        assert!(Instant::now() < deadline, "the server never served again");
        std::thread::sleep(Duration::from_millis(100));
    };
    let v: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert!(v["accept_errors"].as_u64().unwrap() > 0, "it never ran out of descriptors: {v}");
    assert_eq!(http(&addr, "PUT /v1/kv/after", None).0, 200);
    let (st, body) = http(&addr, "GET /v1/kv/before", None);
    assert_eq!((st, body.as_str()), (200, "v"));
    srv.kill();
}

#[test]
fn p2p_target_and_initiator_find_each_other_through_the_meta_server() {
    // Every process shares the token through KVFERRY_AUTH_TOKEN.
    let token = format!("cli-token-{}", std::process::id());
    let (_srv, line) = start(
        "meta-server",
        Command::new(env!("CARGO_BIN_EXE_kvferry"))
            .args(["meta-server", "--port", "0"])
            .env("KVFERRY_AUTH_TOKEN", &token)
            .stderr(Stdio::null()),
    );
    assert!(line.contains("token required"), "{line}");
    let addr = line.split_whitespace().nth(3).expect("meta-server prints its address").to_string();
    let (st, body) = http(&addr, "PUT /v1/kv/intruder", None);
    assert_eq!(st, 401, "{body}");
    let url = format!("http://{addr}");
    let job = format!("cli-{}", std::process::id());
    let flags = ["--backend", "tcp", "--job", &job, "--block-sizes", "4K,64K", "--metadata-url", &url];
    let mut target = Child::spawn(
        "the target",
        Command::new(env!("CARGO_BIN_EXE_kvferry"))
            .args(["bench", "p2p", "--mode", "target", "--name", "cli-target"])
            .args(flags)
            .env("KVFERRY_AUTH_TOKEN", &token)
            .stderr(Stdio::null()),
        "",
    );
    let o = Command::new(env!("CARGO_BIN_EXE_kvferry"))
        .args(["bench", "p2p", "--mode", "initiator", "--json", "--check-consistency", "--num_iter", "20"])
        .args(flags)
        .env("KVFERRY_AUTH_TOKEN", &token)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["verified"] == true && l["backend"] == "TCP"));
    // The target leaves once its initiator is done.
    let st =
        target.exits_within(Duration::from_secs(15)).expect("the target did not leave after the initiator finished");
    assert!(st.success(), "target exit status {st}");
}

#[test]
fn p2p_target_and_initiator_over_ip_and_port() {
    let (_t, line) = start(
        "the target",
        Command::new(env!("CARGO_BIN_EXE_kvferry"))
            .args(["bench", "p2p", "--mode", "target", "--backend", "tcp", "--ip", "127.0.0.1", "--port", "0"])
            .stderr(Stdio::null()),
    );
    let port = line.trim().rsplit(':').next().unwrap().to_string();
    let o = kvferry(&[
        "bench",
        "p2p",
        "--mode",
        "initiator",
        "--backend",
        "tcp",
        "--ip",
        "127.0.0.1",
        "--port",
        &port,
        "--block-sizes",
        "4K,1M",
        "--batch-sizes",
        "1,16",
        "--num_iter",
        "10",
        "--check-consistency",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with("TCP")).count(), 4);
}

#[test]
fn bench_meta_reports_every_way() {
    let o = kvferry(&["bench", "meta", "--regions", "100", "--iters", "3", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let ways: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["way"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ways, ["in-memory", "peer-to-peer", "meta-server"]);
}

#[test]
fn serve_publishes_to_the_store_and_serves_transfers() {
    use kvferry::{Agent, AgentConfig, AlignedBuf, MetaPeer, Params, XferDescList, XferOp};
    let srv = kvferry::metadata::server::MetaServer::start("127.0.0.1:0").unwrap();
    let name = format!("serve-{}", std::process::id());
    let dir = format!("/var/tmp/kvferry-serve-{}", std::process::id());
    std::fs::create_dir_all(&dir).unwrap();
    let exported = format!("{dir}/exported.bin");
    let (_serve, line) = start(
        "serve",
        Command::new(env!("CARGO_BIN_EXE_kvferry"))
            .args([
                "serve",
                "--name",
                &name,
                "--backends",
                "posix,tcp",
                "--mem-size",
                "1M",
                "--ip",
                "127.0.0.1",
                "--port",
                "0",
            ])
            .args(["--listen-port", "0", "--metadata-url", &srv.url(), "--files", &exported, "--file-size", "1M"])
            .stderr(Stdio::null()),
    );
    assert!(line.contains("metadata listener on port") && line.contains("published"), "{line}");
    let me = Agent::new(
        &format!("serve-client-{}", std::process::id()),
        AgentConfig::default().with_metadata_url(srv.url()).with_backend("tcp", Params::new()),
    )
    .unwrap();
    me.fetch_remote_metadata(&name, None, MetaPeer::Store).unwrap();
    let descs = me.store().unwrap().get(&format!("/kvferry/serve/{name}/descs"), Duration::from_secs(5)).unwrap();
    let remote = XferDescList::from_bytes(&descs).unwrap();
    let mut buf = AlignedBuf::new(8192).unwrap();
    buf.as_mut_slice()[..4096].fill(0x5e);
    let _r = me.register_buf(&buf).unwrap();
    let far =
        XferDescList::from_descs(kvferry::MemType::Dram, vec![kvferry::XferDesc::new(remote[0].addr + 4096, 4096, 0)]);
    let w = me.create_request(XferOp::Write, &buf.xfer_blocks(0, 4096, 1).unwrap(), &far, &name, None).unwrap();
    w.post(None).unwrap();
    w.wait(Duration::from_secs(10)).unwrap();
    let r = me.create_request(XferOp::Read, &buf.xfer_blocks(4096, 4096, 1).unwrap(), &far, &name, None).unwrap();
    r.post(None).unwrap();
    r.wait(Duration::from_secs(10)).unwrap();
    assert!(buf.as_slice()[4096..].iter().all(|&b| b == 0x5e));

    // The served file is exported: WRITE into it, and find the bytes on disk.
    let files = me.remote_files(&name).unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].size, 1 << 20);
    let in_file =
        XferDescList::from_descs(kvferry::MemType::File, vec![kvferry::XferDesc::new(8192, 4096, files[0].id)]);
    let w = me.create_request(XferOp::Write, &buf.xfer_blocks(0, 4096, 1).unwrap(), &in_file, &name, None).unwrap();
    w.post(None).unwrap();
    w.wait(Duration::from_secs(10)).unwrap();
    let on_disk = std::fs::read(&exported).unwrap();
    assert!(on_disk[8192..12288].iter().all(|&b| b == 0x5e));
    drop(_serve);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn storage_local_and_remote_file_segments_across_processes() {
    let dir = format!("/var/tmp/kvferry-cli-st-{}", std::process::id());
    std::fs::create_dir_all(&dir).unwrap();
    for (mode, op, extra) in [
        ("local", "write", &["--engine", "threads"][..]),
        ("local", "read", &["--direct", "--buffer", "shared"][..]),
        ("loopback", "write", &[][..]),
        ("loopback", "read", &["--direct", "--pattern", "rand"][..]),
    ] {
        let o = kvferry(
            &[
                &[
                    "bench",
                    "storage",
                    "--mode",
                    mode,
                    "--op",
                    op,
                    "--dir",
                    &dir,
                    "--file-size",
                    "8M",
                    "--num-files",
                    "2",
                ][..],
                &["--block-sizes", "4K,64K", "--batch-size", "8", "--iters", "20", "--json", "--check-consistency"][..],
                extra,
            ]
            .concat(),
        );
        assert!(o.status.success(), "{mode} {op}: {}", text(&o));
        let lines: Vec<serde_json::Value> =
            String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{mode} {op}");
        for l in lines {
            assert_eq!(l["verified"], true);
            assert!(l["iops"].as_f64().unwrap() > 0.0);
            assert_eq!(l["backend"], if mode == "local" { "POSIX" } else { "TCP" });
        }
    }
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "bench files are removed afterwards: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Hand-written rendezvous frames (a 4-byte length, then postcard): what a
/// hostile client sends, without kvferry's own initiator.
mod raw {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    fn varint(mut n: u64, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn bytes(b: &[u8], out: &mut Vec<u8>) {
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }

    fn frame(body: Vec<u8>) -> Vec<u8> {
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend(body);
        f
    }

    /// `Msg::Auth(token)`.
    pub fn auth(token: &[u8]) -> Vec<u8> {
        let mut b = vec![3];
        bytes(token, &mut b);
        frame(b)
    }

    /// `Msg::Hello { backend, buf_len, pattern_seed, metadata }`.
    pub fn hello(backend: &str, buf_len: u64, metadata: &[u8]) -> Vec<u8> {
        let mut b = vec![0];
        bytes(backend.as_bytes(), &mut b);
        varint(buf_len, &mut b);
        b.push(0xA5);
        bytes(metadata, &mut b);
        frame(b)
    }

    /// Reads one answer: `Ok(())` for `Ready`, `Err(message)` for `Failed`.
    pub fn answer(s: &mut TcpStream, timeout: Duration) -> Result<(), String> {
        s.set_read_timeout(Some(timeout)).unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).map_err(|e| format!("no answer: {e}"))?;
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut body).map_err(|e| format!("short answer: {e}"))?;
        match body[0] {
            1 => Ok(()),
            2 => Err(String::from_utf8_lossy(&body[2..]).into_owned()),
            v => Err(format!("unexpected variant {v}")),
        }
    }

    /// Connects to `addr` and sends `frames`.
    pub fn send(addr: &str, frames: &[Vec<u8>]) -> TcpStream {
        send_from(std::net::Ipv4Addr::LOCALHOST, addr, frames)
    }

    /// Connects to `addr` from source address `src` (another loopback
    /// address stands for another host) and sends `frames`.
    pub fn send_from(src: std::net::Ipv4Addr, addr: &str, frames: &[Vec<u8>]) -> TcpStream {
        let mut s = kvferry_test_support::connect_from(src, addr.parse().unwrap());
        for f in frames {
            s.write_all(f).unwrap();
        }
        s
    }
}

#[test]
fn serve_rendezvous_speaks_the_token_and_serves_many_at_once_within_a_deadline() {
    let (_serve, line) = start(
        "serve",
        Command::new(env!("CARGO_BIN_EXE_kvferry"))
            .args(["serve", "--backends", "tcp", "--mem-size", "1M", "--ip", "127.0.0.1", "--port", "0"])
            .env("KVFERRY_AUTH_TOKEN", "s3cret")
            .stderr(Stdio::null()),
    );
    assert!(line.contains("auth token required"), "{line}");
    let addr = line.split_whitespace().nth(3).unwrap().to_string();
    // An attacker on 127.0.0.1 holds eight connections without sending a
    // byte (its per-address share); a ninth is refused at once.
    let idle: Vec<_> = (0..8).map(|_| raw::send(&addr, &[])).collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    let mut s = raw::send(&addr, &[]);
    let e = raw::answer(&mut s, Duration::from_secs(2)).unwrap_err();
    assert!(e.contains("in flight already"), "{e}");
    // No token, or a wrong one: refused, no metadata handed out.
    let other = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let mut s = raw::send_from(other, &addr, &[raw::auth(b""), raw::hello("tcp", 0, b"")]);
    let e = raw::answer(&mut s, Duration::from_secs(5)).unwrap_err();
    assert!(e.contains("auth token"), "{e}");
    let mut s = raw::send_from(other, &addr, &[raw::auth(b"guess")]);
    assert!(raw::answer(&mut s, Duration::from_secs(5)).unwrap_err().contains("auth token"));
    // Sixteen clients with the token at once are all answered while the attacker waits.
    let mut cfg = kvferry::AgentConfig::default().with_backend("tcp", kvferry::Params::new());
    cfg.auth_token = None;
    let me = kvferry::Agent::new(&format!("cli-rv-{}", std::process::id()), cfg).unwrap();
    let md = me.local_metadata().unwrap();
    let clients: Vec<_> = (0..16u8)
        .map(|i| {
            let (addr, md) = (addr.clone(), md.clone());
            std::thread::spawn(move || {
                let src = std::net::Ipv4Addr::new(127, 0, 1, i);
                let mut s = raw::send_from(src, &addr, &[raw::auth(b"s3cret"), raw::hello("tcp", 0, &md)]);
                raw::answer(&mut s, Duration::from_secs(5))
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap().expect("a client with the token gets Ready");
    }
    assert!(started.elapsed() < Duration::from_secs(5), "served concurrently: {:?}", started.elapsed());
    // The attacker's connections are cut off at the 10 s handshake deadline.
    for mut s in idle {
        let r = raw::answer(&mut s, Duration::from_secs(15));
        assert!(r.as_ref().is_err_and(|e| e.contains("deadline") || e.contains("no answer")), "{r:?}");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(14), "the deadline holds: {took:?}");
}

/// Starts a bench target (`args` after `kvferry`) with `token` (none: the
/// variable removed); returns it with the address it printed.
fn spawn_target(args: &[&str], token: Option<&str>) -> (Child, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvferry"));
    cmd.args(args).stderr(Stdio::null());
    match token {
        Some(t) => cmd.env("KVFERRY_AUTH_TOKEN", t),
        None => cmd.env_remove("KVFERRY_AUTH_TOKEN"),
    };
    let (child, line) = start("the target", &mut cmd);
    let addr = line.trim().strip_prefix("KVFERRY-TARGET listening on ").unwrap_or_else(|| panic!("{line}")).to_string();
    (child, addr)
}

/// Waits (15 s at most) for a target to leave by itself.
fn exits_by_itself(target: &mut Child, what: &str) {
    assert!(target.exits_within(Duration::from_secs(15)).is_some(), "{what}");
}

#[test]
fn p2p_target_refuses_a_huge_buffer_or_no_token_and_keeps_serving() {
    let (mut target, addr) = spawn_target(
        &["bench", "p2p", "--mode", "target", "--backend", "tcp", "--ip", "127.0.0.1", "--port", "0"],
        Some("tok"),
    );
    let port = addr.rsplit(':').next().unwrap().to_string();
    // An attacker holds a connection during the whole run.
    let _idle = raw::send(&addr, &[]);
    let mut s = raw::send(&addr, &[raw::auth(b""), raw::hello("tcp", 4096, b"")]);
    assert!(raw::answer(&mut s, Duration::from_secs(5)).unwrap_err().contains("auth token"));
    // 2^40 bytes: refused before anything is allocated, with what to do.
    let mut s = raw::send(&addr, &[raw::auth(b"tok"), raw::hello("tcp", 1 << 40, b"")]);
    let e = raw::answer(&mut s, Duration::from_secs(5)).unwrap_err();
    assert!(e.contains("1099511627776") && e.contains("--max-buffer"), "{e}");
    // Garbage metadata with the token: refused, and the target keeps waiting.
    let mut s = raw::send(&addr, &[raw::auth(b"tok"), raw::hello("tcp", 4096, b"junk")]);
    let e = raw::answer(&mut s, Duration::from_secs(5)).unwrap_err();
    assert!(e.contains("does not decode"), "{e}");
    // The target still serves a real initiator (with the token), then leaves.
    let o = Command::new(env!("CARGO_BIN_EXE_kvferry"))
        .args(["bench", "p2p", "--mode", "initiator", "--backend", "tcp", "--ip", "127.0.0.1", "--port", &port])
        .args(["--block-sizes", "4K", "--batch-sizes", "1", "--num_iter", "10", "--check-consistency"])
        .env("KVFERRY_AUTH_TOKEN", "tok")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    exits_by_itself(&mut target, "the target leaves after its initiator");
    // An explicit --max-buffer is honoured.
    let (_small, addr) = spawn_target(
        &["bench", "p2p", "--mode", "target", "--ip", "127.0.0.1", "--port", "0", "--max-buffer", "1M"],
        None,
    );
    let mut s = raw::send(&addr, &[raw::auth(b""), raw::hello("tcp", 2 << 20, b"")]);
    let e = raw::answer(&mut s, Duration::from_secs(5)).unwrap_err();
    assert!(e.contains("1048576"), "{e}");
}

#[test]
fn meta_server_refuses_bad_limits_and_tokens_clearly() {
    let o = kvferry(&["meta-server", "--port", "0", "--max-waiters", "2000"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("max_waiters"), "{}", text(&o));
    let long = "x".repeat(2000);
    let o = kvferry(&["meta-server", "--port", "0", "--token", &long]);
    assert!(!o.status.success());
    assert!(text(&o).contains("auth token"), "{}", text(&o));
}

#[test]
fn storage_target_refuses_a_client_without_the_token_and_serves_its_initiator() {
    let dir = format!("/var/tmp/kvferry-cli-stt-{}", std::process::id());
    std::fs::create_dir_all(&dir).unwrap();
    let files = ["--dir", &dir, "--file-size", "4M", "--num-files", "1", "--op", "write"];
    let (mut target, addr) = spawn_target(
        &[&["bench", "storage", "--mode", "target", "--ip", "127.0.0.1", "--port", "0"][..], &files].concat(),
        Some("st-tok"),
    );
    let port = addr.rsplit(':').next().unwrap().to_string();
    // A silent client does not hold the port; no token or a wrong one is refused.
    let _idle = raw::send(&addr, &[]);
    let mut s = raw::send(&addr, &[raw::auth(b""), raw::hello("tcp", 0, b"")]);
    assert!(raw::answer(&mut s, Duration::from_secs(5)).unwrap_err().contains("auth token"));
    let mut s = raw::send(&addr, &[raw::auth(b"guess"), raw::hello("tcp", 0, b"")]);
    assert!(raw::answer(&mut s, Duration::from_secs(5)).unwrap_err().contains("auth token"));
    // With the token but another message than Hello: refused, and the target keeps waiting.
    let mut s = raw::send(&addr, &[raw::auth(b"st-tok"), raw::auth(b"st-tok")]);
    assert!(raw::answer(&mut s, Duration::from_secs(5)).unwrap_err().contains("did not start with Hello"));
    // Garbage metadata in a Hello with the token: refused, nothing loaded, still waiting.
    let mut s = raw::send(&addr, &[raw::auth(b"st-tok"), raw::hello("tcp", 0, b"not metadata")]);
    let e = raw::answer(&mut s, Duration::from_secs(5)).unwrap_err();
    assert!(e.contains("does not decode"), "{e}");
    // The initiator with the token is served, and the target leaves after it.
    let o = Command::new(env!("CARGO_BIN_EXE_kvferry"))
        .args(["bench", "storage", "--mode", "initiator", "--ip", "127.0.0.1", "--port", &port])
        .args(files)
        .args(["--block-sizes", "64K", "--batch-size", "4", "--iters", "10", "--check-consistency"])
        .env("KVFERRY_AUTH_TOKEN", "st-tok")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    exits_by_itself(&mut target, "the storage target leaves after its initiator");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A loopback server that answers every HTTP request with `body` (what
/// etcd's JSON API answers a range with), for `kvferry info`'s etcd probe.
fn fake_etcd(body: &'static str) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let (mut line, mut len) = (String::new(), 0u64);
            while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                line.clear();
            }
            let _ = std::io::copy(&mut (&mut r).take(len), &mut std::io::sink());
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        }
    });
    url
}

#[test]
fn info_probes_etcd_with_the_agents_client() {
    let etcd_check = |eps: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_kvferry"))
            .args(["info", "--json"])
            .env("KVFERRY_ETCD_ENDPOINTS", eps)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["checks"].as_array().unwrap().iter().find(|c| c["what"] == "etcd").unwrap().clone()
    };
    let good = fake_etcd(r#"{"header":{"revision":"42"}}"#);
    let c = etcd_check(&good);
    assert_eq!(c["ok"], true, "{c}");
    assert!(c["detail"].as_str().unwrap().contains("revision 42"), "{c}");
    let dead = format!(
        "http://127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    );
    let c = etcd_check(&format!("{good},{dead}"));
    assert_eq!(c["ok"], false, "{c}");
    assert!(c["detail"].as_str().unwrap().contains(&dead) && c["hint"].as_str().is_some_and(|h| !h.is_empty()), "{c}");
    let c = etcd_check(&fake_etcd("garbage"));
    assert_eq!(c["ok"], false, "{c}");
    assert!(c["detail"].as_str().unwrap().contains("v3.4"), "{c}");
}

/// The library's tracing events reach stderr: filtered by KVFERRY_LOG
/// (warnings only by default), as JSON with `--log-format json`.
#[test]
fn library_logs_reach_stderr_filtered_and_as_json() {
    let dir = std::env::temp_dir().join(format!("kvferry-cli-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |env: Option<&str>, json: bool, tag: &str| -> String {
        let path = dir.join(format!("{tag}.err"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvferry"));
        cmd.args(["meta-server", "--port", "0"]).env_remove("RUST_LOG").env_remove("KVFERRY_LOG");
        if json {
            cmd.args(["--log-format", "json"]);
        }
        if let Some(f) = env {
            cmd.env("KVFERRY_LOG", f);
        }
        cmd.stderr(std::fs::File::create(&path).unwrap());
        let (child, line) = start("meta-server", &mut cmd);
        assert!(line.contains("listening"), "{line}");
        drop(child);
        std::fs::read_to_string(&path).unwrap()
    };
    let quiet = run(None, false, "default");
    assert!(!quiet.contains("metadata server listening"), "info is filtered out by default: {quiet}");
    let human = run(Some("info"), false, "human");
    assert!(human.contains("INFO") && human.contains("metadata server listening"), "{human}");
    let json = run(Some("kvferry=info"), true, "json");
    let event = json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "metadata server listening")
        .unwrap_or_else(|| panic!("no JSON event in {json}"));
    assert_eq!(event["level"], "INFO");
    assert!(event["fields"]["addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "{event}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn storage_bench_over_obj_verifies_against_a_real_s3_server() {
    let s3 = kvferry_test_support::servers::S3::start();
    let creds = [
        "--obj_bucket_name",
        &s3.bucket,
        "--obj_endpoint_override",
        &s3.endpoint,
        "--access-key",
        &s3.access_key,
        "--secret-key",
        &s3.secret_key,
    ];
    for op in ["write", "read"] {
        let mut args = vec!["bench", "storage", "--backend", "obj", "--op", op, "--block-sizes", "64K,1M"];
        args.extend(["--batch-size", "4", "--iters", "3", "--warmup", "1", "--check-consistency", "--json"]);
        args.extend(creds);
        let o = kvferry(&args);
        assert!(o.status.success(), "{op}: {}", text(&o));
        let lines: Vec<serde_json::Value> =
            String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
        assert_eq!(lines.len(), 2, "{}", text(&o));
        for l in &lines {
            assert_eq!(l["backend"], "OBJ");
            assert_eq!(l["op"], op.to_uppercase());
            assert_eq!(l["verified"], true);
            assert_eq!(l["bytes"].as_u64(), Some(3 * 4 * l["block_size"].as_u64().unwrap()), "{l}");
        }
    }
    let o = kvferry(&["bench", "storage", "--backend", "obj", "--mode", "target"]);
    assert!(!o.status.success() && text(&o).contains("--mode local"), "{}", text(&o));
    let o = kvferry(&["bench", "storage", "--backend", "obj", "--op", "write", "--block-size", "4K", "--iters", "1"]);
    assert!(!o.status.success() && text(&o).contains("bucket"), "no bucket: {}", text(&o));
}
