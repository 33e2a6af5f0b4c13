//! The request builder: one readable way to say what a request moves, instead
//! of positional arguments and `Option`s that pick a side.
//!
//! ```
//! use std::time::Duration;
//! use kvferry::{Agent, AlignedBuf, XferOp};
//! let a = Agent::with_backends("builder-a", &["LOCAL"])?;
//! let b = Agent::with_backends("builder-b", &["LOCAL"])?;
//! let (src, dst) = (AlignedBuf::new(8192)?, AlignedBuf::new(8192)?);
//! let (_ra, _rb) = (a.register_buf(&src)?, b.register_buf(&dst)?);
//! a.load_remote_metadata(&b.local_metadata()?)?;
//!
//! // Descriptor lists, resolved when the request is built.
//! let req = a
//!     .request(XferOp::Write)
//!     .local(&src.xfer_blocks(0, 4096, 2)?)
//!     .remote("builder-b", &dst.xfer_blocks(0, 4096, 2)?)
//!     .notify(b"layer-0")
//!     .build()?;
//! req.post(None)?;
//! req.wait(Duration::from_secs(5))?;
//!
//! // Prepared lists and indices, for hot loops.
//! let lp = a.prepare_local(&src.xfer_blocks(0, 4096, 2)?)?;
//! let rp = a.prepare_remote("builder-b", &dst.xfer_blocks(0, 4096, 2)?)?;
//! let req = a.request(XferOp::Write).local_prepared(&lp, &[1]).remote_prepared(&rp, &[0]).build()?;
//! assert_eq!(req.total_bytes(), 4096);
//! # Ok::<(), kvferry::Error>(())
//! ```

use std::fmt;

use super::xfer::PreparedList;
use super::Agent;
use crate::desc::XferDescList;
use crate::error::{Error, Result};
use crate::request::Request;
use crate::types::XferOp;

/// One side of a request as the caller gave it.
#[derive(Clone, Copy)]
enum Side<'a> {
    /// A descriptor list, resolved at [`RequestBuilder::build`].
    List(&'a XferDescList),
    /// Entries of a prepared list, by index.
    Prepared(&'a PreparedList, &'a [usize]),
}

/// Builds a [`Request`]; made by [`Agent::request`]. Give the local side
/// ([`local`](Self::local) or [`local_prepared`](Self::local_prepared)) and
/// the remote side ([`remote`](Self::remote) or
/// [`remote_prepared`](Self::remote_prepared)), both as lists or both as
/// prepared lists, optionally a notification and backend hints, then
/// [`build`](Self::build). Nothing is checked or resolved before `build`.
#[must_use = "a request builder does nothing until build() is called"]
pub struct RequestBuilder<'a> {
    agent: &'a Agent,
    op: XferOp,
    local: Option<Side<'a>>,
    remote: Option<(&'a str, Side<'a>)>,
    notif: Option<&'a [u8]>,
    hints: &'a [&'a str],
}

impl fmt::Debug for RequestBuilder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBuilder")
            .field("agent", &self.agent.name())
            .field("op", &self.op)
            .field("local", &self.local.is_some())
            .field("remote", &self.remote.map(|(peer, _)| peer))
            .field("notif_len", &self.notif.map(<[u8]>::len))
            .field("hints", &self.hints)
            .finish()
    }
}

impl<'a> RequestBuilder<'a> {
    /// The local side: descriptors of this agent's registered memory.
    pub fn local(mut self, descs: &'a XferDescList) -> Self {
        self.local = Some(Side::List(descs));
        self
    }

    /// The remote side: descriptors of `peer`'s published regions (this
    /// agent's own name for local transfers such as DRAM ↔ FILE).
    pub fn remote(mut self, peer: &'a str, descs: &'a XferDescList) -> Self {
        self.remote = Some((peer, Side::List(descs)));
        self
    }

    /// The local side as entries `idx` of a list from
    /// [`Agent::prepare_local`].
    pub fn local_prepared(mut self, list: &'a PreparedList, idx: &'a [usize]) -> Self {
        self.local = Some(Side::Prepared(list, idx));
        self
    }

    /// The remote side as entries `idx` of a list from
    /// [`Agent::prepare_remote`] (the list names the peer).
    pub fn remote_prepared(mut self, list: &'a PreparedList, idx: &'a [usize]) -> Self {
        self.remote = Some((list.peer().unwrap_or(""), Side::Prepared(list, idx)));
        self
    }

    /// A notification the peer receives after each posting's data is
    /// visible (at most [`MAX_NOTIF_LEN`](crate::types::MAX_NOTIF_LEN) bytes;
    /// [`Request::post`] may replace it).
    pub fn notify(mut self, msg: &'a [u8]) -> Self {
        self.notif = Some(msg);
        self
    }

    /// Considers only these backends, the first that can serve wins
    /// (without hints the preference order decides; see [`Agent::create_request_with`]).
    pub fn hints(mut self, hints: &'a [&'a str]) -> Self {
        self.hints = hints;
        self
    }

    /// Checks everything and prepares the request with the chosen backend.
    pub fn build(self) -> Result<Request> {
        let RequestBuilder { agent, op, local, remote, notif, hints } = self;
        let Some(local) = local else {
            return Err(Error::invalid("request builder: no local side; call .local(..) or .local_prepared(..)"));
        };
        let Some((peer, remote)) = remote else {
            return Err(Error::invalid("request builder: no remote side; call .remote(..) or .remote_prepared(..)"));
        };
        match (local, remote) {
            (Side::List(l), Side::List(r)) => agent.create_request_with(op, l, r, peer, notif, hints),
            (Side::Prepared(l, li), Side::Prepared(r, ri)) => agent.make_request(op, l, li, r, ri, notif, hints),
            _ => Err(Error::invalid(
                "request builder: give both sides as descriptor lists (.local, .remote) or both as prepared lists (.local_prepared, .remote_prepared); prepare the other side with prepare_local or prepare_remote",
            )),
        }
    }
}

impl Agent {
    /// Starts building a `op` request (see [`RequestBuilder`]):
    /// `agent.request(XferOp::Write).local(&l).remote("decode", &r).notify(b"done").build()?`.
    pub fn request(&self, op: XferOp) -> RequestBuilder<'_> {
        RequestBuilder { agent: self, op, local: None, remote: None, notif: None, hints: &[] }
    }
}

#[cfg(test)]
mod tests {
    use crate::{Agent, AlignedBuf, ErrorKind, XferOp};

    #[test]
    fn builder_needs_both_sides_of_one_kind() {
        let a = Agent::with_backends("builder-unit-a", &["LOCAL"]).unwrap();
        let buf = AlignedBuf::new(4096).unwrap();
        let _r = a.register_buf(&buf).unwrap();
        let l = buf.xfer_blocks(0, 4096, 1).unwrap();
        let e = a.request(XferOp::Read).local(&l).build().unwrap_err();
        assert!(e.message().contains("no remote side"), "{e}");
        let e = a.request(XferOp::Read).remote(a.name(), &l).build().unwrap_err();
        assert!(e.message().contains("no local side"), "{e}");
        let rp = a.prepare_remote(a.name(), &l).unwrap();
        let e = a.request(XferOp::Read).local(&l).remote_prepared(&rp, &[0]).build().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidParam);
        assert!(e.message().contains("both sides"), "{e}");
        let lp = a.prepare_local(&l).unwrap();
        let e = a.request(XferOp::Read).local_prepared(&lp, &[0]).remote_prepared(&lp, &[0]).build().unwrap_err();
        assert!(e.message().contains("prepare_remote"), "{e}");
        let ok = a.request(XferOp::Write).local_prepared(&lp, &[0]).remote_prepared(&rp, &[0]).build().unwrap();
        assert_eq!((ok.op(), ok.peer(), ok.total_bytes()), (XferOp::Write, a.name(), 4096));
        assert!(format!("{:?}", a.request(XferOp::Read).notify(b"n")).contains("notif_len"));
    }
}
