//! SHM between two real processes: data byte for byte (READ and WRITE, one
//! and 4096 descriptors), backend choice against a TCP-like backend, hints,
//! notifications, refusal of deregistered regions, and the fallback when the
//! kernel refuses cross-memory attach.

mod shm_support;

use std::time::Duration;

use kvferry::{AlignedBuf, ErrorKind, XferOp};
use kvferry_test_support::{fill, pattern_byte};
use shm_support::{agent, peer_main, remote_list, Peer};

const ME: &str = "shm_xfer";

/// The peer role: does nothing unless this binary was started as a peer.
#[test]
fn shm_peer_main() {
    peer_main();
}

fn spawn(name: &str, size: usize, seed: u64, extra: &[(&str, &str)]) -> Peer {
    Peer::spawn("shm_peer_main", name, size, seed, extra)
}

#[test]
fn write_and_read_one_descriptor() {
    const N: usize = 1 << 20;
    let mut peer = spawn("shm-p1", N, 11, &[]);
    let a = agent(&format!("{ME}-a1"), &["SHM"]);
    let mut buf = AlignedBuf::new(N).unwrap();
    fill(buf.as_mut_slice(), 22);
    let _r = a.register_buf(&buf).unwrap();
    a.load_remote_metadata(&peer.md).unwrap();

    let local = buf.xfer_blocks(0, N, 1).unwrap();
    let remote = remote_list(peer.addr, std::iter::once(0), N);
    let w = a.create_request(XferOp::Write, &local, &remote, "shm-p1", None).unwrap();
    assert_eq!(w.backend(), "SHM");
    w.post(None).unwrap();
    w.wait(Duration::from_secs(5)).unwrap();
    assert!(peer.dump("w1") == buf.as_slice(), "WRITE: the peer's buffer differs from ours");

    peer.ok("FILL 33");
    let r = a.create_request(XferOp::Read, &local, &remote, "shm-p1", None).unwrap();
    r.post(None).unwrap();
    r.wait(Duration::from_secs(5)).unwrap();
    let bad = buf.as_slice().iter().enumerate().position(|(i, &b)| b != pattern_byte(33, i));
    assert_eq!(bad, None, "READ: first wrong byte");
    peer.exit();
}

#[test]
fn write_and_read_4096_scattered_descriptors() {
    const B: usize = 256;
    const K: usize = 4096;
    // Remote block of local block i: a permutation, so no two descriptors merge.
    let perm = |i: usize| (i * 1237) % K;
    let mut peer = spawn("shm-p4k", B * K, 5, &[]);
    let a = agent(&format!("{ME}-a4k"), &["SHM"]);
    let mut buf = AlignedBuf::new(B * K).unwrap();
    fill(buf.as_mut_slice(), 6);
    let _r = a.register_buf(&buf).unwrap();
    a.load_remote_metadata(&peer.md).unwrap();
    let local = buf.xfer_blocks(0, B, K).unwrap();
    let remote = remote_list(peer.addr, (0..K).map(|i| perm(i) * B), B);

    let w = a.create_request(XferOp::Write, &local, &remote, "shm-p4k", None).unwrap();
    assert_eq!(w.segments(), K, "scattered descriptors stay separate");
    w.post(None).unwrap();
    w.wait(Duration::from_secs(5)).unwrap();
    let got = peer.dump("w4k");
    for i in 0..K {
        assert!(got[perm(i) * B..][..B] == buf.as_slice()[i * B..][..B], "WRITE: block {i} differs");
    }

    peer.ok("FILL 44");
    let r = a.create_request(XferOp::Read, &local, &remote, "shm-p4k", None).unwrap();
    r.post(None).unwrap();
    r.wait(Duration::from_secs(5)).unwrap();
    for i in 0..K {
        for j in 0..B {
            assert_eq!(buf.as_slice()[i * B + j], pattern_byte(44, perm(i) * B + j), "READ: block {i} byte {j}");
        }
    }
    // Posting again moves the same bytes again (prepared iovecs are reused).
    peer.ok("FILL 45");
    r.post(None).unwrap();
    assert_eq!(buf.as_slice()[0], pattern_byte(45, 0));
    peer.exit();
}

#[test]
fn shm_preferred_over_tcp_and_hints_win() {
    let peer = spawn("shm-pchoice", 1 << 16, 1, &[("KVFERRY_SHM_PEER_BACKENDS", "FAKETCP,SHM")]);
    // TCP-like backend created first: rank decides, not creation order.
    let a = agent(&format!("{ME}-achoice"), &["FAKETCP", "SHM"]);
    let buf = AlignedBuf::new(1 << 16).unwrap();
    let _r = a.register_buf(&buf).unwrap();
    a.load_remote_metadata(&peer.md).unwrap();
    let local = buf.xfer_blocks(0, 4096, 1).unwrap();
    let remote = remote_list(peer.addr, std::iter::once(0), 4096);
    let mk = |hints: &[&str]| {
        a.create_request_with(XferOp::Write, &local, &remote, "shm-pchoice", None, hints).unwrap().backend().to_string()
    };
    let req = a.create_request(XferOp::Write, &local, &remote, "shm-pchoice", None).unwrap();
    assert_eq!(a.chosen_backend(&req), "SHM", "same host: SHM (rank 10) before TCP (rank 50)");
    assert_eq!(mk(&["FAKETCP"]), "FAKETCP", "a hint wins");
    assert_eq!(mk(&["faketcp", "SHM"]), "FAKETCP", "hints in the caller's order");
    assert_eq!(mk(&["SHM", "FAKETCP"]), "SHM");
    assert_eq!(a.backend_capabilities("SHM").unwrap().rank, 10);
    peer.exit();
}

#[test]
fn notifications_attached_and_standalone() {
    const N: usize = 64 << 10;
    let mut peer = spawn("shm-pnotif", N, 1, &[]);
    let me = format!("{ME}-anotif");
    let a = agent(&me, &["SHM"]);
    let mut buf = AlignedBuf::new(N).unwrap();
    fill(buf.as_mut_slice(), 77);
    let _r = a.register_buf(&buf).unwrap();
    a.load_remote_metadata(&peer.md).unwrap();
    let local = buf.xfer_blocks(0, N, 1).unwrap();
    let remote = remote_list(peer.addr, std::iter::once(0), N);
    let w = a.create_request(XferOp::Write, &local, &remote, "shm-pnotif", Some(b"layer-0")).unwrap();

    // Attached: the peer checks its data the moment the notification arrives.
    peer.cmd_nowait(&format!("NOTIFDATA 77 {N}"));
    w.post(None).unwrap();
    assert_eq!(peer.line(), "DATA OK layer-0");
    // A notification given at post replaces the stored one.
    fill(buf.as_mut_slice(), 78);
    peer.cmd_nowait(&format!("NOTIFDATA 78 {N}"));
    w.post(Some(b"layer-1")).unwrap();
    assert_eq!(peer.line(), "DATA OK layer-1");

    // Standalone, both ways.
    a.send_notification("shm-pnotif", b"hello", &[]).unwrap();
    a.send_notification("shm-pnotif", b"again", &["SHM"]).unwrap();
    assert_eq!(peer.cmd("NOTIFS 2"), format!("NOTIFS {me}:hello,{me}:again"));
    peer.ok(&format!("LOAD {}", kvferry_test_support::hex(&a.local_metadata().unwrap())));
    peer.ok(&format!("SEND {me} back"));
    assert!(a.wait_notifications(Duration::from_secs(10)));
    assert_eq!(a.take_notifications()["shm-pnotif"], vec![b"back".to_vec()]);
    peer.exit();
}

#[test]
fn deregistered_region_is_refused() {
    let mut peer = spawn("shm-pdereg", 1 << 16, 1, &[]);
    let a = agent(&format!("{ME}-adereg"), &["SHM"]);
    let buf = AlignedBuf::new(1 << 16).unwrap();
    let _r = a.register_buf(&buf).unwrap();
    a.load_remote_metadata(&peer.md).unwrap();
    let local = buf.xfer_blocks(0, 4096, 1).unwrap();
    let remote = remote_list(peer.addr, std::iter::once(0), 4096);
    let w = a.create_request(XferOp::Write, &local, &remote, "shm-pdereg", None).unwrap();
    w.post(None).unwrap();
    // The owner's deregistration returns only after this agent acknowledged it.
    peer.ok("DEREG");
    let e = w.post(None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAllowed, "{e}");
    assert!(e.message().contains("deregistered"), "{e}");
    // A new request from the old metadata is refused at creation.
    let e = a.create_request(XferOp::Write, &local, &remote, "shm-pdereg", None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAllowed, "{e}");
    peer.exit();
}

#[test]
fn refused_attach_falls_back_to_tcp() {
    // The kernel must refuse the attach: as root, the chooser drops to
    // nobody; as another user, the target makes itself non-dumpable.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let me = format!("{ME}-aeperm");
    let a = agent(&me, &["FAKETCP", "SHM"]);
    let buf = AlignedBuf::new(1 << 16).unwrap();
    let _r = a.register_buf(&buf).unwrap();
    let md = kvferry_test_support::hex(&a.local_metadata().unwrap());
    if root {
        let mut chooser = spawn(
            "shm-pchooser",
            1 << 16,
            1,
            &[("KVFERRY_SHM_PEER_BACKENDS", "FAKETCP,SHM"), ("KVFERRY_SHM_PEER_SETUID", "1")],
        );
        assert_eq!(chooser.cmd(&format!("CHOOSE {md} {me} {}", buf.addr())), "CHOSEN FAKETCP");
        chooser.exit();
    } else {
        let peer = spawn(
            "shm-pnodump",
            1 << 16,
            1,
            &[("KVFERRY_SHM_PEER_BACKENDS", "FAKETCP,SHM"), ("KVFERRY_SHM_PEER_NODUMP", "1")],
        );
        a.load_remote_metadata(&peer.md).unwrap();
        let local = buf.xfer_blocks(0, 4096, 1).unwrap();
        let remote = remote_list(peer.addr, std::iter::once(0), 4096);
        let req = a.create_request(XferOp::Write, &local, &remote, "shm-pnodump", None).unwrap();
        assert_eq!(req.backend(), "FAKETCP");
        peer.exit();
    }
}
