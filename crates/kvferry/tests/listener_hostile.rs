//! A hostile client against the peer-to-peer metadata listener, speaking
//! its framing by hand over 127.0.0.1 ("KVFL" | version | op | token_len |
//! body_len | token | body): slow bytes, forged SEND and INVALIDATE, floods
//! of connections from one address, oversized bodies, too many peers and
//! regions. Each bound is shown to hold, and a legitimate client is shown to
//! be served while the attacker holds its connections.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use kvferry::metadata::listener::{encode_msg, ListenerLimits, MsgHeader, Op, HEADER_LEN};
use kvferry::{Agent, AgentConfig, AlignedBuf, ErrorKind, Params};
use kvferry_test_support::{connect_from, name};

const T: Duration = Duration::from_secs(5);

/// An agent with its listener on 127.0.0.1 and the LOCAL backend.
fn target(token: Option<&str>, limits: ListenerLimits) -> (Agent, SocketAddr) {
    let mut cfg = AgentConfig::default().with_listener(0).with_backend("LOCAL", Params::new());
    cfg.listen_addr = Some("127.0.0.1".parse().unwrap());
    cfg.auth_token = None;
    if let Some(t) = token {
        cfg = cfg.with_auth_token(t);
    }
    cfg.listener_limits = limits;
    let a = Agent::new(&name("lh-target"), cfg).unwrap();
    let addr = a.listen_addr().unwrap();
    (a, addr)
}

/// An agent (LOCAL backend) with `regions` registered buffers, to make blobs.
fn source(prefix: &str, regions: usize) -> (Agent, Vec<AlignedBuf>, Vec<kvferry::Registration>) {
    let mut cfg = AgentConfig::default().with_backend("LOCAL", Params::new());
    cfg.auth_token = None;
    let a = Agent::new(&name(prefix), cfg).unwrap();
    let bufs: Vec<AlignedBuf> = (0..regions).map(|_| AlignedBuf::new(4096).unwrap()).collect();
    let regs = bufs.iter().map(|b| a.register_buf(b).unwrap()).collect();
    (a, bufs, regs)
}

/// Reads one answer: its kind and body. Errors (EOF, timeout) are `None`.
fn answer(s: &mut TcpStream, timeout: Duration) -> Option<(Op, Vec<u8>)> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut hb = [0u8; HEADER_LEN];
    s.read_exact(&mut hb).ok()?;
    let h = MsgHeader::decode(&hb).ok()?;
    let mut rest = vec![0u8; h.token_len as usize + h.body_len as usize];
    s.read_exact(&mut rest).ok()?;
    Some((h.op, rest.split_off(h.token_len as usize)))
}

/// One whole request from `src`, answered.
fn ask(src: Ipv4Addr, dst: SocketAddr, op: Op, token: &[u8], body: &[u8]) -> (Op, String, Vec<u8>) {
    let mut s = connect_from(src, dst);
    s.write_all(&encode_msg(op, token, body).unwrap()).unwrap();
    let (op, body) = answer(&mut s, T).expect("the listener answers");
    (op, String::from_utf8_lossy(&body).into_owned(), body)
}

const LO: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

fn invalidate_body(instance: u64, name: &str) -> Vec<u8> {
    let mut b = instance.to_le_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b
}

#[test]
fn a_client_trickling_bytes_does_not_block_a_fetch_and_is_cut_off_at_the_deadline() {
    let limits = ListenerLimits { request_deadline: Duration::from_secs(2), ..ListenerLimits::default() };
    let (t, addr) = target(None, limits);
    // The attacker announces a body and sends a byte of it every second.
    let mut slow = connect_from(LO, addr);
    let msg = encode_msg(Op::Send, &[], &[0u8; 64]).unwrap();
    slow.write_all(&msg[..HEADER_LEN]).unwrap();
    let trickle = std::thread::spawn(move || {
        let start = Instant::now();
        for b in &msg[HEADER_LEN..] {
            if slow.write_all(std::slice::from_ref(b)).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
            if start.elapsed() > Duration::from_secs(8) {
                break;
            }
        }
        (answer(&mut slow, Duration::from_secs(1)), start.elapsed())
    });
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let (op, _, blob) = ask(LO, addr, Op::Fetch, &[], t.name().as_bytes());
    assert_eq!(op, Op::Metadata, "a legitimate FETCH is served while the slow client holds its connection");
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "served at once, not after the slow client: {:?}",
        t0.elapsed()
    );
    assert!(!blob.is_empty());
    let (ans, took) = trickle.join().unwrap();
    let (op, why) = ans.expect("the slow client gets an answer before the connection closes");
    assert_eq!(op, Op::Error);
    assert!(String::from_utf8_lossy(&why).contains("deadline"), "{}", String::from_utf8_lossy(&why));
    assert!(took < Duration::from_secs(7), "cut off near the 2 s deadline, not per byte: {took:?}");
}

#[test]
fn forged_send_and_invalidate_without_the_token_are_refused() {
    let (t, addr) = target(Some("s3cret"), ListenerLimits::default());
    let (victim, _b, _r) = source("lh-victim", 1);
    let blob = victim.local_metadata().unwrap();
    let (op, why, _) = ask(LO, addr, Op::Send, &[], &blob);
    assert_eq!(op, Op::Error);
    assert!(why.contains("auth token"), "{why}");
    let (op, _, _) = ask(LO, addr, Op::Send, b"wrong", &blob);
    assert_eq!(op, Op::Error);
    assert!(!t.check_remote(victim.name(), None), "nothing was loaded");
    let (op, why, _) = ask(LO, addr, Op::Fetch, &[], t.name().as_bytes());
    assert_eq!(op, Op::Error, "FETCH without the token hands out no keys: {why}");
    // The token is checked before the body: a header announcing 10 MiB with
    // no token is refused at once, without waiting for (or allocating) the body.
    let mut s = connect_from(LO, addr);
    let mut h = encode_msg(Op::Send, &[], &[]).unwrap();
    h[8..12].copy_from_slice(&(10u32 << 20).to_le_bytes());
    s.write_all(&h).unwrap();
    let t0 = Instant::now();
    let (op, why) = answer(&mut s, T).unwrap();
    assert_eq!(op, Op::Error);
    assert!(String::from_utf8_lossy(&why).contains("auth token"));
    assert!(t0.elapsed() < Duration::from_secs(2), "refused from the header: {:?}", t0.elapsed());
    // With the token the same SEND loads; an INVALIDATE without it is refused.
    let (op, why, _) = ask(LO, addr, Op::Send, b"s3cret", &blob);
    assert_eq!(op, Op::Ok, "{why}");
    assert!(t.check_remote(victim.name(), None));
    let (op, why, _) = ask(OTHER, addr, Op::Invalidate, &[], &invalidate_body(0, victim.name()));
    assert_eq!(op, Op::Error);
    assert!(why.contains("auth token"), "{why}");
    assert!(t.check_remote(victim.name(), None), "the forged INVALIDATE dropped nothing");
    let (op, _, _) = ask(OTHER, addr, Op::Invalidate, b"s3cret", &invalidate_body(0, victim.name()));
    assert_eq!(op, Op::Ok);
    assert!(!t.check_remote(victim.name(), None));
}

#[test]
fn without_a_token_a_stranger_can_neither_replace_nor_withdraw_a_peer_loaded_elsewhere() {
    let (t, addr) = target(None, ListenerLimits::default());
    let (real, _b, _r) = source("lh-real", 1);
    let blob = real.local_metadata().unwrap();
    t.load_remote_metadata(&blob).unwrap();
    // Loaded by the application: a SEND from the network may not replace it...
    let (op, why, _) = ask(LO, addr, Op::Send, &[], &blob);
    assert_eq!(op, Op::Error);
    assert!(why.contains("may not replace") && why.contains("KVFERRY_AUTH_TOKEN"), "{why}");
    // ...nor may an INVALIDATE withdraw it.
    let (op, why, _) = ask(LO, addr, Op::Invalidate, &[], &invalidate_body(0, real.name()));
    assert_eq!(op, Op::Error);
    assert!(why.contains("only the peer itself"), "{why}");
    assert!(t.check_remote(real.name(), None));
    t.invalidate_remote(real.name()).unwrap();

    // Pushed from 127.0.0.1: another address can neither replace nor withdraw it.
    let (op, why, _) = ask(LO, addr, Op::Send, &[], &blob);
    assert_eq!(op, Op::Ok, "{why}");
    let (op, why, _) = ask(OTHER, addr, Op::Send, &[], &blob);
    assert_eq!(op, Op::Error, "{why}");
    assert!(why.contains("pushed from 127.0.0.1"), "{why}");
    let (op, _, _) = ask(OTHER, addr, Op::Invalidate, &[], &invalidate_body(0, real.name()));
    assert_eq!(op, Op::Error);
    assert!(t.check_remote(real.name(), None));
    // The address it came from may refresh and withdraw it.
    let (op, _, _) = ask(LO, addr, Op::Send, &[], &blob);
    assert_eq!(op, Op::Ok);
    let (op, _, _) = ask(LO, addr, Op::Invalidate, &[], &invalidate_body(0, real.name()));
    assert_eq!(op, Op::Ok);
    assert!(!t.check_remote(real.name(), None));
}

#[test]
fn connections_from_one_address_are_capped_while_another_address_is_served() {
    // A long deadline: the held connections must outlive a slow, loaded test run.
    let limits = ListenerLimits {
        max_connections_per_ip: 4,
        max_connections: 6,
        request_deadline: Duration::from_secs(60),
        ..ListenerLimits::default()
    };
    let (t, addr) = target(None, limits);
    // The attacker opens 100 idle connections from 127.0.0.1: four are held,
    // the rest are answered ERROR at once.
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..100 {
        let mut s = connect_from(LO, addr);
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut hb = [0u8; HEADER_LEN];
        match s.read_exact(&mut hb) {
            Ok(()) => {
                let h = MsgHeader::decode(&hb).unwrap();
                assert_eq!(h.op, Op::Error);
                let mut body = vec![0u8; h.body_len as usize];
                s.read_exact(&mut body).unwrap();
                assert!(String::from_utf8_lossy(&body).contains("max_connections_per_ip"));
                refused += 1;
            }
            Err(_) => held.push(s),
        }
        if held.len() > 4 {
            break;
        }
    }
    assert_eq!(held.len(), 4, "exactly max_connections_per_ip connections are held");
    assert_eq!(refused, 96);
    // Another address is served while the attacker holds its four.
    let t0 = Instant::now();
    let (op, _, _) = ask(OTHER, addr, Op::Fetch, &[], t.name().as_bytes());
    assert_eq!(op, Op::Metadata);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // The total cap: two more from 127.0.0.2 fill it (4 + 2 = 6), a third is refused.
    // (The FETCH's slot is given back just after its answer: retry until both are held.)
    let hold = || {
        let deadline = Instant::now() + T;
        loop {
            let mut s = connect_from(OTHER, addr);
            if answer(&mut s, Duration::from_millis(300)).is_none() {
                return s;
            }
            assert!(Instant::now() < deadline, "a slot for 127.0.0.2 comes free");
        }
    };
    let (_b1, _b2) = (hold(), hold());
    let mut c = connect_from(Ipv4Addr::new(127, 0, 0, 3), addr);
    let (op, why) = answer(&mut c, T).expect("refused at once");
    assert_eq!(op, Op::Error);
    assert!(String::from_utf8_lossy(&why).contains("max_connections"));
    // Once the attacker lets go, its address is served again.
    drop(held);
    drop((_b1, _b2));
    let deadline = Instant::now() + T;
    loop {
        let (op, _, _) = ask(LO, addr, Op::Fetch, &[], t.name().as_bytes());
        if op == Op::Metadata {
            break;
        }
        assert!(Instant::now() < deadline, "slots are given back when connections close");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bodies_are_bounded_in_size_and_in_bytes_held_at_once() {
    let limits = ListenerLimits { max_body: 4096, max_inflight_bytes: 6000, ..ListenerLimits::default() };
    let (t, addr) = target(None, limits);
    // A 1 MiB body is refused from its header (nothing is allocated for it).
    let mut s = connect_from(LO, addr);
    let mut h = encode_msg(Op::Send, &[], &[]).unwrap();
    h[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes());
    s.write_all(&h).unwrap();
    let (op, why) = answer(&mut s, T).unwrap();
    assert_eq!(op, Op::Error);
    assert!(String::from_utf8_lossy(&why).contains("max_body"), "{}", String::from_utf8_lossy(&why));
    // One client announces 4000 bytes and holds them; a second 4000 is over the 6000 in flight.
    let mut a = connect_from(LO, addr);
    let mut h = encode_msg(Op::Send, &[], &[]).unwrap();
    h[8..12].copy_from_slice(&4000u32.to_le_bytes());
    a.write_all(&h).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut b = connect_from(OTHER, addr);
    b.write_all(&h).unwrap();
    let (op, why) = answer(&mut b, T).unwrap();
    assert_eq!(op, Op::Error);
    assert!(String::from_utf8_lossy(&why).contains("max_inflight_bytes"), "{}", String::from_utf8_lossy(&why));
    // Small requests still flow meanwhile.
    let (op, _, _) = ask(OTHER, addr, Op::Fetch, &[], t.name().as_bytes());
    assert_eq!(op, Op::Metadata);
    drop(a);
}

#[test]
fn peers_and_regions_pushed_through_the_listener_are_capped_with_clear_errors() {
    let limits =
        ListenerLimits { max_peers: 2, max_regions_per_peer: 4, max_regions_total: 7, ..ListenerLimits::default() };
    let (t, addr) = target(None, limits);
    let (p1, _b1, _r1) = source("lh-p1", 4);
    let (p2, _b2, _r2) = source("lh-p2", 2);
    let (p3, _b3, _r3) = source("lh-p3", 1);
    let (big, _b4, _r4) = source("lh-big", 5);
    let send = |a: &Agent| ask(LO, addr, Op::Send, &[], &a.local_metadata().unwrap());
    let (op, why, _) = send(&big);
    assert_eq!(op, Op::Error);
    assert!(why.contains("5 regions") && why.contains("max_regions_per_peer"), "{why}");
    assert_eq!(send(&p1).0, Op::Ok);
    // 4 + 4 would pass the 7 regions in all.
    let (p1b, _b5, _r5) = source("lh-p1b", 4);
    let (op, why, _) = send(&p1b);
    assert_eq!(op, Op::Error);
    assert!(why.contains("max_regions_total"), "{why}");
    assert_eq!(send(&p2).0, Op::Ok);
    let (op, why, _) = send(&p3);
    assert_eq!(op, Op::Error);
    assert!(why.contains("max_peers") && why.contains(p3.name()), "{why}");
    // A peer already loaded may refresh itself at the cap; the application's own loads are not capped.
    assert_eq!(send(&p2).0, Op::Ok);
    t.load_remote_metadata(&big.local_metadata().unwrap()).unwrap();
    // Withdrawing one makes room.
    let (op, _, _) = ask(LO, addr, Op::Invalidate, &[], &invalidate_body(0, p2.name()));
    assert_eq!(op, Op::Ok);
    assert_eq!(send(&p3).0, Op::Ok);
    let mut loaded = t.remote_agents();
    loaded.sort();
    let mut want = vec![p1.name().to_string(), p3.name().to_string(), big.name().to_string()];
    want.sort();
    assert_eq!(loaded, want);
}

#[test]
fn a_hostile_listener_serving_another_agents_metadata_changes_nothing() {
    let (me, _b, _r) = source("lh-me", 1);
    let (loaded, _b2, _r2) = source("lh-loaded", 1);
    me.load_remote_metadata(&loaded.local_metadata().unwrap()).unwrap();
    // A fake listener answers any FETCH with a blob that claims to be `loaded`
    // (another instance, its regions replaced by the attacker's).
    let (fake, _b3, _r3) = source("lh-fake", 3);
    let mut md = kvferry::metadata::AgentMetadata::decode(&fake.local_metadata().unwrap()).unwrap();
    md.name = loaded.name().to_string();
    let forged = md.encode();
    let srv = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = srv.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = srv.accept().unwrap();
        let mut hb = [0u8; HEADER_LEN];
        s.read_exact(&mut hb).unwrap();
        let h = MsgHeader::decode(&hb).unwrap();
        let mut rest = vec![0u8; h.token_len as usize + h.body_len as usize];
        s.read_exact(&mut rest).unwrap();
        s.write_all(&encode_msg(Op::Metadata, &[], &forged).unwrap()).unwrap();
        let _ = s.read(&mut [0u8; 1]);
    });
    me.fetch_remote_metadata("lh-someone", None, kvferry::MetaPeer::Addr(addr)).unwrap();
    server.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!me.check_remote("lh-someone", None));
    let p = me.remote_agents();
    assert_eq!(p, vec![loaded.name().to_string()], "the entry that was loaded stays");
    let l = fake.local_metadata().unwrap();
    let fake_md = kvferry::metadata::AgentMetadata::decode(&l).unwrap();
    for r in &fake_md.regions {
        let one = kvferry::XferDescList::from_descs(r.mem_type, vec![kvferry::XferDesc::new(r.addr, r.len, r.dev_id)]);
        assert!(!me.check_remote(loaded.name(), Some(&one)), "a forged region was loaded: {:#x}", r.addr);
    }
}

#[test]
fn the_listener_binds_where_the_tcp_data_port_binds() {
    let mut p = Params::new();
    p.set("bind", "127.0.0.1");
    let mut cfg = AgentConfig::default().with_listener(0).with_backend("TCP", p);
    cfg.auth_token = None;
    let a = Agent::new(&name("lh-bind"), cfg).unwrap();
    let at = a.listen_addr().unwrap();
    assert_eq!(at.ip(), "127.0.0.1".parse::<std::net::IpAddr>().unwrap(), "loopback data port, loopback listener");
    let mut cfg = AgentConfig::default().with_listener(0).with_backend("TCP", Params::new());
    cfg.auth_token = None;
    let b = Agent::new(&name("lh-bind-any"), cfg).unwrap();
    assert!(b.listen_addr().unwrap().ip().is_unspecified(), "a data port on every interface: so is the listener");
    // A malformed request gets a clear error, and the listener keeps serving.
    let mut s = TcpStream::connect(at).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let (op, why) = answer(&mut s, T).unwrap();
    assert_eq!(op, Op::Error);
    assert!(String::from_utf8_lossy(&why).contains("KVFL"));
    let (op, _, _) = ask(LO, at, Op::Fetch, &[], a.name().as_bytes());
    assert_eq!(op, Op::Metadata);
    let e = a.load_untrusted_metadata(b"junk", LO.into()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Malformed, "{e}");
}

#[test]
fn a_blob_past_the_default_regions_cap_is_refused_and_leaves_nothing() {
    let (t, addr) = target(None, ListenerLimits::default());
    let (src, _b, _r) = source("lh-huge", 1);
    let mut md = kvferry::metadata::AgentMetadata::decode(&src.local_metadata().unwrap()).unwrap();
    let one = md.regions[0].clone();
    md.regions = (0..(1u64 << 16) + 1)
        .map(|i| {
            let mut r = one.clone();
            r.addr = 0x1000_0000 + i * 4096;
            r.len = 4096;
            r
        })
        .collect();
    let blob = md.encode();
    assert!(blob.len() < ListenerLimits::default().max_body as usize, "within max_body: the regions cap decides");
    let (op, why, _) = ask(LO, addr, Op::Send, &[], &blob);
    assert_eq!(op, Op::Error);
    assert!(why.contains("65537 regions") && why.contains("max_regions_per_peer"), "{why}");
    assert!(t.remote_agents().is_empty());
    // The listener still serves.
    assert_eq!(ask(LO, addr, Op::Fetch, &[], t.name().as_bytes()).0, Op::Metadata);
}

#[test]
fn metadata_bytes_of_pushed_peers_are_capped_in_all() {
    let (a, _b1, _r1) = source("lh-bytes-a", 2);
    let (b, _b2, _r2) = source("lh-bytes-b", 2);
    let (blob_a, blob_b) = (a.local_metadata().unwrap(), b.local_metadata().unwrap());
    let cap = (blob_a.len() + blob_b.len() / 2) as u64;
    let (t, addr) = target(None, ListenerLimits { max_blob_bytes_total: cap, ..ListenerLimits::default() });
    assert_eq!(ask(LO, addr, Op::Send, &[], &blob_a).0, Op::Ok);
    let (op, why, _) = ask(LO, addr, Op::Send, &[], &blob_b);
    assert_eq!(op, Op::Error);
    assert!(why.contains("max_blob_bytes_total"), "{why}");
    // Refreshing the one loaded is not double-charged.
    assert_eq!(ask(LO, addr, Op::Send, &[], &blob_a).0, Op::Ok);
    assert_eq!(t.remote_agents(), vec![a.name().to_string()]);
}
