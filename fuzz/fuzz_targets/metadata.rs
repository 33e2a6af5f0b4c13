//! cargo-fuzz target `metadata`: see `fuzz_support::metadata` (shared with the stable
//! randomized test `crates/kvferry/tests/fuzz_decoders.rs`).
#![no_main]

#[path = "../../crates/kvferry/tests/fuzz_support/mod.rs"]
mod fuzz_support;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_support::metadata(data));
