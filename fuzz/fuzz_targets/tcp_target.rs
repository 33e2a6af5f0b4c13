//! cargo-fuzz target `tcp_target`: the model-based property test of the TCP
//! target (`crates/kvferry-test-support/src/tcp_model.rs`, shared with the
//! stable test `crates/kvferry/tests/tcp_model.rs`) driven by fuzzer bytes.
//!
//! One target agent lives for the whole fuzzing run (DRAM regions between
//! guard pages and canaries, FILE regions inside canary-filled files under
//! /var/tmp); each input is a sequence of steps (frames, batches, cut frames,
//! deregistrations) whose answers and effects are checked against the model.
//! A touched canary, a wrong answer or a fault aborts the run.
#![no_main]

use std::sync::{Mutex, OnceLock};

use kvferry_test_support::tcp_model::{Bytes, World};

static WORLD: OnceLock<Mutex<World>> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let world = WORLD.get_or_init(|| Mutex::new(World::new("fuzz")));
    // A failed input aborts the process, so a poisoned lock is never seen again.
    let mut w = world.lock().unwrap_or_else(|e| e.into_inner());
    w.run(&mut Bytes::new(data), 256);
});
