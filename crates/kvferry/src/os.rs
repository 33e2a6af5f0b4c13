//! The few OS helpers that tools built on kvferry share with it (the
//! `kvferry` command's rendezvous and metadata server use them), so that
//! they need no system calls of their own. Everything else about the OS is
//! the library's private business.
//!
//! ```
//! use std::io::Write;
//! use std::net::{TcpListener, TcpStream};
//! use std::time::{Duration, Instant};
//!
//! let l = TcpListener::bind("127.0.0.1:0")?;
//! let mut a = TcpStream::connect(l.local_addr()?)?;
//! assert!(kvferry::os::wait_readable(&l, Duration::from_secs(5))?);
//! let (b, _) = l.accept()?;
//! a.write_all(b"ping")?;
//! let mut buf = [0u8; 4];
//! kvferry::os::read_exact_by(&b, &mut buf, Instant::now() + Duration::from_secs(5))?;
//! assert_eq!(&buf, b"ping");
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::sys;

/// Fills `buf` from the stream socket `sock` before `deadline`: one deadline
/// for the whole buffer, not one per read, so a peer trickling bytes is cut
/// off there. Works whatever the socket's blocking mode and timeouts, and
/// changes neither.
///
/// Errors: `TimedOut` ("N of M bytes arrived before the deadline"),
/// `UnexpectedEof` ("the peer closed after N of M bytes"), or the OS error.
/// [`Error::io`](crate::Error::io) maps them to `Timeout` and `RemoteDisconnect`.
pub fn read_exact_by(sock: &impl AsRawFd, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    sys::read_exact_by(sock, buf, deadline)
}

/// Waits up to `timeout` until `fd` is readable: for a listening socket, a
/// connection is waiting to be accepted. `false` on timeout or when a signal
/// cut the wait short.
pub fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    sys::wait_readable(fd.as_raw_fd(), timeout)
}

/// Raises this process's soft limit on open descriptors (`ulimit -n`)
/// towards `want`, as far as the hard limit allows, and returns the limit
/// now in force (which may still be below `want`). Never lowers it.
pub fn raise_fd_limit(want: u64) -> io::Result<u64> {
    sys::raise_fd_limit(want)
}

/// Makes room for `n` more items in `v`, asking for transparent huge pages
/// when that is 4 MiB or more, so that filling a large fresh vector (a
/// million descriptors from Python, say) does not take a page fault every
/// 4 KiB. Advice only: the vector behaves the same either way.
pub fn reserve_huge<T>(v: &mut Vec<T>, n: usize) {
    v.reserve(n);
    let bytes = v.capacity().saturating_mul(std::mem::size_of::<T>());
    if bytes >= 4 << 20 {
        sys::advise_huge(v.as_ptr().cast(), bytes);
    }
}
