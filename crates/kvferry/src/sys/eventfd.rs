//! `eventfd`: the one wake-up primitive of the crate. A TCP lane's waiter
//! polls one beside its socket; an io_uring ring keeps a poll armed on one.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A non-blocking, close-on-exec `eventfd`: one thread signals, another's
/// poll (or ring) wakes. It stays signaled until [`clear`](Self::clear)ed.
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    /// A new, unsignaled eventfd.
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes integers only and returns a fresh descriptor or -1.
        let fd = syscall!(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: `fd` is a fresh descriptor owned by no one else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds one to the counter: wakes a poll on it.
    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one`, a live u64. A full counter (EAGAIN)
        // still leaves the eventfd readable, which is all a signal needs.
        let _ = syscall!(retry unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) });
    }

    /// Resets the counter to zero (unsignaled).
    pub(crate) fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into `v`, a live u64; EAGAIN (already zero) is fine.
        let _ = syscall!(retry unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) });
    }

    /// The descriptor, to poll on.
    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl fmt::Debug for EventFd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("EventFd").field(&self.0.as_raw_fd()).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn signals_until_cleared() {
        let e = EventFd::new().unwrap();
        assert!(!super::super::wait_readable(e.raw(), Duration::ZERO).unwrap());
        e.signal();
        e.signal();
        assert!(super::super::wait_readable(e.raw(), Duration::ZERO).unwrap());
        e.clear();
        e.clear();
        assert!(!super::super::wait_readable(e.raw(), Duration::ZERO).unwrap());
    }
}
