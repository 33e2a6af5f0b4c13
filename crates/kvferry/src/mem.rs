//! The owned, aligned buffer that the safe registration API takes.
//!
//! This is the allocator only: the descriptors of a buffer
//! ([`AlignedBuf::xfer_blocks`] and friends) are built in [`crate::desc`],
//! which sits above it.

use std::alloc::{self, Layout};
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::sys;

/// The system page size, used as the default alignment of [`AlignedBuf`].
pub fn page_size() -> usize {
    sys::page_size()
}

/// Where an [`AlignedBuf`]'s bytes live.
enum Backing {
    /// From the global allocator (the fallback, and alignments above the page size).
    Heap { layout: Layout },
    /// A `MAP_SHARED` mapping of an anonymous memfd, which other processes
    /// of this host may map too (the SHM backend's fast path).
    MemFd { map_len: usize, fd: Arc<OwnedFd> },
    /// A private anonymous mapping with transparent huge pages advised (see
    /// [`AlignedBuf::huge`]).
    Anon { map_len: usize },
}

struct RawAlloc {
    ptr: NonNull<u8>,
    backing: Backing,
}

// SAFETY: RawAlloc is a plain allocation (heap or mapping) with no thread
// affinity; access to its bytes is coordinated by the transfer protocol, as
// with any DMA buffer.
unsafe impl Send for RawAlloc {}
// SAFETY: see above; RawAlloc itself holds no interior state besides the bytes.
unsafe impl Sync for RawAlloc {}

impl Drop for RawAlloc {
    fn drop(&mut self) {
        match &self.backing {
            // SAFETY: ptr was returned by alloc_zeroed with this exact layout and is freed once.
            Backing::Heap { layout } => unsafe { alloc::dealloc(self.ptr.as_ptr(), *layout) },
            Backing::Anon { map_len } => {
                // SAFETY: ptr/map_len is exactly the mapping kept by `huge_alloc`, unmapped once,
                // when the last owner (buffer or registration) lets go.
                unsafe { sys::unmap(self.ptr.as_ptr(), *map_len) };
            }
            Backing::MemFd { map_len, .. } => {
                // SAFETY: ptr/map_len is exactly the mapping made in `memfd_alloc`, unmapped once.
                // Other processes that mapped the memfd keep their own mappings (and the pages).
                unsafe { sys::unmap(self.ptr.as_ptr(), *map_len) };
            }
        }
    }
}

/// Allocates `len` zeroed, page-aligned bytes as a shared mapping of a new
/// anonymous memfd whose size is sealed (it can neither shrink nor grow, so a
/// process that maps it never faults past its end). `None` if the kernel
/// refuses any step (no `memfd_create`, seccomp, limits): the caller falls
/// back to the allocator.
fn memfd_alloc(len: usize) -> Option<RawAlloc> {
    let page = page_size();
    let map_len = len.checked_add(page - 1)? / page * page;
    let fd = sys::memfd_create(c"kvferry-buf", libc::MFD_ALLOW_SEALING).ok()?;
    sys::set_len(fd.as_raw_fd(), map_len as u64).ok()?;
    sys::add_seals(fd.as_raw_fd(), libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL).ok()?;
    let ptr = sys::map_shared(fd.as_fd(), map_len, 0).ok()?;
    Some(RawAlloc { ptr, backing: Backing::MemFd { map_len, fd: Arc::new(fd) } })
}

/// The size of a transparent huge page on x86-64 and most aarch64 kernels,
/// which [`AlignedBuf::huge`] aligns to.
pub const HUGE_PAGE: usize = 2 << 20;

/// Maps `len` bytes (rounded up to whole huge pages) of private anonymous
/// memory at a [`HUGE_PAGE`]-aligned address and asks for transparent huge
/// pages. `None` if the kernel refuses the mapping.
fn huge_alloc(len: usize) -> Option<RawAlloc> {
    let map_len = len.checked_add(HUGE_PAGE - 1)? / HUGE_PAGE * HUGE_PAGE;
    let ptr = sys::map_huge(map_len, HUGE_PAGE).ok()?;
    Some(RawAlloc { ptr, backing: Backing::Anon { map_len } })
}

/// A handle to the memfd behind registered memory, with which a backend may
/// let another process of the host map that memory (the SHM fast path).
///
/// Given to backends in [`Region::share`](crate::backend::Region::share) for
/// memory registered with [`Agent::register_buf`](crate::Agent::register_buf);
/// raw [`register_mem`](crate::Agent::register_mem) regions have none. The
/// region starts `offset` bytes into the file (a multiple of the page size).
/// The file's size is sealed: it cannot shrink under a peer's mapping.
#[derive(Clone)]
pub struct MemShare {
    fd: Arc<OwnedFd>,
    offset: u64,
}

impl MemShare {
    /// The memfd (owned by the buffer; duplicate it to keep it).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Where the region starts in the file, in bytes (page-aligned).
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl PartialEq for MemShare {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.fd, &other.fd) && self.offset == other.offset
    }
}

impl Eq for MemShare {}

impl fmt::Debug for MemShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemShare(fd {}, offset {})", self.fd.as_raw_fd(), self.offset)
    }
}

/// An owned, zeroed, page-aligned (so O_DIRECT-ready) host buffer.
///
/// It is the memory-safe way to take part in transfers: registering it with
/// [`Agent::register_buf`](crate::Agent::register_buf) keeps the allocation
/// alive for as long as the registration exists, even if the `AlignedBuf` is
/// dropped first.
///
/// While a transfer that targets this buffer is in flight, its bytes may
/// change under a shared borrow, exactly as with any buffer a NIC or DMA
/// engine writes into. Read the contents once the transfer is complete.
///
/// ```
/// let mut buf = kvferry::AlignedBuf::new(1 << 20).unwrap();
/// buf.as_mut_slice()[0] = 7;
/// assert_eq!(buf.addr() % 4096, 0);
/// ```
pub struct AlignedBuf {
    alloc: Arc<RawAlloc>,
    len: usize,
}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to the page size.
    ///
    /// The bytes are a shared mapping of an anonymous memfd (so that the SHM
    /// backend can let same-host peers map them), or, where the kernel
    /// refuses memfds, come from the global allocator. Each memfd-backed
    /// buffer holds a file descriptor; after `fork()` without `exec` the
    /// child shares its pages with the parent (no copy-on-write).
    pub fn new(len: usize) -> Result<Self> {
        Self::with_align(len, page_size())
    }

    /// Allocates `len` zeroed bytes aligned to `align` (a power of two).
    pub fn with_align(len: usize, align: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::invalid("AlignedBuf length is 0: ask for at least one byte"));
        }
        let layout = Layout::from_size_align(len, align).map_err(|_| {
            Error::invalid(format!("AlignedBuf: alignment {align} is not a power of two, or {len} bytes is too large"))
        })?;
        // A mapping is page-aligned: a memfd serves any alignment up to the page size.
        if align <= page_size() {
            if let Some(a) = memfd_alloc(len) {
                return Ok(AlignedBuf { alloc: Arc::new(a), len });
            }
        }
        // SAFETY: layout has a non-zero size (len > 0 checked above).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr)
            .ok_or_else(|| Error::new(crate::ErrorKind::Backend, format!("out of memory allocating {len} bytes")))?;
        Ok(AlignedBuf { alloc: Arc::new(RawAlloc { ptr, backing: Backing::Heap { layout } }), len })
    }

    /// Allocates `len` zeroed bytes of private memory aligned to
    /// [`HUGE_PAGE`], backed by transparent huge pages where the kernel
    /// allows it (`madvise` mode or `always` in
    /// `/sys/kernel/mm/transparent_hugepage/enabled`).
    ///
    /// This is the buffer for storage I/O and large copies. An O_DIRECT
    /// read or write pins every page it touches, and with 2 MiB pages a 1 MiB
    /// I/O pins one page instead of 256: on the reference machine that
    /// doubles POSIX bandwidth (see docs/PERFORMANCE.md). numpy's allocator
    /// does the same for arrays of 4 MiB and more.
    ///
    /// Unlike [`new`](Self::new), same-host peers cannot map this memory: the
    /// SHM backend reaches it with cross-memory attach (`process_vm_*`), which
    /// is as fast for large blocks and slower for many small ones. Falls back
    /// to [`new`](Self::new) if the kernel refuses the mapping.
    pub fn huge(len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::invalid("AlignedBuf length is 0: ask for at least one byte"));
        }
        match huge_alloc(len) {
            Some(a) => Ok(AlignedBuf { alloc: Arc::new(a), len }),
            None => Self::new(len),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a buffer has at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The address of the first byte.
    pub fn as_ptr(&self) -> *const u8 {
        self.alloc.ptr.as_ptr()
    }

    /// The address of the first byte, for writing.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.alloc.ptr.as_ptr()
    }

    /// The address of the first byte as a descriptor address.
    pub fn addr(&self) -> u64 {
        self.as_ptr() as u64
    }

    /// The contents.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the allocation holds len initialized (zeroed) bytes and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// The contents, for writing.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access from this handle.
        unsafe { std::slice::from_raw_parts_mut(self.alloc.ptr.as_ptr(), self.len) }
    }

    /// The memfd behind the buffer, when it has one (see [`MemShare`]).
    pub(crate) fn share(&self) -> Option<MemShare> {
        match &self.alloc.backing {
            Backing::MemFd { fd, .. } => Some(MemShare { fd: fd.clone(), offset: 0 }),
            Backing::Heap { .. } | Backing::Anon { .. } => None,
        }
    }

    pub(crate) fn keepalive(&self) -> Arc<dyn std::any::Any + Send + Sync> {
        self.alloc.clone()
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf").field("addr", &format_args!("{:#x}", self.addr())).field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        let b = AlignedBuf::with_align(10_000, 4096).unwrap();
        assert_eq!(b.addr() % 4096, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        assert!(AlignedBuf::new(0).is_err());
        assert!(AlignedBuf::with_align(8, 3).is_err());
    }

    #[test]
    fn aligned_buf_is_memfd_backed_and_sealed() {
        let mut b = AlignedBuf::new(10_000).unwrap();
        let share = b.share().expect("memfd_create works on Linux >= 3.17");
        assert_eq!(share.offset(), 0);
        assert_eq!(b.addr() % page_size() as u64, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[9_999] = 7;
        // The file is sized to whole pages and cannot change size.
        let fd = share.fd().as_raw_fd();
        let (size, seals) = (sys::fstat(fd).unwrap().size as usize, sys::seals(fd).unwrap());
        assert_eq!(size, 10_000usize.div_ceil(page_size()) * page_size());
        assert_eq!(seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW), libc::F_SEAL_SHRINK | libc::F_SEAL_GROW);
        assert!(sys::set_len(fd, 0).is_err(), "sealed against shrinking");
        assert_eq!(share, share.clone());
        // Alignments above the page size come from the allocator.
        let big = AlignedBuf::with_align(4096, 2 * page_size()).unwrap();
        assert_eq!(big.addr() % (2 * page_size()) as u64, 0);
        assert!(big.share().is_none());
    }

    #[test]
    fn memfd_buffers_serve_o_direct() {
        use std::io::{Read, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let path = std::env::temp_dir().join(format!("kvferry-odirect-{}", std::process::id()));
        let open =
            || std::fs::OpenOptions::new().read(true).write(true).create(true).custom_flags(libc::O_DIRECT).open(&path);
        let mut f = match open() {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                eprintln!("skipped: {} does not support O_DIRECT (tmpfs?)", path.display());
                return;
            }
            Err(e) => panic!("open {}: {e}", path.display()),
        };
        // A memfd-backed buffer out, a huge-page one back in.
        let mut b = AlignedBuf::new(HUGE_PAGE + (1 << 16)).unwrap();
        assert!(b.share().is_some());
        b.as_mut_slice().iter_mut().enumerate().for_each(|(i, x)| *x = (i % 251) as u8);
        f.write_all(b.as_slice()).unwrap();
        let mut back = AlignedBuf::huge(b.len()).unwrap();
        let mut f = open().unwrap();
        f.read_exact(back.as_mut_slice()).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(back.as_slice() == b.as_slice());
    }

    #[test]
    fn huge_buffers_are_aligned_private_and_advised() {
        assert!(AlignedBuf::huge(0).is_err());
        let len = 3 * HUGE_PAGE + 5;
        let mut b = AlignedBuf::huge(len).unwrap();
        assert_eq!(b.len(), len);
        assert_eq!(b.addr() % HUGE_PAGE as u64, 0, "huge buffers start on a huge-page boundary");
        assert!(b.share().is_none(), "private memory cannot be handed to SHM peers");
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[len - 1] = 9;
        // The mapping covers whole huge pages and carries MADV_HUGEPAGE ("hg"
        // in VmFlags), whatever the kernel then does with the advice.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let head = format!("{:x}-", b.addr());
        let vma: Vec<&str> = smaps.split_inclusive('\n').skip_while(|l| !l.starts_with(&head)).take(40).collect();
        assert!(!vma.is_empty(), "mapping at {head} not found in smaps");
        let (lo, hi) = vma[0].split_whitespace().next().unwrap().split_once('-').unwrap();
        let size = u64::from_str_radix(hi, 16).unwrap() - u64::from_str_radix(lo, 16).unwrap();
        assert!(size >= 4 * HUGE_PAGE as u64, "a {size}-byte mapping for a {len}-byte buffer");
        let flags = vma.iter().find(|l| l.starts_with("VmFlags:")).expect("VmFlags line");
        if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            assert!(flags.split_whitespace().any(|f| f == "hg"), "no MADV_HUGEPAGE: {flags}");
        }
    }
}
