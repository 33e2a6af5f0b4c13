//! Requests, prepared lists and registrations for Python. Each wraps its
//! Rust object in `Mutex<Option<Arc<_>>>`: `release()` drops this handle's
//! share at once (safe twice, safe after the agent is gone), while a thread
//! that is still waiting on it keeps its own share until it returns.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use kvferry::{ErrorKind, PreparedList, Registration, XferState};

use crate::desc::PyRegDescList;
use crate::errors::{kv, py_err};

/// A notification argument: `bytes`, `bytearray`, `memoryview` or `str` (UTF-8).
pub fn msg_bytes(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(s.to_cow()?.as_bytes().to_vec());
    }
    obj.extract::<Vec<u8>>()
}

fn released(what: &str) -> PyErr {
    py_err(kvferry::Error::new(ErrorKind::InvalidParam, format!("this {what} was released; create a new one")))
}

/// `(start_us, post_us, xfer_us, total_bytes, descriptors)`, as Python sees telemetry.
type TelemetryTuple = (u64, u64, u64, u64, usize);

/// A transfer request: created once, posted many times.
#[pyclass(frozen, module = "kvferry._kvferry", name = "Request")]
#[derive(Debug)]
pub struct PyRequest {
    req: Mutex<Option<Arc<kvferry::Request>>>,
    backend: String,
    total_bytes: u64,
    segments: usize,
}

impl PyRequest {
    /// Wraps a Rust request.
    pub fn wrap(r: kvferry::Request) -> Self {
        PyRequest {
            backend: r.backend().to_string(),
            total_bytes: r.total_bytes(),
            segments: r.segments(),
            req: Mutex::new(Some(Arc::new(r))),
        }
    }

    /// The backend the agent chose.
    pub fn backend_name(&self) -> &str {
        &self.backend
    }

    fn get(&self) -> PyResult<Arc<kvferry::Request>> {
        self.req.lock().clone().ok_or_else(|| released("request"))
    }
}

#[pymethods]
impl PyRequest {
    /// Starts the transfer (`notif` replaces the stored notification).
    /// Returns True when it finished at once. Releases the GIL.
    #[pyo3(signature = (notif = None))]
    fn post(&self, py: Python<'_>, notif: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
        let req = self.get()?;
        let msg = notif.map(msg_bytes).transpose()?;
        let s = kv(py.detach(|| req.post(msg.as_deref())))?;
        Ok(s == XferState::Done)
    }

    /// Whether the last posting is done (False: still in progress); raises
    /// its error if it failed. Releases the GIL.
    ///
    /// A posting still in progress yields the core before answering: NIXL
    /// programs poll `check_xfer_state` in a tight loop, and on a machine
    /// with few cores that loop would otherwise take the core the backend's
    /// threads need to move the bytes (a yield costs well under a
    /// microsecond when nothing else is waiting for the core).
    fn status(&self, py: Python<'_>) -> PyResult<bool> {
        let req = self.get()?;
        let s = kv(py.detach(|| {
            let s = req.status();
            if matches!(s, Ok(XferState::InProgress)) {
                std::thread::yield_now();
            }
            s
        }))?;
        Ok(s == XferState::Done)
    }

    /// Blocks until the last posting completes or fails, at most `timeout`
    /// seconds (then `kvferry.TimeoutError`). Releases the GIL.
    #[pyo3(signature = (timeout = 30.0))]
    fn wait(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let req = self.get()?;
        let t = Duration::try_from_secs_f64(timeout).map_err(|_| {
            PyValueError::new_err(format!("timeout must be a non-negative number of seconds, not {timeout}"))
        })?;
        kv(py.detach(|| req.wait(t)))
    }

    /// Cancels what is in flight and frees the request. Safe to call twice.
    fn release(&self, py: Python<'_>) {
        let r = self.req.lock().take();
        py.detach(move || drop(r));
    }

    /// Whether `release` was called.
    #[getter]
    fn released(&self) -> bool {
        self.req.lock().is_none()
    }

    /// The backend the agent chose.
    #[getter]
    fn backend(&self) -> &str {
        &self.backend
    }

    /// Bytes per posting.
    #[getter]
    fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Descriptors after merging contiguous runs.
    #[getter]
    fn segments(&self) -> usize {
        self.segments
    }

    /// The remote agent.
    #[getter]
    fn peer(&self) -> PyResult<String> {
        Ok(self.get()?.peer().to_string())
    }

    /// `"READ"` or `"WRITE"`.
    #[getter]
    fn op(&self) -> PyResult<String> {
        Ok(self.get()?.op().to_string())
    }

    /// The backend's estimate: `(duration_us, error_margin_us, method)`.
    fn estimate_cost(&self) -> PyResult<(u64, u64, &'static str)> {
        let c = self.get()?.estimate_cost();
        Ok((c.duration.as_micros() as u64, c.err_margin.as_micros() as u64, c.method))
    }

    /// Telemetry of the last posting that ended: `(start_us since the
    /// epoch, post_us, xfer_us, total_bytes, descriptors)`, all 0 but the
    /// last two before one ended; `None` when the agent's telemetry is off
    /// (`Agent(..., telemetry=True)` or `KVFERRY_TELEMETRY=1`).
    fn telemetry(&self) -> PyResult<Option<TelemetryTuple>> {
        let r = self.get()?;
        if !r.telemetry_enabled() {
            return Ok(None);
        }
        Ok(Some(match r.telemetry() {
            Some(t) => (
                t.start_us(),
                t.post_duration.as_micros() as u64,
                t.xfer_duration.as_micros() as u64,
                t.total_bytes,
                t.desc_count,
            ),
            None => (0, 0, 0, self.total_bytes, self.segments),
        }))
    }

    fn __repr__(&self) -> String {
        match self.req.lock().as_ref() {
            Some(r) => format!(
                "Request({} {} bytes in {} segments to '{}' over {})",
                r.op(),
                self.total_bytes,
                self.segments,
                r.peer(),
                self.backend
            ),
            None => "Request(released)".to_string(),
        }
    }
}

/// A descriptor list resolved once, for building many requests by index.
#[pyclass(frozen, module = "kvferry._kvferry", name = "PreparedList")]
#[derive(Debug)]
pub struct PyPrepared {
    list: Mutex<Option<Arc<PreparedList>>>,
    len: usize,
}

impl PyPrepared {
    /// Wraps a Rust prepared list.
    pub fn wrap(l: PreparedList) -> Self {
        PyPrepared { len: l.len(), list: Mutex::new(Some(Arc::new(l))) }
    }

    /// The Rust list, unless released.
    pub fn get(&self) -> PyResult<Arc<PreparedList>> {
        self.list.lock().clone().ok_or_else(|| released("prepared list"))
    }
}

#[pymethods]
impl PyPrepared {
    fn __len__(&self) -> usize {
        self.len
    }

    /// The agent whose memory it describes (None: the local side).
    #[getter]
    fn peer(&self) -> PyResult<Option<String>> {
        Ok(self.get()?.peer().map(str::to_string))
    }

    /// The memory type's name.
    #[getter]
    fn mem_type(&self) -> PyResult<&'static str> {
        Ok(self.get()?.mem_type().as_str())
    }

    /// Frees the list. Safe to call twice.
    fn release(&self) {
        self.list.lock().take();
    }

    /// Whether `release` was called.
    #[getter]
    fn released(&self) -> bool {
        self.list.lock().is_none()
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.list.lock().as_deref())
    }
}

/// A live registration; `deregister()` (or leaving a `with` block) ends it.
#[pyclass(frozen, module = "kvferry._kvferry", name = "Registration")]
#[derive(Debug)]
pub struct PyRegistration {
    reg: Mutex<Option<Registration>>,
    descs: Py<PyRegDescList>,
    /// The Python object whose memory is registered, kept alive meanwhile.
    keep: Mutex<Option<Py<PyAny>>>,
}

impl PyRegistration {
    /// Wraps a Rust registration, keeping `keep` alive until it ends.
    pub fn wrap(py: Python<'_>, reg: Registration, keep: Option<Py<PyAny>>) -> PyResult<Self> {
        let descs = Py::new(py, PyRegDescList::wrap(reg.descs().clone()))?;
        Ok(PyRegistration { reg: Mutex::new(Some(reg)), descs, keep: Mutex::new(keep) })
    }
}

#[pymethods]
impl PyRegistration {
    /// The registered descriptors.
    #[getter]
    fn descs(&self, py: Python<'_>) -> Py<PyRegDescList> {
        self.descs.clone_ref(py)
    }

    /// Deregisters now (a no-op the second time). Releases the GIL.
    fn deregister(&self, py: Python<'_>) -> PyResult<()> {
        let r = self.reg.lock().take();
        let out = match r {
            Some(r) => kv(py.detach(move || r.deregister())),
            None => Ok(()),
        };
        self.keep.lock().take();
        out
    }

    /// Whether it is still registered.
    #[getter]
    fn active(&self) -> bool {
        self.reg.lock().is_some()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.deregister(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!("Registration({:?}, active={})", self.descs.get().get(), self.active())
    }
}
