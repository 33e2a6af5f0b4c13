//! The mapped fast path: a peer's memfd-backed region mapped into this
//! process (`mmap(MAP_SHARED)`), so that copies to and from it are plain
//! user-space `memcpy`.
//!
//! Only a sealed memfd is accepted: `F_SEAL_SHRINK` guarantees the file can
//! never become shorter than the mapping, so no copy can fault (`SIGBUS`)
//! past its end, whatever the owner does. A hugetlbfs memfd
//! (`MFD_HUGETLB`) is refused too: its pages are allocated at first touch
//! from the huge page pool, and a touch that finds the pool empty is a
//! `SIGBUS` in the toucher, so a hostile owner could size one beyond the pool
//! and crash its initiators. Hole punching (`fallocate`) on a shmem memfd is
//! harmless: the next touch gets a fresh zero page. The mapping covers exactly the
//! region's pages and is unmapped on drop; the SHM link drops it when the
//! owner revokes the region or the connection ends.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::sys::{self, FsType};

/// A peer's region mapped read-write into this process.
#[derive(Debug)]
pub struct Mapping {
    /// Start of the mapping (page-aligned).
    base: usize,
    /// Bytes mapped (whole pages).
    map_len: usize,
    /// Where the region starts inside the mapping.
    skew: usize,
    /// The region's start address in the owner's process.
    region_addr: u64,
    /// The region's length.
    region_len: u64,
    /// Which `chunk`s of the mapping were populated for writing (bit set)
    /// and, separately, for reading, so that populating is paid once per
    /// chunk: populating pages already mapped still walks them (about 45 µs
    /// a MiB here), which would tax every request created over them.
    populated: [Box<[AtomicU64]>; 2],
    /// The granule of that bookkeeping (a power of two).
    chunk: usize,
}

/// The finest granule of [`Mapping::populate`]'s bookkeeping: a segment of
/// 1 MiB or more leaves at most two partial chunks (128 KiB, a few µs to
/// walk again) at its ends.
const CHUNK: usize = 64 << 10;

/// At most this many chunks per mapping (128 KiB of bits for each of the
/// two sets): a region over 64 GiB gets coarser chunks, so that the size a
/// peer registers does not decide how much memory this process spends.
const MAX_CHUNKS: usize = 1 << 20;

// SAFETY: a Mapping is an address range with no thread affinity; the SHM link
// decides who may copy through it (see `Link`), and munmap may run on any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; &Mapping only hands out addresses.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `region_len` bytes of `fd` from `offset`, the region the owner
    /// has at `region_addr`. Refuses (with the reason) anything but a memfd
    /// sealed against shrinking that holds the whole region.
    pub fn map(fd: OwnedFd, offset: u64, region_addr: u64, region_len: u64) -> Result<Mapping> {
        let bad = |why: String| Error::malformed(format!("SHM: the owner's memfd cannot be mapped: {why}"));
        let page = sys::page_size() as u64;
        let len = usize::try_from(region_len).map_err(|_| bad(format!("region of {region_len} bytes")))?;
        if len == 0 {
            return Err(bad("empty region".into()));
        }
        let start = offset / page * page;
        let skew = (offset - start) as usize;
        let end = offset.checked_add(region_len).ok_or_else(|| bad("offset + length overflows".into()))?;
        if sys::seals(fd.as_raw_fd()).map_or(true, |s| s & libc::F_SEAL_SHRINK == 0) {
            return Err(bad("it is not a memfd sealed against shrinking".into()));
        }
        let st = sys::fstat(fd.as_raw_fd()).map_err(|e| Error::io("SHM: fstat of a peer's memfd", e))?;
        let size = st.size;
        if !st.is_file() {
            return Err(bad("it is not a regular file".into()));
        }
        let fs_type = sys::fs_type(fd.as_raw_fd()).map_err(|e| Error::io("SHM: fstatfs of a peer's memfd", e))?;
        if fs_type == FsType::HugeTlb {
            return Err(bad(
                "it is a hugetlbfs memfd (MFD_HUGETLB), whose pages may be missing at first touch (SIGBUS)".into(),
            ));
        }
        if end > size {
            return Err(bad(format!("the region ends at byte {end} of a {size}-byte file")));
        }
        let map_len = end
            .checked_sub(start)
            .and_then(|n| n.checked_add(page - 1))
            .map(|n| n / page * page)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| bad("mapping length overflows".into()))?;
        // The file's size was checked above and is sealed: it cannot shrink under us.
        let p = sys::map_shared(fd.as_fd(), map_len, start)
            .map_err(|e| Error::io("SHM: mmap of a peer's memfd", e))?
            .as_ptr();
        // The mapping holds the file; the descriptor closes here.
        drop(fd);
        let chunk = map_len.div_ceil(MAX_CHUNKS).next_power_of_two().max(CHUNK);
        let words = map_len.div_ceil(chunk).div_ceil(64);
        let bits = || (0..words).map(|_| AtomicU64::new(0)).collect::<Box<[AtomicU64]>>();
        Ok(Mapping { base: p as usize, map_len, skew, region_addr, region_len, populated: [bits(), bits()], chunk })
    }

    /// The local address of the owner's range `remote_addr`+`len`, if the
    /// range lies inside the mapped region.
    pub fn local_addr(&self, remote_addr: u64, len: u64) -> Option<usize> {
        let rel = remote_addr.checked_sub(self.region_addr)?;
        if rel.checked_add(len)? > self.region_len {
            return None;
        }
        self.base.checked_add(self.skew)?.checked_add(usize::try_from(rel).ok()?)
    }

    /// Maps the pages of the local range `addr`+`len` (inside this mapping,
    /// as returned by [`local_addr`](Self::local_addr)) into the page tables
    /// now, for writing or reading, so that the first copy through them does
    /// not fault every 4 KiB (about 290 ms a GiB on a VM, against 190 ms for
    /// one populate). Pages the owner has not touched yet are allocated, as
    /// the copy would. Each chunk (64 KiB, coarser for regions over 64 GiB)
    /// is populated once for the mapping's life (a chunk done for writing
    /// serves reads too), in runs of chunks not yet done. Skipped where the
    /// kernel lacks `MADV_POPULATE_*`.
    pub fn populate(&self, addr: usize, len: usize, write: bool) {
        debug_assert!(addr >= self.base && addr + len <= self.base + self.map_len);
        let (start, end) = (addr - self.base, addr - self.base + len);
        let chunk = self.chunk;
        let (first, last) = (start / chunk, end.div_ceil(chunk));
        let done = |c: usize| {
            let bit = 1u64 << (c % 64);
            (self.populated[0][c / 64].load(Ordering::Relaxed) & bit != 0)
                || (!write && self.populated[1][c / 64].load(Ordering::Relaxed) & bit != 0)
        };
        let mut c = first;
        while c < last {
            if done(c) {
                c += 1;
                continue;
            }
            let run = c;
            while c < last && !done(c) {
                c += 1;
            }
            let (lo, hi) = ((run * chunk).max(start), (c * chunk).min(end));
            if let Err(e) = sys::populate(self.base + lo, hi - lo, write) {
                tracing::trace!("SHM: populating {} bytes of a peer's mapping: {e} (skipped)", hi - lo);
                return;
            }
            // Only chunks the range covered whole are done; the others may
            // have more pages to populate for a later range.
            let set = &self.populated[usize::from(!write)];
            for k in run..c {
                if k * chunk >= start && ((k + 1) * chunk).min(self.map_len) <= end {
                    set[k / 64].fetch_or(1 << (k % 64), Ordering::Relaxed);
                }
            }
        }
    }

    /// The owner's region this maps: start address and length.
    pub fn region(&self) -> (u64, u64) {
        (self.region_addr, self.region_len)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: base/map_len is exactly the mapping made in `map`, unmapped
        // once; the link drops a Mapping only while no copy through it runs.
        unsafe { sys::unmap(self.base as *mut u8, self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AlignedBuf;
    use std::os::fd::AsFd;

    #[test]
    fn maps_a_sealed_memfd_and_checks_bounds() {
        let mut buf = AlignedBuf::new(3 * 4096 + 100).unwrap();
        buf.as_mut_slice()[5000] = 42;
        let fd = buf.share().unwrap().fd().try_clone_to_owned().unwrap();
        let m = Mapping::map(fd, 0, 0x10_0000, buf.len() as u64).unwrap();
        let p = m.local_addr(0x10_0000 + 5000, 1).unwrap();
        // SAFETY: p lies inside the live mapping.
        assert_eq!(unsafe { *(p as *const u8) }, 42);
        // SAFETY: as above; writes land in the buffer's pages.
        unsafe { *(p as *mut u8) = 43 };
        assert_eq!(buf.as_slice()[5000], 43);
        assert!(m.local_addr(0x10_0000, buf.len() as u64).is_some());
        assert!(m.local_addr(0x10_0000, buf.len() as u64 + 1).is_none());
        assert!(m.local_addr(0xf_ffff, 1).is_none());
        assert!(m.local_addr(u64::MAX, 2).is_none());
        let fd = || buf.share().unwrap().fd().try_clone_to_owned().unwrap();
        assert!(Mapping::map(fd(), 0, 0, 1 << 20).unwrap_err().message().contains("ends at byte"));
        assert!(Mapping::map(fd(), u64::MAX, 0, 2).is_err());
        assert!(Mapping::map(fd(), 0, 0, 0).is_err());
        // A file that is not a sealed memfd is refused.
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        let e = Mapping::map(f.as_fd().try_clone_to_owned().unwrap(), 0, 0, 1).unwrap_err();
        assert!(e.message().contains("sealed"), "{e}");
    }

    #[test]
    fn populate_backs_the_range_with_pages_and_keeps_contents() {
        use std::os::unix::fs::MetadataExt;
        let len = 4 << 20;
        let mut buf = AlignedBuf::new(len).unwrap();
        buf.as_mut_slice()[3] = 7;
        let fd = buf.share().unwrap().fd().try_clone_to_owned().unwrap();
        let file = std::fs::File::from(fd.try_clone().unwrap());
        let before = file.metadata().unwrap().blocks();
        let m = Mapping::map(fd, 0, 0x10_0000, len as u64).unwrap();
        let p = m.local_addr(0x10_0000 + 1, len as u64 - 1).unwrap();
        // An unaligned start and length: whole pages around them are populated.
        m.populate(p, len - 1, true);
        let after = file.metadata().unwrap().blocks();
        if sys::populate(p, 1, false).is_ok() {
            // 512-byte blocks: the memfd now holds every page of the range.
            assert!(after * 512 >= len as u64 && after > before, "{before} -> {after} blocks");
        }
        assert_eq!(buf.as_slice()[3], 7, "populating changes no byte");
        assert!(buf.as_slice()[4..].iter().all(|&b| b == 0));
        if sys::populate(p, 1, false).is_ok() {
            // Bookkeeping: the first chunk was covered in part (the range
            // starts at byte 1), the other 63 whole; reads need nothing more.
            let count =
                |set: usize| m.populated[set].iter().map(|w| w.load(Ordering::Relaxed).count_ones()).sum::<u32>();
            assert_eq!((count(0), count(1)), (63, 0));
            m.populate(m.base, len, false);
            assert_eq!((count(0), count(1)), (63, 1), "only the chunk not yet done is populated for reading");
            m.populate(m.base, len, true);
            assert_eq!(count(0), 64);
        }
    }

    #[test]
    fn populate_bookkeeping_is_bounded_whatever_the_region_size() {
        // A large region (mapped, never touched) gets coarser chunks, not more bits.
        let len: usize = 256 << 30;
        let Some(fd) = memfd(libc::MFD_ALLOW_SEALING) else { return };
        if sys::set_len(fd.as_raw_fd(), len as u64).is_err() {
            return;
        }
        sys::add_seals(fd.as_raw_fd(), libc::F_SEAL_SHRINK).unwrap();
        let m = Mapping::map(fd, 0, 0, len as u64).expect("a 256 GiB mapping");
        assert!(m.chunk >= len / MAX_CHUNKS && m.chunk.is_power_of_two());
        assert!(m.populated[0].len() * 64 <= MAX_CHUNKS);
    }

    fn memfd(flags: libc::c_uint) -> Option<OwnedFd> {
        sys::memfd_create(c"hostile", flags).ok()
    }

    /// What a hostile owner could hand over: each is refused before any
    /// mapping exists, so no later copy can SIGBUS this process.
    #[test]
    fn hostile_memfds_are_refused() {
        let size = 4 * 4096u64;
        // Unsealed: the owner could truncate it under a mapping.
        let fd = memfd(libc::MFD_ALLOW_SEALING).unwrap();
        sys::set_len(fd.as_raw_fd(), size).unwrap();
        let e = Mapping::map(fd, 0, 0x1000, size).unwrap_err();
        assert!(e.message().contains("sealed against shrinking"), "{e}");
        // Sealing not even allowed (F_SEAL_SEAL set from birth).
        let fd = memfd(0).unwrap();
        sys::set_len(fd.as_raw_fd(), size).unwrap();
        assert!(Mapping::map(fd, 0, 0x1000, size).unwrap_err().message().contains("sealed"));
        // Sealed against growing only: still shrinkable.
        let fd = memfd(libc::MFD_ALLOW_SEALING).unwrap();
        sys::set_len(fd.as_raw_fd(), size).unwrap();
        sys::add_seals(fd.as_raw_fd(), libc::F_SEAL_GROW).unwrap();
        assert!(Mapping::map(fd, 0, 0x1000, size).unwrap_err().message().contains("shrinking"));
        // Sealed but shorter than the region it claims to hold.
        let fd = memfd(libc::MFD_ALLOW_SEALING).unwrap();
        sys::set_len(fd.as_raw_fd(), 4096).unwrap();
        sys::add_seals(fd.as_raw_fd(), libc::F_SEAL_SHRINK).unwrap();
        let e = Mapping::map(fd, 0, 0x1000, size).unwrap_err();
        assert!(e.message().contains("ends at byte"), "{e}");
        // Hugetlbfs, sealed, sized far beyond any huge page pool: refused by
        // file system type. (Kernels without hugetlbfs memfds cannot make one.)
        match memfd(libc::MFD_HUGETLB | libc::MFD_ALLOW_SEALING) {
            None => eprintln!("hostile_memfds_are_refused: no MFD_HUGETLB here; hugetlbfs case not run"),
            Some(fd) => {
                let huge = 1u64 << 40;
                let sized = sys::set_len(fd.as_raw_fd(), huge).is_ok();
                let sealed = sys::add_seals(fd.as_raw_fd(), libc::F_SEAL_SHRINK).is_ok();
                if sized && sealed {
                    let e = Mapping::map(fd, 0, 0x1000, huge).unwrap_err();
                    assert!(e.message().contains("hugetlbfs"), "{e}");
                } else {
                    eprintln!("hostile_memfds_are_refused: cannot size/seal a hugetlbfs memfd here; case not run");
                }
            }
        }
        // And kvferry's own buffers pass every check.
        let buf = AlignedBuf::new(size as usize).unwrap();
        Mapping::map(buf.share().unwrap().fd().try_clone_to_owned().unwrap(), 0, 0x1000, size).unwrap();
    }
}
