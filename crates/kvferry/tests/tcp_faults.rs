//! Faults on purpose: a peer killed mid-transfer, a peer that hangs, a
//! refused connection, a request dropped while its peer is stalled.
//! Bounds are generous (several times the configured timeout): the tests
//! check that nothing hangs, not how fast the machine is.

mod tcp_support;

use std::time::{Duration, Instant};

use kvferry::{Agent, AgentConfig, AlignedBuf, ErrorKind, Params, XferOp};
use kvferry_test_support::{eventually, fill, first_mismatch};
use tcp_support::{fetch, PeerProc};

peer_entry!();

const BIG: usize = 64 << 20;

fn agent(name: &str, peer_timeout: Duration) -> Agent {
    Agent::new(name, AgentConfig::default().with_peer_timeout(peer_timeout).with_backend("TCP", Params::new())).unwrap()
}

#[test]
fn killed_peer_fails_in_flight_request_others_continue_restart_reachable() {
    let mut p1 = PeerProc::spawn("tf-p1", BIG, &[], &[]);
    let mut p2 = PeerProc::spawn("tf-p2", 1 << 20, &[], &[]);
    let a = agent("tf-a", Duration::from_secs(1));
    fetch(&a, "tf-p1", "127.0.0.1", p1.md_port);
    fetch(&a, "tf-p2", "127.0.0.1", p2.md_port);
    let mut src = AlignedBuf::new(BIG).unwrap();
    fill(src.as_mut_slice(), 9);
    let _r = a.register_buf(&src).unwrap();
    a.make_connection("tf-p1").unwrap();

    // Stop the peer so the request is surely in flight, then kill it.
    p1.signal(libc::SIGSTOP);
    let w = a
        .create_request(XferOp::Write, &src.xfer_blocks(0, BIG, 1).unwrap(), &p1.blocks(0, BIG, 1), "tf-p1", Some(b"x"))
        .unwrap();
    w.post(None).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let killed = Instant::now();
    p1.kill();
    let e = w.wait(Duration::from_secs(20)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RemoteDisconnect, "{e}");
    assert!(killed.elapsed() < Duration::from_secs(5), "took {:?}", killed.elapsed());
    // The agent dropped the dead peer's metadata.
    eventually("dead peer invalidated", Duration::from_secs(10), || !a.check_remote("tf-p1", None));
    let e = w.post(None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RemoteDisconnect, "{e}");

    // The other peer is unaffected.
    let w2 = a
        .create_request(XferOp::Write, &src.xfer_blocks(0, 4096, 1).unwrap(), &p2.blocks(0, 4096, 1), "tf-p2", None)
        .unwrap();
    w2.post(None).unwrap();
    w2.wait(Duration::from_secs(20)).unwrap();
    assert_eq!(p2.cmd("check 9 0 4096"), "OK");

    // A restarted peer of the same name, with new metadata, is reachable.
    let p1b = PeerProc::spawn("tf-p1", BIG, &[], &[]);
    fetch(&a, "tf-p1", "127.0.0.1", p1b.md_port);
    let back = AlignedBuf::new(1 << 20).unwrap();
    let _r2 = a.register_buf(&back).unwrap();
    let r = a
        .create_request(
            XferOp::Read,
            &back.xfer_blocks(0, 1 << 20, 1).unwrap(),
            &p1b.blocks(0, 1 << 20, 1),
            "tf-p1",
            None,
        )
        .unwrap();
    r.post(None).unwrap();
    r.wait(Duration::from_secs(20)).unwrap();
    assert_eq!(first_mismatch(back.as_slice(), 1, 0, 1 << 20), None);
    drop(p2);
}

#[test]
fn hung_peer_becomes_remote_disconnect_within_the_peer_timeout() {
    let p = PeerProc::spawn("tf-p3", BIG, &[], &[]);
    let a = agent("tf-b", Duration::from_millis(500));
    fetch(&a, "tf-p3", "127.0.0.1", p.md_port);
    let dst = AlignedBuf::new(BIG).unwrap();
    let _r = a.register_buf(&dst).unwrap();
    a.make_connection("tf-p3").unwrap();
    p.signal(libc::SIGSTOP);
    let r = a
        .create_request(XferOp::Read, &dst.xfer_blocks(0, BIG, 1).unwrap(), &p.blocks(0, BIG, 1), "tf-p3", None)
        .unwrap();
    let t0 = Instant::now();
    r.post(None).unwrap();
    let e = r.wait(Duration::from_secs(20)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RemoteDisconnect, "{e}");
    assert!(e.message().contains("peer_timeout"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
    eventually("hung peer invalidated", Duration::from_secs(10), || !a.check_remote("tf-p3", None));
    p.signal(libc::SIGCONT);
}

#[test]
fn dropping_a_request_to_a_stalled_peer_returns_promptly() {
    let p = PeerProc::spawn("tf-p4", BIG, &[], &[]);
    let a = agent("tf-c", Duration::from_secs(30));
    fetch(&a, "tf-p4", "127.0.0.1", p.md_port);
    let buf = AlignedBuf::new(BIG).unwrap();
    let _r = a.register_buf(&buf).unwrap();
    a.make_connection("tf-p4").unwrap();
    p.signal(libc::SIGSTOP);
    for op in [XferOp::Write, XferOp::Read] {
        let r =
            a.create_request(op, &buf.xfer_blocks(0, BIG, 1).unwrap(), &p.blocks(0, BIG, 1), "tf-p4", None).unwrap();
        r.post(None).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let t0 = Instant::now();
        drop(r);
        assert!(t0.elapsed() < Duration::from_secs(3), "{op} drop took {:?}", t0.elapsed());
    }
    p.signal(libc::SIGCONT);
}

#[test]
fn refused_connection_names_the_address() {
    let mut p = PeerProc::spawn("tf-p5", 1 << 20, &[], &[]);
    let a = agent("tf-d", Duration::from_secs(1));
    fetch(&a, "tf-p5", "127.0.0.1", p.md_port);
    let src = AlignedBuf::new(4096).unwrap();
    let _r = a.register_buf(&src).unwrap();
    let w = a
        .create_request(XferOp::Write, &src.xfer_blocks(0, 4096, 1).unwrap(), &p.blocks(0, 4096, 1), "tf-p5", None)
        .unwrap();
    p.kill();
    let e = match w.post(None) {
        Err(e) => e,
        Ok(_) => w.wait(Duration::from_secs(20)).unwrap_err(),
    };
    assert_eq!(e.kind(), ErrorKind::RemoteDisconnect, "{e}");
    assert!(e.message().contains("127.0.0.1:") && e.message().contains("refused"), "{e}");
    // A refused metadata fetch is an error in the background, never a hang.
    let port = p.md_port;
    a.fetch_remote_metadata("tf-p5", None, kvferry::MetaPeer::addr("127.0.0.1", port).unwrap()).unwrap();
}
