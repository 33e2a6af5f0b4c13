//! The always-run counterpart of the `cargo fuzz` targets in `fuzz/`: a
//! deterministic randomized test that feeds every decoder of untrusted bytes
//! (metadata blobs, descriptor lists, the TCP wire protocol, the metadata
//! listener framing, the SHM control wire) many thousands of mutated inputs
//! — bit flips, interesting values, truncations, random lengths, spliced
//! valid frames, random bytes — and replays random sequences of agent
//! operations over LOCAL. Nothing may panic or hang.
//!
//! `KVF_FUZZ_WRITE_SEEDS=fuzz/corpus` also writes the valid seed inputs as
//! cargo-fuzz corpora. `KVF_FUZZ_ITERS` scales the work (default 6000 inputs per decoder, 60
//! operation sequences); `KVF_FUZZ_SEED` changes the seed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::Duration;

use kvferry_test_support::fuzz as fuzz_support;
use kvferry_test_support::rng::Rng;

fn iters() -> usize {
    std::env::var("KVF_FUZZ_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(6000)
}

fn seed() -> u64 {
    std::env::var("KVF_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x6b76_6665_7272_7921) | 1
}

const INTERESTING: &[u64] =
    &[0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x1_0000, 0x7fff_ffff, 0xffff_ffff, 1 << 32, u64::MAX >> 1, u64::MAX];

/// One mutation of `input`, drawing on `pool` (other valid inputs) for splices.
fn mutate(rng: &mut Rng, input: &[u8], pool: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.next_below(4) {
        match rng.next_below(9) {
            // Bit flip.
            0 if !v.is_empty() => {
                let i = rng.next_below(v.len());
                v[i] ^= 1 << rng.next_below(8);
            }
            // Random byte.
            1 if !v.is_empty() => {
                let i = rng.next_below(v.len());
                v[i] = rng.next_u64() as u8;
            }
            // An interesting integer (1, 2, 4 or 8 bytes, little-endian) over a length field.
            2 if !v.is_empty() => {
                let width = [1, 2, 4, 8][rng.next_below(4)];
                let val = INTERESTING[rng.next_below(INTERESTING.len())].to_le_bytes();
                let at = rng.next_below(v.len());
                for (k, &byte) in val.iter().take(width).enumerate() {
                    if let Some(b) = v.get_mut(at + k) {
                        *b = byte;
                    }
                }
            }
            // Truncate.
            3 => v.truncate(rng.next_below(v.len() + 1)),
            // Append random bytes.
            4 => {
                let n = rng.next_below(64);
                v.extend(rng.next_bytes(n));
            }
            // Insert or delete a run.
            5 if !v.is_empty() => {
                let at = rng.next_below(v.len());
                if rng.next_below(2) == 0 {
                    let n = rng.next_below(16);
                    let ins = rng.next_bytes(n);
                    v.splice(at..at, ins);
                } else {
                    let end = (at + rng.next_below(16)).min(v.len());
                    v.drain(at..end);
                }
            }
            // Splice: a prefix of this with a suffix of another valid input.
            6 if !pool.is_empty() => {
                let other = &pool[rng.next_below(pool.len())];
                let cut = rng.next_below(v.len() + 1);
                let from = rng.next_below(other.len() + 1);
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            // Concatenate two valid inputs (two frames back to back).
            7 if !pool.is_empty() => v.extend_from_slice(&pool[rng.next_below(pool.len())]),
            // Entirely random bytes of a random length.
            _ => {
                let n = rng.next_below(200);
                v = rng.next_bytes(n);
            }
        }
    }
    v
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn decoders_never_panic_on_mutated_input() {
    let seeds = fuzz_support::seeds();
    let mut rng = Rng(seed());
    let names = ["metadata", "desc_lists", "tcp_proto", "listener", "shm_wire"];
    for (target, name) in names.iter().enumerate() {
        let pool: Vec<Vec<u8>> = seeds.iter().filter(|(t, _)| *t == target).map(|(_, s)| s.clone()).collect();
        assert!(!pool.is_empty(), "no seeds for {name}");
        if let Ok(dir) = std::env::var("KVF_FUZZ_WRITE_SEEDS") {
            // Seed corpora for cargo fuzz: fuzz/corpus/<target>/.
            let d = std::path::Path::new(&dir).join(name);
            std::fs::create_dir_all(&d).unwrap();
            for (k, s) in pool.iter().enumerate() {
                std::fs::write(d.join(format!("seed-{k}")), s).unwrap();
            }
        }
        // The valid inputs themselves decode without complaint.
        for s in &pool {
            fuzz_support::run(target, s);
        }
        for i in 0..iters() {
            let base = &pool[rng.next_below(pool.len())];
            let input = mutate(&mut rng, base, &pool);
            let r = catch_unwind(AssertUnwindSafe(|| fuzz_support::run(target, &input)));
            assert!(r.is_ok(), "decoder {name} panicked on input {i}: {}", hex(&input));
        }
    }
}

#[test]
fn random_agent_operations_never_panic_or_hang() {
    let mut rng = Rng(seed() ^ 0x9e37_79b9_7f4a_7c15);
    let runs = (iters() / 30).max(10);
    for i in 0..runs {
        let n = 50 + rng.next_below(1500);
        let input = rng.next_bytes(n);
        let (tx, rx) = mpsc::channel();
        let data = input.clone();
        std::thread::spawn(move || {
            let r = catch_unwind(AssertUnwindSafe(|| fuzz_support::agent_ops(&data)));
            let _ = tx.send(r.is_ok());
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(true) => {}
            Ok(false) => panic!("agent operations panicked on sequence {i}: {}", hex(&input)),
            Err(_) => panic!("agent operations hung (60 s) on sequence {i}: {}", hex(&input)),
        }
    }
}

/// Streams of mutated frames, cut at random points, to a live TCP target
/// (the receive buffer and frame parsing of its connection threads): no
/// thread panics, memory outside the registered region never changes, and
/// the target still serves a well-behaved initiator afterwards.
#[test]
fn random_frame_streams_to_a_tcp_target_never_panic() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use kvferry::backend::tcp::proto::{self, ConnInfo, Entry, FrameType, Header, Hello};
    use kvferry::metadata::codec::AgentMetadata;
    use kvferry::{Agent, AgentConfig, AlignedBuf, Params, XferOp};

    static PANICS: AtomicUsize = AtomicUsize::new(0);
    let prev = Arc::new(std::panic::take_hook());
    let p2 = prev.clone();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        p2(info);
    }));

    let cfg =
        || AgentConfig::default().with_peer_timeout(Duration::from_millis(500)).with_backend("TCP", Params::new());
    let target = Agent::new("fz-tcp-target", cfg()).unwrap();
    let mut mem = AlignedBuf::new(64 << 10).unwrap();
    mem.as_mut_slice().fill(0x5a);
    let mut guard = AlignedBuf::new(64 << 10).unwrap();
    guard.as_mut_slice().fill(0xc3);
    let _reg = target.register_buf(&mem).unwrap();
    let md = AgentMetadata::decode(&target.local_metadata().unwrap()).unwrap();
    let tcp = md.backends.iter().find(|b| b.name == "TCP").unwrap();
    let port = ConnInfo::decode(tcp.conn_info.as_ref().unwrap()).unwrap().port;
    let key = md.regions[0].key;
    let (base, rlen) = (mem.addr(), mem.len() as u64);

    let mut rng = Rng(seed() ^ 0x5151);
    let conns = (iters() / 60).max(20);
    for c in 0..conns {
        let mut stream = Vec::new();
        Hello {
            version: proto::VERSION,
            caps: proto::CAPS,
            instance: 5,
            expect_instance: md.instance,
            name: "fz".into(),
            token: Vec::new(),
        }
        .encode(&mut stream);
        let mut valid: Vec<Vec<u8>> = Vec::new();
        for f in 0..1 + rng.next_below(12) {
            let mut b = Vec::new();
            let n = 1 + rng.next_below(4);
            let mut entries = Vec::new();
            for _ in 0..n {
                let len = 1 + rng.next_below(8192) as u64;
                let off = rng.next_below((rlen - len) as usize) as u64;
                entries.push(Entry { key, addr: base + off, len });
            }
            // Some entries go astray: past the end, before the start, or a wrong key.
            if rng.next_below(3) == 0 {
                let e = &mut entries[rng.next_below(n)];
                match rng.next_below(3) {
                    0 => e.addr = base + rlen - e.len / 2,
                    1 => e.addr = guard.addr(),
                    _ => e.key.0[rng.next_below(16)] ^= 1,
                }
            }
            let sum: u64 = entries.iter().map(|e| e.len).sum();
            let ty = match rng.next_below(4) {
                0 | 1 => FrameType::Write,
                2 => FrameType::Read,
                _ => FrameType::Notif,
            };
            let (count, len) = if ty == FrameType::Notif { (0, rng.next_below(64) as u64) } else { (n as u32, sum) };
            b.extend_from_slice(&Header::new(ty, (c << 16 | f) as u64, count, len).encode());
            if ty != FrameType::Notif {
                for e in &entries {
                    e.encode(&mut b);
                }
            }
            if ty != FrameType::Read {
                b.extend(rng.next_bytes(len as usize));
            }
            valid.push(b);
        }
        let frames: Vec<u8> = valid.concat();
        // Mutate the frames (not the handshake) now and then.
        let frames = if rng.next_below(2) == 0 { mutate(&mut rng, &frames, &valid) } else { frames };
        stream.extend_from_slice(&frames);

        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut rd = s.try_clone().unwrap();
        let drain = std::thread::spawn(move || {
            let mut sink = [0u8; 64 << 10];
            while matches!(rd.read(&mut sink), Ok(n) if n > 0) {}
        });
        // Written in random pieces, so headers and tables arrive split.
        let mut at = 0;
        while at < stream.len() {
            let k = (1 + rng.next_below(300)).min(stream.len() - at);
            if s.write_all(&stream[at..at + k]).is_err() {
                break; // the target closed on a malformed frame
            }
            at += k;
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        drain.join().unwrap();
    }
    assert!(guard.as_slice().iter().all(|&b| b == 0xc3), "memory outside the registered region changed");
    assert!(mem.as_slice().iter().any(|&b| b != 0x5a), "no WRITE was accepted: the streams test nothing");

    // The target still serves a well-behaved initiator.
    let init = Agent::new("fz-tcp-init", cfg()).unwrap();
    let mut src = AlignedBuf::new(64 << 10).unwrap();
    for (i, b) in src.as_mut_slice().iter_mut().enumerate() {
        *b = i as u8;
    }
    let back = AlignedBuf::new(64 << 10).unwrap();
    let _r1 = init.register_buf(&src).unwrap();
    let _r2 = init.register_buf(&back).unwrap();
    init.load_remote_metadata(&target.local_metadata().unwrap()).unwrap();
    let remote = mem.xfer_blocks(0, 64 << 10, 1).unwrap();
    let w =
        init.create_request(XferOp::Write, &src.xfer_blocks(0, 64 << 10, 1).unwrap(), &remote, "fz-tcp-target", None);
    w.unwrap().wait_posted();
    let r =
        init.create_request(XferOp::Read, &back.xfer_blocks(0, 64 << 10, 1).unwrap(), &remote, "fz-tcp-target", None);
    r.unwrap().wait_posted();
    assert!(back.as_slice() == src.as_slice());
    drop(init);
    drop(target);
    let _ = std::panic::take_hook();
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a thread panicked (see its message above)");
}

trait PostWait {
    fn wait_posted(self);
}

impl PostWait for kvferry::Request {
    fn wait_posted(self) {
        self.post(None).unwrap();
        self.wait(Duration::from_secs(10)).unwrap();
    }
}
