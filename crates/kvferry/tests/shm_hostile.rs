//! SHM's control socket against hostile local clients, with hand-built
//! frames over the owner's real abstract socket: another uid is refused
//! before its HELLO is read, gets no memfd and cannot touch the owner's
//! buffer, while same-uid peers keep working; the socket's public name
//! carries no secret.
//!
//! The other-uid cases need root (to run a child as uid 65534, the way
//! `shm_support` peers do: the re-executed test binary drops its uid itself,
//! so it needs no permission on the binary); elsewhere they print why they
//! did not run.

mod shm_support;

use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::time::{Duration, Instant};

use kvferry::backend::shm::fdpass::FdReader;
use kvferry::backend::shm::info::ConnInfo;
use kvferry::backend::shm::wire::{frame_len, Frame, MapStatus, VERSION};
use kvferry::backend::AccessKey;
use kvferry::metadata::codec::AgentMetadata;
use kvferry::AlignedBuf;
use kvferry_test_support::fs::is_root;
use kvferry_test_support::{fill, hex, pattern_byte, rerun_self, unhex, Child};
use shm_support::{agent, peer_main, Peer};

const ME: &str = "shm_hostile";
const HOSTILE_ENV: &str = "KVFERRY_SHM_HOSTILE";

/// The peer role (shm_support): does nothing unless started as a peer.
#[test]
fn shm_peer_main() {
    peer_main();
}

/// What the owner publishes that a hostile client would use: its control
/// socket, its nonce, and the key of its first region.
struct Target {
    info: ConnInfo,
    key: AccessKey,
}

fn target_of(md: &[u8]) -> Target {
    let m = AgentMetadata::decode(md).unwrap();
    let shm = m.backends.iter().find(|b| b.name == "SHM").expect("an SHM backend");
    let info = ConnInfo::decode(shm.conn_info.as_ref().expect("conn info")).unwrap();
    Target { info, key: m.regions[0].key }
}

fn read_frame(s: &mut impl Read) -> std::io::Result<Frame> {
    let mut p = [0u8; 4];
    s.read_exact(&mut p)?;
    let n = frame_len(p).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Frame::decode(&b).map_err(|e| std::io::Error::other(e.to_string()))
}

/// What a hostile client got from the owner.
#[derive(Debug, Default)]
struct Outcome {
    welcome: bool,
    fd: bool,
    wrote: bool,
    refuse: Option<String>,
}

impl Outcome {
    fn line(&self) -> String {
        format!(
            "RESULT welcome={} fd={} wrote={} refuse={}",
            self.welcome,
            self.fd,
            self.wrote,
            self.refuse.as_deref().unwrap_or("-").replace(' ', "_")
        )
    }
}

/// The hostile client: connects to `socket`, says HELLO with the right nonce
/// (the worst case: it read the owner's metadata), asks for the memfd of
/// `key`, and, if it gets one, maps it and writes 0xEE over the region.
fn attack(socket: &[u8], nonce: u64, key: AccessKey) -> Outcome {
    let mut o = Outcome::default();
    let addr = SocketAddr::from_abstract_name(socket).unwrap();
    let s = match UnixStream::connect_addr(&addr) {
        Ok(s) => s,
        Err(e) => {
            o.refuse = Some(format!("connect failed: {e}"));
            return o;
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    Frame::Hello { version: VERSION, instance: 1, nonce, token: Vec::new(), name: "hostile".into() }.encode(&mut out);
    Frame::Map { id: 1, key }.encode(&mut out);
    // The owner may have closed already: a failed write is part of the outcome.
    let _ = (&s).write_all(&out);
    let mut r = FdReader::new(s.try_clone().unwrap());
    loop {
        match read_frame(&mut r) {
            Ok(Frame::Welcome) => o.welcome = true,
            Ok(Frame::Refuse(why)) => {
                o.refuse = Some(why);
                break;
            }
            Ok(Frame::Mapped { status: MapStatus::Fd, region_len, offset, .. }) => {
                if let Some(fd) = r.take_fd() {
                    o.fd = true;
                    let len = (offset + region_len) as usize;
                    // SAFETY: a fresh shared mapping of the received file, unmapped below; no Rust
                    // reference points into it.
                    unsafe {
                        use std::os::fd::AsRawFd;
                        let p = libc::mmap(
                            std::ptr::null_mut(),
                            len,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_SHARED,
                            fd.as_raw_fd(),
                            0,
                        );
                        if p != libc::MAP_FAILED {
                            std::ptr::write_bytes((p as *mut u8).add(offset as usize), 0xee, region_len as usize);
                            o.wrote = true;
                            libc::munmap(p, len);
                        }
                    }
                }
                break;
            }
            Ok(_) => break,
            Err(e) => {
                if o.refuse.is_none() {
                    o.refuse = Some(format!("closed: {e}"));
                }
                break;
            }
        }
    }
    o
}

/// Opens `n` connections to `socket` and counts those the owner closed
/// within `within` (EOF or REFUSE) without a HELLO being sent.
fn hold(socket: &[u8], n: usize, within: Duration) -> (Vec<UnixStream>, usize) {
    let addr = SocketAddr::from_abstract_name(socket).unwrap();
    let conns: Vec<UnixStream> = (0..n).filter_map(|_| UnixStream::connect_addr(&addr).ok()).collect();
    let deadline = Instant::now() + within;
    let mut closed = 0;
    for mut c in conns.iter() {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        c.set_read_timeout(Some(left)).unwrap();
        let mut b = [0u8; 4096];
        loop {
            match c.read(&mut b) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    closed += 1;
                    break;
                }
                Err(_) => break,
            }
        }
    }
    (conns, closed)
}

/// The hostile role: this binary re-executed with `KVFERRY_SHM_HOSTILE`
/// (`socket-hex nonce key-hex holders`), optionally dropping to uid 65534.
/// It holds `holders` bare connections, attacks, prints the outcome and
/// keeps the held connections until its stdin closes.
#[test]
fn shm_hostile_main() {
    let Ok(args) = std::env::var(HOSTILE_ENV) else { return };
    if std::env::var("KVFERRY_SHM_HOSTILE_SETUID").is_ok() {
        // SAFETY: plain syscalls with integer arguments; glibc applies them to every thread.
        unsafe {
            assert_eq!(libc::setgroups(0, std::ptr::null()), 0);
            assert_eq!(libc::setresgid(65534, 65534, 65534), 0);
            assert_eq!(libc::setresuid(65534, 65534, 65534), 0);
        }
    }
    let a: Vec<&str> = args.split_whitespace().collect();
    let socket = unhex(a[0]);
    let nonce: u64 = a[1].parse().unwrap();
    let key = AccessKey(unhex(a[2]).try_into().unwrap());
    let holders: usize = a[3].parse().unwrap();
    // SAFETY: geteuid has no preconditions.
    println!("@@ UID {}", unsafe { libc::geteuid() });
    // The name is public: any user finds it in /proc/net/unix.
    let listed = std::fs::read_to_string("/proc/net/unix").unwrap().contains(&*String::from_utf8_lossy(&socket));
    println!("@@ LISTED {listed}");
    let (held, closed) = hold(&socket, holders, Duration::from_secs(5));
    println!("@@ HELD {} CLOSED {closed}", held.len());
    println!("@@ {}", attack(&socket, nonce, key).line());
    std::io::stdout().flush().unwrap();
    let mut l = String::new();
    let _ = std::io::stdin().read_line(&mut l);
    drop(held);
    std::process::exit(0);
}

/// Runs the hostile role against `t`; returns its answer lines and the
/// child (which holds its connections until its stdin is closed).
fn spawn_hostile(t: &Target, holders: usize, setuid: bool) -> (Child, Vec<String>) {
    let mut cmd = rerun_self("shm_hostile_main", false, &[]);
    cmd.env(HOSTILE_ENV, format!("{} {} {} {holders}", hex(&t.info.socket), t.info.nonce, hex(&t.key.0)));
    if setuid {
        cmd.env("KVFERRY_SHM_HOSTILE_SETUID", "1");
    }
    let mut child = Child::spawn("the hostile child", &mut cmd, "@@ ");
    let lines = (0..4).map(|_| child.line(Duration::from_secs(30))).collect();
    (child, lines)
}

/// Closes the hostile child's stdin (it lets go of its connections and
/// exits) and waits for it, killing it after 10 s.
fn finish(mut child: Child) {
    child.close_stdin();
    if child.exits_within(Duration::from_secs(10)).is_none() {
        child.kill();
    }
}

/// Another uid that knows everything public (socket name, nonce, key) holds
/// 200 connections and tries HELLO + MAP: every connection is refused at
/// accept, no memfd leaves the owner, the buffer is untouched; meanwhile a
/// same-uid agent's notification still arrives. The same attack from the
/// owner's own uid does get the memfd, so the test would see a hole.
#[test]
fn another_uid_is_refused_gets_no_memfd_and_cannot_write() {
    if !is_root() {
        eprintln!(
            "another_uid_is_refused_gets_no_memfd_and_cannot_write: not run: needs root to start a child as uid 65534"
        );
        return;
    }
    const N: usize = 1 << 16;
    let me = format!("{ME}-owner");
    let a = agent(&me, &["SHM"]);
    let mut buf = AlignedBuf::new(N).unwrap();
    fill(buf.as_mut_slice(), 5);
    let _r = a.register_buf(&buf).unwrap();
    let md = a.local_metadata().unwrap();
    let t = target_of(&md);

    let (child, lines) = spawn_hostile(&t, 200, true);
    assert_eq!(lines[0], "UID 65534", "{lines:?}");
    assert_eq!(lines[1], "LISTED true", "the name is public, so it must hold no secret: {lines:?}");
    assert_eq!(lines[2], "HELD 200 CLOSED 200", "every bare connection is closed at accept: {lines:?}");
    let r = &lines[3];
    assert!(r.starts_with("RESULT welcome=false fd=false wrote=false refuse="), "{r}");
    assert!(r.contains("uid_65534") && r.contains("allowed_uids"), "the refusal says why and what to do: {r}");
    assert!(
        buf.as_slice().iter().enumerate().all(|(i, &b)| b == pattern_byte(5, i)),
        "the owner's buffer is untouched"
    );

    // While the attacker's process is still alive, a same-uid peer is served.
    let mut peer = Peer::spawn("shm_peer_main", "shm-hlegit", 4096, 1, &[]);
    peer.ok(&format!("LOAD {}", hex(&md)));
    peer.ok(&format!("SEND {me} legit"));
    assert!(a.wait_notifications(Duration::from_secs(10)));
    assert_eq!(a.take_notifications()["shm-hlegit"], vec![b"legit".to_vec()]);
    peer.exit();
    finish(child);

    // Control: the same client as the owner's uid gets the memfd and writes.
    let (child, lines) = spawn_hostile(&t, 0, false);
    assert_eq!(lines[3], "RESULT welcome=true fd=true wrote=true refuse=-", "{lines:?}");
    assert!(buf.as_slice().iter().all(|&b| b == 0xee), "a same-uid client is trusted (like ptrace)");
    finish(child);
}

/// The control socket's name is visible to every user, and holds neither
/// the nonce nor anything derived from it.
#[test]
fn the_public_socket_name_carries_no_secret() {
    let a = agent(&format!("{ME}-name"), &["SHM"]);
    let buf = AlignedBuf::new(4096).unwrap();
    let _r = a.register_buf(&buf).unwrap();
    let t = target_of(&a.local_metadata().unwrap());
    let name = String::from_utf8(t.info.socket.clone()).unwrap();
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    let line = table.lines().find(|l| l.contains(&name)).expect("the socket is listed in /proc/net/unix");
    for secret in [format!("{:016x}", t.info.nonce), format!("{:x}", t.info.nonce), t.info.nonce.to_string()] {
        assert!(!line.contains(&secret), "the nonce {secret} is in the public name: {line}");
    }
}

/// `allowed_uids` admits a listed uid (and only through the parameter):
/// uid 65534 then gets the memfd of a region whose key it names.
#[test]
fn allowed_uids_admits_a_listed_uid() {
    if !is_root() {
        eprintln!("allowed_uids_admits_a_listed_uid: not run: needs root to start a child as uid 65534");
        return;
    }
    let cfg = kvferry::AgentConfig::default().with_backend("SHM", kvferry::Params::new().with("allowed_uids", "65534"));
    let a = kvferry::Agent::new(&format!("{ME}-allow"), cfg).unwrap();
    let buf = AlignedBuf::new(4096).unwrap();
    let _r = a.register_buf(&buf).unwrap();
    let t = target_of(&a.local_metadata().unwrap());
    let (child, lines) = spawn_hostile(&t, 0, true);
    assert_eq!(lines[0], "UID 65534");
    assert_eq!(lines[3], "RESULT welcome=true fd=true wrote=true refuse=-", "{lines:?}");
    finish(child);

    let bad = kvferry::AgentConfig::default().with_backend("SHM", kvferry::Params::new().with("allowed_uids", "12,x"));
    let e = kvferry::Agent::new(&format!("{ME}-badallow"), bad).expect_err("a bad uid list is refused");
    assert!(e.to_string().contains("allowed_uids"), "{e}");
}

/// A hand-built same-uid client floods a real agent with NOTIF frames over
/// its control socket: the agent queues at most the sender's share, tells
/// the flooder why and closes it; a legitimate peer process's notification
/// still arrives, and the agent can take what was queued.
#[test]
fn notification_flood_is_bounded_and_a_legit_peer_still_gets_through() {
    let share = 64u64 << 10;
    let mut cfg = kvferry::AgentConfig::default().with_backend("SHM", kvferry::Params::new());
    cfg.notif_limits = kvferry::notif::NotifLimits { per_peer_bytes: share, total_bytes: 1 << 20 };
    let me = format!("{ME}-flooded");
    let a = kvferry::Agent::new(&me, cfg).unwrap();
    let buf = AlignedBuf::new(4096).unwrap();
    let _r = a.register_buf(&buf).unwrap();
    let md = a.local_metadata().unwrap();
    let t = target_of(&md);

    let addr = SocketAddr::from_abstract_name(&t.info.socket).unwrap();
    let mut s = UnixStream::connect_addr(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    Frame::Hello { version: VERSION, instance: 9, nonce: t.info.nonce, token: Vec::new(), name: "flooder".into() }
        .encode(&mut out);
    s.write_all(&out).unwrap();
    assert_eq!(read_frame(&mut s).unwrap(), Frame::Welcome);
    out.clear();
    Frame::Notif(vec![0x5a; 4000]).encode(&mut out);
    let mut sent = 0;
    // 4000 × 4 KB = 16 MB offered against a 64 KiB share.
    while sent < 4000 && s.write_all(&out).is_ok() {
        sent += 1;
    }
    let why = match read_frame(&mut s) {
        Ok(Frame::Refuse(why)) => why,
        other => panic!("expected REFUSE after {sent} frames, got {other:?}"),
    };
    assert!(why.contains("notif_limits") && why.contains("flooder"), "{why}");
    assert!(sent < 4000, "the flooding connection was closed");

    let mut peer = Peer::spawn("shm_peer_main", "shm-hflood-legit", 4096, 1, &[]);
    peer.ok(&format!("LOAD {}", hex(&md)));
    peer.ok(&format!("SEND {me} legit"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut flood_bytes = 0u64;
    let mut legit = Vec::new();
    while legit.is_empty() && Instant::now() < deadline {
        a.wait_notifications(Duration::from_millis(100));
        for (from, msgs) in a.take_notifications() {
            match from.as_str() {
                "flooder" => flood_bytes += msgs.iter().map(|m| m.len() as u64 + 64).sum::<u64>(),
                "shm-hflood-legit" => legit.extend(msgs),
                other => panic!("unexpected sender {other}"),
            }
        }
    }
    assert_eq!(legit, vec![b"legit".to_vec()], "the legit peer's notification arrived");
    assert!(flood_bytes > 0 && flood_bytes <= share, "{flood_bytes} bytes of the flood were queued, share {share}");
    peer.exit();
}

/// Peers that stop reading hold their connections' writers (the owner is
/// stuck writing them answers) and never take a REVOKE: a deregistration
/// still ends within one `peer_timeout`, not one per stuck peer, and closes them.
#[test]
fn a_deregistration_is_bounded_by_one_timeout_however_many_peers_are_stuck() {
    let cfg = kvferry::AgentConfig::default()
        .with_backend("SHM", kvferry::Params::new())
        .with_peer_timeout(Duration::from_millis(500));
    let a = kvferry::Agent::new(&format!("{ME}-revoke"), cfg).unwrap();
    let buf = AlignedBuf::new(4096).unwrap();
    let reg = a.register_buf(&buf).unwrap();
    let t = target_of(&a.local_metadata().unwrap());
    let addr = SocketAddr::from_abstract_name(&t.info.socket).unwrap();
    const STUCK: usize = 6;
    let stuck: Vec<UnixStream> = (0..STUCK)
        .map(|i| {
            let mut s = UnixStream::connect_addr(&addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut out = Vec::new();
            let name = format!("stuck-{i}");
            Frame::Hello { version: VERSION, instance: 1, nonce: t.info.nonce, token: Vec::new(), name }
                .encode(&mut out);
            s.write_all(&out).unwrap();
            assert_eq!(read_frame(&mut s).unwrap(), Frame::Welcome);
            // QUERYs whose STATUS answers are never read: once the socket
            // buffers are full the owner blocks writing one, holding the writer.
            out.clear();
            Frame::Query { id: 1, keys: vec![t.key; 1000] }.encode(&mut out);
            s.set_nonblocking(true).unwrap();
            // Until the owner stops reading for good (its answer write is
            // blocked): our writes then stay refused for a while.
            let (until, mut refused) = (Instant::now() + Duration::from_secs(10), 0);
            while refused < 4 && Instant::now() < until {
                match (&s).write(&out) {
                    Ok(_) => refused = 0,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        refused += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(refused, 4, "the owner kept reading");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    drop(reg);
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(1500), "deregistration took {took:?} with {STUCK} stuck peers");
    // Every stuck connection was closed: reading drains to EOF (or a reset).
    for mut s in stuck {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = vec![0u8; 1 << 16];
        loop {
            match s.read(&mut b) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("a stuck peer's connection stayed open: {e}"),
            }
        }
    }
}
