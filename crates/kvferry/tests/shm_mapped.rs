//! SHM's mapped fast path with real processes: memfd-backed regions
//! (`register_buf` of an `AlignedBuf`) are copied with memcpy through a
//! mapping of the owner's memfd, raw `register_mem` memory with cross-memory
//! attach; data byte for byte on both; deregistration unmaps before it
//! returns and later posts touch nothing; a peer that exits turns mapped
//! posts into `RemoteDisconnect` and its mapping is dropped.

mod shm_support;

use std::time::Duration;

use kvferry::{
    Agent, AgentConfig, AlignedBuf, ErrorKind, MemType, Params, RegDesc, RegDescList, XferDesc, XferDescList, XferOp,
};
use kvferry_test_support::{eventually, fill, pattern_byte};
use shm_support::{agent, maps_inode, peer_main, remote_list, Peer};

const ME: &str = "shm_mapped";

/// The peer role: does nothing unless this binary was started as a peer.
#[test]
fn shm_peer_main() {
    peer_main();
}

fn spawn(name: &str, size: usize, seed: u64, extra: &[(&str, &str)]) -> Peer {
    Peer::spawn("shm_peer_main", name, size, seed, extra)
}

/// Registers a `Vec`'s memory raw (no memfd behind it).
fn register_vec(a: &Agent, v: &[u8]) -> kvferry::Registration {
    let mut l = RegDescList::new(MemType::Dram);
    l.push(RegDesc::new(v.as_ptr() as u64, v.len() as u64, 0));
    // SAFETY: every Vec passed here outlives its registration (dropped first in each test).
    unsafe { a.register_mem(&l, &[]) }.unwrap()
}

#[test]
fn aligned_buf_regions_use_the_mapped_path() {
    const B: usize = 256;
    const K: usize = 4096;
    let perm = |i: usize| (i * 1237) % K;
    let mut peer = spawn("shm-m1", B * K, 11, &[]);
    let inode = peer.memfd_inode().expect("the peer's AlignedBuf is a memfd");
    let a = agent(&format!("{ME}-a1"), &["SHM"]);
    let mut buf = AlignedBuf::new(B * K).unwrap();
    fill(buf.as_mut_slice(), 22);
    let _r = a.register_buf(&buf).unwrap();
    a.load_remote_metadata(&peer.md).unwrap();

    // One descriptor, WRITE then READ.
    let whole_l = buf.xfer_blocks(0, B * K, 1).unwrap();
    let whole_r = remote_list(peer.addr, std::iter::once(0), B * K);
    let w = a.create_request(XferOp::Write, &whole_l, &whole_r, "shm-m1", None).unwrap();
    assert_eq!(w.data_path(), Some(kvferry::DataPath::Mapped));
    assert!(maps_inode(inode), "prepare mapped the peer's memfd");
    w.post(None).unwrap();
    assert!(peer.dump("m1w") == buf.as_slice(), "WRITE: the peer's buffer differs from ours");
    peer.ok("FILL 33");
    let r = a.create_request(XferOp::Read, &whole_l, &whole_r, "shm-m1", None).unwrap();
    assert_eq!(r.data_path(), Some(kvferry::DataPath::Mapped));
    r.post(None).unwrap();
    assert_eq!(buf.as_slice().iter().enumerate().position(|(i, &b)| b != pattern_byte(33, i)), None, "READ");

    // 4096 scattered descriptors, WRITE then READ.
    fill(buf.as_mut_slice(), 44);
    let local = buf.xfer_blocks(0, B, K).unwrap();
    let remote = remote_list(peer.addr, (0..K).map(|i| perm(i) * B), B);
    let w = a.create_request(XferOp::Write, &local, &remote, "shm-m1", None).unwrap();
    assert_eq!((w.segments(), w.data_path()), (K, Some(kvferry::DataPath::Mapped)));
    w.post(None).unwrap();
    let got = peer.dump("m1w4k");
    for i in 0..K {
        assert!(got[perm(i) * B..][..B] == buf.as_slice()[i * B..][..B], "WRITE: block {i} differs");
    }
    peer.ok("FILL 55");
    let r = a.create_request(XferOp::Read, &local, &remote, "shm-m1", None).unwrap();
    r.post(None).unwrap();
    for i in 0..K {
        for j in 0..B {
            assert_eq!(buf.as_slice()[i * B + j], pattern_byte(55, perm(i) * B + j), "READ: block {i} byte {j}");
        }
    }
    peer.exit();
}

#[test]
fn raw_registered_memory_uses_cross_memory_attach() {
    const N: usize = 256 << 10;
    let mut raw_peer = spawn("shm-mraw", N, 3, &[("KVFERRY_SHM_PEER_RAW", "1")]);
    assert_eq!(raw_peer.memfd_inode(), None, "a Vec is not a memfd");
    let mut buf_peer = spawn("shm-mbuf", N, 4, &[]);
    let a = agent(&format!("{ME}-araw"), &["SHM"]);
    // The initiator's own memory is raw too: only the remote side decides the path.
    let mut mine = vec![0u8; N];
    fill(&mut mine, 66);
    let reg = register_vec(&a, &mine);
    a.load_remote_metadata(&raw_peer.md).unwrap();
    a.load_remote_metadata(&buf_peer.md).unwrap();
    let local = remote_list(mine.as_ptr() as u64, (0..N / 4096).map(|i| i * 4096), 4096);

    for (peer, path) in [(&mut raw_peer, kvferry::DataPath::Cma), (&mut buf_peer, kvferry::DataPath::Mapped)] {
        let name = peer.name.clone();
        let remote = remote_list(peer.addr, (0..N / 4096).map(|i| ((i * 7) % (N / 4096)) * 4096), 4096);
        let w = a.create_request(XferOp::Write, &local, &remote, &name, None).unwrap();
        assert_eq!(w.data_path(), Some(path), "{name}");
        w.post(None).unwrap();
        let got = peer.dump(&format!("raw-{name}"));
        for i in 0..N / 4096 {
            let o = ((i * 7) % (N / 4096)) * 4096;
            assert!(got[o..][..4096] == mine[i * 4096..][..4096], "{name}: WRITE block {i} differs");
        }
        peer.ok("FILL 77");
        let r = a.create_request(XferOp::Read, &local, &remote, &name, None).unwrap();
        assert_eq!(r.data_path(), Some(path));
        r.post(None).unwrap();
        for i in 0..N / 4096 {
            let o = ((i * 7) % (N / 4096)) * 4096;
            for j in 0..4096 {
                assert_eq!(mine[i * 4096 + j], pattern_byte(77, o + j), "{name}: READ block {i} byte {j}");
            }
        }
        fill(&mut mine, 66);
    }
    drop(reg);
    raw_peer.exit();
    buf_peer.exit();
}

#[test]
fn mixed_requests_and_the_map_parameter() {
    // Two agents of this process (SHM still goes through the kernel and the
    // control socket): one request spanning a memfd region and a raw one.
    let cfg = |map: &str| AgentConfig::default().with_backend("SHM", Params::new().with("map", map));
    let owner = Agent::new(&format!("{ME}-owner"), cfg("true")).unwrap();
    let mapped = AlignedBuf::new(64 << 10).unwrap();
    let raw = vec![0u8; 64 << 10];
    let _r1 = owner.register_buf(&mapped).unwrap();
    let r2 = register_vec(&owner, &raw);
    let a = Agent::new(&format!("{ME}-init"), cfg("true")).unwrap();
    let mut buf = AlignedBuf::new(8192).unwrap();
    fill(buf.as_mut_slice(), 88);
    let _r3 = a.register_buf(&buf).unwrap();
    a.load_remote_metadata(&owner.local_metadata().unwrap()).unwrap();
    let local = buf.xfer_blocks(0, 4096, 2).unwrap();
    let remote = XferDescList::from_descs(
        MemType::Dram,
        vec![XferDesc::new(mapped.addr() + 4096, 4096, 0), XferDesc::new(raw.as_ptr() as u64 + 8192, 4096, 0)],
    );
    let w = a.create_request_with(XferOp::Write, &local, &remote, owner.name(), None, &["SHM"]).unwrap();
    assert_eq!(w.data_path(), Some(kvferry::DataPath::Mixed));
    w.post(None).unwrap();
    assert!(mapped.as_slice()[4096..8192] == buf.as_slice()[..4096], "mapped half");
    assert!(std::hint::black_box(&raw)[8192..12288] == buf.as_slice()[4096..], "raw half");

    // map=false on the initiator: it never asks for the memfd.
    let first = buf.xfer_blocks(0, 4096, 1).unwrap();
    let one = |agent: &Agent, owner: &Agent, addr: u64| {
        agent.load_remote_metadata(&owner.local_metadata().unwrap()).unwrap();
        let r = remote_list(addr, std::iter::once(0), 4096);
        let req = agent.create_request_with(XferOp::Write, &first, &r, owner.name(), None, &["SHM"]).unwrap();
        req.post(None).unwrap();
        req.data_path()
    };
    let b = Agent::new(&format!("{ME}-nomap"), cfg("false")).unwrap();
    let _r4 = b.register_buf(&buf).unwrap();
    assert_eq!(one(&b, &owner, mapped.addr()), Some(kvferry::DataPath::Cma));
    // map=false on the owner: it shares no memfd; initiators use CMA.
    let owner2 = Agent::new(&format!("{ME}-owner2"), cfg("false")).unwrap();
    let other = AlignedBuf::new(4096).unwrap();
    let _r5 = owner2.register_buf(&other).unwrap();
    assert_eq!(one(&a, &owner2, other.addr()), Some(kvferry::DataPath::Cma));
    assert!(other.as_slice() == &buf.as_slice()[..4096]);
    drop(r2);
}

#[test]
fn deregistration_unmaps_and_later_posts_touch_nothing() {
    const N: usize = 1 << 20;
    let mut peer = spawn("shm-mdereg", N, 1, &[]);
    let inode = peer.memfd_inode().unwrap();
    let a = agent(&format!("{ME}-adereg"), &["SHM"]);
    let mut buf = AlignedBuf::new(N).unwrap();
    fill(buf.as_mut_slice(), 12);
    let _r = a.register_buf(&buf).unwrap();
    a.load_remote_metadata(&peer.md).unwrap();
    let local = buf.xfer_blocks(0, N, 1).unwrap();
    let remote = remote_list(peer.addr, std::iter::once(0), N);
    let w = a.create_request(XferOp::Write, &local, &remote, "shm-mdereg", None).unwrap();
    let r = a.create_request(XferOp::Read, &local, &remote, "shm-mdereg", None).unwrap();
    assert_eq!(w.data_path(), Some(kvferry::DataPath::Mapped));
    w.post(None).unwrap();
    assert!(maps_inode(inode));

    // The owner's deregistration returns only after this agent unmapped the
    // region and acknowledged.
    peer.ok("DEREG");
    assert!(!maps_inode(inode), "the mapping is gone once the owner's deregister returned");
    fill(buf.as_mut_slice(), 13);
    for req in [&w, &r] {
        let e = req.post(None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotAllowed, "{e}");
        assert!(e.message().contains("deregistered"), "{e}");
    }
    assert_eq!(
        buf.as_slice().iter().enumerate().position(|(i, &b)| b != pattern_byte(13, i)),
        None,
        "READ moved nothing"
    );
    let got = peer.dump("mdereg");
    assert_eq!(
        got.iter().enumerate().position(|(i, &b)| b != pattern_byte(12, i)),
        None,
        "the owner's memory is untouched"
    );
    let e = a.create_request(XferOp::Write, &local, &remote, "shm-mdereg", None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAllowed, "{e}");
    peer.exit();
}

#[test]
fn exited_peer_fails_mapped_posts_and_is_unmapped() {
    const N: usize = 1 << 20;
    let peer = spawn("shm-mexit", N, 1, &[]);
    let inode = peer.memfd_inode().unwrap();
    let a = agent(&format!("{ME}-aexit"), &["SHM"]);
    let buf = AlignedBuf::new(N).unwrap();
    let _r = a.register_buf(&buf).unwrap();
    a.load_remote_metadata(&peer.md).unwrap();
    let local = buf.xfer_blocks(0, N, 1).unwrap();
    let remote = remote_list(peer.addr, std::iter::once(0), N);
    let w = a.create_request(XferOp::Write, &local, &remote, "shm-mexit", None).unwrap();
    let r = a.create_request(XferOp::Read, &local, &remote, "shm-mexit", None).unwrap();
    assert_eq!((w.data_path(), r.data_path()), (Some(kvferry::DataPath::Mapped), Some(kvferry::DataPath::Mapped)));
    w.post(None).unwrap();
    peer.exit(); // returns once the process is reaped; its pages live on in our mapping

    for req in [&w, &r] {
        let e = req.post(None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::RemoteDisconnect, "{e}");
    }
    eventually("the orphaned mapping dropped", Duration::from_secs(10), || !maps_inode(inode));
    eventually("peer invalidated", Duration::from_secs(10), || !a.check_remote("shm-mexit", None));
}
