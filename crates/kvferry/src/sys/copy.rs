//! Copies into memory another party may watch while it lands.
//!
//! A target's registered memory is shared with its application, which may
//! poll it while a WRITE lands (the seed's streaming ring: the receiver
//! reads a slot's sequence number, then clears it). Such a copy must write
//! each destination byte exactly once, front to back, as a NIC or the
//! kernel's `copy_to_user` does. `memcpy` promises neither: glibc's
//! large-copy paths load the first vector at the start and store it again
//! at the end (after the bulk of the copy already wrote those bytes when
//! the destination is 64-byte aligned), so a value the application read
//! and cleared in between came back — a sequence number from a transfer
//! long done reappeared in a slot (the bug behind the streaming sample's
//! "overruns" over TCP, found with `examples/python/streaming`).
//!
//! [`copy_once`] is a plain forward loop of non-overlapping vector stores:
//! AVX2 where the CPU has it (about memcpy's speed at every size measured,
//! see docs/PERFORMANCE.md), SSE2 otherwise on x86-64, and volatile 8-byte
//! stores elsewhere (which the compiler cannot turn back into `memcpy`).

/// Copies `len` bytes from `src` to `dst`, writing each destination byte
/// exactly once, in ascending address order (by 8 to 32 bytes at a time).
/// Overlapping ranges fall back to `memmove` (nobody can watch a copy
/// within one buffer meaningfully, and `memmove` is right for it).
///
/// # Safety
///
/// `src..src+len` must be readable and `dst..dst+len` writable memory of
/// this process for the whole call.
pub(crate) unsafe fn copy_once(dst: *mut u8, src: *const u8, len: usize) {
    let (d, s) = (dst as usize, src as usize);
    if len == 0 || (d < s.wrapping_add(len) && s < d.wrapping_add(len)) {
        // SAFETY: the caller's promise; `copy` allows overlap.
        unsafe { std::ptr::copy(src, dst, len) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked); the caller's promise on the ranges.
            unsafe { x86::copy_avx2(dst, src, len) };
        } else {
            // SAFETY: SSE2 is part of x86-64; the caller's promise on the ranges.
            unsafe { x86::copy_sse2(dst, src, len) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // SAFETY: the caller's promise on the ranges.
        unsafe { copy_words(dst, src, len, 0) };
    }
}

/// Copies bytes `from..len` by volatile 8-byte stores, then single bytes.
///
/// # Safety
///
/// As for [`copy_once`], the ranges not overlapping.
#[inline]
unsafe fn copy_words(dst: *mut u8, src: *const u8, len: usize, mut i: usize) {
    while i + 8 <= len {
        // SAFETY: `i + 8 <= len`, inside both ranges; `[u8; 8]` needs no alignment.
        unsafe {
            let w = std::ptr::read_unaligned(src.add(i) as *const [u8; 8]);
            std::ptr::write_volatile(dst.add(i) as *mut [u8; 8], w);
        }
        i += 8;
    }
    while i < len {
        // SAFETY: `i < len`, inside both ranges.
        unsafe { std::ptr::write_volatile(dst.add(i), *src.add(i)) };
        i += 1;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 128 bytes per step with 32-byte stores, then 16-byte ones, then words.
    ///
    /// # Safety
    ///
    /// The CPU has AVX2; the ranges as for [`super::copy_once`], not overlapping.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn copy_avx2(dst: *mut u8, src: *const u8, len: usize) {
        let mut i = 0;
        while i + 128 <= len {
            // SAFETY: `i + 128 <= len`, inside both ranges; unaligned loads and stores.
            unsafe {
                let (s, d) = (src.add(i) as *const __m256i, dst.add(i) as *mut __m256i);
                let (a, b, c, e) = (
                    _mm256_loadu_si256(s),
                    _mm256_loadu_si256(s.add(1)),
                    _mm256_loadu_si256(s.add(2)),
                    _mm256_loadu_si256(s.add(3)),
                );
                _mm256_storeu_si256(d, a);
                _mm256_storeu_si256(d.add(1), b);
                _mm256_storeu_si256(d.add(2), c);
                _mm256_storeu_si256(d.add(3), e);
            }
            i += 128;
        }
        while i + 16 <= len {
            // SAFETY: `i + 16 <= len`, inside both ranges; an unaligned load and store.
            unsafe { _mm_storeu_si128(dst.add(i) as *mut __m128i, _mm_loadu_si128(src.add(i) as *const __m128i)) };
            i += 16;
        }
        // SAFETY: the caller's promise, passed on.
        unsafe { super::copy_words(dst, src, len, i) };
    }

    /// 64 bytes per step with 16-byte stores, then words.
    ///
    /// # Safety
    ///
    /// The ranges as for [`super::copy_once`], not overlapping.
    pub(super) unsafe fn copy_sse2(dst: *mut u8, src: *const u8, len: usize) {
        let mut i = 0;
        while i + 64 <= len {
            // SAFETY: `i + 64 <= len`, inside both ranges; unaligned loads and stores.
            unsafe {
                let (s, d) = (src.add(i) as *const __m128i, dst.add(i) as *mut __m128i);
                let (a, b, c, e) = (
                    _mm_loadu_si128(s),
                    _mm_loadu_si128(s.add(1)),
                    _mm_loadu_si128(s.add(2)),
                    _mm_loadu_si128(s.add(3)),
                );
                _mm_storeu_si128(d, a);
                _mm_storeu_si128(d.add(1), b);
                _mm_storeu_si128(d.add(2), c);
                _mm_storeu_si128(d.add(3), e);
            }
            i += 64;
        }
        // SAFETY: the caller's promise, passed on.
        unsafe { super::copy_words(dst, src, len, i) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_length_and_alignment() {
        let src: Vec<u8> = (0..1024u32).map(|i| (i * 31 + 7) as u8).collect();
        for len in (0..300).chain([511, 512, 513, 1000]) {
            for off in 0..9 {
                let mut dst = vec![0xAAu8; 1040];
                // SAFETY: both ranges lie inside their vectors.
                unsafe { copy_once(dst.as_mut_ptr().add(off), src.as_ptr().add(3), len) };
                assert!(dst[..off].iter().all(|&b| b == 0xAA), "len {len} off {off}: bytes before touched");
                assert_eq!(&dst[off..off + len], &src[3..3 + len], "len {len} off {off}");
                assert!(dst[off + len..].iter().all(|&b| b == 0xAA), "len {len} off {off}: bytes after touched");
            }
        }
    }

    #[test]
    fn overlapping_ranges_move_like_memmove() {
        let mut v: Vec<u8> = (0..200u8).collect();
        let p = v.as_mut_ptr();
        // SAFETY: both ranges lie inside `v`.
        unsafe { copy_once(p.add(10), p, 150) };
        assert_eq!(&v[10..160], &(0..150u8).collect::<Vec<_>>()[..]);
    }

    /// The property the TCP target needs: a word the application clears
    /// while a copy runs is not written again. Per round, a watcher thread
    /// clears the 64-byte-aligned first word the moment it changes, once;
    /// once the copy returned, the word must still be clear. (`memcpy` fails
    /// this: glibc stores the first vector again at the end.)
    #[test]
    fn a_cleared_word_is_not_written_again() {
        use std::sync::atomic::{AtomicU64, Ordering};
        #[repr(align(64))]
        struct Page([u8; 65536]);
        let dst = Box::new(Page([0; 65536]));
        let src = vec![0x5Au8; 65536];
        let dst_addr = dst.0.as_ptr() as usize;
        // SAFETY: the word lies in `dst`, alive for the test; atomic access races
        // only with the copy's plain stores (the pattern under test).
        let word = unsafe { &*(dst_addr as *const AtomicU64) };
        // Round `r` starts when `round` is 2r+1; the watcher sets it to 2r+2 once it cleared.
        let round = AtomicU64::new(0);
        const ROUNDS: u64 = 300;
        let mut rewritten = None;
        std::thread::scope(|sc| {
            sc.spawn(|| {
                for r in 0..ROUNDS {
                    while round.load(Ordering::Acquire) != 2 * r + 1 {
                        if round.load(Ordering::Acquire) == u64::MAX {
                            return;
                        }
                        std::hint::spin_loop();
                    }
                    while word.load(Ordering::Relaxed) == 0 {
                        std::hint::spin_loop();
                    }
                    word.store(0, Ordering::Relaxed);
                    round.store(2 * r + 2, Ordering::Release);
                }
            });
            for r in 0..ROUNDS {
                round.store(2 * r + 1, Ordering::Release);
                // SAFETY: both ranges are the two buffers, alive for the scope.
                unsafe { copy_once(dst_addr as *mut u8, src.as_ptr(), 65536) };
                while round.load(Ordering::Acquire) != 2 * r + 2 {
                    std::hint::spin_loop();
                }
                if word.load(Ordering::Relaxed) != 0 {
                    rewritten = Some(r);
                    round.store(u64::MAX, Ordering::Release);
                    break;
                }
            }
        });
        assert_eq!(rewritten, None, "the cleared word was written again (in that round)");
    }
}
