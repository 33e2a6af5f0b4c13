//! In-flight request states, observed through the GATED test backend, whose
//! transfers complete only when the test opens its gate. One test function:
//! the gate is process-wide.

use std::sync::atomic::Ordering;
use std::time::Duration;

use kvferry::{Agent, AgentConfig, AlignedBuf, ErrorKind, Params, XferOp, XferState};
use kvferry_test_support::name;
use kvferry_test_support::plugins::{self, GATE, GATED};

#[test]
fn repost_wait_timeout_and_release() {
    plugins::register(&GATED);
    let cfg = || AgentConfig::default().with_backend("gated", Params::new());
    let a = Agent::new(&name("ga"), cfg()).unwrap();
    let b = Agent::new(&name("gb"), cfg()).unwrap();
    let src = AlignedBuf::new(4096).unwrap();
    let dst = AlignedBuf::new(4096).unwrap();
    let (_ra, _rb) = (a.register_buf(&src).unwrap(), b.register_buf(&dst).unwrap());
    a.load_remote_metadata(&b.local_metadata().unwrap()).unwrap();
    let (l, r) = (src.xfer_blocks(0, 4096, 1).unwrap(), dst.xfer_blocks(0, 4096, 1).unwrap());

    GATE.open.store(false, Ordering::SeqCst);
    let req = a.create_request(XferOp::Write, &l, &r, b.name(), None).unwrap();
    assert_eq!(req.post(None).unwrap(), XferState::InProgress);
    assert_eq!(req.status().unwrap(), XferState::InProgress);
    assert_eq!(req.post(None).unwrap_err().kind(), ErrorKind::RepostActive);
    let e = req.wait(Duration::from_millis(20)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(e.message().contains("GATED"), "{e}");

    GATE.open.store(true, Ordering::SeqCst);
    req.wait(Duration::from_secs(5)).unwrap();
    assert_eq!(req.status().unwrap(), XferState::Done);
    assert_eq!(req.post(None).unwrap(), XferState::Done, "reposting after completion is allowed");

    // Releasing an in-flight request cancels it; a finished one is not cancelled.
    let before = GATE.cancels.load(Ordering::SeqCst);
    req.release();
    assert_eq!(GATE.cancels.load(Ordering::SeqCst), before);
    GATE.open.store(false, Ordering::SeqCst);
    let req = a.create_request(XferOp::Write, &l, &r, b.name(), None).unwrap();
    req.post(None).unwrap();
    drop(req);
    assert_eq!(GATE.cancels.load(Ordering::SeqCst), before + 1);
    GATE.open.store(true, Ordering::SeqCst);
}
