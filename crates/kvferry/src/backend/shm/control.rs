//! The same-host control channel of the SHM backend: one abstract-namespace
//! Unix socket per backend instance, carrying the frames of
//! [`wire`](super::wire).
//!
//! Each initiator opens one connection to each owner it transfers to (lazily,
//! on first use, then kept). Over it the initiator sends notifications, asks
//! whether region keys are still live and asks for the memfd of mappable
//! regions (the owner answers with the descriptor, `SCM_RIGHTS`); the owner
//! sends revocations when it deregisters a region, and waits (bounded) for
//! their acknowledgement, which the initiator sends only once no copy into
//! the region is in flight and its mapping of the region is gone.
//!
//! * [`owner`](super::owner) — the owner side ([`Server`](super::owner::Server)):
//!   a listener thread, one reader thread per incoming connection, the
//!   owner's table of live keys and of the memfds peers may map.
//! * [`link`](super::link) — the initiator side of one connection
//!   ([`Link`](super::link::Link)): queries, map requests, revocations, one
//!   reader thread.
//! * [`link_state`](super::link_state) — what an initiator knows of the
//!   owner's regions: the keys known live, the regions mapped here, those
//!   left to cross-memory attach, and whether the link is dead.
//! * [`socket`](super::socket) — abstract sockets and peer credentials.
//!
//! Who may talk on the socket is decided by the kernel-reported credentials
//! of the other end (`SO_PEERCRED`), checked on both sides ([`Access`]):
//! the owner accepts only its own uid (and the uids it was told to allow),
//! before any byte is read or any thread started; the initiator accepts an
//! owner only if the socket's listener is the pid its metadata names,
//! running as an allowed uid. The nonce and the auth token are checked on
//! top, in HELLO.

use std::io::Read;

use super::wire::{frame_len, Frame};
use crate::error::{Error, Result};

/// Reads one frame; `buf` is reused between calls.
pub(super) fn read_frame(s: &mut impl Read, buf: &mut Vec<u8>) -> Result<Frame> {
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix).map_err(|e| Error::io("SHM control channel: read", e))?;
    let n = frame_len(prefix)?;
    buf.clear();
    buf.resize(n, 0);
    s.read_exact(buf).map_err(|e| Error::io("SHM control channel: read", e))?;
    Frame::decode(buf)
}

/// Which local users may use an SHM control socket, either side: this
/// process's effective uid always, plus the uids listed in the SHM parameter
/// `allowed_uids`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// This process's effective uid.
    pub me: u32,
    /// Other uids allowed (the `allowed_uids` parameter).
    pub extra: Vec<u32>,
}

impl Access {
    /// This process's own uid only.
    pub fn own_uid() -> Access {
        Access { me: crate::sys::effective_uid(), extra: Vec::new() }
    }

    /// This process's uid plus `extra`.
    pub fn with_extra(extra: Vec<u32>) -> Access {
        Access { extra, ..Access::own_uid() }
    }

    /// Whether `uid` may use the socket.
    pub fn admits(&self, uid: u32) -> bool {
        uid == self.me || self.extra.contains(&uid)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::link::{Hello, Link};
    use super::super::owner::{Exported, Server};
    use super::*;
    use crate::backend::{AccessKey, PeerEvents};
    use crate::notif::NotifSink;
    use crate::AlignedBuf;

    fn pair(name: &str) -> (Server, Arc<Link>) {
        let socket = format!("kvferry-shm-test-{}-{name}", std::process::id()).into_bytes();
        let t = Duration::from_secs(5);
        let server =
            Server::start(socket.clone(), "owner".into(), 7, None, NotifSink::new(), t, Access::own_uid()).unwrap();
        let hello = Hello { agent: "init", instance: 1, nonce: 7, token: None };
        let pid = std::process::id() as i32;
        let link =
            Link::connect(&socket, hello, "owner".into(), 1, pid, (t, t), PeerEvents::detached(), &Access::own_uid())
                .unwrap();
        (server, link)
    }

    #[test]
    fn map_revoke_and_hang_up() {
        let (server, link) = pair("map");
        let t = Duration::from_secs(5);
        let mut buf = AlignedBuf::new(8192).unwrap();
        buf.as_mut_slice()[100] = 9;
        let (shared, raw, gone) = (AccessKey([1; 16]), AccessKey([2; 16]), AccessKey([3; 16]));
        server.add(shared, Some(Exported { share: buf.share().unwrap(), addr: 0x1000, len: 8192 }));
        server.add(raw, None);
        link.ensure_live(&[shared, raw], t).unwrap();
        link.ensure_mapped(&[shared, raw], t).unwrap();
        {
            let st = link.state.read();
            assert!(st.cma_only.contains(&raw) && !st.maps.contains_key(&raw));
            let p = st.maps[&shared].local_addr(0x1000 + 100, 1).unwrap();
            // SAFETY: p lies in the live mapping of `buf`'s memfd.
            assert_eq!(unsafe { *(p as *const u8) }, 9, "the mapping shows the owner's bytes");
        }
        // Asking again costs nothing: both answers are cached.
        link.ensure_mapped(&[shared, raw], t).unwrap();
        let e = link.ensure_mapped(&[gone], t).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::NotAllowed, "{e}");

        // Revocation returns once the initiator unmapped and acknowledged.
        server.revoke(shared, t);
        {
            let st = link.state.read();
            assert!(!st.maps.contains_key(&shared) && !st.live.contains(&shared) && st.dead.is_none());
        }
        assert!(!link.hung_up());
        // The owner going away is visible at once, without the reader thread.
        drop(server);
        assert!(link.hung_up());
    }

    #[test]
    fn access_admits_own_uid_and_listed_ones() {
        let a = Access::own_uid();
        assert!(a.admits(a.me));
        assert!(!a.admits(a.me.wrapping_add(1)));
        let b = Access::with_extra(vec![a.me.wrapping_add(1)]);
        assert!(b.admits(a.me) && b.admits(a.me.wrapping_add(1)) && !b.admits(a.me.wrapping_add(2)));
    }
}
