//! Requests: a READ or WRITE between a local descriptor list and a remote
//! one, created once, posted many times, polled or waited on, released on drop.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::backend::{BackendXfer, CostEstimate};
use crate::error::{Error, ErrorKind, Result};
use crate::types::{DataPath, XferOp, XferState};

/// What a request keeps of the agent that created it: the agent's name, for
/// diagnostics, and, by holding it, the agent itself (its backends and
/// registrations stay alive until the request is released). Defined here so
/// that requests do not depend on the agent; the agent implements it.
pub(crate) trait RequestOwner: Send + Sync + 'static {
    /// The creating agent's name.
    fn name(&self) -> &str;
}

/// Everything a request is made of, as the agent builds it.
pub(crate) struct RequestParts {
    /// The creating agent.
    pub(crate) owner: Arc<dyn RequestOwner>,
    /// The backend chosen.
    pub(crate) backend: Arc<str>,
    /// READ or WRITE.
    pub(crate) op: XferOp,
    /// The remote agent.
    pub(crate) peer: Arc<str>,
    /// Bytes per posting.
    pub(crate) total_bytes: u64,
    /// Segments after merging.
    pub(crate) segments: usize,
    /// The backend's estimate.
    pub(crate) cost: CostEstimate,
    /// The prepared transfer.
    pub(crate) xfer: Box<dyn BackendXfer>,
    /// The notification stored with the request.
    pub(crate) notif: Option<Vec<u8>>,
}

struct ReqInner {
    xfer: Box<dyn BackendXfer>,
    notif: Option<Vec<u8>>,
    posted: bool,
    in_flight: bool,
    failed: Option<Error>,
}

/// A transfer request. `Send + Sync`: any thread may post, poll or wait.
///
/// Dropping it (or [`release`](Self::release)) cancels what is still in
/// flight and returns once no backend touches its memory any more.
pub struct Request {
    owner: Arc<dyn RequestOwner>,
    backend: Arc<str>,
    op: XferOp,
    peer: Arc<str>,
    total_bytes: u64,
    segments: usize,
    cost: CostEstimate,
    inner: Mutex<ReqInner>,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("agent", &self.owner.name())
            .field("op", &self.op)
            .field("peer", &self.peer)
            .field("backend", &self.backend)
            .field("bytes", &self.total_bytes)
            .field("segments", &self.segments)
            .finish()
    }
}

impl Request {
    pub(crate) fn new(parts: RequestParts) -> Self {
        let RequestParts { owner, backend, op, peer, total_bytes, segments, cost, xfer, notif } = parts;
        Request {
            owner,
            backend,
            op,
            peer,
            total_bytes,
            segments,
            cost,
            inner: Mutex::new(ReqInner { xfer, notif, posted: false, in_flight: false, failed: None }),
        }
    }

    /// How the backend moves this request's bytes, when it has several ways
    /// (SHM: [`DataPath::Mapped`], [`DataPath::Cma`] or [`DataPath::Mixed`]);
    /// `None` otherwise.
    pub fn data_path(&self) -> Option<DataPath> {
        self.inner.lock().xfer.data_path()
    }

    /// Starts the transfer. `notif`, if given, replaces the notification
    /// stored with the request; it reaches the peer after the data.
    ///
    /// Returns `Done` if it finished at once, else `InProgress`. Posting
    /// again while in flight is `RepostActive`; after completion (or an
    /// error) a request can be posted again.
    pub fn post(&self, notif: Option<&[u8]>) -> Result<XferState> {
        let mut g = self.inner.lock();
        if g.in_flight {
            match g.xfer.poll() {
                Ok(XferState::InProgress) => {
                    return Err(Error::new(
                        ErrorKind::RepostActive,
                        format!("request to '{}' is still in flight; wait for it before posting again", self.peer),
                    ))
                }
                Ok(XferState::Done) | Err(_) => g.in_flight = false,
            }
        }
        if let Some(n) = notif {
            if n.len() > crate::types::MAX_NOTIF_LEN {
                return Err(Error::invalid(format!(
                    "notification is {} bytes, more than {}",
                    n.len(),
                    crate::types::MAX_NOTIF_LEN
                )));
            }
            g.notif = Some(n.to_vec());
        }
        g.posted = true;
        g.failed = None;
        let ReqInner { xfer, notif, .. } = &mut *g;
        match xfer.post(notif.as_deref()) {
            Ok(s) => {
                g.in_flight = s == XferState::InProgress;
                Ok(s)
            }
            Err(e) => {
                g.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Where the last posting stands, without blocking. An error is final
    /// for that posting and is reported again until the next post.
    pub fn status(&self) -> Result<XferState> {
        let mut g = self.inner.lock();
        Self::poll_locked(&mut g)
    }

    fn poll_locked(g: &mut ReqInner) -> Result<XferState> {
        if let Some(e) = &g.failed {
            return Err(e.clone());
        }
        if !g.posted {
            return Err(Error::new(ErrorKind::InvalidParam, "request was never posted; call post first"));
        }
        if !g.in_flight {
            return Ok(XferState::Done);
        }
        match g.xfer.poll() {
            Ok(s) => {
                g.in_flight = s == XferState::InProgress;
                Ok(s)
            }
            Err(e) => {
                g.in_flight = false;
                g.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Blocks until the last posting completes, fails, or `timeout` passes
    /// (then a `Timeout` error; the request stays in flight). Other threads
    /// may poll the same request meanwhile.
    pub fn wait(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut g = self.inner.lock();
                if Self::poll_locked(&mut g)? == XferState::Done {
                    return Ok(());
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::timeout(format!(
                        "request to '{}' ({} bytes over {}) did not finish within {timeout:?}",
                        self.peer, self.total_bytes, self.backend
                    )));
                }
                // Wait in short slices so that other threads can poll too.
                match g.xfer.poll_for(left.min(Duration::from_millis(2))) {
                    Ok(XferState::Done) => {
                        g.in_flight = false;
                        return Ok(());
                    }
                    Ok(XferState::InProgress) => {}
                    Err(e) => {
                        g.in_flight = false;
                        g.failed = Some(e.clone());
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Cancels anything in flight and frees the request (the same as dropping it).
    pub fn release(self) {}

    /// The backend the agent chose for this request.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// READ or WRITE.
    pub fn op(&self) -> XferOp {
        self.op
    }

    /// The remote agent.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Bytes moved per posting.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Descriptors after merging contiguous runs.
    pub fn segments(&self) -> usize {
        self.segments
    }

    /// The backend's estimate of how long one posting takes.
    pub fn estimate_cost(&self) -> CostEstimate {
        self.cost
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        let g = self.inner.get_mut();
        if g.in_flight {
            g.xfer.cancel();
        }
    }
}

// Request must stay shareable between threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Request>();
};
