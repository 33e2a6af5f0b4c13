//! Model-based property test of the TCP target (issue 11): random frames
//! from a hostile client over random registrations (DRAM regions between
//! guard pages and canaries, FILE regions inside larger files, a whole-file
//! registration, an exported file), against a model of what each key may
//! reach. The property: no byte outside a live registered region of the
//! frame's kind is read or written; a frame that mixes kinds, or has any
//! entry outside a live region of its own kind, gets `ERROR(NotAllowed)` and
//! touches nothing. See `crates/kvferry-test-support/src/tcp_model.rs`.
//!
//! `KVF_MODEL_SEED` varies the seed, `KVF_MODEL_STEPS` the number of steps
//! (default 2500, bounded to ~10 s); the cargo-fuzz target
//! `fuzz/fuzz_targets/tcp_target.rs` runs the same model on fuzzer input.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvferry::backend::tcp::proto::{Entry, FrameType, Status};
use kvferry_test_support::tcp_model::{Bytes, Rng, Source, World};
use kvferry_test_support::tcp_wire::HostileClient;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

#[test]
fn random_frames_touch_nothing_outside_a_region_of_their_kind() {
    let seed = env("KVF_MODEL_SEED", 0x6b76_6d6f_6465_6c31) | 1;
    let steps = env("KVF_MODEL_STEPS", 2500);
    println!("KVF_MODEL_SEED={seed} KVF_MODEL_STEPS={steps}");
    let mut w = World::new("rng");
    let mut rng = Rng(seed);
    let start = Instant::now();
    let mut done = 0;
    while done < steps && start.elapsed() < Duration::from_secs(10) {
        w.step(&mut rng);
        done += 1;
        if done % 200 == 0 {
            w.check_notifs();
        }
    }
    w.check_notifs();
    let s = w.stats.clone();
    println!("{done} steps in {:?}: {s:?}", start.elapsed());
    // Every kind of frame happened, so passing means something.
    assert!(done >= 500, "only {done} steps in the time bound");
    for (what, n) in [
        ("accepted memory WRITEs", s.mem_writes),
        ("accepted memory READs", s.mem_reads),
        ("accepted file WRITEs", s.file_writes),
        ("accepted file READs", s.file_reads),
        ("refused mixed-kind frames", s.mixed),
        ("refused out-of-bounds entries", s.out_of_bounds),
        ("refused deregistered keys", s.dead_key),
        ("refused unknown keys", s.unknown_key),
        ("refused malformed frames", s.malformed),
        ("connections closed on bad headers", s.closed),
        ("frames cut off", s.cut),
        ("notifications", s.notifs),
        ("(de)registrations", s.toggles),
        ("batched frames", s.batched),
    ] {
        assert!(n > 0, "the run produced no {what}: {s:?}");
    }
    // kvferry's own initiator is still served, byte for byte.
    w.legit_round();
}

/// The defect of issue 11, by hand: entry 0 a DRAM key, entry 1 a FILE key.
/// The whole-file key's range "covers" every offset, so a target that judges
/// the frame by entry 0 would write (or leak) the canaries in front of a DRAM
/// region; one with a ranged file key would use a file offset as a pointer.
#[test]
fn frames_that_mix_memory_and_file_keys_are_refused() {
    let mut w = World::new("mixed");
    let (mk, maddr, _) = w.mem_region(0).expect("memory region 0 is live");
    let (canary, canary_len) = w.canary_before(0);
    let (wk, _, _) = w.file_region(w.whole_file()).expect("the whole-file region is live");
    let (fk, foff, _) = w.file_region(0).expect("file region 0 is live");
    let mem = Entry { key: mk, addr: maddr, len: 64 };
    let cases = [
        ("DRAM then whole-file key at a canary address", vec![mem, Entry { key: wk, addr: canary, len: canary_len }]),
        ("DRAM then whole-file key in file coordinates", vec![mem, Entry { key: wk, addr: 0, len: 64 }]),
        ("DRAM then a ranged file key", vec![mem, Entry { key: fk, addr: foff, len: 64 }]),
        ("ranged file key then DRAM", vec![Entry { key: fk, addr: foff, len: 64 }, mem]),
        ("whole-file key then DRAM", vec![Entry { key: wk, addr: 0, len: 64 }, mem]),
    ];
    for (what, entries) in cases {
        for ty in [FrameType::Write, FrameType::Read] {
            let got = w.frame_checked(ty, entries.clone());
            // The model decides (and `frame_checked` asserts) the answer; the
            // mixed ones must be refusals.
            if entries.len() > 1 {
                assert_eq!(got, (FrameType::Error, Status::NotAllowed), "{what}, {ty:?}");
            }
        }
    }
    // The whole-file key alone at a memory address is a file offset: past
    // the end of the file, so a READ fails at the target's storage.
    let past = w.frame_checked(FrameType::Read, vec![Entry { key: wk, addr: canary, len: canary_len }]);
    assert_eq!(past.0, FrameType::Error);
    // Both kinds still work on their own.
    assert_eq!(w.frame_checked(FrameType::Write, vec![mem]).0, FrameType::Ack);
    assert_eq!(w.frame_checked(FrameType::Read, vec![Entry { key: fk, addr: foff, len: 64 }]).0, FrameType::Data);
    w.legit_round();
}

/// The cargo-fuzz target's body (`World::run` on raw bytes) on random
/// inputs, as `fuzz_decoders.rs` does for the decoder targets.
#[test]
fn fuzz_target_body_runs_on_random_inputs() {
    let n = env("KVF_FUZZ_ITERS", 6000) / 30;
    let mut w = World::new("fuzzbody");
    let mut rng = Rng(env("KVF_FUZZ_SEED", 0x7463_705f_7461_7267) | 1);
    let start = Instant::now();
    let mut inputs = 0;
    for _ in 0..n {
        if start.elapsed() > Duration::from_secs(6) {
            break;
        }
        let len = (rng.next_u64() % 400) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        w.run(&mut Bytes::new(&data), usize::MAX);
        inputs += 1;
    }
    assert!(inputs >= 20, "only {inputs} inputs in the time bound");
    w.legit_round();
}

/// While attackers hold connections open in the middle of frames (and in
/// the middle of the handshake), the model's client and kvferry's own
/// initiator are served as before.
#[test]
fn legitimate_traffic_flows_while_attackers_hold_connections() {
    let mut w = World::new("held");
    let t = w.target().clone();
    let (mk, maddr, _) = w.mem_region(1).expect("memory region 1 is live");
    let mut held = Vec::new();
    for i in 0..24u64 {
        let mut c = HostileClient::connect_ok(&t, &format!("holder-{i}"), b"");
        // A WRITE's header and entry, then silence instead of the payload.
        let mut b = Vec::new();
        kvferry_test_support::tcp_wire::raw_frame(
            &mut b,
            FrameType::Write as u8,
            i,
            1,
            64,
            &[Entry { key: mk, addr: maddr, len: 64 }],
            &[],
        );
        c.send_raw(&b).expect("send half a frame");
        held.push(c);
    }
    // Half a hello.
    let mut raw = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(("127.0.0.1", t.port)).expect("connect");
        std::io::Write::write_all(&mut s, b"KVFT\x01").expect("send part of a hello");
        raw.push(s);
    }
    let mut rng = Rng(0x686f_6c64 | 1);
    for _ in 0..200 {
        w.step(&mut rng);
    }
    w.check_notifs();
    w.legit_round();
    drop(held);
    drop(raw);
    // Nothing the holders sent was applied.
    w.legit_round();
}

/// A hostile client streams WRITEs into a region while it is deregistered:
/// no byte of the region changes after `deregister` returned (a frame in
/// the middle of its copy finishes or is aborted first), later frames are
/// refused with `NotAllowed` (or their connection was closed by the
/// deregistration and the next one refuses them), and none is acknowledged
/// after a refusal.
#[test]
fn no_byte_moves_after_deregistration_returns() {
    let mut w = World::new("dereg");
    let t = w.target().clone();
    let (key, addr, len) = w.mem_region(1).expect("memory region 1 is live");
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let hammer = {
        let (stop, acked) = (stop.clone(), acked.clone());
        std::thread::spawn(move || {
            let e = Entry { key, addr, len };
            let mut refused_after_stop = 0;
            let mut refused = false;
            let mut reconnects = 0;
            let mut c = HostileClient::connect_ok(&t, "hammer", b"");
            for op in 1u64.. {
                let data = vec![op as u8; len as usize];
                let answer = c.send(FrameType::Write, op, len, &[e], &data).and_then(|()| c.answer());
                let a = match answer {
                    Ok(a) => a,
                    Err(err) => {
                        // Deregistration may abort a connection in the middle of a copy.
                        reconnects += 1;
                        assert!(reconnects <= 3, "the target keeps dropping the connection: {err}");
                        c = HostileClient::connect_ok(&t, "hammer", b"");
                        continue;
                    }
                };
                assert_eq!(a.header.op, op);
                match (a.header.ty, a.header.status) {
                    (FrameType::Ack, _) => {
                        assert!(!refused, "a WRITE was applied after an earlier one was refused");
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    (FrameType::Error, Status::NotAllowed) => {
                        refused = true;
                        if stop.load(Ordering::Acquire) {
                            refused_after_stop += 1;
                        }
                    }
                    other => panic!("unexpected answer {other:?}: {}", a.text()),
                }
                if refused_after_stop >= 50 {
                    break;
                }
            }
        })
    };
    let until = Instant::now() + Duration::from_secs(10);
    while acked.load(Ordering::Relaxed) < 20 {
        assert!(Instant::now() < until, "the hammer's WRITEs are not acknowledged");
        std::thread::sleep(Duration::from_millis(1));
    }
    w.deregister_mem(1);
    let frozen = w.mem_bytes(1);
    stop.store(true, Ordering::Release);
    hammer.join().expect("the hammer saw ACKs, then only refusals");
    assert_eq!(w.mem_bytes(1), frozen, "the region changed after deregister returned");
    w.resync_mem(1);
    let mut rng = Rng(0x0064_6572_6567 | 1);
    for _ in 0..100 {
        w.step(&mut rng);
    }
    w.legit_round();
}

/// Answers come in request order on each connection (docs/TCP.md): a frame
/// refused at once is answered after the file READs before it, which the
/// target pipelines. A kvferry initiator matches each answer to the frame it
/// awaits, so an early ERROR would kill the connection and fail both requests.
#[test]
fn a_refusal_is_answered_after_the_file_reads_before_it() {
    let mut w = World::new("order");
    let (fk, foff, flen) = w.file_region(0).expect("file region 0 is live");
    let (xk, _, _) = w.file_region(3).expect("the exported file is live");
    let read = Entry { key: fk, addr: foff, len: flen };
    let refused = [
        ("out of bounds", vec![Entry { key: xk, addr: 0, len: 64 }, Entry { key: fk, addr: 0, len: 64 }]),
        (
            "unknown key",
            vec![
                Entry { key: xk, addr: 0, len: 64 },
                Entry { key: kvferry::backend::AccessKey([9; 16]), addr: 0, len: 64 },
            ],
        ),
    ];
    for (what, bad) in refused {
        for ty in [FrameType::Read, FrameType::Write] {
            let got =
                w.batch_checked(vec![(FrameType::Read, vec![read]), (FrameType::Read, vec![read]), (ty, bad.clone())]);
            assert_eq!(got[2], (FrameType::Error, Status::NotAllowed), "{what}, {ty:?}");
        }
    }
}
