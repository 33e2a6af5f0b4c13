//! cargo-fuzz target `agent_ops`: see `kvferry_test_support::fuzz::agent_ops` (shared with the stable
//! randomized test `crates/kvferry/tests/fuzz_decoders.rs`).
#![no_main]

use kvferry_test_support::fuzz as fuzz_support;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_support::agent_ops(data));
