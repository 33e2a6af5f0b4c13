//! SHM failure modes with real processes: a peer that exits or is killed
//! mid-transfer turns requests into `RemoteDisconnect` (never a hang) and is
//! invalidated; a restarted peer needs fresh metadata, and the stale one is
//! refused. The peers' buffers are memfd-backed, so these run the mapped path
//! (`shm_mapped.rs` has more of it).

mod shm_support;

use std::time::{Duration, Instant};

use kvferry::{AlignedBuf, ErrorKind, MemType, XferDesc, XferDescList, XferOp};
use kvferry_test_support::{eventually, fill, scratch};
use shm_support::{agent, peer_main, Peer};

const ME: &str = "shm_failures";

/// The peer role: does nothing unless this binary was started as a peer.
#[test]
fn shm_peer_main() {
    peer_main();
}

fn spawn(name: &str, size: usize, seed: u64) -> Peer {
    Peer::spawn("shm_peer_main", name, size, seed, &[])
}

fn one(base: u64, len: usize) -> XferDescList {
    XferDescList::from_descs(MemType::Dram, vec![XferDesc::new(base, len as u64, 0)])
}

#[test]
fn exited_peer_gives_remote_disconnect() {
    let peer = spawn("shm-fexit", 1 << 16, 1);
    let a = agent(&format!("{ME}-aexit"), &["SHM"]);
    let buf = AlignedBuf::new(1 << 16).unwrap();
    let _r = a.register_buf(&buf).unwrap();
    a.load_remote_metadata(&peer.md).unwrap();
    let w = a
        .create_request(XferOp::Write, &buf.xfer_blocks(0, 4096, 1).unwrap(), &one(peer.addr, 4096), "shm-fexit", None)
        .unwrap();
    w.post(None).unwrap();
    peer.exit(); // returns once the process is reaped

    let t = Instant::now();
    let e = w.post(None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RemoteDisconnect, "{e}");
    assert!(t.elapsed() < Duration::from_secs(2), "the failure is immediate, not a timeout");
    assert_eq!(w.status().unwrap_err().kind(), ErrorKind::RemoteDisconnect);
    // The agent was told: the peer's metadata is gone.
    eventually("peer invalidated", Duration::from_secs(10), || !a.check_remote("shm-fexit", None));
    let e = a.send_notification("shm-fexit", b"x", &[]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

#[test]
fn killed_peer_mid_transfer_never_hangs() {
    const N: usize = 32 << 20;
    let peer = spawn("shm-fkill", N, 1);
    let a = agent(&format!("{ME}-akill"), &["SHM"]);
    let buf = AlignedBuf::new(N).unwrap();
    let _r = a.register_buf(&buf).unwrap();
    a.load_remote_metadata(&peer.md).unwrap();
    let w = a
        .create_request(XferOp::Write, &buf.xfer_blocks(0, N, 1).unwrap(), &one(peer.addr, N), "shm-fkill", None)
        .unwrap();
    assert_eq!(w.data_path(), Some(kvferry::DataPath::Mapped));
    w.post(None).unwrap();
    let poster = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match w.post(None) {
                Ok(_) => assert!(Instant::now() < deadline, "posts kept succeeding after the peer was killed"),
                Err(e) => return e,
            }
        }
    });
    std::thread::sleep(Duration::from_millis(50));
    peer.kill();
    let e = poster.join().unwrap();
    assert_eq!(e.kind(), ErrorKind::RemoteDisconnect, "{e}");
    eventually("peer invalidated", Duration::from_secs(10), || !a.check_remote("shm-fkill", None));
}

#[test]
fn restarted_peer_needs_fresh_metadata() {
    let old = spawn("shm-frestart", 1 << 16, 1);
    let old_md = old.md.clone();
    let a = agent(&format!("{ME}-arestart"), &["SHM"]);
    let mut buf = AlignedBuf::new(1 << 16).unwrap();
    fill(buf.as_mut_slice(), 9);
    let _r = a.register_buf(&buf).unwrap();
    a.load_remote_metadata(&old_md).unwrap();
    let stale = a
        .create_request(
            XferOp::Write,
            &buf.xfer_blocks(0, 4096, 1).unwrap(),
            &one(old.addr, 4096),
            "shm-frestart",
            None,
        )
        .unwrap();
    old.exit();

    let mut new = spawn("shm-frestart", 1 << 16, 2);
    // The old process's metadata is refused by a fresh agent...
    let b = agent(&format!("{ME}-brestart"), &["SHM"]);
    let e = b.load_remote_metadata(&old_md).unwrap_err();
    assert!(e.message().contains("stale") || e.message().contains("no longer"), "{e}");
    // ...and requests built on it fail, never touching the new process.
    assert_eq!(stale.post(None).unwrap_err().kind(), ErrorKind::RemoteDisconnect);

    // The new process's metadata works (it replaces the old instance).
    a.load_remote_metadata(&new.md).unwrap();
    let w = a
        .create_request(
            XferOp::Write,
            &buf.xfer_blocks(0, 4096, 16).unwrap(),
            &one(new.addr, 1 << 16).trim_into(4096),
            "shm-frestart",
            None,
        )
        .unwrap();
    assert_eq!(w.data_path(), Some(kvferry::DataPath::Mapped), "the new process's memfd was mapped");
    w.post(None).unwrap();
    let path = scratch("restart");
    new.ok(&format!("DUMP {}", path.display()));
    let got = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(got == buf.as_slice(), "the new process received the data");
    assert_eq!(stale.post(None).unwrap_err().kind(), ErrorKind::RemoteDisconnect, "the old request stays dead");
    new.exit();
}

trait Split {
    fn trim_into(&self, block: usize) -> XferDescList;
}

impl Split for XferDescList {
    /// Splits a one-descriptor list into `block`-sized descriptors.
    fn trim_into(&self, block: usize) -> XferDescList {
        let d = self.get(0).unwrap();
        let n = d.len as usize / block;
        XferDescList::from_descs(
            MemType::Dram,
            (0..n).map(|i| XferDesc::new(d.addr + (i * block) as u64, block as u64, 0)).collect(),
        )
    }
}
