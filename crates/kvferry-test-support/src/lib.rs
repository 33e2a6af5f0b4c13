//! The test toolkit of the kvferry workspace: what the integration tests of
//! `kvferry` and `kvferry-cli`, and the cargo-fuzz targets, share instead of
//! each test folder carrying its own copy. Not published.
//!
//! | module | what |
//! |---|---|
//! | [`names`] | process-unique names, free ports, scratch paths |
//! | [`wait`] | [`eventually`]: a bounded wait for a condition |
//! | [`pattern`] | deterministic byte patterns: fill, check, permutations, hex |
//! | [`rng`] | a small deterministic random number generator |
//! | [`net`] | [`connect_from`]: a TCP connect from a chosen source address |
//! | [`process`] | child processes read line by line, and re-running this test binary in a role |
//! | [`netns`] | two network namespaces joined by a veth pair |
//! | [`servers`] | a real etcd on free ports |
//! | [`fs`] | temporary directories, tmpfs mounts, loop devices, loud skips |
//! | [`plugins`] | dummy backends (a gated one, a TCP stand-in) for agent-level tests |
//! | [`tcp_wire`] | a hand-written TCP wire client that does what kvferry's initiator never would |
//! | [`tcp_model`] | the model-based property test of the TCP target |
//! | [`fuzz`] | the decoder drivers run by `tests/fuzz_decoders.rs` and the fuzz targets |
//!
//! Everything here panics with a message that says what failed: it is for
//! tests, where a panic is the failure report.

pub mod fs;
pub mod fuzz;
pub mod names;
pub mod net;
pub mod netns;
pub mod pattern;
pub mod plugins;
pub mod process;
pub mod rng;
pub mod servers;
pub mod tcp_model;
pub mod tcp_wire;
pub mod wait;

pub use names::{free_port, name, scratch};
pub use net::connect_from;
pub use pattern::{fill, first_mismatch, hex, pattern_byte, pattern_vec, unhex};
pub use process::{rerun_self, Child};
pub use wait::eventually;
