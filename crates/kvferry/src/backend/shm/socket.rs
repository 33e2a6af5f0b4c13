//! The OS boundary of the SHM control channel: abstract-namespace Unix
//! sockets (bounded connect) and the kernel's word on who holds the other
//! end (`SO_PEERCRED`).
//!
//! Abstract sockets vanish with their last descriptor: nothing to clean up on
//! disk. Their names are visible to every user (`/proc/net/unix`), so a name
//! carries no secret and proves nothing: anyone can bind one. Who may talk
//! on a socket is decided by `SO_PEERCRED` ([`Access`](super::control::Access)).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::SocketAddr;

use crate::error::{Error, Result};

/// The address of the abstract socket `name`.
pub(super) fn abstract_addr(name: &[u8]) -> Result<SocketAddr> {
    SocketAddr::from_abstract_name(name).map_err(|e| Error::io("SHM: abstract socket name", e))
}

// The OS calls live in `crate::sys`; the SHM control channel names them here.
pub(super) use crate::sys::{connect_abstract, peer_cred};

#[cfg(test)]
mod tests {
    use std::io;
    use std::os::unix::net::UnixListener;
    use std::time::{Duration, Instant};

    use super::*;

    /// A listener that never accepts (backlog full) cannot hold a connecting
    /// initiator: the connect gives up after its timeout.
    #[test]
    fn connect_to_a_full_backlog_is_bounded() {
        let name = format!("kvferry-shm-test-{}-backlog", std::process::id()).into_bytes();
        let _listener = UnixListener::bind_addr(&abstract_addr(&name).unwrap()).unwrap();
        let t = Duration::from_millis(100);
        let mut held = Vec::new();
        let start = Instant::now();
        let err = loop {
            match connect_abstract(&name, t) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() <= 5000, "the backlog never filled");
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(start.elapsed() < Duration::from_secs(10), "bounded: {:?}", start.elapsed());
        assert!(connect_abstract(b"kvferry-shm-test-nobody-listens", t).is_err());
    }
}
