//! `EtcdStore` against a real etcd (Debian's etcd-server): every
//! `MetaStore` call through etcd's JSON API, leases that expire or are
//! unknown, watches (compacted ones too), endpoints tried in order, and
//! authentication.

use std::time::{Duration, Instant};

use kvferry::metadata::store::{EtcdCredentials, EtcdStore, MetaStore};
use kvferry::ErrorKind;

fn store(urls: &[&str]) -> EtcdStore {
    EtcdStore::connect(&urls.iter().map(|u| u.to_string()).collect::<Vec<_>>(), Duration::from_secs(2)).unwrap()
}

fn dead_url() -> String {
    format!("http://127.0.0.1:{}", kvferry_test_support::free_port())
}

#[test]
fn keys_values_and_prefixes() {
    let etcd = kvferry_test_support::servers::Etcd::start();
    let s = store(&[&etcd.url]);
    assert_eq!(s.get("/t/missing").unwrap(), None);
    let binary: Vec<u8> = (0..=255).cycle().take(100_000).collect();
    s.put("/t/a", &binary, None).unwrap();
    s.put("/t/b", b"", None).unwrap();
    s.put("/t/c/d", b"x", None).unwrap();
    s.put("/u/other", b"y", None).unwrap();
    assert_eq!(s.get("/t/a").unwrap().as_deref(), Some(&binary[..]));
    assert_eq!(s.get("/t/b").unwrap().as_deref(), Some(&b""[..]));
    assert_eq!(s.list("/t/").unwrap(), ["/t/a", "/t/b", "/t/c/d"]);
    s.delete("/t/b").unwrap();
    s.delete("/t/never").unwrap();
    assert_eq!(s.get("/t/b").unwrap(), None);
    assert_eq!(s.delete_prefix("/t/").unwrap(), 2);
    assert!(s.list("/t/").unwrap().is_empty());
    assert_eq!(s.list("/u/").unwrap(), ["/u/other"]);
    // The store's revision counts every change.
    let r = s.revision().unwrap();
    s.put("/u/other", b"z", None).unwrap();
    assert_eq!(s.revision().unwrap(), r + 1);
}

#[test]
fn leases_expire_renew_and_revoke() {
    let etcd = kvferry_test_support::servers::Etcd::start();
    let s = store(&[&etcd.url]);
    let l = s.grant_lease(Duration::from_secs(2)).unwrap();
    s.put("/l/a", b"1", Some(l)).unwrap();
    assert!(s.keep_alive(l).unwrap());
    s.revoke(l).unwrap();
    assert_eq!(s.get("/l/a").unwrap(), None, "revoking deletes the lease's keys");
    // Unknown leases: keep-alive says gone, put says NotFound, revoke is fine.
    assert!(!s.keep_alive(l).unwrap());
    assert_eq!(s.put("/l/b", b"1", Some(l)).unwrap_err().kind(), ErrorKind::NotFound);
    s.revoke(l).unwrap();
    assert!(!s.keep_alive(u64::MAX).unwrap());
    // A lease nobody renews expires with its keys.
    let l = s.grant_lease(Duration::from_millis(1500)).unwrap();
    s.put("/l/c", b"1", Some(l)).unwrap();
    let t = Instant::now();
    while s.get("/l/c").unwrap().is_some() {
        assert!(t.elapsed() < Duration::from_secs(10), "the lease never expired");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!s.keep_alive(l).unwrap());
}

#[test]
fn watches_see_changes_after_a_revision() {
    let etcd = kvferry_test_support::servers::Etcd::start();
    let s = store(&[&etcd.url]);
    let since = s.revision().unwrap();
    // Nothing changes: the watch ends after its timeout, revision unchanged.
    let t = Instant::now();
    let quiet = s.watch("/w/", since, Duration::from_millis(300)).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(250) && t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!((quiet.revision, quiet.put.len(), quiet.deleted.len(), quiet.compacted), (since, 0, 0, false));
    // Changes made before the watch starts are seen from `since` on.
    s.put("/w/a", b"1", None).unwrap();
    s.put("/elsewhere", b"1", None).unwrap();
    let b = s.watch("/w/", since, Duration::from_secs(2)).unwrap();
    assert_eq!(b.put, ["/w/a"]);
    assert!(b.revision > since && !b.compacted);
    // A delete, seen from the batch's revision on (not the put again).
    s.delete("/w/a").unwrap();
    let d = s.watch("/w/", b.revision, Duration::from_secs(2)).unwrap();
    assert_eq!((d.put.len(), d.deleted.as_slice()), (0, &["/w/a".to_string()][..]));
    assert!(d.revision > b.revision);
    // A change while the watch waits ends it early.
    let s2 = store(&[&etcd.url]);
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        s2.put("/w/late", b"1", None).unwrap();
    });
    let t = Instant::now();
    let late = s.watch("/w/", d.revision, Duration::from_secs(10)).unwrap();
    writer.join().unwrap();
    assert_eq!(late.put, ["/w/late"]);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Compacted history: the watcher is told to re-list.
    let now = s.revision().unwrap();
    let answer = etcd.post("/v3/kv/compaction", &format!(r#"{{"revision":"{now}"}}"#));
    assert!(answer.contains("header"), "{answer}");
    let c = s.watch("/w/", since, Duration::from_secs(2)).unwrap();
    assert!(c.compacted, "{c:?}");
}

#[test]
fn wait_for_a_key() {
    let etcd = kvferry_test_support::servers::Etcd::start();
    let s = store(&[&etcd.url]);
    s.put("/k/there", b"v", None).unwrap();
    assert_eq!(s.wait_for("/k/there", Duration::from_secs(1)).unwrap().as_deref(), Some(&b"v"[..]));
    let t = Instant::now();
    assert_eq!(s.wait_for("/k/never", Duration::from_millis(300)).unwrap(), None);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let s2 = store(&[&etcd.url]);
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        s2.put("/k/later", b"late", None).unwrap();
    });
    assert_eq!(s.wait_for("/k/later", Duration::from_secs(10)).unwrap().as_deref(), Some(&b"late"[..]));
    writer.join().unwrap();
}

#[test]
fn endpoints_are_tried_in_order() {
    let etcd = kvferry_test_support::servers::Etcd::start();
    let dead = dead_url();
    let s = store(&[&dead, &etcd.url]);
    s.put("/e/a", b"1", None).unwrap();
    assert_eq!(s.get("/e/a").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(s.endpoint(), format!("{dead},{}", etcd.url));
    // All dead: a bounded error that names each endpoint.
    let (d1, d2) = (dead_url(), dead_url());
    let t = Instant::now();
    let e = store(&[&d1, &d2]).get("/e/a").unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(e.kind(), ErrorKind::RemoteDisconnect);
    assert!(e.message().contains(&d1) && e.message().contains(&d2), "{e}");
}

#[test]
fn authentication_with_a_user() {
    // Tokens that expire after a second: the client must take a new one.
    let etcd =
        kvferry_test_support::servers::Etcd::start_with(kvferry_test_support::free_port(), &["--auth-token-ttl", "1"]);
    for (path, body) in [
        ("/v3/auth/user/add", r#"{"name":"root","password":"rootpw"}"#),
        ("/v3/auth/role/add", r#"{"name":"root"}"#),
        ("/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#),
        ("/v3/auth/enable", "{}"),
    ] {
        let answer = etcd.post(path, body);
        assert!(answer.contains("header"), "{path}: {answer}");
    }
    let anonymous = store(&[&etcd.url]);
    let e = anonymous.put("/a/x", b"1", None).unwrap_err();
    assert!(e.kind() == ErrorKind::NotAllowed && e.message().contains("KVFERRY_ETCD_USER"), "{e}");
    let wrong = store(&[&etcd.url]).with_credentials(Some(EtcdCredentials::new("root", "nope")));
    let e = wrong.get("/a/x").unwrap_err();
    assert!(e.kind() == ErrorKind::NotAllowed && e.message().contains("KVFERRY_ETCD_PASSWORD"), "{e}");
    let s = store(&[&etcd.url]).with_credentials(Some(EtcdCredentials::new("root", "rootpw")));
    s.put("/a/x", b"1", None).unwrap();
    let l = s.grant_lease(Duration::from_secs(60)).unwrap();
    s.put("/a/y", b"2", Some(l)).unwrap();
    assert!(s.keep_alive(l).unwrap());
    // Past the token's TTL (and etcd's 1 s sweep): every call still works.
    let expire = || std::thread::sleep(Duration::from_secs(3));
    expire();
    assert_eq!(s.get("/a/x").unwrap().as_deref(), Some(&b"1"[..]));
    let since = s.revision().unwrap();
    expire();
    s.delete("/a/x").unwrap();
    expire();
    assert_eq!(s.watch("/a/", since, Duration::from_secs(2)).unwrap().deleted, ["/a/x"]);
    expire();
    assert!(s.keep_alive(l).unwrap());
    s.revoke(l).unwrap();
}
