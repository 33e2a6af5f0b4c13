//! Cross-memory attach: a thin, honest wrapper over `process_vm_readv` and
//! `process_vm_writev`.
//!
//! One call moves up to [`IOV_MAX`] pairs of ranges straight between this
//! process and another, one copy, no intermediate buffer. The kernel checks
//! that the caller may ptrace the target (same user, and Yama's
//! `ptrace_scope` allows it), so a refusal is `EPERM`; a target that exited is
//! `ESRCH`; an unmapped range in either process is `EFAULT`.
//!
//! The kernel may move fewer bytes than asked (a range that becomes invalid
//! part way, or more than `MAX_RW_COUNT` in one call). [`Cma::transfer`] then
//! resumes from where it stopped; a call that makes no progress at all is an
//! error.

use std::io;

use crate::types::XferOp;

/// Largest number of iovecs one call accepts (`UIO_MAXIOV` on Linux).
pub const IOV_MAX: usize = 1024;

/// One range, laid out exactly like `struct iovec` (pointer-sized base and length),
/// but holding plain integers so that prepared transfers stay `Send`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Iov {
    /// Start address (in this process for local ranges, in the peer for remote ones).
    pub base: usize,
    /// Length in bytes.
    pub len: usize,
}

const _: () = {
    assert!(std::mem::size_of::<Iov>() == std::mem::size_of::<libc::iovec>());
    assert!(std::mem::align_of::<Iov>() == std::mem::align_of::<libc::iovec>());
};

/// Calls `process_vm_readv` ([`XferOp::Read`]: peer → this process) or
/// `process_vm_writev` ([`XferOp::Write`]: this process → peer) once.
///
/// # Safety
///
/// Every local range must be memory of this process that may be read
/// (`Write`) or written (`Read`) for the duration of the call, with no Rust
/// reference to it that the write would invalidate.
unsafe fn raw(dir: XferOp, pid: i32, local: &[Iov], remote: &[Iov]) -> io::Result<usize> {
    debug_assert!(local.len() <= IOV_MAX && remote.len() <= IOV_MAX);
    let l = local.as_ptr().cast::<libc::iovec>();
    let r = remote.as_ptr().cast::<libc::iovec>();
    // SAFETY: `Iov` has iovec's layout (checked at compile time); the arrays
    // are valid for their lengths; the caller vouches for the local ranges;
    // the kernel validates the remote ranges against the target's mappings.
    let n = syscall!(unsafe {
        match dir {
            XferOp::Read => libc::process_vm_readv(pid, l, local.len() as _, r, remote.len() as _, 0),
            XferOp::Write => libc::process_vm_writev(pid, l, local.len() as _, r, remote.len() as _, 0),
        }
    })?;
    Ok(n as usize)
}

/// Moves bytes between pairs of equal-length ranges of this process and another.
///
/// Keeps a scratch array so that resuming after a partial transfer allocates
/// nothing; build one per prepared transfer and reuse it.
#[derive(Debug, Default)]
pub struct Cma {
    scratch_local: Vec<Iov>,
    scratch_remote: Vec<Iov>,
}

impl Cma {
    /// A mover with its scratch arrays allocated.
    pub fn new() -> Self {
        Cma { scratch_local: Vec::with_capacity(IOV_MAX), scratch_remote: Vec::with_capacity(IOV_MAX) }
    }

    /// Moves every byte of `local[i]` ↔ `remote[i]` (pairwise equal lengths),
    /// in calls of at most [`IOV_MAX`] pairs. Returns the bytes moved, which is
    /// the sum of lengths unless an error stops it.
    ///
    /// # Safety
    ///
    /// As for one call: every local range must be valid for reading (`Write`)
    /// or writing (`Read`) for the whole call, and not aliased by a Rust
    /// reference that a write would invalidate.
    pub unsafe fn transfer(&mut self, dir: XferOp, pid: i32, local: &[Iov], remote: &[Iov]) -> io::Result<u64> {
        debug_assert_eq!(local.len(), remote.len());
        let mut moved = 0u64;
        for (lc, rc) in local.chunks(IOV_MAX).zip(remote.chunks(IOV_MAX)) {
            let want: usize = lc.iter().map(|v| v.len).sum();
            // SAFETY: forwarded from the caller.
            let got = unsafe { raw(dir, pid, lc, rc)? };
            moved += got as u64;
            if got < want {
                // SAFETY: forwarded from the caller.
                moved += unsafe { self.resume(dir, pid, lc, rc, got)? };
            }
        }
        Ok(moved)
    }

    /// Finishes one chunk after the kernel moved only `done` of its bytes.
    ///
    /// # Safety
    ///
    /// As for [`transfer`](Self::transfer).
    unsafe fn resume(
        &mut self,
        dir: XferOp,
        pid: i32,
        local: &[Iov],
        remote: &[Iov],
        mut done: usize,
    ) -> io::Result<u64> {
        let mut moved = 0u64;
        loop {
            // Rebuild the rest of the chunk, skipping `done` bytes, into scratch.
            self.scratch_local.clear();
            self.scratch_remote.clear();
            let mut skip = done;
            for (l, r) in local.iter().zip(remote) {
                if skip >= l.len {
                    skip -= l.len;
                    continue;
                }
                self.scratch_local.push(Iov { base: l.base + skip, len: l.len - skip });
                self.scratch_remote.push(Iov { base: r.base + skip, len: r.len - skip });
                skip = 0;
            }
            let want: usize = self.scratch_local.iter().map(|v| v.len).sum();
            if want == 0 {
                return Ok(moved);
            }
            // SAFETY: forwarded from the caller; scratch holds sub-ranges of the caller's ranges.
            let got = unsafe { raw(dir, pid, &self.scratch_local, &self.scratch_remote)? };
            if got == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("cross-memory copy made no progress with {want} bytes left (a range is no longer mapped)"),
                ));
            }
            moved += got as u64;
            done += got;
        }
    }
}

/// Whether this process can use cross-memory attach at all: reads 8 bytes of
/// its own memory through `process_vm_readv`. Fails with the OS error when the
/// syscall is missing (`ENOSYS`) or filtered out (seccomp: `EPERM`).
pub fn probe_self() -> io::Result<()> {
    let src: u64 = 0x6b76_6665_7272_7921;
    let mut dst: u64 = 0;
    let l = [Iov { base: std::ptr::addr_of_mut!(dst) as usize, len: 8 }];
    let r = [Iov { base: std::ptr::addr_of!(src) as usize, len: 8 }];
    // SAFETY: `dst` is a live local of this frame, written only by the kernel during the call.
    let n = unsafe { raw(XferOp::Read, std::process::id() as i32, &l, &r)? };
    // The kernel wrote `dst` behind the compiler's back; read it through a volatile load.
    // SAFETY: `dst` is a valid, initialized u64.
    let got = unsafe { std::ptr::read_volatile(std::ptr::addr_of!(dst)) };
    if n != 8 || got != src {
        return Err(io::Error::other(format!("process_vm_readv on this process moved {n} bytes, read {got:#x}")));
    }
    Ok(())
}

/// Reads one `u64` at `addr` in process `pid`.
pub fn read_u64(pid: i32, addr: u64) -> io::Result<u64> {
    let mut dst: u64 = 0;
    let l = [Iov { base: std::ptr::addr_of_mut!(dst) as usize, len: 8 }];
    let r = [Iov { base: addr as usize, len: 8 }];
    // SAFETY: `dst` is a live local of this frame, written only by the kernel during the call.
    let n = unsafe { raw(XferOp::Read, pid, &l, &r)? };
    if n != 8 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("read {n} of 8 bytes from pid {pid}")));
    }
    // SAFETY: `dst` is a valid, initialized u64 the kernel just wrote.
    Ok(unsafe { std::ptr::read_volatile(std::ptr::addr_of!(dst)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_and_self_copies() {
        probe_self().unwrap();
        let pid = std::process::id() as i32;
        // 3000 small pieces: three calls of at most IOV_MAX pairs.
        let src: Vec<u8> = (0..3000u32 * 8).map(|i| (i * 7 + 3) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        let local: Vec<Iov> =
            (0..3000).map(|i| Iov { base: dst.as_mut_ptr() as usize + (2999 - i) * 8, len: 8 }).collect();
        let remote: Vec<Iov> = (0..3000).map(|i| Iov { base: src.as_ptr() as usize + i * 8, len: 8 }).collect();
        let mut cma = Cma::new();
        // SAFETY: dst is live and not borrowed during the call.
        let n = unsafe { cma.transfer(XferOp::Read, pid, &local, &remote) }.unwrap();
        assert_eq!(n, src.len() as u64);
        for i in 0..3000 {
            assert_eq!(dst[(2999 - i) * 8..][..8], src[i * 8..][..8]);
        }
        assert_eq!(read_u64(pid, src.as_ptr() as u64).unwrap(), u64::from_ne_bytes(src[..8].try_into().unwrap()));
    }

    #[test]
    fn unmapped_remote_is_an_error_not_a_hang() {
        let pid = std::process::id() as i32;
        let mut dst = [0u8; 16];
        let l = [Iov { base: dst.as_mut_ptr() as usize, len: 16 }];
        let r = [Iov { base: 8, len: 16 }];
        // SAFETY: dst is live and not borrowed during the call.
        let e = unsafe { Cma::new().transfer(XferOp::Read, pid, &l, &r) }.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{e}");
    }
}
