//! The agent's public surface over the LOCAL backend: configuration,
//! backends, registration, metadata, requests, notifications, threads.

use std::time::Duration;

use kvferry::{
    Agent, AgentConfig, AlignedBuf, ErrorKind, MemType, Params, RegDesc, RegDescList, XferDesc, XferDescList, XferOp,
    XferState,
};
use kvferry_test_support::name;
use kvferry_test_support::plugins::{self, GATED};

const T: Duration = Duration::from_secs(5);

fn pair() -> (Agent, Agent) {
    let a = Agent::with_backends(&name("a"), &["local"]).unwrap();
    let b = Agent::with_backends(&name("b"), &["LOCAL"]).unwrap();
    (a, b)
}

/// Two LOCAL agents with `src` registered on `a`, `dst` on `b`, and `b`'s
/// metadata loaded on `a`.
struct Linked {
    a: Agent,
    b: Agent,
    src: AlignedBuf,
    dst: AlignedBuf,
    regs: (kvferry::Registration, kvferry::Registration),
}

impl Linked {
    /// A WRITE of the first 4 KiB of `src` to the first 4 KiB of `dst`.
    fn first_block(&self, notif: Option<&[u8]>) -> kvferry::Request {
        let (l, r) = (self.src.xfer_blocks(0, 4096, 1).unwrap(), self.dst.xfer_blocks(0, 4096, 1).unwrap());
        self.a.create_request(XferOp::Write, &l, &r, self.b.name(), notif).unwrap()
    }
}

fn linked(len: usize, seed: u8) -> Linked {
    let (a, b) = pair();
    let src = filled(len, seed);
    let dst = AlignedBuf::new(len).unwrap();
    let regs = (a.register_buf(&src).unwrap(), b.register_buf(&dst).unwrap());
    a.load_remote_metadata(&b.local_metadata().unwrap()).unwrap();
    Linked { a, b, src, dst, regs }
}

fn filled(len: usize, seed: u8) -> AlignedBuf {
    let mut b = AlignedBuf::new(len).unwrap();
    for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    b
}

#[test]
fn names_must_be_unique_and_non_empty() {
    assert_eq!(Agent::new("", AgentConfig::default()).unwrap_err().kind(), ErrorKind::InvalidParam);
    let n = name("dup");
    let a = Agent::new(&n, AgentConfig::default()).unwrap();
    let e = Agent::new(&n, AgentConfig::default()).unwrap_err();
    assert!(e.message().contains("already exists"), "{e}");
    drop(a);
    Agent::new(&n, AgentConfig::default()).expect("the name is free again once the agent is gone");
}

#[test]
fn backend_registry_and_tracking() {
    let a = Agent::new(&name("reg"), AgentConfig::default()).unwrap();
    assert!(Agent::available_plugins().contains(&"LOCAL".to_string()));
    let e = a.create_backend("nosuch", &Params::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.message().contains("LOCAL"), "lists the available plugins: {e}");
    let e = a.create_backend("local", &Params::new().with("bogus", 1)).unwrap_err();
    assert!(e.message().contains("'bogus'"), "{e}");
    assert!(!a.has_backend("LOCAL"));
    let e = a.require_backend("local").unwrap_err();
    assert!(e.message().contains("has: none"), "{e}");
    a.create_backend("Local", &Params::new()).unwrap();
    a.create_backend("LOCAL", &Params::new()).expect("creating an existing backend again is a no-op");
    assert!(a.has_backend("local"));
    assert_eq!(a.backends(), vec!["LOCAL".to_string()]);
    a.require_backend("LOCAL").unwrap();
    let (mems, params) = Agent::plugin_params("local").unwrap();
    assert_eq!(mems, vec![MemType::Dram]);
    assert!(params.is_empty());
}

#[test]
fn with_backends_is_all_or_nothing_and_names_each_failure() {
    let n = name("all");
    let e = Agent::with_backends(&n, &["local", "nope1", "nope2"]).unwrap_err();
    assert!(e.message().contains("NOPE1") && e.message().contains("NOPE2"), "{e}");
    Agent::with_backends(&n, &["local"]).expect("a failed creation leaves the name free");
}

#[test]
fn user_plugins_take_custom_params_from_the_environment() {
    plugins::register(&GATED);
    let vars = [("KVFERRY_BACKENDS", "local,gated"), ("KVFERRY_GATED_COLOR", "red")]
        .map(|(k, v)| (k.to_string(), v.to_string()));
    let a = Agent::new(&name("env"), AgentConfig::from_vars(vars).unwrap()).unwrap();
    assert_eq!(a.backends(), vec!["LOCAL".to_string(), "GATED".to_string()]);
    assert_eq!(a.backend_params("gated").unwrap().raw("color"), Some("red"));
    assert_eq!(a.backend_params("gated").unwrap().raw("rank"), Some("100"), "defaults fill the rest");
    let vars =
        [("KVFERRY_BACKENDS", "gated"), ("KVFERRY_GATED_SHADE", "x")].map(|(k, v)| (k.to_string(), v.to_string()));
    let e = Agent::new(&name("env"), AgentConfig::from_vars(vars).unwrap()).unwrap_err();
    assert!(e.message().contains("'shade'") && e.message().contains("rank, color"), "{e}");
    let e = a.create_backend("gated", &Params::new().with("color", "green")).unwrap_err();
    assert!(e.message().contains("other parameters"), "{e}");
}

#[test]
fn registration_rules() {
    let (a, _b) = pair();
    let buf = AlignedBuf::new(1 << 16).unwrap();
    let r = a.register_buf(&buf).unwrap();
    assert_eq!(a.registered_regions(), 1);
    let e = a.register_buf(&buf).unwrap_err();
    assert!(e.message().contains("overlaps"), "{e}");
    let inner = RegDescList::from_descs(MemType::Dram, vec![RegDesc::new(buf.addr() + 4096, 10, 0)]);
    // SAFETY: buf outlives every registration in this test (they fail or are dropped first).
    assert!(unsafe { a.register_mem(&inner, &[]) }.unwrap_err().message().contains("overlaps"));
    let zero = RegDescList::from_descs(MemType::Dram, vec![RegDesc::new(buf.addr(), 0, 0)]);
    // SAFETY: as above.
    assert!(unsafe { a.register_mem(&zero, &[]) }.unwrap_err().message().contains("zero length"));
    let vram = RegDescList::from_descs(MemType::Vram, vec![RegDesc::new(0x1000, 10, 0)]);
    // SAFETY: registration fails before anything could touch the address.
    let e = unsafe { a.register_mem(&vram, &[]) }.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported);
    assert!(e.message().contains("VRAM"), "{e}");
    let e = a.register_storage(&buf.reg_list(), &[]).unwrap_err();
    assert!(e.message().contains("register_storage takes FILE"), "{e}");
    drop(r);
    assert_eq!(a.registered_regions(), 0, "dropping the handle deregisters");
}

#[test]
fn deregistration_must_match_exactly() {
    let (a, _b) = pair();
    let buf = AlignedBuf::new(8192).unwrap();
    a.register_buf(&buf).unwrap().keep();
    let wrong_len = RegDescList::from_descs(MemType::Dram, vec![RegDesc::new(buf.addr(), 4096, 0)]);
    assert_eq!(a.deregister_mem(&wrong_len).unwrap_err().kind(), ErrorKind::Mismatch);
    let elsewhere = RegDescList::from_descs(MemType::Dram, vec![RegDesc::new(buf.addr() + 4096, 4096, 0)]);
    assert_eq!(a.deregister_mem(&elsewhere).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(a.registered_regions(), 1, "a failed deregistration removes nothing");
    a.deregister_mem(&buf.reg_list()).unwrap();
    assert_eq!(a.registered_regions(), 0);
    assert_eq!(a.deregister_mem(&buf.reg_list()).unwrap_err().kind(), ErrorKind::NotFound);
}

#[test]
fn registration_outlives_the_buffer_handle() {
    let (a, b) = pair();
    let src = filled(4096, 1);
    let dst = AlignedBuf::new(4096).unwrap();
    let (dst_addr, _rb) = (dst.addr(), b.register_buf(&dst).unwrap());
    drop(dst); // The registration keeps the memory alive.
    let _ra = a.register_buf(&src).unwrap();
    a.load_remote_metadata(&b.local_metadata().unwrap()).unwrap();
    let remote = XferDescList::from_descs(MemType::Dram, vec![XferDesc::new(dst_addr, 4096, 0)]);
    let req = a.create_request(XferOp::Write, &src.xfer_blocks(0, 4096, 1).unwrap(), &remote, b.name(), None).unwrap();
    assert_eq!(req.post(None).unwrap(), XferState::Done);
}

#[test]
fn write_and_read_move_every_byte() {
    let (a, b) = pair();
    let src = filled(1 << 20, 7);
    let dst = AlignedBuf::new(1 << 20).unwrap();
    let (_ra, _rb) = (a.register_buf(&src).unwrap(), b.register_buf(&dst).unwrap());
    assert_eq!(a.load_remote_metadata(&b.local_metadata().unwrap()).unwrap(), b.name());
    let local = src.xfer_blocks(0, 4096, 256).unwrap();
    // Scatter into the remote buffer in reverse block order.
    let mut remote = XferDescList::new(MemType::Dram);
    for i in (0..256).rev() {
        remote.push(dst.xfer_desc(i * 4096, 4096).unwrap());
    }
    let w = a.create_request(XferOp::Write, &local, &remote, b.name(), None).unwrap();
    assert_eq!(w.backend(), "LOCAL");
    assert_eq!(a.chosen_backend(&w), "LOCAL");
    w.post(None).unwrap();
    w.wait(T).unwrap();
    for i in 0..256 {
        assert_eq!(&dst.as_slice()[(255 - i) * 4096..][..4096], &src.as_slice()[i * 4096..][..4096]);
    }
    // Read it back into a third buffer.
    let back = AlignedBuf::new(1 << 20).unwrap();
    let _rc = a.register_buf(&back).unwrap();
    let r = a
        .create_request(
            XferOp::Read,
            &back.xfer_blocks(0, 1 << 20, 1).unwrap(),
            &dst.xfer_blocks(0, 1 << 20, 1).unwrap(),
            b.name(),
            None,
        )
        .unwrap();
    r.post(None).unwrap();
    r.wait(T).unwrap();
    assert_eq!(back.as_slice(), dst.as_slice());
    assert!(r.estimate_cost().duration > Duration::ZERO);
}

#[test]
fn an_agent_can_transfer_to_itself() {
    let (a, _) = pair();
    let buf = filled(8192, 3);
    let _r = a.register_buf(&buf).unwrap();
    let req = a
        .create_request(
            XferOp::Write,
            &buf.xfer_blocks(0, 4096, 1).unwrap(),
            &buf.xfer_blocks(4096, 4096, 1).unwrap(),
            a.name(),
            Some(b"self"),
        )
        .unwrap();
    req.post(None).unwrap();
    assert_eq!(&buf.as_slice()[4096..], &buf.as_slice()[..4096]);
    assert_eq!(a.take_notifications()[a.name()], vec![b"self".to_vec()]);
}

#[test]
fn request_validation_errors() {
    let (a, b) = pair();
    let src = AlignedBuf::new(8192).unwrap();
    let dst = AlignedBuf::new(8192).unwrap();
    let unreg = AlignedBuf::new(8192).unwrap();
    let (_ra, _rb) = (a.register_buf(&src).unwrap(), b.register_buf(&dst).unwrap());
    let one = src.xfer_blocks(0, 4096, 1).unwrap();
    let two = dst.xfer_blocks(0, 4096, 2).unwrap();
    // Unknown peer.
    let e = a.create_request(XferOp::Write, &one, &two, b.name(), None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Mismatch, "count mismatch is checked first: {e}");
    let e = a.create_request(XferOp::Write, &one, &dst.xfer_blocks(0, 4096, 1).unwrap(), b.name(), None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.message().contains("load its metadata"), "{e}");
    a.load_remote_metadata(&b.local_metadata().unwrap()).unwrap();
    let e = a.create_request(XferOp::Write, &one, &dst.xfer_blocks(0, 2048, 1).unwrap(), b.name(), None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Mismatch);
    let e = a
        .create_request(
            XferOp::Write,
            &unreg.xfer_blocks(0, 4096, 1).unwrap(),
            &dst.xfer_blocks(0, 4096, 1).unwrap(),
            b.name(),
            None,
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAllowed);
    assert!(e.message().contains("local"), "{e}");
    let e = a.create_request(XferOp::Write, &one, &unreg.xfer_blocks(0, 4096, 1).unwrap(), b.name(), None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAllowed);
    assert!(e.message().contains("published"), "{e}");
    // A range that starts inside the region but runs past its end.
    let past = XferDescList::from_descs(MemType::Dram, vec![XferDesc::new(dst.addr() + 4096, 8192, 0)]);
    let big = src.xfer_blocks(0, 8192, 1).unwrap();
    assert_eq!(a.create_request(XferOp::Write, &big, &past, b.name(), None).unwrap_err().kind(), ErrorKind::NotAllowed);
    let empty = XferDescList::new(MemType::Dram);
    assert_eq!(
        a.create_request(XferOp::Write, &empty, &empty, b.name(), None).unwrap_err().kind(),
        ErrorKind::InvalidParam
    );
    let e = a
        .create_request_with(XferOp::Write, &one, &dst.xfer_blocks(0, 4096, 1).unwrap(), b.name(), None, &["tcp"])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported);
    assert!(e.message().contains("TCP is not a backend"), "{e}");
    let huge = vec![0u8; kvferry::notif::MAX_NOTIF_LEN + 1];
    let req = a.create_request(XferOp::Write, &one, &dst.xfer_blocks(0, 4096, 1).unwrap(), b.name(), None).unwrap();
    assert_eq!(req.status().unwrap_err().kind(), ErrorKind::InvalidParam, "never posted");
    assert_eq!(req.post(Some(&huge)).unwrap_err().kind(), ErrorKind::InvalidParam);
}

#[test]
fn the_owner_checks_live_registrations_at_post() {
    let l = linked(4096, 9);
    let req = l.first_block(None);
    let Linked { dst, regs: (_ra, rb), .. } = l;
    rb.deregister().unwrap();
    let e = req.post(None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAllowed);
    assert!(dst.as_slice().iter().all(|&x| x == 0), "memory untouched");
    assert_eq!(req.status().unwrap_err().kind(), ErrorKind::NotAllowed, "the error sticks until the next post");
}

#[test]
fn metadata_loading_errors_and_partial_merges() {
    let (a, b) = pair();
    let e = a.load_remote_metadata(&a.local_metadata().unwrap()).unwrap_err();
    assert!(e.message().contains("own metadata"), "{e}");
    assert_eq!(a.load_remote_metadata(b"garbage").unwrap_err().kind(), ErrorKind::Malformed);
    let md = b.local_metadata().unwrap();
    assert_eq!(a.load_remote_metadata(&md[..md.len() - 1]).unwrap_err().kind(), ErrorKind::Malformed);
    let mut future = md.clone();
    future[4] = 0xff;
    assert!(a.load_remote_metadata(&future).unwrap_err().message().contains("upgrade kvferry"));

    // Partial blobs: connection info first, then regions one at a time.
    let x = AlignedBuf::new(4096).unwrap();
    let y = AlignedBuf::new(4096).unwrap();
    let (_rx, _ry) = (b.register_buf(&x).unwrap(), b.register_buf(&y).unwrap());
    let conn_only = b.partial_metadata(&RegDescList::new(MemType::Dram), true, &[]).unwrap();
    assert_eq!(a.load_remote_metadata(&conn_only).unwrap(), b.name());
    let xd = x.xfer_blocks(0, 4096, 1).unwrap();
    let yd = y.xfer_blocks(0, 4096, 1).unwrap();
    assert!(a.check_remote(b.name(), None));
    assert!(!a.check_remote(b.name(), Some(&xd)));
    a.load_remote_metadata(&b.partial_metadata(&x.reg_list(), false, &["local"]).unwrap()).unwrap();
    assert!(a.check_remote(b.name(), Some(&xd)) && !a.check_remote(b.name(), Some(&yd)));
    a.load_remote_metadata(&b.partial_metadata(&y.reg_list(), false, &[]).unwrap()).unwrap();
    assert!(a.check_remote(b.name(), Some(&xd)) && a.check_remote(b.name(), Some(&yd)), "partials merge");
    let unreg = AlignedBuf::new(4096).unwrap();
    assert_eq!(b.partial_metadata(&unreg.reg_list(), true, &[]).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(b.partial_metadata(&x.reg_list(), true, &["tcp"]).unwrap_err().kind(), ErrorKind::NotFound);

    // A full blob replaces: a region the peer no longer has disappears.
    drop(_ry);
    a.load_remote_metadata(&b.local_metadata().unwrap()).unwrap();
    assert!(!a.check_remote(b.name(), Some(&yd)));
    a.invalidate_remote(b.name()).unwrap();
    assert!(!a.check_remote(b.name(), None));
    assert_eq!(a.invalidate_remote(b.name()).unwrap_err().kind(), ErrorKind::NotFound);
    assert!(a.remote_agents().is_empty());
}

#[test]
fn invalidation_breaks_old_requests() {
    let l = linked(4096, 0);
    let req = l.first_block(None);
    let Linked { a, b, src, dst, regs: (_ra, _rb) } = l;
    a.invalidate_remote(b.name()).unwrap();
    assert_eq!(req.post(None).unwrap_err().kind(), ErrorKind::RemoteDisconnect);
    let bname = b.name().to_string();
    drop((_rb, b));
    let req2 = a
        .create_request(
            XferOp::Write,
            &src.xfer_blocks(0, 4096, 1).unwrap(),
            &src.xfer_blocks(0, 4096, 1).unwrap(),
            a.name(),
            None,
        )
        .unwrap();
    req2.post(None).unwrap();
    assert!(a
        .create_request(
            XferOp::Write,
            &src.xfer_blocks(0, 4096, 1).unwrap(),
            &dst.xfer_blocks(0, 4096, 1).unwrap(),
            &bname,
            None
        )
        .is_err());
}

#[test]
fn prepared_lists_merge_contiguous_runs() {
    let Linked { a, b, src, dst, regs: _regs } = linked(64 * 1024, 5);
    let lp = a.prepare_local(&src.xfer_blocks(0, 4096, 16).unwrap()).unwrap();
    let rp = a.prepare_remote(b.name(), &dst.xfer_blocks(0, 4096, 16).unwrap()).unwrap();
    assert_eq!((lp.len(), rp.peer()), (16, Some(b.name())));
    let idx: Vec<usize> = (0..16).collect();
    let req = a.make_request(XferOp::Write, &lp, &idx, &rp, &idx, None, &[]).unwrap();
    assert_eq!(req.segments(), 1, "16 blocks contiguous on both sides are one segment");
    req.post(None).unwrap();
    assert_eq!(dst.as_slice(), src.as_slice());
    // Swapped pairs are not contiguous.
    let req = a.make_request(XferOp::Write, &lp, &[0, 1, 2, 3], &rp, &[1, 0, 2, 3], None, &[]).unwrap();
    assert_eq!(req.segments(), 3);
    // Errors.
    assert_eq!(
        a.make_request(XferOp::Write, &lp, &[0, 1], &rp, &[0], None, &[]).unwrap_err().kind(),
        ErrorKind::Mismatch
    );
    assert!(a
        .make_request(XferOp::Write, &lp, &[16], &rp, &[0], None, &[])
        .unwrap_err()
        .message()
        .contains("out of range"));
    assert_eq!(
        a.make_request(XferOp::Write, &rp, &[0], &lp, &[0], None, &[]).unwrap_err().kind(),
        ErrorKind::InvalidParam
    );
    let unreg = AlignedBuf::new(4096).unwrap();
    assert_eq!(a.prepare_local(&unreg.xfer_blocks(0, 4096, 1).unwrap()).unwrap_err().kind(), ErrorKind::NotAllowed);
}

#[test]
fn backend_choice_is_deterministic_and_hints_win() {
    plugins::register(&GATED);
    let cfg = || AgentConfig::default().with_backend("gated", Params::new()).with_backend("local", Params::new());
    let a = Agent::new(&name("ca"), cfg()).unwrap();
    let b = Agent::new(&name("cb"), cfg()).unwrap();
    let src = AlignedBuf::new(4096).unwrap();
    let dst = AlignedBuf::new(4096).unwrap();
    let (_ra, _rb) = (a.register_buf(&src).unwrap(), b.register_buf(&dst).unwrap());
    a.load_remote_metadata(&b.local_metadata().unwrap()).unwrap();
    let (l, r) = (src.xfer_blocks(0, 4096, 1).unwrap(), dst.xfer_blocks(0, 4096, 1).unwrap());
    let req = a.create_request(XferOp::Write, &l, &r, b.name(), None).unwrap();
    assert_eq!(req.backend(), "LOCAL", "lowest rank wins, whatever the creation order");
    let req = a.create_request_with(XferOp::Write, &l, &r, b.name(), None, &["gated", "local"]).unwrap();
    assert_eq!(req.backend(), "GATED", "hints win in the caller's order");
    // Memory registered only with LOCAL cannot be moved by GATED.
    let only_local = AlignedBuf::new(4096).unwrap();
    let _rl = a.register_mem_hinted(&only_local, &["local"]);
    let e = a
        .create_request_with(
            XferOp::Write,
            &only_local.xfer_blocks(0, 4096, 1).unwrap(),
            &r,
            b.name(),
            None,
            &["gated"],
        )
        .unwrap_err();
    assert!(e.message().contains("not every descriptor"), "{e}");
    // Notifications skip backends without them.
    a.send_notification(b.name(), b"hi", &[]).unwrap();
    assert!(a.send_notification(b.name(), b"hi", &["gated"]).is_err());
    assert_eq!(b.take_notifications()[a.name()], vec![b"hi".to_vec()]);
}

trait HintedReg {
    fn register_mem_hinted(&self, buf: &AlignedBuf, hints: &[&str]) -> kvferry::Registration;
}

impl HintedReg for Agent {
    fn register_mem_hinted(&self, buf: &AlignedBuf, hints: &[&str]) -> kvferry::Registration {
        // SAFETY: every caller keeps `buf` alive longer than the registration.
        unsafe { self.register_mem(&buf.reg_list(), hints) }.unwrap()
    }
}

#[test]
fn notifications_follow_data_and_drain() {
    let l = linked(4096, 2);
    l.b.load_remote_metadata(&l.a.local_metadata().unwrap()).unwrap();
    let req = l.first_block(Some(b"stored"));
    let Linked { a, b, src, dst, regs: _regs } = l;
    req.post(None).unwrap();
    req.post(Some(b"replaced")).unwrap();
    req.post(None).unwrap();
    b.send_notification(a.name(), b"standalone", &[]).unwrap();
    assert!(b.wait_notifications(T));
    let n = b.take_notifications();
    assert_eq!(n[a.name()], vec![b"stored".to_vec(), b"replaced".to_vec(), b"replaced".to_vec()]);
    assert_eq!(dst.as_slice(), src.as_slice(), "data visible by the time the notification is");
    assert!(b.take_notifications().is_empty(), "take drains");
    assert_eq!(a.take_notifications()[b.name()], vec![b"standalone".to_vec()]);
    assert!(!b.wait_notifications(Duration::from_millis(10)));
    let e = a.send_notification("nobody", b"x", &[]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

#[test]
fn eight_threads_post_and_poll_on_one_agent() {
    let l = linked(8 * 65536, 11);
    let shared = l.first_block(None);
    let Linked { a, b, src, dst, regs: _regs } = l;
    std::thread::scope(|s| {
        for t in 0..8 {
            let (a, src, dst, shared, bname) = (&a, &src, &dst, &shared, b.name());
            s.spawn(move || {
                let l = src.xfer_blocks(t * 65536, 4096, 16).unwrap();
                let r = dst.xfer_blocks(t * 65536, 4096, 16).unwrap();
                for i in 0..200 {
                    let req = a.create_request(XferOp::Write, &l, &r, bname, Some(&[t as u8])).unwrap();
                    req.post(None).unwrap();
                    req.wait(T).unwrap();
                    // Everyone hammers one shared request too: post races are RepostActive or fine.
                    match shared.post(None) {
                        Ok(_) => {}
                        Err(e) => assert_eq!(e.kind(), ErrorKind::RepostActive),
                    }
                    let _ = shared.status();
                    if i % 50 == 0 {
                        let _ = a.local_metadata().unwrap();
                    }
                }
            });
        }
    });
    assert_eq!(dst.as_slice(), src.as_slice());
    let n = b.take_notifications();
    assert_eq!(n[a.name()].len(), 1600);
}

#[test]
fn descriptor_lists_travel_as_bytes() {
    let (a, b) = pair();
    let dst = AlignedBuf::new(8192).unwrap();
    let _rb = b.register_buf(&dst).unwrap();
    let wire = dst.xfer_blocks(0, 4096, 2).unwrap().to_bytes();
    a.load_remote_metadata(&b.local_metadata().unwrap()).unwrap();
    let remote = XferDescList::from_bytes(&wire).unwrap();
    assert!(a.check_remote(b.name(), Some(&remote)));
    assert_eq!(XferDescList::from_bytes(&wire[..3]).unwrap_err().kind(), ErrorKind::Malformed);
}

#[test]
fn a_peer_with_no_common_backend_is_refused_until_it_has_one() {
    let a = Agent::with_backends(&name("a"), &["local"]).unwrap();
    let b = Agent::with_backends(&name("b"), &[]).unwrap();
    // `b` still creating its backends: loading it would name a peer no
    // backend can reach, and a fetch loop would stop asking.
    let e = a.load_remote_metadata(&b.local_metadata().unwrap()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(e.message().contains("no backend in common") && e.message().contains("this agent has [LOCAL]"), "{e}");
    assert!(a.remote_agents().is_empty() && !a.check_remote(b.name(), None));
    b.create_backend("LOCAL", &Params::new()).unwrap();
    assert_eq!(a.load_remote_metadata(&b.local_metadata().unwrap()).unwrap(), b.name());
    assert!(a.check_remote(b.name(), None));
}

#[test]
fn the_listener_starts_once_after_construction() {
    let a = Agent::with_backends(&name("a"), &["local"]).unwrap();
    let b = Agent::with_backends(&name("b"), &["local"]).unwrap();
    assert_eq!(b.listen_port(), None);
    let port = b.start_listener(0).unwrap();
    assert!(port != 0 && b.listen_port() == Some(port));
    let e = b.start_listener(0).unwrap_err();
    assert!(e.message().contains("already listens"), "{e}");
    a.fetch_remote_metadata(b.name(), None, kvferry::MetaPeer::addr("127.0.0.1", port).unwrap()).unwrap();
    let deadline = std::time::Instant::now() + T;
    while !a.check_remote(b.name(), None) {
        assert!(std::time::Instant::now() < deadline, "the late listener never served b's metadata");
        std::thread::sleep(Duration::from_millis(5));
    }
}
