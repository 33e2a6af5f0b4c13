//! The initiator side of the SHM control channel ([`Link`]): one
//! connection to one owner, opened after checking that the socket's
//! listener is the owner's process (`SO_PEERCRED`), with one reader thread
//! that applies answers and revocations to the [`LinkState`] in stream
//! order. See [`control`](super::control).

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use super::control::{read_frame, Access};
use super::fdpass::FdReader;
use super::link_state::LinkState;
use super::mapping::Mapping;
use super::socket::{connect_abstract, peer_cred};
use super::wire::{Frame, MapStatus, MAX_QUERY_KEYS, VERSION};
use crate::auth::AuthToken;
use crate::backend::PeerEvents;
use crate::error::{Error, Result};
use crate::types::AccessKey;

/// How a MAP request ended, as the reader thread applied it.
#[derive(Debug)]
enum MapOutcome {
    Gone,
    Cma,
    Mapped,
}

#[derive(Debug)]
enum Query {
    Pending(Vec<AccessKey>),
    Answered(Vec<bool>),
    PendingMap(AccessKey),
    AnsweredMap(MapOutcome),
}

/// The initiator side of a connection to one owner.
///
/// Posts hold `state` read-locked for the whole copy; the reader thread
/// write-locks it to apply a REVOKE, so its ACK means no copy into the
/// revoked region is in flight or will start.
#[derive(Debug)]
pub struct Link {
    /// The owner agent's name.
    pub peer: Arc<str>,
    /// The owner agent's instance.
    pub instance: u64,
    /// The owner's process id.
    pub pid: i32,
    /// Keys known live, and whether the link is dead.
    pub state: RwLock<LinkState>,
    writer: Mutex<UnixStream>,
    /// The writer's descriptor, polled without its lock to see the owner hang up.
    sock: RawFd,
    queries: Mutex<HashMap<u64, Query>>,
    queries_cv: Condvar,
    next_query: AtomicU64,
    closing: AtomicBool,
    events: PeerEvents,
}

/// What the initiator says in its HELLO.
#[derive(Debug)]
pub struct Hello<'a> {
    /// This agent's name.
    pub agent: &'a str,
    /// This agent's instance.
    pub instance: u64,
    /// The owner's nonce from its connection info.
    pub nonce: u64,
    /// This agent's auth token, if any.
    pub token: Option<&'a AuthToken>,
}

impl Link {
    /// Connects to the owner's socket, checks that the process listening on
    /// it is `pid` running as a uid `access` admits (`SO_PEERCRED`; anyone
    /// can bind an abstract name, so the name alone proves nothing), says
    /// HELLO, waits (bounded) for WELCOME and starts the reader thread.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        socket: &[u8],
        hello: Hello<'_>,
        peer: Arc<str>,
        instance: u64,
        pid: i32,
        timeouts: (Duration, Duration),
        events: PeerEvents,
        access: &Access,
    ) -> Result<Arc<Link>> {
        let (connect_timeout, peer_timeout) = timeouts;
        let mut s = connect_abstract(socket, connect_timeout).map_err(|e| {
            Error::io(format!("SHM: connecting to agent '{peer}' (pid {pid}): its control socket does not answer"), e)
        })?;
        let io = |what: &'static str| move |e: io::Error| Error::io(format!("SHM: {what}"), e);
        let cred = peer_cred(&s).map_err(io("SO_PEERCRED on the control socket"))?;
        if cred.pid != pid || !access.admits(cred.uid) {
            return Err(Error::not_allowed(format!(
                "SHM: the control socket of agent '{peer}' is held by process {} (uid {}), not by the agent's \
                 process {pid} running as an allowed uid ({}{}); refusing to trust it (another process bound the \
                 name, or the agent restarted: fetch its metadata again; set allowed_uids to admit another uid)",
                cred.pid,
                cred.uid,
                access.me,
                if access.extra.is_empty() { String::new() } else { format!(", {:?}", access.extra) }
            )));
        }
        s.set_read_timeout(Some(connect_timeout)).map_err(io("set_read_timeout"))?;
        s.set_write_timeout(Some(peer_timeout)).map_err(io("set_write_timeout"))?;
        let mut out = Vec::new();
        Frame::Hello {
            version: VERSION,
            instance: hello.instance,
            nonce: hello.nonce,
            token: hello.token.map(|t| t.as_bytes().to_vec()).unwrap_or_default(),
            name: hello.agent.to_string(),
        }
        .encode(&mut out);
        s.write_all(&out).map_err(io("sending HELLO"))?;
        let mut buf = Vec::new();
        match read_frame(&mut s, &mut buf).map_err(|e| e.context(format!("SHM: handshake with agent '{peer}'")))? {
            Frame::Welcome => {}
            Frame::Refuse(why) => {
                return Err(Error::not_allowed(format!("SHM: agent '{peer}' refused the connection: {why}")))
            }
            other => return Err(Error::malformed(format!("SHM: agent '{peer}' answered HELLO with {other:?}"))),
        }
        s.set_read_timeout(None).map_err(io("set_read_timeout"))?;
        let reader = FdReader::new(s.try_clone().map_err(io("cloning a socket"))?);
        let sock = s.as_raw_fd();
        let link = Arc::new(Link {
            peer,
            instance,
            pid,
            state: RwLock::new(LinkState::default()),
            writer: Mutex::new(s),
            sock,
            queries: Mutex::new(HashMap::new()),
            queries_cv: Condvar::new(),
            next_query: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            events,
        });
        let l = link.clone();
        std::thread::Builder::new()
            .name("kvferry-shm-link".into())
            .spawn(move || l.read_loop(reader, buf))
            .map_err(io("starting the link reader thread"))?;
        Ok(link)
    }

    /// Sends one frame (encoded into `buf`, which is reused).
    pub fn send(&self, frame: &Frame, buf: &mut Vec<u8>) -> Result<()> {
        buf.clear();
        frame.encode(buf);
        self.send_bytes(buf)
    }

    /// Sends bytes holding whole encoded frames; a failure marks the link dead.
    pub fn send_bytes(&self, bytes: &[u8]) -> Result<()> {
        let r = self.writer.lock().write_all(bytes);
        r.map_err(|e| {
            let e = Error::io(format!("SHM: sending to agent '{}'", self.peer), e);
            self.mark_dead(e.message().to_string());
            e
        })
    }

    /// The error a post returns on a dead link.
    pub fn dead_error(&self, why: &str) -> Error {
        Error::disconnected(format!(
            "SHM: agent '{}' (pid {}) is unreachable: {why}; load its fresh metadata if it was restarted",
            self.peer, self.pid
        ))
    }

    /// Makes sure the owner still has every key registered, asking it about
    /// those not yet known live (bounded by `timeout`).
    pub fn ensure_live(&self, keys: &[AccessKey], timeout: Duration) -> Result<()> {
        let missing: Vec<AccessKey> = {
            let st = self.state.read();
            if let Some(why) = &st.dead {
                return Err(self.dead_error(why));
            }
            st.unknown(keys)
        };
        let deadline = Instant::now() + timeout;
        let mut buf = Vec::new();
        for chunk in missing.chunks(MAX_QUERY_KEYS) {
            let id = self.next_query.fetch_add(1, Ordering::Relaxed);
            self.queries.lock().insert(id, Query::Pending(chunk.to_vec()));
            if let Err(e) = self.send(&Frame::Query { id, keys: chunk.to_vec() }, &mut buf) {
                self.queries.lock().remove(&id);
                return Err(e);
            }
            let mut q = self.queries.lock();
            let live = loop {
                if let Some(Query::Answered(_)) = q.get(&id) {
                    match q.remove(&id) {
                        Some(Query::Answered(l)) => break l,
                        _ => unreachable!("checked just above under the same lock"),
                    }
                }
                if let Some(why) = self.state.read().dead.clone() {
                    q.remove(&id);
                    return Err(self.dead_error(&why));
                }
                if self.queries_cv.wait_until(&mut q, deadline).timed_out() {
                    q.remove(&id);
                    return Err(Error::timeout(format!(
                        "SHM: agent '{}' did not answer a region query within {timeout:?}",
                        self.peer
                    )));
                }
            };
            drop(q);
            if let Some(i) = live.iter().position(|&l| !l) {
                return Err(Error::not_allowed(format!(
                    "SHM: agent '{}' no longer has region {:?} registered (deregistered since its metadata was fetched); fetch fresh metadata",
                    self.peer, chunk[i]
                )));
            }
            if live.len() != chunk.len() {
                return Err(Error::malformed(format!(
                    "SHM: agent '{}' answered {} statuses for {} keys",
                    self.peer,
                    live.len(),
                    chunk.len()
                )));
            }
        }
        Ok(())
    }

    /// Asks the owner for the memfd of each live key not yet mapped (or known
    /// unmappable) and maps those it shares, bounded by `timeout`. Keys the
    /// owner cannot share stay on cross-memory attach; a key found
    /// deregistered is a `NotAllowed` error.
    pub fn ensure_mapped(&self, keys: &[AccessKey], timeout: Duration) -> Result<()> {
        let missing: Vec<AccessKey> = {
            let st = self.state.read();
            if let Some(why) = &st.dead {
                return Err(self.dead_error(why));
            }
            st.unmapped(keys)
        };
        if missing.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        let mut buf = Vec::new();
        let mut ids = Vec::with_capacity(missing.len());
        let forget = |ids: &[(u64, AccessKey)]| {
            let mut q = self.queries.lock();
            for (id, _) in ids {
                q.remove(id);
            }
        };
        // All requests first, then all answers: one round trip for many regions.
        for &key in &missing {
            let id = self.next_query.fetch_add(1, Ordering::Relaxed);
            self.queries.lock().insert(id, Query::PendingMap(key));
            ids.push((id, key));
            if let Err(e) = self.send(&Frame::Map { id, key }, &mut buf) {
                forget(&ids);
                return Err(e);
            }
        }
        let mut q = self.queries.lock();
        for (n, &(id, key)) in ids.iter().enumerate() {
            let outcome = loop {
                if let Some(Query::AnsweredMap(_)) = q.get(&id) {
                    match q.remove(&id) {
                        Some(Query::AnsweredMap(o)) => break o,
                        _ => unreachable!("checked just above under the same lock"),
                    }
                }
                let dead = self.state.read().dead.clone();
                let timed_out = dead.is_none() && self.queries_cv.wait_until(&mut q, deadline).timed_out();
                if dead.is_some() || timed_out {
                    for (id, _) in &ids[n..] {
                        q.remove(id);
                    }
                    return Err(match dead {
                        Some(why) => self.dead_error(&why),
                        None => Error::timeout(format!(
                            "SHM: agent '{}' did not answer a region map request within {timeout:?}",
                            self.peer
                        )),
                    });
                }
            };
            if let MapOutcome::Gone = outcome {
                for (id, _) in &ids[n + 1..] {
                    q.remove(id);
                }
                return Err(Error::not_allowed(format!(
                    "SHM: agent '{}' no longer has region {key:?} registered (deregistered since its metadata was fetched); fetch fresh metadata",
                    self.peer
                )));
            }
        }
        Ok(())
    }

    /// Whether the owner's end of the control connection is closed (the owner
    /// exited, was killed or dropped its backend): one `poll`, no waiting.
    /// A process's sockets close as it exits, before it can be reaped.
    pub fn hung_up(&self) -> bool {
        // `sock` stays open as long as this Link (it is `writer`'s
        // descriptor, which is shut down but never closed before).
        crate::sys::hung_up(self.sock)
    }

    /// Marks the link dead (first reason wins), unmaps the owner's regions
    /// (waiting for copies in flight) and wakes waiting queries.
    pub fn mark_dead(&self, why: String) {
        let unmapped = self.state.write().kill(why);
        drop(unmapped);
        let _q = self.queries.lock();
        self.queries_cv.notify_all();
    }

    /// Whether the link was closed on purpose (unload, drop).
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Closes the link on purpose: posts fail from now on, the reader exits,
    /// and the peer is not reported lost.
    pub fn close(&self, why: &str) {
        self.closing.store(true, Ordering::SeqCst);
        self.mark_dead(why.to_string());
        let _ = self.writer.lock().shutdown(std::net::Shutdown::Both);
    }

    /// Reports the owner as lost (unless the link was closed on purpose).
    pub fn report_lost(&self) {
        if !self.is_closing() {
            self.events.peer_lost(&self.peer, self.instance);
        }
    }

    /// Applies a MAPPED answer (in stream order, so a later REVOKE wins):
    /// maps the memfd `fd` when the owner sent one.
    fn apply_mapped(&self, id: u64, status: MapStatus, fd: Option<std::os::fd::OwnedFd>, region: (u64, u64, u64)) {
        let mut q = self.queries.lock();
        let Some(Query::PendingMap(key)) = q.get(&id) else { return };
        let key = *key;
        let outcome = match (status, fd) {
            (MapStatus::Gone, _) => MapOutcome::Gone,
            (MapStatus::NoFd, _) => {
                self.state.write().use_cma(key);
                MapOutcome::Cma
            }
            (MapStatus::Fd, fd) => {
                let (addr, len, offset) = region;
                let mapped = fd
                    .ok_or_else(|| Error::malformed("SHM: a MAPPED answer came without its descriptor"))
                    .and_then(|fd| Mapping::map(fd, offset, addr, len));
                let mut st = self.state.write();
                match mapped {
                    Ok(m) => {
                        st.use_mapping(key, m);
                        MapOutcome::Mapped
                    }
                    Err(e) => {
                        tracing::warn!(peer = %self.peer, error = %e, "SHM: cannot map a peer's region; using cross-memory attach for it");
                        st.use_cma(key);
                        MapOutcome::Cma
                    }
                }
            }
        };
        q.insert(id, Query::AnsweredMap(outcome));
        self.queries_cv.notify_all();
    }

    fn read_loop(self: Arc<Self>, mut s: FdReader, mut buf: Vec<u8>) {
        let mut out = Vec::with_capacity(16);
        let why = loop {
            let frame = read_frame(&mut s, &mut buf);
            if let Ok(Frame::Mapped { id, status, region_addr, region_len, offset }) = frame {
                let fd = s.take_fd();
                s.clear_fds();
                self.apply_mapped(id, status, fd, (region_addr, region_len, offset));
                continue;
            }
            // Descriptors are expected only with MAPPED: close any other.
            s.clear_fds();
            match frame {
                Ok(Frame::Status { id, live }) => {
                    let mut q = self.queries.lock();
                    if let Some(Query::Pending(keys)) = q.get(&id) {
                        // Applied here, in stream order, so a later REVOKE wins.
                        self.state.write().confirm(keys, &live);
                        q.insert(id, Query::Answered(live));
                        self.queries_cv.notify_all();
                    }
                }
                Ok(Frame::Revoke { seq, key }) => {
                    // Waits for copies in flight (they hold the read lock),
                    // then unmaps the region before acknowledging.
                    let unmapped = self.state.write().revoke(&key);
                    drop(unmapped);
                    if let Err(e) = self.send(&Frame::Ack(seq), &mut out) {
                        break e.message().to_string();
                    }
                }
                Ok(Frame::Refuse(why)) => {
                    tracing::warn!(peer = %self.peer, "SHM: the owner closed the control connection: {why}");
                    break format!("the owner closed the control connection: {why}");
                }
                Ok(other) => break format!("unexpected frame from the owner: {other:?}"),
                Err(e) => break format!("control connection closed ({})", e.message()),
            }
        };
        self.mark_dead(why);
        self.report_lost();
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::super::fdpass;
    use super::super::socket::abstract_addr;
    use super::*;

    /// An abstract name can be bound by anyone: the initiator trusts a socket
    /// only if its listener is the expected pid, as an admitted uid.
    #[test]
    fn initiator_refuses_a_socket_held_by_another_process_or_uid() {
        let name = format!("kvferry-shm-test-{}-squat", std::process::id()).into_bytes();
        let _squatter = UnixListener::bind_addr(&abstract_addr(&name).unwrap()).unwrap();
        let t = Duration::from_secs(2);
        let hello = || Hello { agent: "init", instance: 1, nonce: 7, token: None };
        let me = std::process::id() as i32;
        let e = Link::connect(
            &name,
            hello(),
            "owner".into(),
            1,
            me + 1,
            (t, t),
            PeerEvents::detached(),
            &Access::own_uid(),
        )
        .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::NotAllowed, "{e}");
        assert!(e.message().contains(&format!("held by process {me}")), "{e}");
        let stranger = Access { me: Access::own_uid().me.wrapping_add(1), extra: Vec::new() };
        let e = Link::connect(&name, hello(), "owner".into(), 1, me, (t, t), PeerEvents::detached(), &stranger)
            .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::NotAllowed, "{e}");
    }

    /// A hand-built hostile owner (same process, so SO_PEERCRED passes)
    /// answers MAP with memfds it could later truncate or that are too short:
    /// the initiator maps none of them and uses cross-memory attach for those
    /// regions, so no copy can ever SIGBUS it.
    #[test]
    fn initiator_does_not_map_a_hostile_owners_memfd() {
        use std::os::fd::AsFd;
        let name = format!("kvferry-shm-test-{}-hostile-owner", std::process::id()).into_bytes();
        let listener = UnixListener::bind_addr(&abstract_addr(&name).unwrap()).unwrap();
        let keys = [AccessKey([1; 16]), AccessKey([2; 16])];
        let owner = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            assert!(matches!(read_frame(&mut s, &mut buf).unwrap(), Frame::Hello { .. }));
            let mut out = Vec::new();
            Frame::Welcome.encode(&mut out);
            s.write_all(&out).unwrap();
            for n in 0..2 {
                let Frame::Map { id, .. } = read_frame(&mut s, &mut buf).unwrap() else { panic!("expected MAP") };
                let fd = crate::sys::memfd_create(c"evil", libc::MFD_ALLOW_SEALING).unwrap();
                // n = 0: unsealed, 1 MiB (truncatable later); n = 1: sealed but 4 KiB for a 1 MiB region.
                let size = if n == 0 { 1 << 20 } else { 4096 };
                crate::sys::set_len(fd.as_raw_fd(), size).unwrap();
                if n == 1 {
                    crate::sys::add_seals(fd.as_raw_fd(), libc::F_SEAL_SHRINK).unwrap();
                }
                out.clear();
                let status = MapStatus::Fd;
                Frame::Mapped { id, status, region_addr: 0x10_0000, region_len: 1 << 20, offset: 0 }.encode(&mut out);
                fdpass::send_with_fd(&s, &out, fd.as_fd()).unwrap();
            }
            // Hold the connection until the initiator is done.
            let _ = read_frame(&mut s, &mut buf);
        });
        let t = Duration::from_secs(5);
        let hello = Hello { agent: "init", instance: 1, nonce: 7, token: None };
        let me = std::process::id() as i32;
        let link =
            Link::connect(&name, hello, "owner".into(), 1, me, (t, t), PeerEvents::detached(), &Access::own_uid())
                .unwrap();
        link.ensure_mapped(&keys, t).unwrap();
        {
            let st = link.state.read();
            assert!(st.maps.is_empty(), "no hostile memfd was mapped");
            assert!(keys.iter().all(|k| st.cma_only.contains(k) && st.live.contains(k)), "both fall back to CMA");
        }
        link.close("test over");
        owner.join().unwrap();
    }
}
