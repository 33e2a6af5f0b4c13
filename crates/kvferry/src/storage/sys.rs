//! The raw OS calls of the storage layer, each a thin wrapper that turns
//! `-1` into [`io::Error`]. Everything `unsafe` about files lives here (and in
//! the io_uring submission in `uring.rs`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Turns a libc return value into `io::Result`, reading `errno` on `-1`.
fn cvt<T: Copy + PartialEq + From<i8>>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Duplicates `fd` (close-on-exec) so the backend owns a descriptor of the
/// same open file that the caller may close independently.
pub(crate) fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) reads no memory; an invalid fd gives EBADF.
    let new = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `new` is a fresh descriptor returned to us by the kernel, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// The file status flags of `fd` (`O_ACCMODE`, `O_DIRECT`, ...).
pub(crate) fn status_flags(fd: RawFd) -> io::Result<i32> {
    // SAFETY: fcntl(F_GETFL) reads no memory; an invalid fd gives EBADF.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })
}

/// What `fstat` says about an open descriptor.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stat {
    /// The device the inode lives on.
    pub(crate) dev: u64,
    /// The inode number.
    pub(crate) ino: u64,
    /// Type and permission bits.
    pub(crate) mode: u32,
    /// Size in bytes (0 for block devices: see [`device_size`]).
    pub(crate) size: u64,
    /// Last modification.
    pub(crate) mtime: SystemTime,
}

impl Stat {
    /// Whether the descriptor is a block device.
    pub(crate) fn is_block(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFBLK
    }

    /// Whether the descriptor is a regular file.
    pub(crate) fn is_file(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }
}

fn mtime_of(sec: i64, nsec: i64) -> SystemTime {
    let nsec = nsec.clamp(0, 999_999_999) as u32;
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::new(0, nsec)
    }
}

/// `fstat(fd)`.
pub(crate) fn fstat(fd: RawFd) -> io::Result<Stat> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer; an invalid fd gives EBADF.
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(Stat {
        dev: st.st_dev,
        ino: st.st_ino,
        mode: st.st_mode,
        size: st.st_size.max(0) as u64,
        mtime: mtime_of(st.st_mtime, st.st_mtime_nsec),
    })
}

/// The O_DIRECT alignments the kernel reports for `fd` through
/// `statx(STATX_DIOALIGN)` (Linux 6.1+): `(memory, offset)`. `None` when the
/// kernel or filesystem does not say.
pub(crate) fn dio_align(fd: RawFd) -> Option<(u32, u32)> {
    // SAFETY: an all-zero `statx` is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated empty string, AT_EMPTY_PATH makes
    // statx describe `fd` itself, and `stx` is a valid writable buffer.
    let r = unsafe { libc::statx(fd, c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    (stx.stx_dio_mem_align > 0 && stx.stx_dio_offset_align > 0)
        .then_some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// The logical block size of a block device (`BLKSSZGET`).
pub(crate) fn logical_block_size(fd: RawFd) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one c_int through the pointer, which points to `size`.
    cvt(unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut size) })?;
    Ok(size.max(0) as u32)
}

/// The size of a block device (or file): `lseek(fd, 0, SEEK_END)`.
///
/// Moving the file position is harmless: every transfer uses positioned I/O.
pub(crate) fn device_size(fd: RawFd) -> io::Result<u64> {
    // SAFETY: lseek reads no memory; an invalid fd gives EBADF.
    let end = cvt(unsafe { libc::lseek(fd, 0, libc::SEEK_END) })?;
    Ok(end.max(0) as u64)
}

/// `pread(fd, buf, len, offset)`: bytes read, 0 at end of file.
///
/// # Safety
///
/// `buf` must be valid for writes of `len` bytes, and nothing else may rely on
/// those bytes while the call runs.
pub(crate) unsafe fn pread(fd: RawFd, buf: *mut u8, len: usize, offset: u64) -> io::Result<usize> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the caller guarantees `buf` is writable for `len` bytes.
    let n = cvt(unsafe { libc::pread64(fd, buf.cast(), len, off) })?;
    Ok(n as usize)
}

/// `pwrite(fd, buf, len, offset)`: bytes written.
///
/// # Safety
///
/// `buf` must be valid for reads of `len` bytes while the call runs.
pub(crate) unsafe fn pwrite(fd: RawFd, buf: *const u8, len: usize, offset: u64) -> io::Result<usize> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the caller guarantees `buf` is readable for `len` bytes.
    let n = cvt(unsafe { libc::pwrite64(fd, buf.cast(), len, off) })?;
    Ok(n as usize)
}

/// An `eventfd`: one thread signals, another's ring wakes.
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    /// A new non-blocking, close-on-exec eventfd.
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: eventfd reads no memory and returns a fresh descriptor or -1.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: `fd` is a fresh descriptor owned by no one else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds one to the counter (wakes a poll on it).
    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one`, a live u64. A full counter (EAGAIN)
        // still leaves the eventfd readable, which is all a signal needs.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter to zero.
    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into `v`, a live u64; EAGAIN (already zero) is fine.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    /// The descriptor, to poll on.
    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dup_and_stat_a_file() {
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        let d = dup(f.as_raw_fd()).unwrap();
        let (a, b) = (fstat(f.as_raw_fd()).unwrap(), fstat(d.as_raw_fd()).unwrap());
        assert_eq!((a.dev, a.ino), (b.dev, b.ino));
        assert!(a.is_file() && !a.is_block());
        assert_eq!(status_flags(d.as_raw_fd()).unwrap() & libc::O_ACCMODE, libc::O_RDONLY);
        assert!(dup(-1).is_err());
        assert!(fstat(-1).is_err());
        assert!(device_size(d.as_raw_fd()).unwrap() > 0);
    }

    #[test]
    fn eventfd_signals() {
        let e = EventFd::new().unwrap();
        e.signal();
        e.drain();
        e.drain();
        assert!(e.raw() >= 0);
    }
}
