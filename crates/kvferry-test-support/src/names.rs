//! Names, ports and paths that two tests (or two runs) never share.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// A process-unique name with a readable prefix: `prefix-<pid>-<n>`.
pub fn name(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A free TCP port on 127.0.0.1 (bound once, then released: another process
/// may take it in between, which tests accept).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A path in the temporary directory unique to this process and `tag`
/// (nothing is created).
pub fn scratch(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kvferry-test-{}-{tag}", std::process::id()))
}
