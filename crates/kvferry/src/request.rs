//! Requests: a READ or WRITE between a local descriptor list and a remote
//! one, created once, posted many times, polled or waited on, released on drop.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::backend::{BackendXfer, CostEstimate};
use crate::error::{Error, ErrorKind, Result};
use crate::telemetry::{XferMetrics, XferTelemetry};
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
    /// The agent's metrics series for this request, when telemetry is on.
    pub(crate) metrics: Option<Arc<XferMetrics>>,
}

/// A request's telemetry, when it is on: the posting running and the last one done.
struct Telemetry {
    metrics: Arc<XferMetrics>,
    /// The running posting: its wall-clock start, start and time in `post`.
    running: Option<(std::time::SystemTime, Instant, Duration)>,
    /// The last posting that ended: wall-clock start, time in `post`, time
    /// to completion seen, success (the rest of its telemetry is the request's).
    last: Option<(std::time::SystemTime, Duration, Duration, bool)>,
}

struct ReqInner {
    xfer: Box<dyn BackendXfer>,
    notif: Option<Vec<u8>>,
    posted: bool,
    in_flight: bool,
    failed: Option<Error>,
    tel: Option<Box<Telemetry>>,
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
        let RequestParts { owner, backend, op, peer, total_bytes, segments, cost, xfer, notif, metrics } = parts;
        let tel = metrics.map(|metrics| Box::new(Telemetry { metrics, running: None, last: None }));
        Request {
            owner,
            backend,
            op,
            peer,
            total_bytes,
            segments,
            cost,
            inner: Mutex::new(ReqInner { xfer, notif, posted: false, in_flight: false, failed: None, tel }),
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
                // Done, or failed: the error was the old posting's; a new one starts.
                r => {
                    let _ = self.observe(&mut g, r);
                }
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
        let started = g.tel.is_some().then(|| (std::time::SystemTime::now(), Instant::now()));
        let ReqInner { xfer, notif, .. } = &mut *g;
        let r = xfer.post(notif.as_deref());
        if let (Some(t), Some((wall, t0))) = (g.tel.as_mut(), started) {
            t.running = Some((wall, t0, t0.elapsed()));
        }
        self.observe(&mut g, r)
    }

    /// Applies what the backend said of the running posting (from `post`,
    /// `poll` or `poll_for`): in flight or not, its error kept, and its
    /// telemetry recorded once it ended.
    fn observe(&self, g: &mut ReqInner, r: Result<XferState>) -> Result<XferState> {
        g.in_flight = matches!(r, Ok(XferState::InProgress));
        match &r {
            Ok(XferState::InProgress) => {}
            Ok(XferState::Done) => self.settle(g, Ok(())),
            Err(e) => {
                g.failed = Some(e.clone());
                self.settle(g, Err(e.kind()));
            }
        }
        r
    }

    /// Records the end of the running posting in its telemetry (when on).
    fn settle(&self, g: &mut ReqInner, r: std::result::Result<(), ErrorKind>) {
        let Some(t) = g.tel.as_mut() else { return };
        let Some((start, t0, post_duration)) = t.running.take() else { return };
        let xfer_duration = t0.elapsed();
        t.metrics.record(post_duration, xfer_duration, self.total_bytes, r);
        t.last = Some((start, post_duration, xfer_duration, r.is_ok()));
    }

    /// What the last completed (or failed) posting took: `None` while
    /// telemetry is off ([`AgentConfig::telemetry`](crate::AgentConfig)) or
    /// before a posting ended. NIXL's `getXferTelemetry`.
    pub fn telemetry(&self) -> Option<XferTelemetry> {
        let (start, post_duration, xfer_duration, ok) = self.inner.lock().tel.as_ref()?.last?;
        Some(XferTelemetry {
            start,
            post_duration,
            xfer_duration,
            total_bytes: self.total_bytes,
            desc_count: self.segments,
            backend: self.backend.to_string(),
            ok,
        })
    }

    /// Whether this request records telemetry (the agent's setting when it was created).
    pub fn telemetry_enabled(&self) -> bool {
        self.inner.lock().tel.is_some()
    }

    /// Where the last posting stands, without blocking. An error is final
    /// for that posting and is reported again until the next post.
    pub fn status(&self) -> Result<XferState> {
        let mut g = self.inner.lock();
        self.poll_locked(&mut g)
    }

    fn poll_locked(&self, g: &mut ReqInner) -> Result<XferState> {
        if let Some(e) = &g.failed {
            return Err(e.clone());
        }
        if !g.posted {
            return Err(Error::new(ErrorKind::InvalidParam, "request was never posted; call post first"));
        }
        if !g.in_flight {
            return Ok(XferState::Done);
        }
        let r = g.xfer.poll();
        self.observe(g, r)
    }

    /// Blocks until the last posting completes, fails, or `timeout` passes
    /// (then a `Timeout` error; the request stays in flight). Other threads
    /// may poll the same request meanwhile.
    pub fn wait(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut g = self.inner.lock();
                if self.poll_locked(&mut g)? == XferState::Done {
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
                let r = g.xfer.poll_for(left.min(Duration::from_millis(2)));
                if self.observe(&mut g, r)? == XferState::Done {
                    return Ok(());
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
            if let Some(t) = g.tel.as_mut() {
                if let Some((_, t0, post)) = t.running.take() {
                    t.metrics.record(post, t0.elapsed(), self.total_bytes, Err(ErrorKind::Canceled));
                }
            }
        }
    }
}

// Request must stay shareable between threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Request>();
};
