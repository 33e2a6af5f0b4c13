//! Sockets: what std does not offer. Shutdown that wakes blocked threads,
//! readiness waits (with an [`EventFd`] beside the socket), reads and sends
//! bounded by one deadline for the whole message, socket buffer sizes, the
//! peer's credentials, abstract Unix sockets with a connect timeout, and
//! this host's interface addresses.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::EventFd;

/// Shuts both directions of a socket down, waking any thread blocked on it
/// (in `accept`, `recv` or `poll`). Errors (an fd already closed: `EBADF`)
/// are ignored: the caller only wants nobody to wait on it any more.
pub(crate) fn shutdown(fd: RawFd) {
    // SAFETY: shutdown takes integers only; on an fd that is not a socket it fails harmlessly.
    let _ = syscall!(unsafe { libc::shutdown(fd, libc::SHUT_RDWR) });
}

/// `timeout` as poll's milliseconds, rounded up so that a wait never
/// returns before its time (and capped at `i32::MAX`).
fn poll_ms(timeout: Duration) -> libc::c_int {
    let ms = timeout.as_nanos().div_ceil(1_000_000);
    ms.min(i32::MAX as u128) as libc::c_int
}

/// Polls one descriptor for `events` up to `timeout`: the events that
/// came, 0 on timeout or a signal.
fn poll_one(fd: RawFd, events: libc::c_short, timeout: Duration) -> io::Result<libc::c_short> {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: one valid pollfd we own, for the call's duration.
    match syscall!(unsafe { libc::poll(&mut p, 1, poll_ms(timeout)) }) {
        Ok(_) => Ok(p.revents),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
        Err(e) => Err(e),
    }
}

/// Waits up to `timeout` until `fd` is readable (for a listening socket: a
/// connection is waiting; for an [`EventFd`]: it is signaled). `false` on
/// timeout or when a signal cut the wait short; hang-ups and errors count
/// as readable (the read that follows tells which).
pub(crate) fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    Ok(poll_one(fd, libc::POLLIN, timeout)? != 0)
}

/// Whether the other end of a connected socket is gone (it closed, the
/// process exited, or the socket is in error): one `poll`, no waiting.
/// A process's sockets close as it exits, before it can be reaped.
pub(crate) fn hung_up(fd: RawFd) -> bool {
    poll_one(fd, libc::POLLRDHUP, Duration::ZERO)
        .is_ok_and(|r| r & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0)
}

/// What [`wait_ready`] saw.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Ready {
    /// The socket has bytes to read (asked for with `data`).
    pub(crate) data: bool,
    /// The socket was hung up or is in error (a read will tell which).
    pub(crate) hup: bool,
    /// The kick was signaled.
    pub(crate) kick: bool,
}

/// Waits up to `timeout` until the socket `fd` has bytes (when `data`), is
/// hung up or in error (always), or `kick` is signaled. A signal or the
/// timeout returns nothing ready.
pub(crate) fn wait_ready(fd: RawFd, data: bool, kick: Option<&EventFd>, timeout: Duration) -> Ready {
    let ev = if data { libc::POLLIN | libc::POLLRDHUP } else { libc::POLLRDHUP };
    let mut fds = [
        libc::pollfd { fd, events: ev, revents: 0 },
        libc::pollfd { fd: kick.map_or(-1, |k| k.raw()), events: libc::POLLIN, revents: 0 },
    ];
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `fds` is an array of 2 pollfds we own (a negative fd is ignored by
    // the kernel); `ts` is a valid timespec; no signal mask is passed.
    let r = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
    if r <= 0 {
        return Ready::default();
    }
    let s = fds[0].revents;
    Ready {
        data: s & libc::POLLIN != 0,
        hup: s & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0,
        kick: fds[1].revents & libc::POLLIN != 0,
    }
}

/// Fills `buf` from the stream socket `sock` before `deadline`: one deadline
/// for the whole buffer, not per read, so a peer trickling bytes is cut off
/// there. Works whatever the socket's blocking mode and timeouts (it polls,
/// then reads without blocking) and changes neither.
///
/// Errors: `TimedOut` ("N of M bytes arrived before the deadline"),
/// `UnexpectedEof` ("the peer closed after N of M bytes"), or the OS error.
pub(crate) fn read_exact_by(sock: &impl AsRawFd, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        // SAFETY: `rest` is writable memory we borrow exclusively, of the length passed.
        match syscall!(unsafe { libc::recv(fd, rest.as_mut_ptr().cast(), rest.len(), libc::MSG_DONTWAIT) }) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the peer closed after {got} of {} bytes", buf.len()),
                ))
            }
            Ok(n) => {
                got += n as usize;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{got} of {} bytes arrived before the deadline", buf.len()),
            ));
        }
        poll_one(fd, libc::POLLIN, left)?;
    }
    Ok(())
}

/// Sends all of `bytes` on the stream socket `sock` by `deadline` without
/// depending on the socket's blocking mode or write timeout: non-blocking
/// sends, and `poll` for room in between. `TimedOut` if the peer did not
/// make room in time (the message may then be partly sent: the caller must
/// close the connection). Never raises `SIGPIPE`.
pub(crate) fn send_within(sock: &impl AsRawFd, bytes: &[u8], deadline: Instant) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    let mut off = 0;
    while off < bytes.len() {
        let rest = &bytes[off..];
        // SAFETY: `rest` is a live slice for the call; the kernel only reads it.
        let sent = syscall!(retry unsafe {
            libc::send(fd, rest.as_ptr().cast(), rest.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        });
        match sent {
            Ok(n) => {
                off += n as usize;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "the peer did not take the frame in time"));
        }
        poll_one(fd, libc::POLLOUT, left)?;
    }
    Ok(())
}

/// Sets `SO_SNDBUF` and `SO_RCVBUF` to `bytes` (0 leaves kernel autotuning on).
pub(crate) fn set_buffers(fd: RawFd, bytes: u64) -> io::Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    let v: libc::c_int = bytes.min(i32::MAX as u64) as libc::c_int;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        set_opt(fd, libc::SOL_SOCKET, opt, &v)?;
    }
    Ok(())
}

/// `setsockopt(fd, level, opt, value)` for a plain-data option value.
fn set_opt<T: Copy>(fd: RawFd, level: libc::c_int, opt: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: the option value is a live `T` of exactly the size passed; the
    // kernel only reads it. An fd that is not a socket gives ENOTSOCK.
    syscall!(unsafe {
        libc::setsockopt(fd, level, opt, (value as *const T).cast(), std::mem::size_of::<T>() as libc::socklen_t)
    })
    .map(drop)
}

/// The credentials the kernel recorded for the other end of a connected
/// Unix socket (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PeerCred {
    /// The peer's process id.
    pub(crate) pid: i32,
    /// The peer's effective uid.
    pub(crate) uid: u32,
    /// The peer's effective gid.
    pub(crate) gid: u32,
}

/// The credentials of the other end of a connected Unix socket: for an
/// accepted socket, the connecting process at `connect`; for a connecting
/// one, the listener's process at `listen`.
pub(crate) fn peer_cred(s: &UnixStream) -> io::Result<PeerCred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a plain-data
    // struct of exactly that size; the descriptor is a live socket we borrow.
    syscall!(unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(PeerCred { pid: cred.pid, uid: cred.uid, gid: cred.gid })
}

/// Connects to the abstract Unix socket `name`, waiting at most `timeout`
/// for the listener's backlog to have room (a listener that stopped
/// accepting, or is flooded, cannot hold the caller: plain `connect` would
/// wait forever).
pub(crate) fn connect_abstract(name: &[u8], timeout: Duration) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain data; all-zero is a valid empty address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= addr.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "abstract socket name empty or too long"));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &b) in addr.sun_path[1..].iter_mut().zip(name) {
        *d = b as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + 1 + name.len()) as libc::socklen_t;
    // SAFETY: socket takes integer arguments and returns a new descriptor or -1.
    let raw = syscall!(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: the descriptor is new and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let t = timeout.max(Duration::from_millis(1));
    let tv = libc::timeval { tv_sec: t.as_secs() as libc::time_t, tv_usec: t.subsec_micros() as libc::suseconds_t };
    set_opt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDTIMEO, &tv)?;
    // A Unix connect interrupted by a signal has not started (no half-open
    // state to collide with), so retrying it is safe.
    // SAFETY: addr is a valid sockaddr_un of which `len` bytes are used; the descriptor is ours.
    match syscall!(retry unsafe { libc::connect(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) }) {
        Ok(_) => Ok(UnixStream::from(fd)),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the listener did not take the connection within {timeout:?} (its backlog is full)"),
        )),
        Err(e) => Err(e),
    }
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

    use super::*;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn interfaces_include_something() {
        assert!(!interface_addrs().is_empty());
    }

    #[test]
    fn deadline_reads_time_out_fill_and_see_eof() {
        let (mut a, b) = pair();
        let mut buf = [0u8; 8];
        let e = read_exact_by(&b, &mut buf, Instant::now() + Duration::from_millis(20)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("0 of 8 bytes"), "{e}");
        a.write_all(b"0123").unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            a.write_all(b"4567").unwrap();
            a
        });
        read_exact_by(&b, &mut buf, Instant::now() + Duration::from_secs(5)).unwrap();
        assert_eq!(&buf, b"01234567");
        drop(t.join().unwrap());
        let e = read_exact_by(&b, &mut buf, Instant::now() + Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }

    #[test]
    fn sends_within_a_deadline_or_time_out() {
        let (a, b) = pair();
        send_within(&a, b"hello", Instant::now() + Duration::from_secs(1)).unwrap();
        let mut buf = [0u8; 5];
        read_exact_by(&b, &mut buf, Instant::now() + Duration::from_secs(1)).unwrap();
        assert_eq!(&buf, b"hello");
        // Nobody reads b: the socket buffers fill and the deadline ends the send.
        let big = vec![0u8; 64 << 20];
        let e = send_within(&a, &big, Instant::now() + Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(!hung_up(a.as_raw_fd()));
        drop(b);
        assert!(wait_readable(a.as_raw_fd(), Duration::from_secs(1)).unwrap());
        assert!(hung_up(a.as_raw_fd()));
    }
}
