//! Vectored socket I/O straight from and into registered memory
//! (`writev`/`readv` over many spans, in calls of at most `IOV_MAX`), and
//! the receive buffer the TCP backend reads frames through.

use std::io;
use std::os::fd::RawFd;

/// Most iovecs one `readv`/`writev` takes (Linux `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// A byte range of this process's memory: `(address, length)`.
pub(crate) type Span = (u64, u64);

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
    // SAFETY: the caller's promise, passed on.
    unsafe { writev_until(fd, spans, None) }
}

/// [`writev_all`] that also fails with `TimedOut` once `deadline` has
/// passed and bytes are still left (a peer that reads just fast enough to
/// beat the send timeout cannot stretch the write forever).
///
/// # Safety
///
/// As for [`writev_all`].
pub(crate) unsafe fn writev_until(fd: RawFd, spans: &[Span], deadline: Option<std::time::Instant>) -> io::Result<()> {
    let mut c = Cursor { spans, idx: 0, off: 0 };
    c.advance(0);
    let mut iov = empty_iov();
    while !c.done() {
        let n = c.fill(&mut iov);
        // SAFETY: the iovecs point into spans the caller promised readable; n ≤ IOV_MAX.
        match syscall!(unsafe { libc::writev(fd, iov.as_ptr(), n as libc::c_int) }).map(|w| w as usize) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the socket accepted no bytes")),
            Ok(w) => {
                c.advance(w as u64);
                if !c.done() && deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer did not take the whole frame in time",
                    ));
                }
            }
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
/// Whenever a read returns without finishing — the receive timeout
/// (`SO_RCVTIMEO`) fired, or only part of the bytes arrived — `on_timeout`
/// decides: `Ok` keeps reading, an error ends the read with it. Deadlines
/// over a whole message are checked there, so a peer that dribbles bytes
/// just under the receive timeout cannot stretch a read forever. End of
/// stream is `UnexpectedEof`.
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
    // SAFETY: the caller's promise, passed on.
    unsafe { readv_all_from(fd, spans, 0, on_timeout) }
}

/// [`readv_all`] for the bytes of `spans` after the first `offset` ones.
///
/// # Safety
///
/// As for [`readv_all`].
pub(crate) unsafe fn readv_all_from(
    fd: RawFd,
    spans: &[Span],
    offset: u64,
    on_timeout: &mut dyn FnMut() -> io::Result<()>,
) -> io::Result<()> {
    let mut c = Cursor { spans, idx: 0, off: 0 };
    c.advance(offset);
    c.advance(0);
    let mut iov = empty_iov();
    while !c.done() {
        let n = c.fill(&mut iov);
        // SAFETY: the iovecs point into spans the caller promised writable and unshared; n ≤ IOV_MAX.
        match syscall!(unsafe { libc::readv(fd, iov.as_ptr(), n as libc::c_int) }).map(|w| w as usize) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the connection")),
            Ok(w) => {
                c.advance(w as u64);
                if !c.done() {
                    on_timeout()?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => on_timeout()?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Copies `src` into `spans`, in order, from their start; `src` must not
/// be longer than the spans together (the excess is ignored).
///
/// # Safety
///
/// Every span must be writable memory of this process that nothing else
/// reads or writes for the whole call, and none may overlap `src`.
pub(crate) unsafe fn scatter(mut src: &[u8], spans: &[Span]) {
    for &(addr, len) in spans {
        if src.is_empty() {
            return;
        }
        let k = (len as usize).min(src.len());
        // SAFETY: `addr..addr+k` lies in a span the caller promised writable and
        // unshared; `src` is a distinct local buffer. Each byte is written once
        // (the application may watch registered memory while it lands).
        unsafe { super::copy_once(addr as *mut u8, src.as_ptr(), k) };
        src = &src[k..];
    }
}

/// A receive buffer in front of a socket: one `recv` takes whatever the
/// socket holds (a whole small frame, or several), instead of one call per
/// header, entry table and payload. Large payloads still go straight into
/// their destination with `readv` once the buffered part is copied.
pub(crate) struct RecvBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    /// A buffer of `cap` bytes.
    pub(crate) fn new(cap: usize) -> RecvBuf {
        RecvBuf { buf: vec![0u8; cap].into_boxed_slice(), start: 0, end: 0 }
    }

    /// The bytes buffered and not consumed yet.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Drops the first `n` buffered bytes.
    pub(crate) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// One `recv` into the free space: `Ok(k > 0)` bytes arrived,
    /// `WouldBlock` when nothing is there (non-blocking, or the receive
    /// timeout fired), `UnexpectedEof` at end of stream.
    pub(crate) fn fill_once(&mut self, fd: RawFd, nonblocking: bool) -> io::Result<usize> {
        if self.end == self.buf.len() && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let free = &mut self.buf[self.end..];
        if free.is_empty() {
            return Err(io::Error::other("receive buffer full (a bug: callers never ask for more than it holds)"));
        }
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        loop {
            // SAFETY: `free` is writable memory we own, of the length passed.
            match syscall!(unsafe { libc::recv(fd, free.as_mut_ptr().cast(), free.len(), flags) }).map(|k| k as usize) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the connection")),
                Ok(k) => {
                    self.end += k;
                    return Ok(k);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Makes at least `n` bytes buffered (`n` at most the capacity), taking
    /// whatever else is already there too. See [`readv_all`] for `on_timeout`
    /// (called on a timeout and after a read that left bytes missing).
    pub(crate) fn fill_to(
        &mut self,
        fd: RawFd,
        n: usize,
        on_timeout: &mut dyn FnMut() -> io::Result<()>,
    ) -> io::Result<()> {
        if n > self.buf.len() {
            return Err(io::Error::other("receive buffer smaller than a frame part (a bug)"));
        }
        if self.start + n > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.end - self.start < n {
            match self.fill_once(fd, false) {
                Ok(_) if self.end - self.start < n => on_timeout()?,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => on_timeout()?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Moves the next `total` bytes of the stream into `spans` (which add up
    /// to `total`): the buffered ones by copy, the rest with `readv` straight in.
    ///
    /// # Safety
    ///
    /// As for [`readv_all`].
    pub(crate) unsafe fn read_spans(
        &mut self,
        fd: RawFd,
        spans: &[Span],
        total: u64,
        on_timeout: &mut dyn FnMut() -> io::Result<()>,
    ) -> io::Result<()> {
        let k = (self.end - self.start).min(total.min(usize::MAX as u64) as usize);
        // SAFETY: the caller's promise on `spans`; the source is our own buffer.
        unsafe { scatter(&self.buf[self.start..self.start + k], spans) };
        self.consume(k);
        if (k as u64) < total {
            // SAFETY: the caller's promise, passed on.
            unsafe { readv_all_from(fd, spans, k as u64, on_timeout)? };
        }
        Ok(())
    }

    /// Reads the next `n` bytes of the stream into `out` (replacing its content).
    pub(crate) fn read_vec(
        &mut self,
        fd: RawFd,
        out: &mut Vec<u8>,
        n: usize,
        on_timeout: &mut dyn FnMut() -> io::Result<()>,
    ) -> io::Result<()> {
        out.clear();
        out.resize(n, 0);
        let span = [(out.as_mut_ptr() as u64, n as u64)];
        // SAFETY: the span is `out`, exclusively borrowed for the call.
        unsafe { self.read_spans(fd, &span, n as u64, on_timeout) }
    }

    /// Skips the next `n` bytes of the stream.
    pub(crate) fn discard(
        &mut self,
        fd: RawFd,
        mut n: u64,
        on_timeout: &mut dyn FnMut() -> io::Result<()>,
    ) -> io::Result<()> {
        while n > 0 {
            if self.end == self.start {
                self.fill_to(fd, 1, on_timeout)?;
            }
            let k = ((self.end - self.start) as u64).min(n);
            self.consume(k as usize);
            n -= k;
        }
        Ok(())
    }
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
}
