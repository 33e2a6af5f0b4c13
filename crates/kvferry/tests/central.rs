//! Central metadata through the embedded metadata server: publish, fetch,
//! partial labels, application keys, lease expiry after a crash, watches,
//! store restarts, and failures.

use std::process::Stdio;
use std::time::{Duration, Instant};

use kvferry::metadata::server::MetaServer;
use kvferry::metadata::store::{HttpStore, MetaStore};
use kvferry::{Agent, AgentConfig, AlignedBuf, ErrorKind, MetaPeer, Params, XferOp};
use kvferry_test_support::{free_port, name, rerun_self, Child};

fn cfg(url: &str) -> AgentConfig {
    let mut c = AgentConfig::default().with_metadata_url(url).with_backend("local", Params::new());
    c.metadata_timeout = Duration::from_millis(500);
    c.metadata_lease = Duration::from_millis(600);
    c.metadata_namespace = format!("/test-{}/agents/", std::process::id());
    c
}

/// The child role: an agent that publishes and then waits to be killed.
#[test]
fn child_role() {
    let Ok(url) = std::env::var("KVFERRY_CENTRAL_CHILD") else { return };
    let n = std::env::var("KVFERRY_CENTRAL_NAME").unwrap();
    let mut c = cfg(&url);
    c.metadata_namespace = std::env::var("KVFERRY_CENTRAL_NS").unwrap();
    let a = Agent::new(&n, c).unwrap();
    a.send_local_metadata(MetaPeer::Store).unwrap();
    println!("published");
    std::thread::sleep(Duration::from_secs(30));
}

#[test]
fn publish_fetch_transfer_and_invalidate() {
    let srv = MetaServer::start("127.0.0.1:0").unwrap();
    let a = Agent::new(&name("ca"), cfg(&srv.url())).unwrap();
    let b = Agent::new(&name("cb"), cfg(&srv.url())).unwrap();
    let src = AlignedBuf::new(4096).unwrap();
    let dst = AlignedBuf::new(4096).unwrap();
    let (_ra, _rb) = (a.register_buf(&src).unwrap(), b.register_buf(&dst).unwrap());
    b.send_local_metadata(MetaPeer::Store).unwrap();
    a.fetch_remote_metadata(b.name(), None, MetaPeer::Store).unwrap();
    assert!(a.check_remote(b.name(), Some(&dst.xfer_blocks(0, 4096, 1).unwrap())));
    let req = a
        .create_request(
            XferOp::Write,
            &src.xfer_blocks(0, 4096, 1).unwrap(),
            &dst.xfer_blocks(0, 4096, 1).unwrap(),
            b.name(),
            None,
        )
        .unwrap();
    req.post(None).unwrap();

    // Partial metadata by label.
    let extra = AlignedBuf::new(4096).unwrap();
    let _re = b.register_buf(&extra).unwrap();
    b.send_partial_metadata(&extra.reg_list(), false, "layer1", MetaPeer::Store).unwrap();
    assert!(!a.check_remote(b.name(), Some(&extra.xfer_blocks(0, 4096, 1).unwrap())));
    a.fetch_remote_metadata(b.name(), Some("layer1"), MetaPeer::Store).unwrap();
    assert!(a.check_remote(b.name(), Some(&extra.xfer_blocks(0, 4096, 1).unwrap())));
    assert!(b.send_partial_metadata(&extra.reg_list(), false, "a/b", MetaPeer::Store).is_err());

    // Withdrawing: the watcher invalidates the peer on its own.
    b.invalidate_local_metadata(MetaPeer::Store).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.check_remote(b.name(), None) {
        assert!(Instant::now() < deadline, "a never noticed that b withdrew its metadata");
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = a.fetch_remote_metadata(b.name(), None, MetaPeer::Store).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.message().contains(&srv.url()), "names the store: {e}");
}

#[test]
fn missing_agent_times_out_with_not_found() {
    let srv = MetaServer::start("127.0.0.1:0").unwrap();
    let a = Agent::new(&name("cm"), cfg(&srv.url())).unwrap();
    let t = Instant::now();
    let e = a.fetch_remote_metadata("nobody", None, MetaPeer::Store).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(t.elapsed() >= Duration::from_millis(450) && t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn application_keys() {
    let srv = MetaServer::start("127.0.0.1:0").unwrap();
    let a = Agent::new(&name("app"), cfg(&srv.url())).unwrap();
    let b = Agent::new(&name("app"), cfg(&srv.url())).unwrap();
    let key = format!("/test-{}/app/ready", std::process::id());
    let (sa, sb) = (a.store().unwrap(), b.store().unwrap());
    assert_eq!(sa.get(&key, Duration::from_millis(50)).unwrap_err().kind(), ErrorKind::NotFound);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| sb.get(&key, Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(50));
        sa.put(&key, b"rank-3").unwrap();
        assert_eq!(waiter.join().unwrap().unwrap(), b"rank-3", "get waits for a later put");
    });
    assert_eq!(sa.list(&format!("/test-{}/app/", std::process::id())).unwrap(), vec![key.clone()]);
    sb.delete(&key).unwrap();
    assert!(sa.get(&key, Duration::ZERO).is_err());
    // Descriptor lists travel as values.
    let buf = AlignedBuf::new(8192).unwrap();
    sa.put(&key, &buf.xfer_blocks(0, 4096, 2).unwrap().to_bytes()).unwrap();
    let got = kvferry::XferDescList::from_bytes(&sb.get(&key, Duration::ZERO).unwrap()).unwrap();
    assert_eq!(got.len(), 2);
}

#[test]
fn killed_agent_metadata_expires_and_watchers_invalidate() {
    let srv = MetaServer::start("127.0.0.1:0").unwrap();
    let watcher = Agent::new(&name("cw"), cfg(&srv.url())).unwrap();
    let victim = name("victim");
    let ns = cfg("http://x").metadata_namespace;
    let mut cmd = rerun_self("child_role", false, &[]);
    cmd.env("KVFERRY_CENTRAL_CHILD", srv.url())
        .env("KVFERRY_CENTRAL_NAME", &victim)
        .env("KVFERRY_CENTRAL_NS", &ns)
        .stderr(Stdio::null());
    let mut child = Child::spawn(&victim, &mut cmd, "");
    child.wait_for("published", Duration::from_secs(60));
    // The child's agent is not loadable here (LOCAL is in-process only), so
    // watch the key itself, and check the watcher path with a live agent below.
    let store = HttpStore::new(&srv.url(), Duration::from_secs(2)).unwrap();
    let key = format!("{ns}{victim}/metadata");
    assert!(store.get(&key).unwrap().is_some());
    // Stays alive while the child renews its lease...
    std::thread::sleep(Duration::from_millis(1200));
    assert!(store.get(&key).unwrap().is_some(), "a live agent keeps its metadata");
    child.kill();
    let t = Instant::now();
    while store.get(&key).unwrap().is_some() {
        assert!(t.elapsed() < Duration::from_secs(3), "metadata of a killed agent outlived its 600 ms lease");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(watcher);
}

#[test]
fn restarted_store_gets_republished() {
    // Pick a port, run a server there, stop it and start a new one on the same port.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let srv = MetaServer::start(&addr).unwrap();
    let a = Agent::new(&name("rs"), cfg(&srv.url())).unwrap();
    let b = Agent::new(&name("rs"), cfg(&srv.url())).unwrap();
    a.send_local_metadata(MetaPeer::Store).unwrap();
    srv.stop();
    // The old listening socket may take a moment to close.
    let t = Instant::now();
    let srv = loop {
        match MetaServer::start(&addr) {
            Ok(s) => break s,
            Err(e) => assert!(t.elapsed() < Duration::from_secs(10), "cannot restart the server: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(srv.is_empty());
    let t = Instant::now();
    loop {
        match b.fetch_remote_metadata(a.name(), None, MetaPeer::Store) {
            Ok(()) => break,
            Err(e) => assert!(t.elapsed() < Duration::from_secs(10), "a never re-published: {e}"),
        }
    }
}

#[test]
fn unreachable_store_is_a_clear_bounded_error() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let a = Agent::new(&name("un"), cfg(&url)).unwrap();
    let t = Instant::now();
    let e = a.send_local_metadata(MetaPeer::Store).unwrap_err();
    assert!(e.message().contains(&url), "names the endpoint: {e}");
    assert!(t.elapsed() < Duration::from_secs(5));
    let none =
        Agent::new(&name("none"), AgentConfig { metadata_url: None, etcd_endpoints: vec![], ..AgentConfig::default() })
            .unwrap();
    let e = none.send_local_metadata(MetaPeer::Store).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported);
    assert!(e.message().contains("KVFERRY_METADATA_URL"), "{e}");
}

#[test]
fn malformed_values_never_panic() {
    let srv = MetaServer::start("127.0.0.1:0").unwrap();
    let a = Agent::new(&name("mal"), cfg(&srv.url())).unwrap();
    let ns = cfg("http://x").metadata_namespace;
    let store = HttpStore::new(&srv.url(), Duration::from_secs(2)).unwrap();
    store.put(&format!("{ns}evil/metadata"), b"not metadata at all", None).unwrap();
    let e = a.fetch_remote_metadata("evil", None, MetaPeer::Store).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Malformed);
    // Another agent's blob under the wrong name is refused too.
    let b = Agent::new(&name("mal"), cfg(&srv.url())).unwrap();
    store.put(&format!("{ns}liar/metadata"), &b.local_metadata().unwrap(), None).unwrap();
    assert!(a.fetch_remote_metadata("liar", None, MetaPeer::Store).unwrap_err().message().contains("not 'liar'"));
}

#[test]
fn http_api_speaks_to_plain_clients() {
    use std::io::{Read, Write};
    let srv = MetaServer::start("127.0.0.1:0").unwrap();
    let raw = |req: &str| -> String {
        let mut s = std::net::TcpStream::connect(srv.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let r = raw("PUT /v1/kv/hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nworld");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = raw("GET /v1/kv/hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(r.ends_with("world"), "{r}");
    let r = raw("GET /v1/prefix/hel HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(r.contains("\"key\":\"hello\""), "{r}");
    let r = raw("GET /v1/kv/%zz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let r = raw("PUT /v1/kv/x?lease=99 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx");
    assert!(r.starts_with("HTTP/1.1 400") && r.contains("32 hex digits"), "{r}");
    let unknown = format!("{:032x}", 99);
    let r = raw(&format!(
        "PUT /v1/kv/x?lease={unknown} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"
    ));
    assert!(r.starts_with("HTTP/1.1 404") && r.contains(&unknown), "{r}");
    let r = raw("GARBAGE\r\n\r\n");
    assert!(!r.starts_with("HTTP/1.1 200"), "{r}");
    let r = raw("GET /v1/events?since=0&prefix=hel&wait_ms=10 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(r.contains("\"kind\":\"put\""), "{r}");
}

#[test]
fn a_name_held_by_another_live_lease_waits_for_it_then_refuses() {
    let srv = MetaServer::start("127.0.0.1:0").unwrap();
    let c = cfg(&srv.url());
    let other = HttpStore::new(&srv.url(), Duration::from_secs(2)).unwrap();
    // A crashed predecessor's key: its lease is never renewed, so the new
    // process gets the name once the old lease (600 ms) expires.
    let n = name("heir");
    let old = other.grant_lease(Duration::from_millis(600)).unwrap();
    other.put(&format!("{}{n}/metadata", c.metadata_namespace), b"stale", Some(old)).unwrap();
    let a = Agent::new(&n, c.clone()).unwrap();
    let t = Instant::now();
    a.send_local_metadata(MetaPeer::Store).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300), "published over a live lease after {:?}", t.elapsed());
    let b = Agent::new(&name("reader"), c.clone()).unwrap();
    b.fetch_remote_metadata(&n, None, MetaPeer::Store).unwrap();
    // A live holder that keeps renewing: the newcomer is refused, clearly.
    let n2 = name("taken");
    let live = other.grant_lease(Duration::from_secs(30)).unwrap();
    other.put(&format!("{}{n2}/metadata", c.metadata_namespace), b"mine", Some(live)).unwrap();
    let e = Agent::new(&n2, c).unwrap().send_local_metadata(MetaPeer::Store).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAllowed, "{e}");
    assert!(e.message().contains("live lease"), "{e}");
    assert_eq!(
        other.get(&format!("{}{n2}/metadata", cfg("http://x").metadata_namespace)).unwrap().as_deref(),
        Some(&b"mine"[..])
    );
}
