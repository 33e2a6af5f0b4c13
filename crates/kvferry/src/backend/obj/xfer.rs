//! One prepared OBJ transfer: each posting runs its operations as one task
//! on the backend's runtime; polling reads the outcome the task leaves.

use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::path::Path;
use parking_lot::{Condvar, Mutex};

use super::plan::Op;
use super::Inner;
use crate::backend::BackendXfer;
use crate::error::{Error, ErrorKind, Result};
use crate::types::{AccessKey, XferState};

/// Where a posting's task leaves its outcome (an error as its kind and
/// message, so that every poll after it reports it).
#[derive(Debug, Default)]
pub(super) struct Outcome {
    result: Mutex<Option<std::result::Result<(), (ErrorKind, String)>>>,
    cv: Condvar,
}

impl Outcome {
    fn set(&self, r: Result<()>) {
        let mut g = self.result.lock();
        if g.is_none() {
            *g = Some(r.map_err(|e| (e.kind(), e.message().to_string())));
        }
        self.cv.notify_all();
    }

    /// Waits until the task left its outcome or `deadline` passed.
    fn wait_until(&self, deadline: Option<Instant>) {
        let mut g = self.result.lock();
        while g.is_none() {
            match deadline {
                Some(d) => {
                    if self.cv.wait_until(&mut g, d).timed_out() {
                        return;
                    }
                }
                None => self.cv.wait(&mut g),
            }
        }
    }
}

/// Sets the outcome when the task ends, even when it is aborted (its future
/// is dropped then, and with it this guard): once the outcome is set, the
/// task touches no memory of the request.
struct Finish(Arc<Outcome>);

impl Drop for Finish {
    fn drop(&mut self) {
        self.0.set(Err(Error::new(ErrorKind::Canceled, "OBJ: the transfer was canceled")));
    }
}

/// A prepared OBJ transfer.
#[derive(Debug)]
pub(super) struct ObjXfer {
    pub inner: Arc<Inner>,
    /// The object regions the request uses, checked again at each post.
    pub keys: Vec<AccessKey>,
    pub objects: Arc<[Path]>,
    pub ops: Arc<[Op]>,
    pub posting: Option<(Arc<Outcome>, tokio::task::JoinHandle<()>)>,
    pub notif: Option<Vec<u8>>,
}

impl ObjXfer {
    fn state(&mut self) -> Result<XferState> {
        let Some((out, _)) = &self.posting else {
            return Err(Error::invalid("OBJ: the transfer was never posted"));
        };
        let r = out.result.lock().clone().map(|r| r.map_err(|(kind, msg)| Error::new(kind, msg)));
        crate::backend::local_outcome(r, &self.inner.notifs, &self.inner.agent, &mut self.notif)
    }
}

impl BackendXfer for ObjXfer {
    fn post(&mut self, notif: Option<&[u8]>) -> Result<XferState> {
        if let Some((out, _)) = &self.posting {
            if out.result.lock().is_none() {
                return Err(Error::new(ErrorKind::RepostActive, "OBJ: the transfer is still in flight"));
            }
        }
        {
            let table = self.inner.table.read();
            if self.keys.iter().any(|k| !table.contains_key(k)) {
                return Err(Error::not_found(
                    "OBJ: an object of this request was deregistered after the request was created; register it again and create a new request",
                ));
            }
        }
        let out = Arc::new(Outcome::default());
        let finish = Finish(out.clone());
        let io = self.inner.io.clone();
        let (ops, objects) = (self.ops.clone(), self.objects.clone());
        let task = self.inner.runtime()?.spawn(async move {
            let r = io.run(ops, objects).await;
            finish.0.set(r);
            drop(finish);
        });
        self.notif = notif.map(<[u8]>::to_vec);
        self.posting = Some((out, task));
        Ok(XferState::InProgress)
    }

    fn poll(&mut self) -> Result<XferState> {
        self.state()
    }

    fn poll_for(&mut self, timeout: Duration) -> Result<XferState> {
        if let Some((out, _)) = &self.posting {
            out.wait_until(Some(Instant::now() + timeout));
        }
        self.state()
    }

    fn cancel(&mut self) {
        if let Some((out, task)) = &self.posting {
            task.abort();
            // The task's future is dropped at its next await (or now, if it
            // is idle): only then may the request's memory go.
            out.wait_until(None);
        }
    }
}

impl Drop for ObjXfer {
    fn drop(&mut self) {
        self.cancel();
    }
}
