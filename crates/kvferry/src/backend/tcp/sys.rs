//! Thin wrappers over the socket calls std does not offer: vectored I/O
//! straight from and into registered memory, socket buffer sizes, interface
//! addresses. Every `unsafe` block of the TCP backend that talks to the OS is here.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

/// Most iovecs one `readv`/`writev` takes (Linux `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// A byte range of this process's memory: `(address, length)`.
pub(crate) type Span = (u64, u64);

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Where a vectored transfer stands: the span being moved and the offset into it.
struct Cursor<'a> {
    spans: &'a [Span],
    idx: usize,
    off: u64,
}

impl Cursor<'_> {
    fn done(&self) -> bool {
        self.idx >= self.spans.len()
    }

    /// Fills `iov` from the cursor; returns how many entries were filled.
    fn fill(&self, iov: &mut [libc::iovec; IOV_MAX]) -> usize {
        let mut n = 0;
        let mut off = self.off;
        for &(addr, len) in &self.spans[self.idx..] {
            if n == IOV_MAX {
                break;
            }
            // Lengths were checked to fit the address space when the plan or frame was built.
            iov[n] = libc::iovec { iov_base: (addr + off) as *mut libc::c_void, iov_len: (len - off) as usize };
            off = 0;
            n += 1;
        }
        n
    }

    fn advance(&mut self, mut n: u64) {
        while n > 0 && !self.done() {
            let left = self.spans[self.idx].1 - self.off;
            if n >= left {
                n -= left;
                self.idx += 1;
                self.off = 0;
            } else {
                self.off += n;
                n = 0;
            }
        }
        while !self.done() && self.spans[self.idx].1 == self.off {
            self.idx += 1;
            self.off = 0;
        }
    }
}

fn empty_iov() -> [libc::iovec; IOV_MAX] {
    [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; IOV_MAX]
}

/// Writes every byte of `spans`, in order, to the socket `fd` with `writev`.
/// A send timeout (`SO_SNDTIMEO`) surfaces as `TimedOut`.
///
/// # Safety
///
/// Every span must be readable memory of this process for the whole call.
pub(crate) unsafe fn writev_all(fd: RawFd, spans: &[Span]) -> io::Result<()> {
    let mut c = Cursor { spans, idx: 0, off: 0 };
    c.advance(0);
    let mut iov = empty_iov();
    while !c.done() {
        let n = c.fill(&mut iov);
        // SAFETY: the iovecs point into spans the caller promised readable; n ≤ IOV_MAX.
        let r = unsafe { libc::writev(fd, iov.as_ptr(), n as libc::c_int) };
        match cvt(r) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the socket accepted no bytes")),
            Ok(w) => c.advance(w as u64),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the peer took no data for the send timeout"))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads exactly the bytes of `spans` from the socket `fd` with `readv`.
/// When the receive timeout (`SO_RCVTIMEO`) fires, `on_timeout` decides:
/// `Ok` keeps waiting, an error ends the read with it. End of stream is `UnexpectedEof`.
///
/// # Safety
///
/// Every span must be writable memory of this process that nothing else
/// reads or writes for the whole call.
pub(crate) unsafe fn readv_all(
    fd: RawFd,
    spans: &[Span],
    on_timeout: &mut dyn FnMut() -> io::Result<()>,
) -> io::Result<()> {
    let mut c = Cursor { spans, idx: 0, off: 0 };
    c.advance(0);
    let mut iov = empty_iov();
    while !c.done() {
        let n = c.fill(&mut iov);
        // SAFETY: the iovecs point into spans the caller promised writable and unshared; n ≤ IOV_MAX.
        let r = unsafe { libc::readv(fd, iov.as_ptr(), n as libc::c_int) };
        match cvt(r) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the connection")),
            Ok(w) => c.advance(w as u64),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => on_timeout()?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes into a local buffer (see [`readv_all`]).
pub(crate) fn read_buf(fd: RawFd, buf: &mut [u8], on_timeout: &mut dyn FnMut() -> io::Result<()>) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let span = [(buf.as_mut_ptr() as u64, buf.len() as u64)];
    // SAFETY: the span is `buf`, exclusively borrowed for the call.
    unsafe { readv_all(fd, &span, on_timeout) }
}

/// Writes all of `parts` (local buffers) with one `writev` where possible.
pub(crate) fn write_bufs(fd: RawFd, parts: &[&[u8]]) -> io::Result<()> {
    let mut spans = [(0u64, 0u64); 4];
    let n = parts.len().min(4);
    for (s, p) in spans.iter_mut().zip(parts) {
        *s = (p.as_ptr() as u64, p.len() as u64);
    }
    // SAFETY: the spans are the borrowed `parts`, readable for the call.
    unsafe { writev_all(fd, &spans[..n]) }
}

/// Sets `SO_SNDBUF` and `SO_RCVBUF` to `bytes` (0 leaves kernel autotuning on).
pub(crate) fn set_buffers(fd: RawFd, bytes: u64) -> io::Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    let v: libc::c_int = bytes.min(i32::MAX as u64) as libc::c_int;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: fd is an open socket; the option value is a c_int of the size passed.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Shuts both directions of a socket down, waking any thread blocked on it.
pub(crate) fn shutdown(fd: RawFd) {
    // SAFETY: shutdown on an fd we own (or one already closed: then EBADF, ignored).
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// The addresses of this host's interfaces that are up, IPv4 first,
/// loopback last (peers on other hosts must not try it first).
pub(crate) fn interface_addrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: p is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & libc::IFF_UP as libc::c_uint == 0 {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points to a sockaddr of the family it names.
        let family = unsafe { (*ifa.ifa_addr).sa_family } as libc::c_int;
        if family == libc::AF_INET {
            // SAFETY: the family is AF_INET, so the address is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
        } else if family == libc::AF_INET6 {
            // SAFETY: the family is AF_INET6, so the address is a sockaddr_in6.
            let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
            let a = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            // Link-local addresses need a scope id we do not publish.
            if a.segments()[0] & 0xffc0 != 0xfe80 {
                out.push(IpAddr::V6(a));
            }
        }
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort_by_key(|a| (a.is_loopback(), a.is_ipv6()));
    out.dedup();
    if out.is_empty() {
        out.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn vectored_round_trip_over_many_spans() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let src: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        // 1500 spans of 2 bytes: more than IOV_MAX.
        let spans: Vec<Span> = (0..1500).map(|i| (src.as_ptr() as u64 + 2 * i, 2)).collect();
        let t = std::thread::spawn(move || {
            let fd = a.as_raw_fd();
            // SAFETY: spans point into src, alive until the thread is joined.
            unsafe { writev_all(fd, &spans).unwrap() };
            a.flush().unwrap();
            src
        });
        let mut dst = vec![0u8; 3000];
        let dspans: Vec<Span> = (0..1000).map(|i| (dst.as_mut_ptr() as u64 + 3 * i, 3)).collect();
        // SAFETY: the spans point into dst, exclusively ours.
        unsafe { readv_all(b.as_raw_fd(), &dspans, &mut || Ok(())).unwrap() };
        let src = t.join().unwrap();
        assert_eq!(src, dst);
    }

    #[test]
    fn interfaces_include_something() {
        assert!(!interface_addrs().is_empty());
    }
}
