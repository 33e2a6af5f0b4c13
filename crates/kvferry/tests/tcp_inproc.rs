//! TCP between two agents of one process: the quick checks of the data path.
//! (The two-process, fault and namespace tests are in the other `tcp_*` files.)

use std::time::Duration;

use kvferry::{Agent, AgentConfig, AlignedBuf, ErrorKind, MemType, Params, XferDescList, XferOp};
use kvferry_test_support::fill;

fn agent(name: &str, params: Params) -> Agent {
    Agent::new(name, AgentConfig::default().with_backend("TCP", params)).unwrap()
}

#[test]
fn write_and_read_byte_for_byte() {
    let a = agent("tcpi-a", Params::new());
    let b = agent("tcpi-b", Params::new());
    let len = 8 << 20;
    let mut src = AlignedBuf::new(len).unwrap();
    fill(src.as_mut_slice(), 3);
    let dst = AlignedBuf::new(len).unwrap();
    let back = AlignedBuf::new(len).unwrap();
    let _r1 = a.register_buf(&src).unwrap();
    let _r2 = b.register_buf(&dst).unwrap();
    let _r3 = a.register_buf(&back).unwrap();
    a.load_remote_metadata(&b.local_metadata().unwrap()).unwrap();
    let req = a
        .create_request(
            XferOp::Write,
            &src.xfer_blocks(0, len, 1).unwrap(),
            &dst.xfer_blocks(0, len, 1).unwrap(),
            "tcpi-b",
            Some(b"w"),
        )
        .unwrap();
    assert_eq!(req.backend(), "TCP");
    req.post(None).unwrap();
    req.wait(Duration::from_secs(20)).unwrap();
    assert!(src.as_slice() == dst.as_slice());
    assert!(b.wait_notifications(Duration::from_secs(5)));
    assert_eq!(b.take_notifications()["tcpi-a"], vec![b"w".to_vec()]);
    let rd = a
        .create_request(
            XferOp::Read,
            &back.xfer_blocks(0, len, 1).unwrap(),
            &dst.xfer_blocks(0, len, 1).unwrap(),
            "tcpi-b",
            None,
        )
        .unwrap();
    rd.post(None).unwrap();
    rd.wait(Duration::from_secs(20)).unwrap();
    assert!(back.as_slice() == src.as_slice());
    // Post again: requests are reusable.
    rd.post(None).unwrap();
    rd.wait(Duration::from_secs(20)).unwrap();
}

#[test]
fn many_small_descriptors_scattered() {
    let a = agent("tcpi-c", Params::new().with("lanes", 3));
    let b = agent("tcpi-d", Params::new());
    let n = 4096;
    let block = 1024;
    let mut src = AlignedBuf::new(n * block).unwrap();
    fill(src.as_mut_slice(), 9);
    let dst = AlignedBuf::new(2 * n * block).unwrap();
    let _r1 = a.register_buf(&src).unwrap();
    let _r2 = b.register_buf(&dst).unwrap();
    a.load_remote_metadata(&b.local_metadata().unwrap()).unwrap();
    // Local block i goes to remote slot (n - 1 - i) * 2: nothing merges.
    let local = src.xfer_blocks(0, block, n).unwrap();
    let mut remote = XferDescList::new(MemType::Dram);
    for i in 0..n {
        remote.push(dst.xfer_desc((n - 1 - i) * 2 * block, block).unwrap());
    }
    let req = a.create_request(XferOp::Write, &local, &remote, "tcpi-d", Some(b"many")).unwrap();
    assert_eq!(req.segments(), n);
    req.post(None).unwrap();
    req.wait(Duration::from_secs(20)).unwrap();
    for i in 0..n {
        let r = (n - 1 - i) * 2 * block;
        assert_eq!(&dst.as_slice()[r..r + block], &src.as_slice()[i * block..(i + 1) * block], "block {i}");
    }
    assert!(b.wait_notifications(Duration::from_secs(5)));
    // READ them back scattered.
    let back = AlignedBuf::new(n * block).unwrap();
    let _r3 = a.register_buf(&back).unwrap();
    let rd = a.create_request(XferOp::Read, &back.xfer_blocks(0, block, n).unwrap(), &remote, "tcpi-d", None).unwrap();
    rd.post(None).unwrap();
    rd.wait(Duration::from_secs(20)).unwrap();
    assert!(back.as_slice() == src.as_slice());
}

#[test]
fn invalidated_peer_is_unreachable_and_drop_is_prompt() {
    let a = agent("tcpi-e", Params::new());
    let b = agent("tcpi-f", Params::new());
    let src = AlignedBuf::new(4096).unwrap();
    let dst = AlignedBuf::new(4096).unwrap();
    let _r1 = a.register_buf(&src).unwrap();
    let _r2 = b.register_buf(&dst).unwrap();
    a.load_remote_metadata(&b.local_metadata().unwrap()).unwrap();
    let req = a
        .create_request(
            XferOp::Write,
            &src.xfer_blocks(0, 4096, 1).unwrap(),
            &dst.xfer_blocks(0, 4096, 1).unwrap(),
            "tcpi-f",
            None,
        )
        .unwrap();
    for _ in 0..100 {
        req.post(None).unwrap();
        req.wait(Duration::from_secs(5)).unwrap();
    }
    a.invalidate_remote("tcpi-f").unwrap();
    let e = req.post(None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RemoteDisconnect, "{e}");
    drop(b);
    drop(a);
}

/// Eight threads post on one agent at once — small requests (written by the
/// posting thread, answers read by whichever waiting thread holds the
/// connection), medium ones and striped large ones, WRITE and READ, waited
/// on or polled, some with notifications — and every byte lands.
#[test]
fn eight_threads_post_small_and_large_on_one_agent() {
    let a = agent("tcpi-m8a", Params::new().with("lanes", 2));
    let b = agent("tcpi-m8b", Params::new());
    let threads = 8;
    let slot = 4 << 20;
    let dst = AlignedBuf::new(threads * slot).unwrap();
    let _rd = b.register_buf(&dst).unwrap();
    a.load_remote_metadata(&b.local_metadata().unwrap()).unwrap();
    a.make_connection("tcpi-m8b").unwrap();
    let sizes = [4096usize, 64 << 10, 8, 2 << 20, 4096, 100_000];
    std::thread::scope(|s| {
        for t in 0..threads {
            let (a, dst) = (&a, &dst);
            s.spawn(move || {
                let mut src = AlignedBuf::new(slot).unwrap();
                let back = AlignedBuf::new(slot).unwrap();
                let _r1 = a.register_buf(&src).unwrap();
                let _r2 = a.register_buf(&back).unwrap();
                for it in 0..60usize {
                    let len = sizes[(it + t) % sizes.len()];
                    let seed = (t * 61 + it) as u8;
                    for (i, b) in src.as_mut_slice()[..len].iter_mut().enumerate() {
                        *b = (i as u8).wrapping_mul(13) ^ seed;
                    }
                    let remote = dst.xfer_blocks(t * slot, len, 1).unwrap();
                    let notif = (it % 7 == 3).then_some(&b"n"[..]);
                    let w = a
                        .create_request(XferOp::Write, &src.xfer_blocks(0, len, 1).unwrap(), &remote, "tcpi-m8b", notif)
                        .unwrap();
                    w.post(None).unwrap();
                    if it % 2 == 0 {
                        w.wait(Duration::from_secs(20)).unwrap();
                    } else {
                        // Spin on status, bounded.
                        let t0 = std::time::Instant::now();
                        while w.status().unwrap() != kvferry::XferState::Done {
                            assert!(t0.elapsed() < Duration::from_secs(20), "thread {t} iteration {it}: WRITE stuck");
                        }
                    }
                    let r = a
                        .create_request(XferOp::Read, &back.xfer_blocks(0, len, 1).unwrap(), &remote, "tcpi-m8b", None)
                        .unwrap();
                    r.post(None).unwrap();
                    r.wait(Duration::from_secs(20)).unwrap();
                    assert!(back.as_slice()[..len] == src.as_slice()[..len], "thread {t} iteration {it} ({len} bytes)");
                }
            });
        }
    });
    // Notifications were attached to some writes: all arrive.
    let want = threads * (0..60).filter(|it| it % 7 == 3).count();
    let t0 = std::time::Instant::now();
    let mut got = 0;
    while got < want && t0.elapsed() < Duration::from_secs(10) {
        b.wait_notifications(Duration::from_millis(100));
        got += b.take_notifications().get("tcpi-m8a").map_or(0, Vec::len);
    }
    assert_eq!(got, want);
}
