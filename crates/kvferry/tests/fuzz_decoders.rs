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

mod fuzz_support;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::Duration;

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

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
    for _ in 0..1 + rng.below(4) {
        match rng.below(9) {
            // Bit flip.
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            // Random byte.
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            // An interesting integer (1, 2, 4 or 8 bytes, little-endian) over a length field.
            2 if !v.is_empty() => {
                let width = [1, 2, 4, 8][rng.below(4)];
                let val = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let at = rng.below(v.len());
                for (k, &byte) in val.iter().take(width).enumerate() {
                    if let Some(b) = v.get_mut(at + k) {
                        *b = byte;
                    }
                }
            }
            // Truncate.
            3 => v.truncate(rng.below(v.len() + 1)),
            // Append random bytes.
            4 => {
                let n = rng.below(64);
                v.extend(rng.bytes(n));
            }
            // Insert or delete a run.
            5 if !v.is_empty() => {
                let at = rng.below(v.len());
                if rng.below(2) == 0 {
                    let n = rng.below(16);
                    let ins = rng.bytes(n);
                    v.splice(at..at, ins);
                } else {
                    let end = (at + rng.below(16)).min(v.len());
                    v.drain(at..end);
                }
            }
            // Splice: a prefix of this with a suffix of another valid input.
            6 if !pool.is_empty() => {
                let other = &pool[rng.below(pool.len())];
                let cut = rng.below(v.len() + 1);
                let from = rng.below(other.len() + 1);
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            // Concatenate two valid inputs (two frames back to back).
            7 if !pool.is_empty() => v.extend_from_slice(&pool[rng.below(pool.len())]),
            // Entirely random bytes of a random length.
            _ => {
                let n = rng.below(200);
                v = rng.bytes(n);
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
            let base = &pool[rng.below(pool.len())];
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
        let n = 50 + rng.below(1500);
        let input = rng.bytes(n);
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
