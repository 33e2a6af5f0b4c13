//! Memory mappings: the page size, shared mappings of a file (registered
//! buffers, a peer's memfd on the SHM mapped path), private huge-page-aligned
//! anonymous memory, and `munmap`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// The system page size (4096 if `sysconf` cannot tell).
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions; it returns -1 on error, handled below.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// Maps `len` bytes of `fd` from `offset` (a multiple of the page size),
/// shared and read-write, at an address the kernel picks. The caller owns
/// the mapping and [`unmap`]s it; the mapping keeps the file open.
pub(crate) fn map_shared(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<NonNull<u8>> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a fresh mapping (no address hint, so nothing existing is replaced)
    // of a descriptor the caller holds open for the duration of the call.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned a null mapping"))
}

/// Maps `len` bytes of private, zeroed, anonymous memory at an address that
/// is a multiple of `align` (a power of two, at least the page size), and
/// advises transparent huge pages for it (`MADV_HUGEPAGE`). The caller owns
/// exactly `ptr..ptr + len` and [`unmap`]s it.
pub(crate) fn map_huge(len: usize, align: usize) -> io::Result<NonNull<u8>> {
    // Over-map by `align`, then trim both ends so that the kept range starts
    // on an `align` boundary (the kernel only backs whole, aligned huge-page
    // ranges with huge pages).
    let over = len.checked_add(align).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a fresh private anonymous mapping with no address hint.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            over,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = p as usize;
    let start = base.next_multiple_of(align);
    let (head, tail) = (start - base, base + over - (start + len));
    // SAFETY: both ranges lie inside the mapping just made, and nothing refers to them.
    unsafe {
        if head > 0 {
            libc::munmap(p, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
        // Advice only: with THP disabled the range keeps normal pages, which
        // is correct, only slower for O_DIRECT.
        libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    NonNull::new(start as *mut u8).ok_or_else(|| io::Error::other("mmap returned a null mapping"))
}

/// Advises transparent huge pages for the whole pages inside
/// `ptr..ptr + len` (`MADV_HUGEPAGE`), so that filling a large fresh
/// allocation faults once per 2 MiB instead of once per 4 KiB. Advice only:
/// nothing changes where THP is off or the range is too small.
pub(crate) fn advise_huge(ptr: *const u8, len: usize) {
    let page = page_size();
    let start = (ptr as usize).div_ceil(page) * page;
    let end = (ptr as usize).saturating_add(len) / page * page;
    if end > start {
        // SAFETY: madvise only gives advice about pages of this process's own
        // mapping (the caller's allocation); MADV_HUGEPAGE changes no contents.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

/// Maps the pages covering `ptr..ptr + len` of a shared mapping into this
/// process's page tables now (`MADV_POPULATE_WRITE` or `_READ`, Linux 5.14),
/// so that a large copy through the mapping does not take a fault per 4 KiB.
/// Advice in effect: an older kernel's `EINVAL` is returned and changes
/// nothing. The caller guarantees the range lies inside a mapping whose
/// backing cannot shrink (a memfd sealed against it), so no page is missing.
pub(crate) fn populate(ptr: usize, len: usize, write: bool) -> io::Result<()> {
    const MADV_POPULATE_READ: libc::c_int = 22;
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    let page = page_size();
    let start = ptr / page * page;
    let end = ptr.saturating_add(len).div_ceil(page) * page;
    let advice = if write { MADV_POPULATE_WRITE } else { MADV_POPULATE_READ };
    // SAFETY: populating faults in pages of this process's own mapping as an
    // access would; it writes no contents, and the caller's mapping covers
    // whole pages of `start..end`.
    syscall!(unsafe { libc::madvise(start as *mut libc::c_void, end - start, advice) })?;
    Ok(())
}

/// Unmaps `len` bytes at `ptr`.
///
/// # Safety
///
/// `ptr..ptr + len` must be (whole pages of) a mapping this process made and
/// still holds, that no reference or in-flight copy uses any more; it is
/// unmapped once.
pub(crate) unsafe fn unmap(ptr: *mut u8, len: usize) {
    // SAFETY: the caller's promise: the range is ours to unmap and unused.
    unsafe { libc::munmap(ptr.cast(), len) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_mappings_are_aligned() {
        let align = 2 << 20;
        let p = map_huge(align, align).unwrap();
        assert_eq!(p.as_ptr() as usize % align, 0);
        // SAFETY: the mapping was made just above and is not used after this.
        unsafe { unmap(p.as_ptr(), align) };
        assert!(page_size().is_power_of_two());
    }
}
