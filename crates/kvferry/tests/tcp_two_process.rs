//! TCP between two real processes: byte-for-byte WRITE and READ with 1 and
//! 4096 descriptors, notifications after the data, eager connections,
//! peer-to-peer metadata (fetch, send, invalidate) and the auth token.

mod tcp_support;

use std::time::Duration;

use kvferry::{AlignedBuf, ErrorKind, MemType, Params, XferDescList, XferOp};
use kvferry_test_support::{eventually, fill, first_mismatch};
use tcp_support::{fetch, initiator, PeerProc};

peer_entry!();

const T: Duration = Duration::from_secs(30);

#[test]
fn write_then_read_one_descriptor_byte_for_byte() {
    let len = 16 << 20;
    let mut peer = PeerProc::spawn("tp-peer1", len, &[], &[]);
    let a = initiator("tp-init1", Params::new());
    fetch(&a, "tp-peer1", "127.0.0.1", peer.md_port);
    let mut src = AlignedBuf::new(len).unwrap();
    fill(src.as_mut_slice(), 42);
    let back = AlignedBuf::new(len).unwrap();
    let _r = a.register_buf(&src).unwrap();
    let _r2 = a.register_buf(&back).unwrap();
    a.make_connection("tp-peer1").unwrap();

    let w = a
        .create_request(
            XferOp::Write,
            &src.xfer_blocks(0, len, 1).unwrap(),
            &peer.blocks(0, len, 1),
            "tp-peer1",
            Some(b"wrote"),
        )
        .unwrap();
    w.post(None).unwrap();
    w.wait(T).unwrap();
    // The notification is sent only after the data is applied: when the peer
    // sees it, the check must pass.
    assert_eq!(peer.cmd("notifs 1 10000"), "NOTIFS tp-init1:wrote");
    assert_eq!(peer.cmd(&format!("check 42 0 {len}")), "OK");

    peer.cmd("fill 77");
    let r = a
        .create_request(XferOp::Read, &back.xfer_blocks(0, len, 1).unwrap(), &peer.blocks(0, len, 1), "tp-peer1", None)
        .unwrap();
    r.post(None).unwrap();
    r.wait(T).unwrap();
    assert_eq!(first_mismatch(back.as_slice(), 77, 0, len), None);
}

#[test]
fn write_and_read_4096_scattered_descriptors() {
    let (n, block) = (4096, 4096);
    let mut peer = PeerProc::spawn("tp-peer2", 2 * n * block, &[], &[]);
    let a = initiator("tp-init2", Params::new().with("lanes", 4));
    fetch(&a, "tp-peer2", "127.0.0.1", peer.md_port);
    let mut src = AlignedBuf::new(n * block).unwrap();
    fill(src.as_mut_slice(), 5);
    let _r = a.register_buf(&src).unwrap();
    // Local block i → remote slot 2*(n-1-i): no two descriptors merge.
    let mut remote = XferDescList::new(MemType::Dram);
    for i in 0..n {
        remote.push(kvferry::XferDesc::new(peer.buf_addr + (2 * (n - 1 - i) * block) as u64, block as u64, 0));
    }
    let w = a
        .create_request(XferOp::Write, &src.xfer_blocks(0, block, n).unwrap(), &remote, "tp-peer2", Some(b"n4096"))
        .unwrap();
    assert_eq!(w.segments(), n);
    w.post(None).unwrap();
    w.wait(T).unwrap();
    assert_eq!(peer.cmd("notifs 1 10000"), "NOTIFS tp-init2:n4096");
    let back = AlignedBuf::new(n * block).unwrap();
    let _r2 = a.register_buf(&back).unwrap();
    let r = a
        .create_request(XferOp::Read, &back.xfer_blocks(0, block, n).unwrap(), &remote, "tp-peer2", Some(b"r"))
        .unwrap();
    r.post(None).unwrap();
    r.wait(T).unwrap();
    assert!(back.as_slice() == src.as_slice(), "READ back differs");
    assert_eq!(peer.cmd("notifs 1 10000"), "NOTIFS tp-init2:r");
    // Odd slots were never written: still the peer's initial pattern.
    for i in 0..n {
        let off = (2 * i + 1) * block;
        assert_eq!(peer.cmd(&format!("check 1 {off} {block}")), "OK", "slot {i}");
        if i == 8 {
            break;
        }
    }
    // Many small posts in a row keep their notifications in order after the data.
    let small = a
        .create_request(
            XferOp::Write,
            &src.xfer_blocks(0, block, 1).unwrap(),
            &peer.blocks(0, block, 1),
            "tp-peer2",
            None,
        )
        .unwrap();
    for i in 0..50 {
        small.post(Some(format!("{i}").as_bytes())).unwrap();
        small.wait(T).unwrap();
    }
    a.send_notification("tp-peer2", b"last", &[]).unwrap();
    let expect: Vec<String> = (0..50).map(|i| format!("tp-init2:{i}")).chain(["tp-init2:last".into()]).collect();
    assert_eq!(peer.cmd("notifs 51 10000"), format!("NOTIFS {}", expect.join(",")));
}

#[test]
fn metadata_send_fetch_and_invalidate_through_listeners() {
    let mut peer = PeerProc::spawn("tp-peer3", 1 << 20, &[], &[]);
    let a = kvferry::Agent::new(
        "tp-init3",
        kvferry::AgentConfig::default().with_listener(0).with_backend("TCP", Params::new()),
    )
    .unwrap();
    let port = a.listen_port().unwrap();
    assert!(port > 0);
    // A wrong name is refused: nothing gets loaded.
    a.fetch_remote_metadata("someone-else", None, kvferry::MetaPeer::addr("127.0.0.1", peer.md_port).unwrap()).unwrap();
    fetch(&a, "tp-peer3", "127.0.0.1", peer.md_port);
    assert!(!a.check_remote("someone-else", None));
    let src = AlignedBuf::new(4096).unwrap();
    let _r = a.register_buf(&src).unwrap();
    let w = a
        .create_request(
            XferOp::Write,
            &src.xfer_blocks(0, 4096, 1).unwrap(),
            &peer.blocks(0, 4096, 1),
            "tp-peer3",
            None,
        )
        .unwrap();
    w.post(None).unwrap();
    w.wait(T).unwrap();
    assert_eq!(peer.cmd("check 1 0 4096"), "BAD 0", "the write of zeroes landed");
    // Invalidation: tell ourselves through our own listener, from a helper agent.
    let helper =
        kvferry::Agent::new("tp-helper3", kvferry::AgentConfig::default().with_backend("TCP", Params::new())).unwrap();
    helper.send_local_metadata(kvferry::MetaPeer::addr("127.0.0.1", port).unwrap()).unwrap();
    eventually("helper metadata arrives", T, || a.check_remote("tp-helper3", None));
    helper.invalidate_local_metadata(kvferry::MetaPeer::addr("127.0.0.1", port).unwrap()).unwrap();
    eventually("helper metadata is dropped", T, || !a.check_remote("tp-helper3", None));
    assert!(matches!(kvferry::MetaPeer::addr("127.0.0.1", 0), Err(e) if e.kind() == ErrorKind::InvalidParam));
}

#[test]
fn auth_token_mismatch_is_refused_at_the_handshake() {
    let mut peer = PeerProc::spawn("tp-peer4", 1 << 20, &[("KVFERRY_AUTH_TOKEN", "s3cret")], &[]);
    let md = peer.cmd("md");
    let hex = md.strip_prefix("MD ").unwrap();
    let blob: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();

    // No token: the metadata listener refuses...
    let mut cfg = kvferry::AgentConfig::default().with_backend("TCP", Params::new());
    cfg.auth_token = None;
    let a = kvferry::Agent::new("tp-init4", cfg).unwrap();
    a.fetch_remote_metadata("tp-peer4", None, kvferry::MetaPeer::addr("127.0.0.1", peer.md_port).unwrap()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!a.check_remote("tp-peer4", None));
    // ...and so does the data path, with metadata obtained another way.
    a.load_remote_metadata(&blob).unwrap();
    let src = AlignedBuf::new(4096).unwrap();
    let _r = a.register_buf(&src).unwrap();
    let e = a.make_connection("tp-peer4").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAllowed, "{e}");
    assert!(e.message().contains("auth token"), "{e}");

    // The right token: allowed.
    let b = kvferry::Agent::new(
        "tp-init4b",
        kvferry::AgentConfig::default().with_auth_token("s3cret").with_backend("TCP", Params::new()),
    )
    .unwrap();
    fetch(&b, "tp-peer4", "127.0.0.1", peer.md_port);
    let src2 = AlignedBuf::new(4096).unwrap();
    let _r2 = b.register_buf(&src2).unwrap();
    let w = b
        .create_request(
            XferOp::Write,
            &src2.xfer_blocks(0, 4096, 1).unwrap(),
            &peer.blocks(0, 4096, 1),
            "tp-peer4",
            None,
        )
        .unwrap();
    w.post(None).unwrap();
    w.wait(T).unwrap();
}
