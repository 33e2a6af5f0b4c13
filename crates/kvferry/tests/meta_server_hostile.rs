//! The metadata server against a hostile client: hand-written HTTP over
//! `std::net::TcpStream` to 127.0.0.1 (huge bodies and headers, missing
//! tokens, other agents' keys, guessed lease ids, long-poll floods, idle
//! connections, slow bodies, caps), each with legitimate agents still
//! served meanwhile.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use kvferry::auth::AuthToken;
use kvferry::metadata::server::{MetaServer, MetaServerConfig};
use kvferry::metadata::store::{HttpStore, MetaStore};
use kvferry::{Agent, AgentConfig, MetaPeer, Params};
use kvferry_test_support::name;

/// Sends `req` as is and reads the answer until the server closes (or 5 s).
fn raw(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(req).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// One request with `Connection: close`; returns the status and the body.
fn call(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> (u16, String) {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let r = raw(addr, &req);
    status_and_body(&r)
}

fn status_and_body(r: &str) -> (u16, String) {
    let status = r.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = r.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn grant(addr: SocketAddr, token: Option<&str>) -> String {
    let (st, b) = call(addr, "POST", "/v1/lease?ttl_ms=60000", token, b"");
    assert_eq!(st, 200, "{b}");
    json(&b)["id"].as_str().unwrap().to_string()
}

fn healthy(addr: SocketAddr) -> bool {
    call(addr, "GET", "/v1/health", None, b"").0 == 200
}

fn agent_cfg(url: &str) -> AgentConfig {
    let mut c = AgentConfig::default().with_metadata_url(url).with_backend("local", Params::new());
    c.metadata_timeout = Duration::from_secs(2);
    c.metadata_lease = Duration::from_millis(900);
    c.metadata_namespace = format!("/hostile-{}/agents/", std::process::id());
    c
}

/// A legitimate pair of agents: one publishes, the other fetches.
fn agents_still_work(url: &str, token: Option<&str>) {
    let mk = |n: &str| {
        let mut c = agent_cfg(url);
        if let Some(t) = token {
            c = c.with_auth_token(t);
        }
        Agent::new(&name(n), c).unwrap()
    };
    let (a, b) = (mk("legit-a"), mk("legit-b"));
    a.send_local_metadata(MetaPeer::Store).unwrap();
    b.fetch_remote_metadata(a.name(), None, MetaPeer::Store).unwrap();
    a.invalidate_local_metadata(MetaPeer::Store).unwrap();
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap()
}

#[test]
fn huge_content_length_then_close_leaves_the_server_serving() {
    let srv = MetaServer::start("127.0.0.1:0").unwrap();
    let addr = srv.addr();
    let before = rss_kib();
    // 2^40 declared, a few bytes sent, then the client goes away; 64 at once.
    let hostile: Vec<_> = (0..64)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                let len = if i % 2 == 0 { 1u64 << 40 } else { 1 << 20 };
                let req = format!("PUT /v1/kv/evil{i} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\nabc");
                let _ = s.write_all(req.as_bytes());
                drop(s);
            })
        })
        .collect();
    for h in hostile {
        h.join().unwrap();
    }
    // The declared size alone is refused with a clear 413.
    let r = raw(addr, b"PUT /v1/kv/big HTTP/1.1\r\nHost: x\r\nContent-Length: 1099511627776\r\n\r\nabc");
    let (st, b) = status_and_body(&r);
    assert_eq!(st, 413, "{r}");
    assert!(b.contains("max_value"), "{b}");
    // Lengths that do not parse, or disagree, are refused as bad requests.
    for cl in
        ["Content-Length: 99999999999999999999999", "Content-Length: -1", "Content-Length: 3\r\nContent-Length: 4"]
    {
        let r =
            raw(addr, format!("PUT /v1/kv/odd HTTP/1.1\r\nHost: x\r\n{cl}\r\nConnection: close\r\n\r\nabc").as_bytes());
        assert!(r.starts_with("HTTP/1.1 400"), "{cl}: {r}");
    }
    assert!(healthy(addr));
    assert_eq!(call(addr, "PUT", "/v1/kv/fine", None, b"value").0, 200);
    assert_eq!(call(addr, "GET", "/v1/kv/fine", None, b""), (200, "value".to_string()));
    assert!(srv.len() == 1, "no half-sent value was stored: {}", srv.len());
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 64 << 10, "RSS grew {grown} KiB");
    agents_still_work(&srv.url(), None);
}

#[test]
fn huge_header_line_gets_431_and_memory_stays_bounded() {
    let srv = MetaServer::start("127.0.0.1:0").unwrap();
    let addr = srv.addr();
    // A 100 KiB header (hyper's buffer may take it in one read) and a 1 MiB one: 431.
    let r = raw(
        addr,
        format!("GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Junk: {}\r\nConnection: close\r\n\r\n", "a".repeat(100 << 10))
            .as_bytes(),
    );
    assert!(r.starts_with("HTTP/1.1 431") && r.contains("max_header_bytes"), "{r}");
    let mut req = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Junk: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 1 << 20));
    req.extend_from_slice(b"\r\n\r\n");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(&req);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let r = String::from_utf8_lossy(&out);
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");

    // A 512 MiB header line: the server stops reading after its limit, so
    // the client cannot even push it, and the server's memory stays flat.
    let before = rss_kib();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /v1/health HTTP/1.1\r\nX-Junk: ").unwrap();
    let chunk = vec![b'a'; 1 << 20];
    let mut sent = 0usize;
    while sent < 512 << 20 {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    assert!(sent < 64 << 20, "the server swallowed {sent} bytes of one header");
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 32 << 10, "RSS grew {grown} KiB");
    assert!(healthy(addr));
}

#[test]
fn a_token_is_required_on_every_request_but_health() {
    let token = "meta-s3cret";
    let cfg = MetaServerConfig::default().with_token(Some(AuthToken::new(token).unwrap()));
    let srv = MetaServer::start_with("127.0.0.1:0", cfg).unwrap();
    let addr = srv.addr();
    for (m, p) in [
        ("GET", "/v1/kv/a"),
        ("PUT", "/v1/kv/a"),
        ("DELETE", "/v1/kv/a"),
        ("GET", "/v1/prefix/a"),
        ("DELETE", "/v1/prefix/a"),
        ("POST", "/v1/lease?ttl_ms=1000"),
        ("GET", "/v1/events?since=0"),
    ] {
        for bad in [None, Some("wrong"), Some("meta-s3cre"), Some("meta-s3cret2")] {
            let (st, b) = call(addr, m, p, bad, b"x");
            assert_eq!(st, 401, "{m} {p} with {bad:?}: {b}");
            assert!(b.contains("Bearer"), "{b}");
        }
    }
    let r = raw(
        addr,
        b"GET /v1/kv/a HTTP/1.1\r\nHost: x\r\nAuthorization: Basic bWV0YS1zM2NyZXQ=\r\nConnection: close\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    assert_eq!(srv.len(), 0, "nothing got in");
    assert!(healthy(addr), "health needs no token");
    assert_eq!(call(addr, "PUT", "/v1/kv/a", Some(token), b"x").0, 200);

    // The agent-side client sends the token from the configuration.
    let good =
        HttpStore::new(&srv.url(), Duration::from_secs(2)).unwrap().with_token(Some(AuthToken::new(token).unwrap()));
    assert_eq!(good.get("a").unwrap().as_deref(), Some(&b"x"[..]));
    let debug = format!("{good:?}");
    assert!(!debug.contains(token) && debug.contains("redacted"), "{debug}");
    let none = HttpStore::new(&srv.url(), Duration::from_secs(2)).unwrap();
    let e = none.put("b", b"y", None).unwrap_err();
    assert!(e.message().contains("401"), "{e}");
    agents_still_work(&srv.url(), Some(token));
}

#[test]
fn only_the_lease_holder_changes_its_keys() {
    let srv = MetaServer::start("127.0.0.1:0").unwrap();
    let addr = srv.addr();
    let (a, b) = (grant(addr, None), grant(addr, None));
    assert_eq!(call(addr, "PUT", &format!("/v1/kv/ns/a/metadata?lease={a}"), None, b"mine").0, 200);
    assert_eq!(call(addr, "PUT", "/v1/kv/ns/a/free", None, b"unleased").0, 200);
    // Overwrite or delete without the lease, or with another one: 403.
    for path in ["/v1/kv/ns/a/metadata".to_string(), format!("/v1/kv/ns/a/metadata?lease={b}")] {
        let (st, body) = call(addr, "PUT", &path, None, b"attacker's address");
        assert_eq!(st, 403, "PUT {path}: {body}");
        assert!(body.contains("lease"), "{body}");
        assert_eq!(call(addr, "DELETE", &path, None, b"").0, 403, "DELETE {path}");
    }
    // Prefix deletes: the empty prefix is refused; without a lease only
    // unleased keys go, with another lease nothing of A's.
    let (st, body) = call(addr, "DELETE", "/v1/prefix/", None, b"");
    assert_eq!(st, 400, "{body}");
    let v = json(&call(addr, "DELETE", &format!("/v1/prefix/ns/?lease={b}"), None, b"").1);
    assert_eq!((v["deleted"].as_u64(), v["kept"].as_u64()), (Some(0), Some(2)), "{v}");
    let v = json(&call(addr, "DELETE", "/v1/prefix/ns/", None, b"").1);
    assert_eq!((v["deleted"].as_u64(), v["kept"].as_u64()), (Some(1), Some(1)), "{v}");
    assert_eq!(call(addr, "GET", "/v1/kv/ns/a/metadata", None, b""), (200, "mine".to_string()));
    // The listing does not give the lease id away.
    let listing = call(addr, "GET", "/v1/prefix/ns/", None, b"").1;
    assert!(!listing.contains(&a) && listing.contains("\"leased\":true"), "{listing}");
    // The holder can.
    assert_eq!(call(addr, "PUT", &format!("/v1/kv/ns/a/metadata?lease={a}"), None, b"v2").0, 200);
    let v = json(&call(addr, "DELETE", &format!("/v1/prefix/ns/?lease={a}"), None, b"").1);
    assert_eq!(v["deleted"].as_u64(), Some(1), "{v}");
    assert_eq!(srv.len(), 0);
}

#[test]
fn lease_ids_are_random_and_guesses_fail() {
    let srv = MetaServer::start("127.0.0.1:0").unwrap();
    let addr = srv.addr();
    let ids: Vec<u128> = (0..16).map(|_| u128::from_str_radix(&grant(addr, None), 16).unwrap()).collect();
    for w in ids.windows(2) {
        assert!(w[0].abs_diff(w[1]) > 1 << 64, "lease ids look sequential: {:x} {:x}", w[0], w[1]);
    }
    assert_eq!(call(addr, "PUT", &format!("/v1/kv/victim?lease={:032x}", ids[0]), None, b"v").0, 200);
    // Neighbours of a known id, small numbers and the old decimal form are no use.
    for guess in [ids[0] + 1, ids[0] - 1, 1, 2, 0] {
        let g = format!("{guess:032x}");
        assert_eq!(call(addr, "POST", &format!("/v1/lease/{g}/keepalive"), None, b"").0, 404);
        assert_eq!(call(addr, "DELETE", &format!("/v1/lease/{g}"), None, b"").0, 404);
        assert_eq!(call(addr, "DELETE", &format!("/v1/kv/victim?lease={g}"), None, b"").0, 403);
    }
    assert_eq!(call(addr, "DELETE", "/v1/lease/1", None, b"").0, 400);
    assert_eq!(call(addr, "GET", "/v1/kv/victim", None, b"").0, 200, "the victim's key survived");
}

#[test]
fn caps_on_value_size_keys_bytes_and_leases_answer_413_and_507() {
    let cfg = MetaServerConfig {
        max_value: 1024,
        max_keys: 8,
        max_bytes: 8 * 1024,
        max_leases: 4,
        ..MetaServerConfig::default()
    };
    let srv = MetaServer::start_with("127.0.0.1:0", cfg).unwrap();
    let addr = srv.addr();
    let (st, b) = call(addr, "PUT", "/v1/kv/big", None, &[7u8; 2000]);
    assert_eq!(st, 413, "{b}");
    // Chunked, so no Content-Length to refuse early: the read is cut at the limit.
    let mut req =
        b"PUT /v1/kv/big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..4 {
        req.extend_from_slice(b"200\r\n");
        req.extend(std::iter::repeat_n(b'z', 0x200));
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    assert!(raw(addr, &req).starts_with("HTTP/1.1 413"));
    for i in 0..8 {
        assert_eq!(call(addr, "PUT", &format!("/v1/kv/k{i}"), None, b"v").0, 200);
    }
    let (st, b) = call(addr, "PUT", "/v1/kv/k8", None, b"v");
    assert_eq!(st, 507, "{b}");
    assert!(b.contains("max_keys"), "{b}");
    assert_eq!(call(addr, "PUT", "/v1/kv/k0", None, b"overwrite is fine").0, 200);
    for i in 0..8 {
        call(addr, "DELETE", &format!("/v1/kv/k{i}"), None, b"");
    }
    for i in 0..7 {
        assert_eq!(call(addr, "PUT", &format!("/v1/kv/b{i}"), None, &[1u8; 1000]).0, 200);
    }
    let (st, b) = call(addr, "PUT", "/v1/kv/b7", None, &[1u8; 1000]);
    assert_eq!(st, 507, "{b}");
    assert!(b.contains("max_bytes"), "{b}");
    for _ in 0..4 {
        grant(addr, None);
    }
    let (st, b) = call(addr, "POST", "/v1/lease?ttl_ms=1000", None, b"");
    assert_eq!(st, 507, "{b}");
    // Freed room is usable again.
    call(addr, "DELETE", "/v1/kv/b0", None, b"");
    assert_eq!(call(addr, "PUT", "/v1/kv/b7", None, &[1u8; 1000]).0, 200);
}

#[test]
fn a_long_poll_flood_cannot_starve_keep_alives() {
    let cfg = MetaServerConfig { max_waiters: 32, max_connections: 128, ..MetaServerConfig::default() };
    let srv = MetaServer::start_with("127.0.0.1:0", cfg).unwrap();
    let addr = srv.addr();
    // 40 long-polls: 32 wait, the rest are told at once.
    let mut polls = Vec::new();
    let mut refused = 0;
    for i in 0..40 {
        let mut s = TcpStream::connect(addr).unwrap();
        let path = if i % 2 == 0 { "/v1/kv/never?wait_ms=60000" } else { "/v1/events?since=999999&wait_ms=60000" };
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
        polls.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    for s in &mut polls {
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut buf = [0u8; 512];
        if let Ok(n) = s.read(&mut buf) {
            let r = String::from_utf8_lossy(&buf[..n]);
            assert!(r.starts_with("HTTP/1.1 503") && r.contains("max_waiters"), "{r}");
            refused += 1;
        }
    }
    assert_eq!(refused, 8, "32 of 40 long-polls wait, 8 are refused");
    // Meanwhile lease keep-alives and ordinary requests are answered quickly.
    let store = HttpStore::new(&srv.url(), Duration::from_secs(2)).unwrap();
    let lease = store.grant_lease(Duration::from_secs(5)).unwrap();
    let t = Instant::now();
    for _ in 0..50 {
        assert!(store.keep_alive(lease).unwrap());
    }
    assert!(t.elapsed() < Duration::from_secs(5), "50 keep-alives took {:?}", t.elapsed());
    store.put("k", b"v", Some(lease)).unwrap();
    assert_eq!(store.get("k").unwrap().as_deref(), Some(&b"v"[..]));
    agents_still_work(&srv.url(), None);
    // The held long-polls answer as soon as their key appears.
    store.put("never", b"now", None).unwrap();
    drop(polls);
}

#[test]
fn idle_and_slow_connections_are_closed_and_cannot_hold_the_server() {
    let cfg = MetaServerConfig {
        max_connections: 16,
        max_waiters: 4,
        header_timeout: Duration::from_millis(300),
        body_timeout: Duration::from_millis(300),
        ..MetaServerConfig::default()
    };
    let srv = MetaServer::start_with("127.0.0.1:0", cfg).unwrap();
    let addr = srv.addr();
    // Fill every connection slot with idle or half-sent requests.
    let mut idle: Vec<TcpStream> = (0..16)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap();
            if i % 2 == 1 {
                s.write_all(b"GET /v1/health HTTP/1.1\r\nHost:").unwrap();
            }
            s
        })
        .collect();
    // A legitimate request still gets through once the idle ones time out.
    let t = Instant::now();
    assert!(healthy(addr));
    assert!(t.elapsed() < Duration::from_secs(3), "waited {:?}", t.elapsed());
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap_or(0);
        let r = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || r.starts_with("HTTP/1.1 408"), "the idle connection got: {r}");
    }
    // A body that trickles too slowly: 408.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(b"PUT /v1/kv/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789").unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let r = String::from_utf8_lossy(&out);
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    assert_eq!(srv.len(), 0);
    agents_still_work(&srv.url(), None);
}

/// PUTs `n` one-byte values under the keys `key(i)`, pipelined on one
/// kept-alive connection, and waits for every answer.
fn put_pipelined(addr: SocketAddr, n: usize, key: impl Fn(usize) -> String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut reader = s.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut seen = 0usize;
        let mut tail = Vec::new();
        while seen < n {
            let got = reader.read(&mut buf).unwrap();
            assert!(got > 0, "the server closed the pipelined connection");
            tail.extend_from_slice(&buf[..got]);
            let text = String::from_utf8_lossy(&tail);
            seen += text.matches("HTTP/1.1 200").count();
            // Keep fewer bytes than the pattern: no match is counted twice.
            let keep = tail.len().min("HTTP/1.1 200".len() - 1);
            tail.drain(..tail.len() - keep);
        }
    });
    let mut batch = Vec::with_capacity(1 << 20);
    for i in 0..n {
        batch.extend_from_slice(
            format!("PUT /v1/kv/{} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nv", key(i)).as_bytes(),
        );
        if batch.len() > 1 << 19 {
            s.write_all(&batch).unwrap();
            batch.clear();
        }
    }
    s.write_all(&batch).unwrap();
    drain.join().unwrap();
}

#[test]
fn a_long_listing_does_not_stall_other_requests() {
    let srv = MetaServer::start("127.0.0.1:0").unwrap();
    let addr = srv.addr();
    // 10^5 keys, pipelined on one kept-alive connection.
    const N: usize = 100_000;
    put_pipelined(addr, N, |i| format!("list/key-{i:08}"));
    assert_eq!(srv.len(), N);

    let lister = std::thread::spawn(move || {
        let t = Instant::now();
        for _ in 0..3 {
            let (st, b) = call(addr, "GET", "/v1/prefix/list/", None, b"");
            assert_eq!(st, 200);
            assert!(b.len() > N * 20, "{} bytes", b.len());
        }
        t.elapsed() / 3
    });
    let mut worst = Duration::ZERO;
    while !lister.is_finished() {
        let t = Instant::now();
        assert_eq!(call(addr, "GET", "/v1/kv/list/key-00000007", None, b""), (200, "v".to_string()));
        worst = worst.max(t.elapsed());
    }
    let listing = lister.join().unwrap();
    eprintln!("a 10^5-key listing took {listing:?}; the slowest concurrent GET {worst:?}");
    assert!(
        worst < Duration::from_millis(250) && worst < listing,
        "a GET waited {worst:?} while a listing took {listing:?}"
    );
}

#[test]
fn a_client_that_never_reads_its_answers_cannot_hold_a_connection() {
    let cfg = MetaServerConfig {
        max_connections: 8,
        max_waiters: 2,
        max_connection_time: Duration::from_secs(1),
        ..MetaServerConfig::default()
    };
    let srv = MetaServer::start_with("127.0.0.1:0", cfg).unwrap();
    let addr = srv.addr();
    let big = vec![9u8; 8 << 20];
    assert_eq!(call(addr, "PUT", "/v1/kv/big", None, &big).0, 200);
    // Every slot: ask for 8 MiB a few times over, never read.
    let stuck: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            for _ in 0..4 {
                s.write_all(b"GET /v1/kv/big HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            }
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // The server cuts them loose after max_connection_time, and serves others.
    let t = Instant::now();
    let (st, b) = call(addr, "GET", "/v1/health", None, b"");
    assert_eq!(st, 200, "{b}");
    assert!(t.elapsed() < Duration::from_secs(4), "waited {:?}", t.elapsed());
    // Soon only the asking connection is left (at most 1 s of grace more).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, b) = call(addr, "GET", "/v1/health", None, b"");
        if json(&b)["connections"].as_u64() == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "stuck connections are still open: {b}");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(stuck);
}

#[test]
fn slow_large_uploads_cannot_take_the_memory_and_small_puts_still_flow() {
    let cfg = MetaServerConfig {
        max_value: 1 << 20,
        max_body_bytes: 2 << 20,
        body_timeout: Duration::from_millis(800),
        ..MetaServerConfig::default()
    };
    let srv = MetaServer::start_with("127.0.0.1:0", cfg).unwrap();
    let addr = srv.addr();
    // Two uploads declare 1 MiB each and send nothing: the budget is taken.
    let hold: Vec<TcpStream> = (0..2)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(
                format!("PUT /v1/kv/hold{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n").as_bytes(),
            )
            .unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    // A third large upload is told to come back.
    let t = Instant::now();
    let mut big =
        b"PUT /v1/kv/third HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\nConnection: close\r\n\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'b', 1 << 20));
    let (st, b) = status_and_body(&raw(addr, &big));
    assert_eq!(st, 503, "{b}");
    assert!(b.contains("max_body_bytes"), "{b}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Small values (metadata blobs) flow meanwhile.
    let store = HttpStore::new(&srv.url(), Duration::from_secs(2)).unwrap();
    store.put("small", &[1u8; 30_000], None).unwrap();
    agents_still_work(&srv.url(), None);
    // The holders time out and the budget comes back.
    for mut s in hold {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 408"));
    }
    assert_eq!(status_and_body(&raw(addr, &big)).0, 200);
}

#[test]
fn one_source_cannot_hold_every_connection() {
    let cfg = MetaServerConfig {
        max_connections: 16,
        max_connections_per_ip: 4,
        max_waiters: 2,
        ..MetaServerConfig::default()
    };
    let srv = MetaServer::start_with("127.0.0.1:0", cfg).unwrap();
    let addr = srv.addr();
    // Four idle connections from 127.0.0.1 fill its share (a complete request
    // proves each is being served before the next comes).
    let mut held: Vec<TcpStream> = Vec::new();
    for _ in 0..4 {
        let mut s = kvferry_test_support::connect_from(std::net::Ipv4Addr::LOCALHOST, addr);
        s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 12];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b[9..12], b"200");
        held.push(s);
    }
    // A fifth from the same address is answered 503 and closed at once.
    let r = raw(addr, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n");
    let (st, body) = status_and_body(&r);
    assert_eq!(st, 503, "{r}");
    assert!(body.contains("max_connections_per_ip"), "{body}");
    // Another host (127.0.0.2) is still served.
    let mut other = kvferry_test_support::connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), addr);
    other.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    other.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = other.read_to_string(&mut out);
    let (st, body) = status_and_body(&out);
    assert_eq!(st, 200, "{out}");
    assert!(json(&body)["refused_per_ip"].as_u64().unwrap() >= 1, "{body}");
    assert!(srv.refused_per_ip() >= 1);
    // Closing one held connection gives its share back.
    held.pop();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !healthy(addr) {
        assert!(Instant::now() < deadline, "a freed connection slot is never given back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn large_listings_are_few_at_once_and_events_come_in_pages() {
    let cfg = MetaServerConfig { body_timeout: Duration::from_secs(2), ..MetaServerConfig::default() };
    let srv = MetaServer::start_with("127.0.0.1:0", cfg).unwrap();
    let addr = srv.addr();
    // 8000 keys of about 900 bytes: a listing is about 7.5 MB of JSON.
    const N: usize = 8000;
    let pad = "k".repeat(880);
    put_pipelined(addr, N, |i| format!("big/{i:08}-{pad}"));
    assert_eq!(srv.len(), N);

    // The event log comes in pages of at most 1024; following the returned
    // revision reaches every put, once.
    let (mut since, mut seen, mut pages) = (0u64, 0usize, 0);
    loop {
        let (st, b) = call(addr, "GET", &format!("/v1/events?prefix=big/&since={since}"), None, b"");
        assert_eq!(st, 200, "{b}");
        let v = json(&b);
        let events = v["events"].as_array().unwrap();
        assert!(events.len() <= 1024, "{} events in one answer", events.len());
        if events.is_empty() {
            break;
        }
        assert!(events.iter().all(|e| e["rev"].as_u64().unwrap() > since));
        seen += events.len();
        pages += 1;
        since = v["revision"].as_u64().unwrap();
    }
    assert_eq!(seen, N, "every event once, in {pages} pages");
    assert!(pages >= 8);

    // Two clients ask for the whole listing and never read it: they hold
    // both large-listing permits (a tiny receive window keeps the answer
    // in flight). A third is told to come back instead of piling up another copy.
    let stalled = |_: usize| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(&addr.into()).unwrap();
        let mut s: TcpStream = s.into();
        s.write_all(b"GET /v1/prefix/big/ HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        s
    };
    let mut held: Vec<TcpStream> = (0..2).map(stalled).collect();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let (st, b) = call(addr, "GET", "/v1/prefix/big/", None, b"");
    assert_eq!(st, 503, "{}", &b[..b.len().min(200)]);
    assert!(b.contains("narrower prefix"), "{b}");
    assert!(t.elapsed() < Duration::from_secs(2), "refused after {:?}", t.elapsed());
    // Small listings and ordinary requests are served meanwhile.
    assert_eq!(call(addr, "GET", "/v1/prefix/nothing-here/", None, b"").0, 200);
    assert!(healthy(addr));
    // Once a holder goes, a large listing is served again, whole.
    held.pop();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (st, b) = call(addr, "GET", "/v1/prefix/big/", None, b"");
        if st == 200 {
            assert_eq!(json(&b)["keys"].as_array().unwrap().len(), N);
            break;
        }
        assert!(Instant::now() < deadline, "a freed permit is never given back ({st})");
    }
}
