//! The OS boundary of the SHM control channel: abstract-namespace Unix
//! sockets (bounded connect) and the kernel's word on who holds the other
//! end (`SO_PEERCRED`).
//!
//! Abstract sockets vanish with their last descriptor: nothing to clean up on
//! disk. Their names are visible to every user (`/proc/net/unix`), so a name
//! carries no secret and proves nothing: anyone can bind one. Who may talk
//! on a socket is decided by [`peer_cred`] ([`Access`](super::control::Access)).

use std::io;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::time::Duration;

use crate::error::{Error, Result};

/// The address of the abstract socket `name`.
pub(super) fn abstract_addr(name: &[u8]) -> Result<SocketAddr> {
    SocketAddr::from_abstract_name(name).map_err(|e| Error::io("SHM: abstract socket name", e))
}

/// Connects to the abstract socket `name`, waiting at most `timeout` for the
/// listener's backlog to have room (a listener that stopped accepting, or is
/// flooded, cannot hold the caller: plain `connect` would wait forever).
pub fn connect_abstract(name: &[u8], timeout: Duration) -> io::Result<UnixStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: sockaddr_un is plain data; all-zero is a valid empty address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= addr.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "abstract socket name empty or too long"));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &b) in addr.sun_path[1..].iter_mut().zip(name) {
        *d = b as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + 1 + name.len()) as libc::socklen_t;
    // SAFETY: socket takes integer arguments; a non-negative result is a new descriptor we own.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above: the descriptor is new and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let t = timeout.max(Duration::from_millis(1));
    let tv = libc::timeval { tv_sec: t.as_secs() as libc::time_t, tv_usec: t.subsec_micros() as libc::suseconds_t };
    // SAFETY: setsockopt reads a timeval of exactly the size given; the descriptor is ours.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    loop {
        // SAFETY: addr is a valid sockaddr_un of which `len` bytes are used; the descriptor is ours.
        let r = unsafe { libc::connect(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) };
        if r == 0 {
            return Ok(UnixStream::from(fd));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the listener did not take the connection within {timeout:?} (its backlog is full)"),
                ))
            }
            _ => return Err(e),
        }
    }
}

/// The credentials the kernel recorded for the other end of a connected Unix
/// socket (`SO_PEERCRED`): for an accepted socket, the connecting process at
/// `connect`; for a connecting one, the listener's process at `listen`.
pub fn peer_cred(s: &UnixStream) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a plain-data
    // struct of exactly that size; the descriptor is a live socket we own.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::time::Instant;

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
