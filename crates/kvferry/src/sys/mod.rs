//! The OS boundary: every system call the library makes goes through this
//! module, and nearly every `unsafe` block that talks to the kernel is in it
//! (the rest are io_uring submissions in `storage/uring.rs` and copies into
//! registered memory, whose safety is the transfer protocol's).
//!
//! Like mio's `sys/unix`, it is one choke point with a portable surface:
//! the rest of the crate sees descriptors, spans, deadlines and
//! `io::Result`s, never `libc` types or raw return codes.
//!
//! | file | facility |
//! |---|---|
//! | `file.rs` | descriptors and files: `dup`, `fcntl` flags and seals, `fstat`/`statx`/`fstatfs`, block-device sizes, `pread`/`pwrite`, `memfd_create` |
//! | `mmap.rs` | the page size, shared and huge-page mappings, `munmap` |
//! | `eventfd.rs` | [`EventFd`], the one wake-up primitive (TCP lanes, io_uring rings) |
//! | `socket.rs` | shutdown, readiness waits, reads and sends bounded by a deadline, socket options, peer credentials, abstract Unix sockets, interface addresses |
//! | `iov.rs` | vectored I/O straight from and into registered memory, and the TCP receive buffer |
//! | `cma.rs` | cross-memory attach (`process_vm_readv`/`writev`) |
//! | `fdpass.rs` | passing descriptors over Unix sockets (`SCM_RIGHTS`) |
//! | `cuda.rs` | the CUDA driver API and cuFile, loaded with `dlopen` at run time |
//! | `process.rs` | process attributes: effective uid, ptracer, descriptor limit |
//!
//! Every wrapper turns `-1` into [`io::Error`] through [`syscall!`]; calls
//! that may be interrupted by a signal and are safe to repeat retry on
//! `EINTR` (`syscall!(retry ...)`). The public face for tools built on kvferry
//! (the `kvferry` command) is [`crate::os`]: a handful of these helpers,
//! nothing that exposes `libc`.

use std::io;

/// Turns the return value of a libc call into `io::Result`: `-1` reads
/// `errno` into an [`io::Error`], anything else is `Ok`.
///
/// `syscall!(unsafe { libc::f(..) })` calls once; `syscall!(retry unsafe {
/// libc::f(..) })` calls again while the call fails with `EINTR` (for calls
/// that are safe to repeat: reads, writes, polls, connects that never
/// started). The `unsafe` block is the caller's, with its `// SAFETY:`
/// comment, so that every call site says why it is sound.
macro_rules! syscall {
    (retry $call:expr) => {
        loop {
            match $crate::sys::cvt($call) {
                Err(e) if e.kind() == ::std::io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        }
    };
    ($call:expr) => {
        $crate::sys::cvt($call)
    };
}

pub mod cma;
mod copy;
pub(crate) mod cuda;
mod eventfd;
pub mod fdpass;
mod file;
mod iov;
mod mmap;
mod process;
mod socket;

pub(crate) use copy::copy_once;
pub(crate) use eventfd::EventFd;
pub(crate) use file::{
    add_seals, device_size, dio_align, dup, fs_type, fstat, logical_block_size, memfd_create, pread, pwrite, seals,
    set_len, status_flags, FsType,
};
pub(crate) use iov::{read_buf, write_bufs, writev_all, writev_until, RecvBuf, Span};
pub(crate) use mmap::{advise_huge, map_huge, map_shared, page_size, populate, unmap};
pub(crate) use process::{allow_any_ptracer, effective_uid, raise_fd_limit};
pub(crate) use socket::{
    connect_abstract, hung_up, interface_addrs, peer_cred, read_exact_by, send_within, set_buffers, shutdown,
    wait_readable, wait_ready,
};

/// What a libc call returns on failure: `-1` of its own integer type.
pub(crate) trait MinusOne: Copy + PartialEq {
    /// `-1` of this type.
    const MINUS_ONE: Self;
}

impl MinusOne for i32 {
    const MINUS_ONE: Self = -1;
}

impl MinusOne for i64 {
    const MINUS_ONE: Self = -1;
}

impl MinusOne for isize {
    const MINUS_ONE: Self = -1;
}

/// `-1` → the calling thread's `errno` as an [`io::Error`]; anything else `Ok`.
/// Used through [`syscall!`].
pub(crate) fn cvt<T: MinusOne>(ret: T) -> io::Result<T> {
    if ret == T::MINUS_ONE {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_reads_errno_and_retries_only_eintr() {
        // SAFETY: close on a descriptor that cannot be open: EBADF, no effect.
        let e = syscall!(unsafe { libc::close(-1) }).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        let mut calls = 0;
        let r: io::Result<i32> = syscall!(retry {
            calls += 1;
            if calls < 3 {
                // SAFETY: writing errno, a thread-local of ours.
                unsafe { *libc::__errno_location() = libc::EINTR };
                -1
            } else {
                7
            }
        });
        assert_eq!((r.unwrap(), calls), (7, 3));
    }
}
