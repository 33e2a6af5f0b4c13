//! What the agent logs when a TCP peer goes away: a peer that leaves while
//! idle (its program ended, the usual end of a NIXL program) is news, logged
//! at info; a peer lost while requests were in flight is a warning, and the
//! requests fail with `RemoteDisconnect`. The peers are processes (this
//! binary re-run as `peer_entry`). One test in its own binary: it installs a
//! process-wide subscriber that records every event.

mod tcp_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvferry::{Agent, AlignedBuf, ErrorKind, Params, XferOp};
use kvferry_test_support::eventually;
use tcp_support::{fetch, initiator, PeerProc};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

peer_entry!();

/// Every event's level and message, from every thread.
#[derive(Clone, Default)]
struct Recorder {
    events: Arc<Mutex<Vec<(Level, String)>>>,
    next_span: Arc<AtomicU64>,
}

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut m = Message(String::new());
        event.record(&mut m);
        self.events.lock().unwrap().push((*event.metadata().level(), m.0));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

impl Recorder {
    fn take(&self) -> Vec<(Level, String)> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }
}

/// Waits (bounded) until `a` no longer has `peer` loaded.
fn until_unloaded(a: &Agent, peer: &str) {
    eventually(&format!("{peer} unloaded after it left"), Duration::from_secs(5), || !a.check_remote(peer, None));
}

#[test]
fn idle_peer_exit_is_info_and_a_loss_mid_request_is_a_warning() {
    let rec = Recorder::default();
    tracing::subscriber::set_global_default(rec.clone()).unwrap();
    let a = initiator("tcplog-a", Params::new());
    let len = 64 << 20;
    let src = AlignedBuf::new(len).unwrap();
    let _r = a.register_buf(&src).unwrap();

    // Idle: one WRITE opens the connections, then the peer's program ends.
    let p = PeerProc::spawn("tcplog-b", 1 << 20, &[], &[]);
    fetch(&a, "tcplog-b", "127.0.0.1", p.md_port);
    let w = a
        .create_request(XferOp::Write, &src.xfer_blocks(0, 4096, 1).unwrap(), &p.blocks(0, 4096, 1), "tcplog-b", None)
        .unwrap();
    w.post(None).unwrap();
    w.wait(Duration::from_secs(20)).unwrap();
    rec.take();
    drop(p); // "quit": the peer drops its agent and exits 0
    until_unloaded(&a, "tcplog-b");
    let idle = rec.take();
    assert!(
        idle.iter().any(|(l, m)| *l == Level::INFO && m.contains("peer closed its connection while idle")),
        "{idle:?}"
    );
    assert!(!idle.iter().any(|(l, _)| *l <= Level::WARN), "an idle peer's exit warned: {idle:?}");

    // In flight: the peer is stopped, a WRITE posted to it, and it is killed.
    let mut p = PeerProc::spawn("tcplog-c", len, &[], &[]);
    fetch(&a, "tcplog-c", "127.0.0.1", p.md_port);
    a.make_connection("tcplog-c").unwrap();
    p.signal(libc::SIGSTOP);
    let w = a
        .create_request(XferOp::Write, &src.xfer_blocks(0, len, 1).unwrap(), &p.blocks(0, len, 1), "tcplog-c", None)
        .unwrap();
    rec.take();
    w.post(None).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    p.kill();
    let e = w.wait(Duration::from_secs(20)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RemoteDisconnect, "{e}");
    until_unloaded(&a, "tcplog-c");
    let lost = rec.take();
    assert!(lost.iter().any(|(l, m)| *l == Level::WARN && m.contains("peer lost with requests in flight")), "{lost:?}");
}
