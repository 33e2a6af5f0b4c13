//! Two processes that find each other only through a central store (the
//! embedded metadata server, and etcd), then move data over TCP; and a
//! killed agent whose metadata expires and whose watchers invalidate it.

use std::time::{Duration, Instant};

use kvferry::metadata::server::MetaServer;
use kvferry::{Agent, AgentConfig, AlignedBuf, MetaPeer, Params, XferDescList, XferOp};
use kvferry_test_support::{fill, name, rerun_self, Child};

const LEN: usize = 1 << 20;

fn config(url: Option<&str>, etcd: Option<&str>, ns: &str) -> AgentConfig {
    let mut c = AgentConfig::default().with_backend("tcp", Params::new());
    c.metadata_url = url.map(String::from);
    c.etcd_endpoints = etcd.map(|e| vec![e.to_string()]).unwrap_or_default();
    c.metadata_namespace = ns.to_string();
    c.metadata_lease = Duration::from_secs(2);
    c.metadata_timeout = Duration::from_secs(10);
    c
}

/// The child: publishes itself and its buffer, waits for "done", checks what was written.
#[test]
fn child_role() {
    let Ok(name) = std::env::var("KVF_STORE_CHILD") else { return };
    let ns = std::env::var("KVF_STORE_NS").unwrap();
    let url = std::env::var("KVF_STORE_URL").ok();
    let etcd = std::env::var("KVF_STORE_ETCD").ok();
    let a = Agent::new(&name, config(url.as_deref(), etcd.as_deref(), &ns)).unwrap();
    let mut buf = AlignedBuf::new(LEN).unwrap();
    fill(&mut buf.as_mut_slice()[..LEN / 2], 1);
    let _r = a.register_buf(&buf).unwrap();
    a.send_local_metadata(MetaPeer::Store).unwrap();
    a.store().unwrap().put(&format!("{ns}app/{name}/descs"), &buf.xfer_blocks(0, LEN, 1).unwrap().to_bytes()).unwrap();
    println!("ready");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if a.take_notifications().values().flatten().any(|m| m == b"done") {
            break;
        }
        assert!(Instant::now() < deadline, "no 'done' notification");
        a.wait_notifications(Duration::from_millis(50));
    }
    let mut want = vec![0u8; LEN / 2];
    fill(&mut want, 2);
    assert!(buf.as_slice()[LEN / 2..] == want[..], "the second half holds what the parent wrote");
    println!("verified");
}

/// Every wait for the child's word is bounded by this.
const SAY: Duration = Duration::from_secs(60);

fn spawn(name: &str, ns: &str, url: Option<&str>, etcd: Option<&str>) -> Child {
    let mut cmd = rerun_self("child_role", false, &[]);
    cmd.env("KVF_STORE_CHILD", name).env("KVF_STORE_NS", ns);
    if let Some(u) = url {
        cmd.env("KVF_STORE_URL", u);
    }
    if let Some(e) = etcd {
        cmd.env("KVF_STORE_ETCD", e);
    }
    let mut child = Child::spawn(name, &mut cmd, "");
    child.wait_for("ready", SAY);
    child
}

fn scenario(url: Option<&str>, etcd: Option<&str>) {
    let ns = format!("/kvf-test-{}-{}/", std::process::id(), kvferry_test_support::free_port());
    let me = Agent::new(&name("parent"), config(url, etcd, &ns)).unwrap();
    let mut local = AlignedBuf::new(LEN).unwrap();
    fill(&mut local.as_mut_slice()[LEN / 2..], 2);
    let _r = me.register_buf(&local).unwrap();

    let child_name = name("child");
    let mut child = spawn(&child_name, &ns, url, etcd);
    me.fetch_remote_metadata(&child_name, None, MetaPeer::Store).unwrap();
    let descs = me.store().unwrap().get(&format!("{ns}app/{child_name}/descs"), Duration::from_secs(5)).unwrap();
    let remote = XferDescList::from_bytes(&descs).unwrap();
    let base = remote[0].addr;
    let half =
        |b: u64| XferDescList::from_descs(kvferry::MemType::Dram, vec![kvferry::XferDesc::new(b, (LEN / 2) as u64, 0)]);
    // READ the child's first half, WRITE our second half, then notify.
    let rd = me.create_request(XferOp::Read, &half(local.addr()), &half(base), &child_name, None).unwrap();
    rd.post(None).unwrap();
    rd.wait(Duration::from_secs(10)).unwrap();
    let mut want = vec![0u8; LEN / 2];
    fill(&mut want, 1);
    assert!(local.as_slice()[..LEN / 2] == want[..], "READ brought the child's bytes");
    let wr = me
        .create_request(
            XferOp::Write,
            &half(local.addr() + (LEN / 2) as u64),
            &half(base + (LEN / 2) as u64),
            &child_name,
            Some(b"done"),
        )
        .unwrap();
    wr.post(None).unwrap();
    wr.wait(Duration::from_secs(10)).unwrap();
    child.wait_for("verified", SAY);
    assert!(child.child.wait().unwrap().success());

    // A killed agent: its metadata expires with its lease and watchers invalidate it.
    let victim = name("victim");
    let mut child = spawn(&victim, &ns, url, etcd);
    me.fetch_remote_metadata(&victim, None, MetaPeer::Store).unwrap();
    assert!(me.check_remote(&victim, None));
    child.kill();
    let t = Instant::now();
    while me.check_remote(&victim, None) {
        assert!(t.elapsed() < Duration::from_secs(10), "the killed agent's metadata was never invalidated");
        std::thread::sleep(Duration::from_millis(50));
    }
    let gone = me.fetch_remote_metadata(&victim, None, MetaPeer::Store);
    assert_eq!(gone.unwrap_err().kind(), kvferry::ErrorKind::NotFound);
}

#[test]
fn through_the_metadata_server() {
    let srv = MetaServer::start("127.0.0.1:0").unwrap();
    scenario(Some(&srv.url()), None);
}

#[test]
fn through_etcd() {
    let etcd = kvferry_test_support::servers::Etcd::start();
    scenario(None, Some(&etcd.url));
}

#[test]
fn etcd_restart_and_failures() {
    let port = kvferry_test_support::free_port();
    let etcd = kvferry_test_support::servers::Etcd::start_on(port);
    let ns = format!("/kvf-restart-{}/", std::process::id());
    let a = Agent::new(&name("er"), config(None, Some(&etcd.url), &ns)).unwrap();
    let b = Agent::new(&name("er"), config(None, Some(&etcd.url), &ns)).unwrap();
    a.send_local_metadata(MetaPeer::Store).unwrap();
    b.fetch_remote_metadata(a.name(), None, MetaPeer::Store).unwrap();
    // A fresh etcd on the same port has lost everything: the agent re-publishes.
    drop(etcd);
    let _etcd = kvferry_test_support::servers::Etcd::start_on(port);
    b.invalidate_remote(a.name()).unwrap();
    let t = Instant::now();
    while b.fetch_remote_metadata(a.name(), None, MetaPeer::Store).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "the agent never re-published to the restarted etcd");
    }
    // A missing agent times out with NotFound; malformed values do not panic.
    let e = b.fetch_remote_metadata("nobody", None, MetaPeer::Store).unwrap_err();
    assert_eq!(e.kind(), kvferry::ErrorKind::NotFound);
    b.store().unwrap().put(&format!("{ns}evil/metadata"), b"garbage").unwrap();
    assert_eq!(
        b.fetch_remote_metadata("evil", None, MetaPeer::Store).unwrap_err().kind(),
        kvferry::ErrorKind::Malformed
    );
    // An unreachable etcd is a clear, bounded error naming the endpoint.
    let dead = format!("http://127.0.0.1:{}", kvferry_test_support::free_port());
    let c = Agent::new(&name("er"), config(None, Some(&dead), &ns)).unwrap();
    let t = Instant::now();
    let e = c.send_local_metadata(MetaPeer::Store).unwrap_err();
    assert!(e.message().contains(&dead), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}
