//! Who and where an agent is: the identity that tells "same process", "same
//! host" and "elsewhere" apart, published in metadata.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// Identity of the process an agent lives in.
///
/// Two agents are on the *same host* for memory-sharing purposes only when
/// they share the kernel boot (`boot_id`) and the PID and network namespaces:
/// two containers on one machine share a boot id but not a PID namespace, so
/// they are never mistaken for one host. `start_time` (clock ticks since boot)
/// tells a restarted process that reuses a PID from the old one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HostId {
    /// `uname -n`, for humans only: never used to decide anything.
    pub hostname: String,
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    /// Inode of `/proc/self/ns/pid`.
    pub pid_ns: u64,
    /// Inode of `/proc/self/ns/net`.
    pub net_ns: u64,
    /// Process id in `pid_ns`.
    pub pid: u32,
    /// Process start time in clock ticks since boot (`/proc/self/stat` field 22).
    pub start_time: u64,
}

impl HostId {
    /// The identity of this process (computed once).
    pub fn current() -> &'static HostId {
        static ID: OnceLock<HostId> = OnceLock::new();
        ID.get_or_init(|| HostId {
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string(),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim().to_string(),
            pid_ns: ns_inode("pid"),
            net_ns: ns_inode("net"),
            pid: std::process::id(),
            start_time: start_time(),
        })
    }

    /// Same kernel and same PID namespace: cross-memory attach can reach the other.
    pub fn same_host(&self, other: &HostId) -> bool {
        !self.boot_id.is_empty() && self.boot_id == other.boot_id && self.pid_ns == other.pid_ns && self.pid_ns != 0
    }

    /// The very same process (same host, pid and start time).
    pub fn same_process(&self, other: &HostId) -> bool {
        self.same_host(other) && self.pid == other.pid && self.start_time == other.start_time
    }
}

fn ns_inode(ns: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/self/ns/{ns}")).map(|m| m.ino()).unwrap_or(0)
}

fn start_time() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name (field 2) may hold spaces; fields resume after its ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_process_is_itself() {
        let me = HostId::current();
        assert!(me.same_process(me));
        assert!(me.start_time > 0 && me.pid_ns != 0 && !me.boot_id.is_empty());
        let mut other = me.clone();
        other.pid_ns += 1;
        assert!(!me.same_host(&other), "a different PID namespace is another host for sharing");
        let mut restarted = me.clone();
        restarted.start_time += 1;
        assert!(me.same_host(&restarted) && !me.same_process(&restarted));
    }
}
