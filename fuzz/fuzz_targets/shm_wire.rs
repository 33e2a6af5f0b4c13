//! cargo-fuzz target `shm_wire`: see `kvferry_test_support::fuzz::shm_wire` (shared with the stable
//! randomized test `crates/kvferry/tests/fuzz_decoders.rs`).
#![no_main]

use kvferry_test_support::fuzz as fuzz_support;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_support::shm_wire(data));
