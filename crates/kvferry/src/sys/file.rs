//! Descriptors and files: duplication, status flags and seals, `fstat`,
//! `statx` and `fstatfs`, block-device geometry, positioned I/O and memfds.
//! What the storage layer, registered buffers and the SHM mapped path know
//! about files, each call a thin wrapper that turns `-1` into [`io::Error`].

use std::ffi::CStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Duplicates `fd` (close-on-exec) so the backend owns a descriptor of the
/// same open file that the caller may close independently.
pub(crate) fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) reads no memory; an invalid fd gives EBADF.
    let new = syscall!(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `new` is a fresh descriptor returned to us by the kernel, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// The file status flags of `fd` (`O_ACCMODE`, `O_DIRECT`, ...).
pub(crate) fn status_flags(fd: RawFd) -> io::Result<i32> {
    // SAFETY: fcntl(F_GETFL) reads no memory; an invalid fd gives EBADF.
    syscall!(unsafe { libc::fcntl(fd, libc::F_GETFL) })
}

/// The seals of a memfd (`F_GET_SEALS`): `F_SEAL_*` bits. Fails with
/// `EINVAL` for a descriptor that does not support sealing.
pub(crate) fn seals(fd: RawFd) -> io::Result<i32> {
    // SAFETY: fcntl(F_GET_SEALS) takes no argument and reads no memory.
    syscall!(unsafe { libc::fcntl(fd, libc::F_GET_SEALS) })
}

/// Adds `seals` (`F_SEAL_*` bits) to a memfd created with `MFD_ALLOW_SEALING`.
pub(crate) fn add_seals(fd: RawFd, seals: i32) -> io::Result<()> {
    // SAFETY: fcntl(F_ADD_SEALS) takes an integer argument and reads no memory.
    syscall!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) }).map(drop)
}

/// Sets the size of the file behind `fd` (`ftruncate`).
pub(crate) fn set_len(fd: RawFd, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: ftruncate takes integers only; an invalid fd gives EBADF.
    syscall!(retry unsafe { libc::ftruncate(fd, len) }).map(drop)
}

/// A new anonymous memory file (`memfd_create`), close-on-exec, with the
/// extra `MFD_*` flags given (`MFD_ALLOW_SEALING`, `MFD_HUGETLB`).
pub(crate) fn memfd_create(name: &CStr, flags: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a NUL-terminated C string alive for the call; the
    // kernel copies it and reads nothing else.
    let raw = syscall!(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) })?;
    // SAFETY: `raw` is a fresh descriptor returned to us by the kernel, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The filesystem a descriptor's file lives on, as far as the library cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FsType {
    /// hugetlbfs (`MFD_HUGETLB` memfds): pages come from the huge page pool at first touch.
    HugeTlb,
    /// Anything else.
    Other,
}

/// What kind of filesystem holds `fd`'s file (`fstatfs`).
pub(crate) fn fs_type(fd: RawFd) -> io::Result<FsType> {
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut sf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `sf` is a valid, writable statfs buffer; an invalid fd gives EBADF.
    syscall!(unsafe { libc::fstatfs(fd, &mut sf) })?;
    Ok(if sf.f_type == libc::HUGETLBFS_MAGIC { FsType::HugeTlb } else { FsType::Other })
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
    syscall!(unsafe { libc::fstat(fd, &mut st) })?;
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
    syscall!(unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut size) })?;
    Ok(size.max(0) as u32)
}

/// The size of a block device (or file): `lseek(fd, 0, SEEK_END)`.
///
/// Moving the file position is harmless: every transfer uses positioned I/O.
pub(crate) fn device_size(fd: RawFd) -> io::Result<u64> {
    // SAFETY: lseek reads no memory; an invalid fd gives EBADF.
    let end = syscall!(unsafe { libc::lseek(fd, 0, libc::SEEK_END) })?;
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
    let n = syscall!(unsafe { libc::pread64(fd, buf.cast(), len, off) })?;
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
    let n = syscall!(unsafe { libc::pwrite64(fd, buf.cast(), len, off) })?;
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

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
    fn a_sealed_memfd() {
        let fd = memfd_create(c"kvferry-test", libc::MFD_ALLOW_SEALING).unwrap();
        set_len(fd.as_raw_fd(), 8192).unwrap();
        assert_eq!(fstat(fd.as_raw_fd()).unwrap().size, 8192);
        assert_eq!(seals(fd.as_raw_fd()).unwrap() & libc::F_SEAL_SHRINK, 0);
        add_seals(fd.as_raw_fd(), libc::F_SEAL_SHRINK).unwrap();
        assert_ne!(seals(fd.as_raw_fd()).unwrap() & libc::F_SEAL_SHRINK, 0);
        assert!(set_len(fd.as_raw_fd(), 0).is_err(), "sealed against shrinking");
        assert_eq!(fs_type(fd.as_raw_fd()).unwrap(), FsType::Other);
        assert!(fs_type(-1).is_err());
    }
}
