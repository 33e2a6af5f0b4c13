//! Per-request telemetry and agent metrics, through the public API: on, a
//! posting's times and bytes show in `Request::telemetry` and in the
//! Prometheus text (served over HTTP too); off, neither exists.

use std::io::{Read, Write};
use std::time::Duration;

use kvferry::{Agent, AgentConfig, AlignedBuf, ErrorKind, Params, XferOp};

fn agent(name: &str, backend: &str, telemetry: bool) -> Agent {
    let cfg = AgentConfig { telemetry, ..AgentConfig::default() }.with_backend(backend, Params::new());
    Agent::new(name, cfg).unwrap()
}

/// A WRITE of `blocks` 4 KiB blocks from `a`'s `src` to `b`'s `dst`.
fn write_request(a: &Agent, b: &Agent, src: &AlignedBuf, dst: &AlignedBuf, blocks: usize) -> kvferry::Request {
    let (local, remote) = (src.xfer_blocks(0, 4096, blocks).unwrap(), dst.xfer_blocks(0, 4096, blocks).unwrap());
    a.create_request(XferOp::Write, &local, &remote, b.name(), None).unwrap()
}

fn scrape(url: &str) -> String {
    let addr = url.trim_start_matches("http://").trim_end_matches("/metrics");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn postings_are_timed_and_counted() {
    let a = agent("tel-a", "TCP", true);
    let b = agent("tel-b", "TCP", true);
    let (src, dst) = (AlignedBuf::new(1 << 20).unwrap(), AlignedBuf::new(1 << 20).unwrap());
    let _ra = a.register_buf(&src).unwrap();
    let _rb = b.register_buf(&dst).unwrap();
    a.load_remote_metadata(&b.local_metadata().unwrap()).unwrap();
    let req = write_request(&a, &b, &src, &dst, 16);
    assert!(req.telemetry_enabled() && a.telemetry_enabled());
    assert_eq!(req.telemetry(), None, "nothing before the first posting ends");
    for _ in 0..3 {
        req.post(None).unwrap();
        req.wait(Duration::from_secs(10)).unwrap();
    }
    let t = req.telemetry().expect("telemetry of the last posting");
    assert!(t.ok && t.backend == "TCP" && t.total_bytes == 16 * 4096, "{t:?}");
    assert_eq!(t.desc_count, req.segments());
    assert!(t.post_duration <= t.xfer_duration && t.xfer_duration < Duration::from_secs(10), "{t:?}");
    assert!(t.start_us() > 1_700_000_000_000_000, "wall-clock start: {}", t.start_us());

    let text = a.metrics_text().unwrap();
    for line in [
        r#"kvferry_tx_bytes_total{backend="TCP",peer="tel-b",agent="tel-a"} 196608"#,
        r#"kvferry_tx_requests_total{backend="TCP",peer="tel-b",agent="tel-a"} 3"#,
        r#"kvferry_xfer_time_seconds_count{backend="TCP",op="WRITE",agent="tel-a"} 3"#,
        r#"kvferry_post_time_seconds_count{backend="TCP",op="WRITE",agent="tel-a"} 3"#,
        r#"kvferry_registered_bytes{agent="tel-a"} 1048576"#,
        r#"kvferry_loaded_peers{agent="tel-a"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }

    // The target counts what it served for its peers.
    let served = b.metrics_text().unwrap();
    for line in [
        r#"kvferry_served_bytes_total{backend="TCP",op="WRITE",peer="tel-a",agent="tel-b"} 196608"#,
        r#"kvferry_refused_frames_total{backend="TCP",peer="tel-a",agent="tel-b"} 0"#,
        r#"kvferry_serve_time_seconds_count{backend="TCP",peer="tel-a",agent="tel-b"} "#,
    ] {
        assert!(served.contains(line), "missing {line} in\n{served}");
    }

    // Served over HTTP for a scraper, the same text.
    let srv = a.serve_metrics("127.0.0.1:0").unwrap();
    let http = scrape(&srv.url());
    assert!(http.starts_with("HTTP/1.1 200") && http.contains("kvferry_tx_requests_total"), "{http}");

    // The exporter does not keep the agent alive: a scrape after it is gone is a 500.
    let gone = agent("tel-gone", "LOCAL", true);
    let orphan = gone.serve_metrics("127.0.0.1:0").unwrap();
    drop(gone);
    let http = scrape(&orphan.url());
    assert!(http.starts_with("HTTP/1.1 500") && http.contains("the agent was dropped"), "{http}");

    // A posting that fails is counted by its kind, with its telemetry marked failed.
    drop((_rb, b));
    let failed = (0..50).find_map(|_| {
        let r = req.post(None).and_then(|_| req.wait(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        r.err()
    });
    let e = failed.expect("a posting to a dropped peer fails");
    assert!(matches!(e.kind(), ErrorKind::RemoteDisconnect | ErrorKind::NotFound), "{e}");
    assert!(!req.telemetry().unwrap().ok);
    let text = a.metrics_text().unwrap();
    assert!(text.contains(r#"kvferry_errors_total{backend="TCP",kind="#), "{text}");
}

#[test]
fn off_by_default_and_says_how_to_turn_it_on() {
    let a = agent("tel-off-a", "LOCAL", false);
    let b = agent("tel-off-b", "LOCAL", false);
    let (src, dst) = (AlignedBuf::new(4096).unwrap(), AlignedBuf::new(4096).unwrap());
    let _ra = a.register_buf(&src).unwrap();
    let _rb = b.register_buf(&dst).unwrap();
    a.load_remote_metadata(&b.local_metadata().unwrap()).unwrap();
    let req = write_request(&a, &b, &src, &dst, 1);
    req.post(None).unwrap();
    req.wait(Duration::from_secs(5)).unwrap();
    assert!(!req.telemetry_enabled() && req.telemetry().is_none());
    let e = a.metrics_text().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported);
    assert!(e.to_string().contains("KVFERRY_TELEMETRY=1"), "{e}");
    assert!(a.serve_metrics("127.0.0.1:0").is_err());
}

#[test]
fn the_environment_turns_it_on_nixl_names_too() {
    for (k, v, on) in
        [("KVFERRY_TELEMETRY", "1", true), ("NIXL_TELEMETRY_ENABLE", "y", true), ("KVFERRY_TELEMETRY", "0", false)]
    {
        let cfg = AgentConfig::from_vars([(k.to_string(), v.to_string())]).unwrap();
        assert_eq!(cfg.telemetry, on, "{k}={v}");
    }
}

/// A hostile client's frames show in the target's metrics: each refused
/// frame is counted, none is counted as served, and the target's counters
/// stay exact while a legitimate initiator uses it at the same time.
#[test]
fn refused_frames_of_a_hostile_client_are_counted() {
    use kvferry::backend::tcp::proto::{ConnInfo, Entry, FrameType, Status};
    use kvferry::backend::AccessKey;
    use kvferry::metadata::AgentMetadata;
    use kvferry_test_support::tcp_wire::{answer, frame, hello, read_welcome};

    let t = agent("tel-hostile-t", "TCP", true);
    let buf = AlignedBuf::new(1 << 16).unwrap();
    let _r = t.register_buf(&buf).unwrap();
    let md = AgentMetadata::decode(&t.local_metadata().unwrap()).unwrap();
    let tcp = md.backends.iter().find(|b| b.name == "TCP").unwrap();
    let port = ConnInfo::decode(tcp.conn_info.as_ref().unwrap()).unwrap().port;
    let region = &md.regions[0];
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&hello(1, md.instance, "hostile", b"")).unwrap();
    assert_eq!(read_welcome(&mut s).unwrap().status, Status::Ok);
    let junk = [0xeeu8; 64];
    let bad = [
        Entry { key: AccessKey([0x5a; 16]), addr: region.addr, len: 64 },
        Entry { key: region.key, addr: region.addr + region.len - 32, len: 64 },
        Entry { key: region.key, addr: u64::MAX - 8, len: 64 },
    ];
    for (op, e) in bad.iter().enumerate() {
        s.write_all(&frame(FrameType::Write, op as u64 + 1, &[*e], &junk)).unwrap();
        assert_eq!(answer(&mut s).0.ty, FrameType::Error);
    }
    let good = Entry { key: region.key, addr: region.addr, len: 64 };
    s.write_all(&frame(FrameType::Write, 9, &[good], &junk)).unwrap();
    assert_eq!(answer(&mut s).0.ty, FrameType::Ack);
    let text = t.metrics_text().unwrap();
    for line in [
        r#"kvferry_refused_frames_total{backend="TCP",peer="hostile",agent="tel-hostile-t"} 3"#,
        r#"kvferry_served_frames_total{backend="TCP",peer="hostile",agent="tel-hostile-t"} 1"#,
        r#"kvferry_served_bytes_total{backend="TCP",op="WRITE",peer="hostile",agent="tel-hostile-t"} 64"#,
        r#"kvferry_serve_time_seconds_count{backend="TCP",peer="hostile",agent="tel-hostile-t"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    assert!(buf.as_slice()[64..].iter().all(|&b| b == 0), "only the good frame landed");
}
