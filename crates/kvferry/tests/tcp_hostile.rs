//! A hostile client against a TCP target, speaking the wire format by hand
//! over 127.0.0.1: frames that mix memory and file keys, a whole-file
//! registration used as a pointer, a notification flood, slow hellos, a
//! crowd of idle connections, a WRITE dribbled while its region is
//! deregistered, and the shared staging budget. Each test also shows that
//! legitimate traffic still flows while (or after) the attacker acts.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvferry::backend::tcp::proto::{
    ConnInfo, Entry, FrameType, Header, Hello, Status, Welcome, CAPS, HEADER_LEN, VERSION, WELCOME_FIXED,
};
use kvferry::backend::AccessKey;
use kvferry::metadata::AgentMetadata;
use kvferry::{Agent, AgentConfig, AlignedBuf, MemType, Params, RegDesc, RegDescList, XferDesc, XferDescList, XferOp};
use kvferry_test_support::fs::TestDir;
use kvferry_test_support::pattern_vec;
use kvferry_test_support::tcp_wire::{self, answer, closed_within, frame, read_welcome};

/// A target agent in this process with one DRAM buffer and one exported file.
struct Target {
    agent: Agent,
    buf: AlignedBuf,
    port: u64,
    instance: u64,
    /// Key of `buf`'s registration.
    mem_key: AccessKey,
    /// Key and range of the exported file's region.
    file_key: AccessKey,
    file_len: u64,
    file: PathBuf,
    _dir: TestDir,
}

fn key_of(md: &AgentMetadata, mt: MemType, pred: impl Fn(u64, u64) -> bool) -> AccessKey {
    md.regions.iter().find(|r| r.mem_type == mt && pred(r.addr, r.len)).expect("region in metadata").key
}

fn target(name: &str, params: &[(&str, &str)], cfg: impl FnOnce(AgentConfig) -> AgentConfig) -> Target {
    let mut p = Params::new();
    for (k, v) in params {
        p.set(k, v);
    }
    let cfg = cfg(AgentConfig::default().with_backend("TCP", p).with_backend("POSIX", Params::new()));
    let agent = Agent::new(name, cfg).unwrap();
    let mut buf = AlignedBuf::new(64 << 10).unwrap();
    buf.as_mut_slice().copy_from_slice(&pattern_vec(1, 64 << 10));
    agent.register_buf(&buf).unwrap().keep();
    let dir = TestDir::temp(&format!("kvf-hostile-{name}"));
    let file = dir.path("f");
    std::fs::write(&file, pattern_vec(2, 64 << 10)).unwrap();
    agent.register_local_file(&file, 64 << 10, false).unwrap();
    let md = AgentMetadata::decode(&agent.local_metadata().unwrap()).unwrap();
    let tcp = md.backends.iter().find(|b| b.name == "TCP").unwrap();
    let info = ConnInfo::decode(tcp.conn_info.as_ref().unwrap()).unwrap();
    let mem_key = key_of(&md, MemType::Dram, |a, _| a == buf.addr());
    let file_key = key_of(&md, MemType::File, |_, _| true);
    Target {
        port: info.port as u64,
        instance: md.instance,
        mem_key,
        file_key,
        file_len: 64 << 10,
        file,
        agent,
        buf,
        _dir: dir,
    }
}

fn hello(t: &Target, name: &str, token: &[u8]) -> Vec<u8> {
    tcp_wire::hello(7, t.instance, name, token)
}

fn dial(t: &Target) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", t.port as u16)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn connect(t: &Target, name: &str, token: &[u8]) -> TcpStream {
    let mut s = dial(t);
    s.write_all(&hello(t, name, token)).unwrap();
    let w = read_welcome(&mut s).unwrap();
    assert_eq!(w.status, Status::Ok, "{}", w.message);
    s
}

/// An initiator agent that loaded `t`'s metadata directly.
fn initiator(name: &str, t: &Target, token: Option<&str>) -> Agent {
    let mut cfg = AgentConfig::default().with_backend("TCP", Params::new());
    if let Some(tok) = token {
        cfg = cfg.with_auth_token(tok);
    }
    let a = Agent::new(name, cfg).unwrap();
    a.load_remote_metadata(&t.agent.local_metadata().unwrap()).unwrap();
    a
}

/// Posts `op` of `len` bytes between `local` and the start of `t.buf`, waiting (bounded).
fn legit(init: &Agent, t: &Target, local: &AlignedBuf, op: XferOp, len: u64) -> kvferry::Result<()> {
    let l = XferDescList::from_descs(MemType::Dram, vec![XferDesc::new(local.addr(), len, 0)]);
    let r = XferDescList::from_descs(MemType::Dram, vec![XferDesc::new(t.buf.addr(), len, 0)]);
    let _reg = init.register_buf(local)?;
    let req = init.create_request(op, &l, &r, t.agent.name(), None)?;
    req.post(None)?;
    req.wait(Duration::from_secs(10))
}

#[test]
fn mixed_memory_and_file_entries_are_refused_in_both_orders() {
    let t = target("mixed", &[], |c| c);
    // Memory the target never registered: what the old bug let a file offset point at.
    let mut secret = AlignedBuf::new(4096).unwrap();
    secret.as_mut_slice().fill(0x5e);
    let mut s = connect(&t, "hostile", b"");
    let mem = Entry { key: t.mem_key, addr: t.buf.addr(), len: 64 };
    let as_ptr = Entry { key: t.file_key, addr: secret.addr(), len: 64 };
    let in_file = Entry { key: t.file_key, addr: 0, len: 64 };
    let mut op = 0;
    for ty in [FrameType::Write, FrameType::Read] {
        for entries in [[mem, as_ptr], [as_ptr, mem], [mem, in_file], [in_file, mem]] {
            op += 1;
            let data = if ty == FrameType::Write { vec![0xaa; 128] } else { Vec::new() };
            s.write_all(&frame(ty, op, &entries, &data)).unwrap();
            let (h, msg) = answer(&mut s);
            let msg = String::from_utf8_lossy(&msg);
            assert_eq!((h.ty, h.status, h.op), (FrameType::Error, Status::NotAllowed, op), "{ty:?} {msg}");
            assert!(msg.contains("must all be memory or all be files"), "{msg}");
        }
    }
    assert!(secret.as_slice().iter().all(|&b| b == 0x5e), "unregistered memory untouched");
    assert_eq!(t.buf.as_slice(), &pattern_vec(1, 64 << 10)[..], "registered memory unchanged");
    assert_eq!(std::fs::read(&t.file).unwrap(), pattern_vec(2, 64 << 10), "file unchanged");
    // A file key with a memory address as its offset reads the file (or fails), never memory.
    s.write_all(&frame(FrameType::Read, 100, &[as_ptr], &[])).unwrap();
    let (h, body) = answer(&mut s);
    assert_eq!(h.ty, FrameType::Error, "offset past the exported region: {}", String::from_utf8_lossy(&body));
    // The connection still serves honest frames of either kind.
    s.write_all(&frame(FrameType::Read, 101, &[mem], &[])).unwrap();
    let (h, body) = answer(&mut s);
    assert_eq!((h.ty, &body[..]), (FrameType::Data, &pattern_vec(1, 64)[..]));
    s.write_all(&frame(FrameType::Read, 102, &[in_file], &[])).unwrap();
    let (h, body) = answer(&mut s);
    assert_eq!((h.ty, &body[..]), (FrameType::Data, &pattern_vec(2, 64)[..]));
    let _ = t.file_len;
}

#[test]
fn a_whole_file_registration_cannot_reach_memory() {
    let t = target("wholefile", &[], |c| c);
    let path = t._dir.0.join("whole");
    std::fs::write(&path, pattern_vec(3, 8192)).unwrap();
    // Length 0: "the whole file", which once covered the whole address space.
    let regs = RegDescList::from_descs(
        MemType::File,
        vec![RegDesc::with_meta(0, 0, 4242, format!("rw:{}", path.display()).into_bytes())],
    );
    t.agent.register_storage(&regs, &["TCP"]).unwrap().keep();
    let md = AgentMetadata::decode(&t.agent.local_metadata().unwrap()).unwrap();
    let whole = md.regions.iter().find(|r| r.mem_type == MemType::File && r.dev_id == 4242).unwrap().key;
    let mut secret = AlignedBuf::new(4096).unwrap();
    secret.as_mut_slice().fill(0x5e);
    let mut s = connect(&t, "hostile", b"");
    // Alone, a memory address is a file offset: it reads the file there (nothing), not memory.
    let e = Entry { key: whole, addr: secret.addr(), len: 64 };
    s.write_all(&frame(FrameType::Read, 1, &[e], &[])).unwrap();
    let (h, body) = answer(&mut s);
    assert_eq!(h.ty, FrameType::Error, "no file bytes there: {}", String::from_utf8_lossy(&body));
    // Mixed with a memory entry, either order: refused.
    let mem = Entry { key: t.mem_key, addr: t.buf.addr(), len: 64 };
    for (op, entries) in [(2, [mem, e]), (3, [e, mem])] {
        s.write_all(&frame(FrameType::Write, op, &entries, &[0xaa; 128])).unwrap();
        let (h, _) = answer(&mut s);
        assert_eq!((h.ty, h.status), (FrameType::Error, Status::NotAllowed));
    }
    assert!(secret.as_slice().iter().all(|&b| b == 0x5e), "unregistered memory untouched");
    assert_eq!(t.buf.as_slice(), &pattern_vec(1, 64 << 10)[..]);
    // The whole file is still served at its real offsets.
    s.write_all(&frame(FrameType::Read, 4, &[Entry { key: whole, addr: 4096, len: 4096 }], &[])).unwrap();
    let (h, body) = answer(&mut s);
    assert_eq!((h.ty, &body[..]), (FrameType::Data, &pattern_vec(3, 8192)[4096..]));
}

#[test]
fn a_notification_flood_is_cut_and_other_senders_still_deliver() {
    let t = target("flood", &[], |c| c);
    let mut s = connect(&t, "flooder", b"");
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let msg = vec![0x33u8; 60 << 10];
    let mut notif = Header::new(FrameType::Notif, 0, 0, msg.len() as u64).encode().to_vec();
    notif.extend_from_slice(&msg);
    // 64 MiB offered, 4x the sender's 16 MiB share: the target must cut it off.
    let mut sent = 0u64;
    let mut cut = false;
    for _ in 0..(64 << 20) / msg.len() {
        if s.write_all(&notif).is_err() {
            cut = true;
            break;
        }
        sent += notif.len() as u64;
    }
    assert!(cut || closed_within(&mut s, Duration::from_secs(5)), "flooder not cut off after {sent} bytes");
    let queued: u64 = t.agent.take_notifications().values().flatten().map(|m| m.len() as u64 + 64).sum();
    assert!(queued <= 16 << 20, "{queued} bytes queued from one sender, over its 16 MiB share");
    // Another sender (and the flooder, once it drained) still gets through.
    let honest = initiator("honest", &t, None);
    honest.send_notification("flood", b"still here", &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = t.agent.take_notifications();
        if got.get("honest").is_some_and(|v| v.iter().any(|m| m == b"still here")) {
            break;
        }
        assert!(Instant::now() < deadline, "the honest notification did not arrive: {got:?}");
        t.agent.wait_notifications(Duration::from_millis(50));
    }
}

#[test]
fn a_hello_dribbled_byte_by_byte_is_cut_by_the_handshake_deadline() {
    let t = target("slowhello", &[], |mut c| {
        c.connect_timeout = Duration::from_millis(600);
        c
    });
    let mut s = dial(&t);
    let h = hello(&t, "slow", b"");
    let start = Instant::now();
    let mut cut = false;
    // One byte per 100 ms: every read gets data well inside any per-read timeout.
    for b in &h {
        if s.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if closed_within(&mut s, Duration::from_millis(1)) {
            cut = true;
            break;
        }
    }
    let took = start.elapsed();
    assert!(cut, "a hello of {} bytes dribbled over {took:?} was accepted", h.len());
    assert!(took < Duration::from_millis(1500), "cut only after {took:?} (connect_timeout 600 ms)");
    // A prompt hello is still welcome.
    drop(connect(&t, "prompt", b""));
}

#[test]
fn hundreds_of_idle_connections_do_not_lock_out_a_client_with_the_token() {
    let t = target("crowd", &[], |c| c.with_auth_token("tok"));
    let half = &hello(&t, "attacker", b"tok")[..20];
    let mut crowd = Vec::new();
    for i in 0..600 {
        let mut s = dial(&t);
        if i % 2 == 0 {
            let _ = s.write_all(half);
        }
        crowd.push(s);
    }
    // While the crowd holds its sockets, a client with the token is served.
    let init = initiator("legit", &t, Some("tok"));
    let mut local = AlignedBuf::new(4096).unwrap();
    local.as_mut_slice().fill(0x77);
    let start = Instant::now();
    legit(&init, &t, &local, XferOp::Write, 4096).unwrap();
    assert!(t.buf.as_slice()[..4096].iter().all(|&b| b == 0x77));
    let mut back = AlignedBuf::new(4096).unwrap();
    legit(&init, &t, &back, XferOp::Read, 4096).unwrap();
    assert!(back.as_mut_slice().iter().all(|&b| b == 0x77));
    assert!(start.elapsed() < Duration::from_secs(5), "legit traffic took {:?}", start.elapsed());
    // The crowd was shed: at most max_conns_per_ip (64) of it can still be open.
    let open = crowd.iter_mut().filter_map(|s| (!closed_within(s, Duration::from_millis(1))).then_some(())).count();
    assert!(open <= 64, "{open} of 600 idle connections still held");
    // And the rest times out on the handshake deadline (connect_timeout, 2 s).
    std::thread::sleep(Duration::from_millis(2600));
    let open = crowd.iter_mut().filter_map(|s| (!closed_within(s, Duration::from_millis(1))).then_some(())).count();
    assert_eq!(open, 0, "idle handshakes outlived the deadline");
}

#[test]
fn authenticated_connections_idle_out() {
    let t = target("idle", &[("idle_timeout_s", "1")], |c| c);
    let mut s = connect(&t, "sleeper", b"");
    let start = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(4)), "idle connection kept");
    assert!(start.elapsed() >= Duration::from_millis(900), "closed too early: {:?}", start.elapsed());
}

#[test]
fn a_dribbled_write_is_cut_by_the_frame_deadline() {
    let t = target("dribble", &[], |c| c.with_peer_timeout(Duration::from_millis(500)));
    let mut s = connect(&t, "dribbler", b"");
    let e = Entry { key: t.mem_key, addr: t.buf.addr(), len: 4096 };
    let f = frame(FrameType::Write, 1, &[e], &[0xaa; 4096]);
    s.write_all(&f[..HEADER_LEN + 32]).unwrap();
    let start = Instant::now();
    let mut cut = false;
    for b in &f[HEADER_LEN + 32..] {
        if s.write_all(&[*b]).is_err() || closed_within(&mut s, Duration::from_millis(1)) {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(cut, "a WRITE dribbled for {:?} was not cut", start.elapsed());
    assert!(start.elapsed() < Duration::from_secs(3), "cut only after {:?}", start.elapsed());
}

#[test]
fn deregister_does_not_wait_for_a_slow_write_and_others_are_served_meanwhile() {
    let t = target("dereg", &[], |c| c.with_peer_timeout(Duration::from_secs(30)));
    let mut victim = AlignedBuf::new(1 << 20).unwrap();
    victim.as_mut_slice().fill(0x11);
    let reg = t.agent.register_buf(&victim).unwrap();
    let md = AgentMetadata::decode(&t.agent.local_metadata().unwrap()).unwrap();
    let vkey = key_of(&md, MemType::Dram, |a, _| a == victim.addr());
    // The attacker announces a 1 MiB WRITE into the victim and dribbles it.
    let mut s = connect(&t, "dribbler", b"");
    let e = Entry { key: vkey, addr: victim.addr(), len: 1 << 20 };
    let mut head = Header::new(FrameType::Write, 1, 1, 1 << 20).encode().to_vec();
    e.encode(&mut head);
    s.write_all(&head).unwrap();
    s.write_all(&[0xee; 1024]).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let mut s2 = s.try_clone().unwrap();
    let dribbler = std::thread::spawn(move || {
        while !st.load(Ordering::Relaxed) {
            if s2.write_all(&[0xee; 16]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    // Another peer's frames on other memory are served meanwhile.
    let init = initiator("other", &t, None);
    let back = AlignedBuf::new(4096).unwrap();
    let start = Instant::now();
    legit(&init, &t, &back, XferOp::Read, 4096).unwrap();
    assert!(start.elapsed() < Duration::from_secs(2), "other peer stalled {:?}", start.elapsed());
    assert_eq!(back.as_slice(), &pattern_vec(1, 4096)[..]);
    // Deregistering the victim does not wait on the dribbler.
    let start = Instant::now();
    reg.deregister().unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "deregister took {took:?}");
    let snapshot = victim.as_slice().to_vec();
    assert!(snapshot[..1024].iter().all(|&b| b == 0xee), "the dribbled WRITE was in progress");
    assert!(snapshot[256 << 10..].iter().all(|&b| b == 0x11), "only the dribbled prefix was written");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(victim.as_slice(), &snapshot[..], "the region was written after deregister returned");
    assert!(closed_within(&mut s, Duration::from_secs(2)), "the dribbler's connection stays open");
    stop.store(true, Ordering::Relaxed);
    dribbler.join().unwrap();
    // Its key is dead; the other peer still works.
    let mut s = connect(&t, "late", b"");
    s.write_all(&frame(FrameType::Write, 2, &[Entry { len: 16, ..e }], &[0xee; 16])).unwrap();
    assert_eq!(answer(&mut s).0.status, Status::NotAllowed);
    legit(&init, &t, &back, XferOp::Read, 4096).unwrap();
}

#[test]
fn staging_for_file_frames_is_one_budget_over_all_connections() {
    let t = target("staging", &[("staging_max", "1M")], |c| c.with_peer_timeout(Duration::from_millis(800)));
    let fe = |off: u64, len: u64| Entry { key: t.file_key, addr: off, len };
    // Over the whole budget: refused at once, with a clear error.
    let mut a = connect(&t, "a", b"");
    a.write_all(&frame(FrameType::Read, 1, &[fe(0, 64 << 10); 17], &[])).unwrap_or(());
    let (h, msg) = answer(&mut a);
    let msg = String::from_utf8_lossy(&msg).to_string();
    assert_eq!((h.ty, h.status), (FrameType::Error, Status::Invalid), "{msg}");
    assert!(msg.contains("staging_max"), "{msg}");
    // Honest frames work, and an idle connection gives its spare buffers back.
    let mut b = connect(&t, "b", b"");
    for c in [&mut a, &mut b] {
        c.write_all(&frame(FrameType::Read, 2, &[fe(0, 48 << 10)], &[])).unwrap();
        let (h, body) = answer(c);
        assert_eq!((h.ty, &body[..]), (FrameType::Data, &pattern_vec(2, 48 << 10)[..]));
    }
    // One connection takes most of the budget for a file WRITE and dribbles it.
    let mut hog = connect(&t, "hog", b"");
    let mut entries = Vec::new();
    for i in 0..16 {
        entries.push(fe(0, if i < 15 { 60 << 10 } else { 1 << 10 }));
    }
    let total: u64 = entries.iter().map(|e| e.len).sum();
    let mut f = Header::new(FrameType::Write, 3, entries.len() as u32, total).encode().to_vec();
    for e in &entries {
        e.encode(&mut f);
    }
    hog.write_all(&f).unwrap();
    hog.write_all(&[0u8; 16]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // While it holds ~900 KiB, a 200 KiB file frame from another connection
    // waits for room (bounded by its frame deadline), not allocating more.
    let start = Instant::now();
    b.write_all(&frame(FrameType::Read, 4, &[fe(0, 50 << 10); 4], &[])).unwrap();
    // Memory frames queue behind it on this connection but need no staging:
    // another connection is served meanwhile.
    let mut c = connect(&t, "c", b"");
    c.write_all(&frame(FrameType::Read, 5, &[Entry { key: t.mem_key, addr: t.buf.addr(), len: 64 }], &[])).unwrap();
    assert_eq!(answer(&mut c).0.ty, FrameType::Data);
    assert!(start.elapsed() < Duration::from_millis(300), "memory frame stalled {:?}", start.elapsed());
    let (h, msg) = answer(&mut b);
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(400), "the budget was not shared: answered after {waited:?}");
    assert!(waited < Duration::from_secs(3), "waited {waited:?}");
    if h.ty == FrameType::Error {
        assert_eq!(h.status, Status::Storage);
        assert!(String::from_utf8_lossy(&msg).contains("staging"), "{}", String::from_utf8_lossy(&msg));
    } else {
        assert_eq!((h.ty, msg.len()), (FrameType::Data, 200 << 10));
    }
    // The hog was cut by its frame deadline; the budget is free again.
    assert!(closed_within(&mut hog, Duration::from_secs(3)), "hog kept its connection");
    b.write_all(&frame(FrameType::Read, 6, &[fe(0, 50 << 10); 4], &[])).unwrap();
    let (h, body) = answer(&mut b);
    assert_eq!((h.ty, body.len()), (FrameType::Data, 200 << 10));
}

#[test]
fn hello_names_follow_the_agent_name_rules() {
    let t = target("names", &[], |c| c);
    for bad in ["evil\nINFO forged log line", "bell\u{7}", "esc\u{1b}[31m"] {
        let mut s = dial(&t);
        s.write_all(&hello(&t, bad, b"")).unwrap();
        let w = read_welcome(&mut s).unwrap();
        assert_eq!(w.status, Status::Malformed, "{bad:?}: {}", w.message);
        assert!(w.message.contains("control characters"), "{}", w.message);
    }
    drop(connect(&t, "fine-name_1.2", b""));
}

#[test]
fn an_initiator_read_is_bounded_against_a_target_that_dribbles_data() {
    // A fake target: the metadata of a real one, with its TCP port pointing here.
    let real = target("dribbling-target", &[], |c| c);
    let mut md = AgentMetadata::decode(&real.agent.local_metadata().unwrap()).unwrap();
    md.name = "fake".into();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp = md.backends.iter_mut().find(|b| b.name == "TCP").unwrap();
    let mut info = ConnInfo::decode(tcp.conn_info.as_ref().unwrap()).unwrap();
    info.port = l.local_addr().unwrap().port();
    info.addrs = vec!["127.0.0.1".parse().unwrap()];
    tcp.conn_info = Some(info.encode());
    let instance = md.instance;
    let fake = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut fixed = [0u8; kvferry::backend::tcp::proto::HELLO_FIXED];
        s.read_exact(&mut fixed).unwrap();
        let mut rest = vec![0u8; Hello::rest_len(&fixed).unwrap()];
        s.read_exact(&mut rest).unwrap();
        let mut w = Vec::new();
        Welcome {
            version: VERSION,
            status: Status::Ok,
            caps: CAPS,
            instance,
            name: "fake".into(),
            message: String::new(),
        }
        .encode(&mut w);
        s.write_all(&w).unwrap();
        let mut hb = [0u8; HEADER_LEN];
        s.read_exact(&mut hb).unwrap();
        let h = Header::decode(&hb).unwrap();
        let mut entries = vec![0u8; h.entries_len()];
        s.read_exact(&mut entries).unwrap();
        s.write_all(&Header::new(FrameType::Data, h.op, 0, h.len).encode()).unwrap();
        // One byte per 100 ms: always inside the initiator's receive timeout.
        let start = Instant::now();
        for _ in 0..h.len {
            if s.write_all(&[0x42]).is_err() || start.elapsed() > Duration::from_secs(20) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let init = Agent::new(
        "reader",
        AgentConfig::default().with_backend("TCP", Params::new()).with_peer_timeout(Duration::from_millis(500)),
    )
    .unwrap();
    init.load_remote_metadata(&md.encode()).unwrap();
    let local = AlignedBuf::new(4096).unwrap();
    let _reg = init.register_buf(&local).unwrap();
    let l = XferDescList::from_descs(MemType::Dram, vec![XferDesc::new(local.addr(), 4096, 0)]);
    let r = XferDescList::from_descs(MemType::Dram, vec![XferDesc::new(real.buf.addr(), 4096, 0)]);
    let req = init.create_request(XferOp::Read, &l, &r, "fake", None).unwrap();
    let start = Instant::now();
    req.post(None).unwrap();
    let res = req.wait(Duration::from_secs(10));
    let took = start.elapsed();
    let e = res.expect_err("a READ dribbled over 400 s completed?");
    assert!(e.to_string().contains("did not arrive whole in time"), "{e}");
    assert!(took < Duration::from_secs(3), "the dribbled READ held the initiator for {took:?}");
    drop(req);
    drop(init);
    fake.join().unwrap();
}

#[test]
fn the_per_address_cap_holds_against_authenticated_connections() {
    let t = target("cap", &[("max_conns_per_ip", "3")], |c| c);
    let mut held: Vec<TcpStream> = (0..3).map(|i| connect(&t, &format!("holder{i}"), b"")).collect();
    // A fourth from the same address finds no handshake to evict: closed, no welcome.
    let mut s = dial(&t);
    let _ = s.write_all(&hello(&t, "fourth", b""));
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)), "a connection over max_conns_per_ip was served");
    // The held ones still work; when one leaves, a new one is admitted.
    let e = Entry { key: t.mem_key, addr: t.buf.addr(), len: 64 };
    held[0].write_all(&frame(FrameType::Read, 1, &[e], &[])).unwrap();
    assert_eq!(answer(&mut held[0]).0.ty, FrameType::Data);
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = dial(&t);
        let _ = s.write_all(&hello(&t, "later", b""));
        let mut fixed = [0u8; WELCOME_FIXED];
        if s.read_exact(&mut fixed).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "no room after a held connection left");
        std::thread::sleep(Duration::from_millis(20));
    }
}
