//! Passing a file descriptor over a Unix stream socket (`SCM_RIGHTS`): a
//! thin wrapper over `sendmsg` and `recvmsg`.
//!
//! The descriptor travels as ancillary data on the first byte of the bytes
//! sent with it. The receiving kernel hands it over when that byte is first
//! read, so a reader that reads whole frames finds it with the frame's first
//! bytes. Received descriptors are close-on-exec (`MSG_CMSG_CLOEXEC`).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// Most descriptors kept from one `recvmsg`; more are closed by the kernel.
const MAX_FDS: usize = 8;

/// Sends `bytes` with `fd` attached (`SCM_RIGHTS`), blocking until all bytes
/// are sent or the socket's write timeout passes.
pub fn send_with_fd(sock: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    if bytes.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "a descriptor needs at least one byte to ride on"));
    }
    // u64 elements: the control buffer must be aligned like `cmsghdr`.
    let mut control = [0u64; 8];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    debug_assert!(space <= std::mem::size_of_val(&control));
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` writable bytes (checked above), so
    // the first header exists and its data holds one c_int.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), fd.as_raw_fd());
    }
    // SAFETY: msg and everything it points to are live for the call; the
    // kernel only reads them.
    let sent = syscall!(retry unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) })? as usize;
    // The descriptor went with the first byte; the rest (if the socket buffer
    // was full) follows as plain bytes.
    if sent < bytes.len() {
        (&*sock).write_all(&bytes[sent..])?;
    }
    Ok(())
}

/// Reads a Unix stream socket with `recvmsg`, keeping the descriptors that
/// arrive with the bytes until [`take_fd`](Self::take_fd) or
/// [`clear_fds`](Self::clear_fds).
#[derive(Debug)]
pub struct FdReader {
    stream: UnixStream,
    fds: Vec<OwnedFd>,
}

impl FdReader {
    /// Reads from `stream`.
    pub fn new(stream: UnixStream) -> Self {
        FdReader { stream, fds: Vec::new() }
    }

    /// The first descriptor received since the last clear, if any.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        if self.fds.is_empty() {
            None
        } else {
            Some(self.fds.remove(0))
        }
    }

    /// Closes every descriptor received and not taken.
    pub fn clear_fds(&mut self) {
        self.fds.clear();
    }
}

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut control = [0u64; 8];
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<libc::c_int>()) as u32) } as usize;
        debug_assert!(space <= std::mem::size_of_val(&control));
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: buf and control are writable for the lengths given in msg.
        let n = syscall!(retry unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) })?
            as usize;
        // SAFETY: the kernel filled msg_control with msg_controllen bytes of
        // well-formed headers; the CMSG_* macros walk them within that bound.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c);
                    let bytes = ((*c).cmsg_len as usize).saturating_sub(data.offset_from(c.cast::<u8>()) as usize);
                    for i in 0..bytes / std::mem::size_of::<libc::c_int>() {
                        let fd = std::ptr::read_unaligned(data.cast::<libc::c_int>().add(i));
                        // The kernel just installed this descriptor for us: we own it.
                        self.fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_descriptor_rides_with_its_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut r = FdReader::new(b);
        (&a).write_all(b"plain").unwrap();
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        send_with_fd(&a, b"withfd", f.as_fd()).unwrap();
        let mut buf = [0u8; 5];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"plain");
        assert!(r.take_fd().is_none(), "no descriptor came with the plain bytes");
        let mut buf = [0u8; 6];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"withfd");
        let got = r.take_fd().expect("the descriptor");
        let mut s = String::new();
        std::fs::File::from(got).read_to_string(&mut s).unwrap();
        assert!(s.contains(')'), "it is the same file: {s}");
        assert!(send_with_fd(&a, b"", f.as_fd()).is_err());
        drop(a);
        assert_eq!(r.read(&mut buf).unwrap(), 0, "EOF");
    }
}
