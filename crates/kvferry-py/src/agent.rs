//! `kvferry._kvferry.Agent`: the Rust agent for Python. Every method that
//! can wait (sockets, locks another thread holds, metadata exchanges)
//! releases the GIL; none calls back into Python.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use parking_lot::Mutex;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use kvferry::{Agent, AgentConfig, MetaPeer, Params, XferOp};

use crate::buf::PyAlignedBuf;
use crate::desc::{indices, PyRegDescList, PyXferDescList};
use crate::errors::{kv, py_err};
use crate::request::{msg_bytes, PyPrepared, PyRegistration, PyRequest};

fn secs(v: f64, what: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| PyValueError::new_err(format!("{what} must be a non-negative number of seconds, not {v}")))
}

fn params(d: Option<&Bound<'_, PyDict>>) -> PyResult<Params> {
    let mut p = Params::new();
    if let Some(d) = d {
        for (k, v) in d.iter() {
            p.set(&k.extract::<String>()?, &v.str()?.to_cow()?);
        }
    }
    Ok(p)
}

fn params_dict<'py>(py: Python<'py>, p: &Params) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in p.iter() {
        d.set_item(k, v)?;
    }
    Ok(d)
}

fn op(s: &str) -> PyResult<XferOp> {
    kv(s.parse::<XferOp>())
}

/// `ip` empty: the central store; else the listener at `ip:port`.
fn meta_peer(ip: &str, port: u16) -> PyResult<MetaPeer> {
    if ip.is_empty() {
        Ok(MetaPeer::Store)
    } else {
        kv(MetaPeer::addr(ip, port))
    }
}

fn hint_refs(h: &[String]) -> Vec<&str> {
    h.iter().map(String::as_str).collect()
}

/// One kvferry agent: backends, registered memory, peers, requests and
/// notifications. Thread-safe: share one between Python threads freely.
#[pyclass(frozen, module = "kvferry._kvferry", name = "Agent")]
#[derive(Debug)]
pub struct PyAgent {
    agent: Agent,
    /// The `/metrics` exporter started by `serve_metrics`, stopped with the agent.
    metrics: Mutex<Option<kvferry::MetricsServer>>,
    /// Errors of asynchronous store fetches, by peer, until looked at.
    fetch_errors: Arc<Mutex<HashMap<String, String>>>,
}

#[pymethods]
impl PyAgent {
    /// Creates an agent. `backends`: names or `(name, {param: value})`
    /// pairs. `from_env`: start from the environment's settings (auth
    /// token, central store, namespace: `KVFERRY_*` and NIXL's
    /// `NIXL_ETCD_*`); `KVFERRY_BACKENDS` is read only when `backends` is None.
    #[new]
    #[pyo3(signature = (name, backends = None, *, listener = false, listen_port = 0, listen_addr = None,
        from_env = true, connect_timeout = None, peer_timeout = None, metadata_timeout = None,
        metadata_url = None, etcd_endpoints = None, namespace = None, auth_token = None, worker_threads = 0,
        telemetry = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        name: &str,
        backends: Option<&Bound<'_, PyAny>>,
        listener: bool,
        listen_port: u16,
        listen_addr: Option<&str>,
        from_env: bool,
        connect_timeout: Option<f64>,
        peer_timeout: Option<f64>,
        metadata_timeout: Option<f64>,
        metadata_url: Option<String>,
        etcd_endpoints: Option<Vec<String>>,
        namespace: Option<String>,
        auth_token: Option<String>,
        worker_threads: usize,
        telemetry: Option<bool>,
    ) -> PyResult<Self> {
        let mut cfg = match (from_env, backends.is_none()) {
            (true, true) => kv(AgentConfig::from_env())?,
            (true, false) => AgentConfig::env_defaults(),
            (false, _) => AgentConfig::default(),
        };
        if let Some(b) = backends {
            for item in b.try_iter()? {
                let item = item?;
                if let Ok(n) = item.extract::<String>() {
                    cfg.backends.push((n, Params::new()));
                } else {
                    let (n, p): (String, Option<Bound<'_, PyDict>>) = item.extract()?;
                    cfg.backends.push((n, params(p.as_ref())?));
                }
            }
        }
        cfg.listener = listener;
        cfg.listen_port = listen_port;
        if let Some(a) = listen_addr {
            cfg.listen_addr = Some(
                a.parse().map_err(|e| PyValueError::new_err(format!("listen_addr '{a}' is not an IP address: {e}")))?,
            );
        }
        if let Some(t) = connect_timeout {
            cfg.connect_timeout = secs(t, "connect_timeout")?;
        }
        if let Some(t) = peer_timeout {
            cfg.peer_timeout = secs(t, "peer_timeout")?;
        }
        if let Some(t) = metadata_timeout {
            cfg.metadata_timeout = secs(t, "metadata_timeout")?;
        }
        if let Some(u) = metadata_url {
            cfg.metadata_url = Some(u);
        }
        if let Some(e) = etcd_endpoints {
            cfg.etcd_endpoints = e;
        }
        if let Some(n) = namespace {
            cfg.metadata_namespace = n;
        }
        if let Some(t) = auth_token {
            cfg = cfg.with_auth_token(t);
        }
        cfg.worker_threads = worker_threads;
        if let Some(t) = telemetry {
            cfg.telemetry = t;
        }
        let name = name.to_string();
        let agent = kv(py.detach(move || Agent::new(&name, cfg)))?;
        Ok(PyAgent { agent, metrics: Mutex::new(None), fetch_errors: Default::default() })
    }

    /// Whether telemetry is on (requests' `telemetry()`, `metrics_text()`).
    #[getter]
    fn telemetry(&self) -> bool {
        self.agent.telemetry_enabled()
    }

    /// The agent's metrics in Prometheus' text format (`kvferry.NotSupportedError`
    /// while telemetry is off).
    fn metrics_text(&self) -> PyResult<String> {
        kv(self.agent.metrics_text())
    }

    /// Serves `metrics_text()` at `http://{addr}/metrics` until the agent is
    /// closed (one exporter per agent; a second call replaces the first).
    /// Returns the URL. `addr` like `"127.0.0.1:9400"`; port 0 picks one.
    #[pyo3(signature = (addr = "127.0.0.1:0"))]
    fn serve_metrics(&self, py: Python<'_>, addr: &str) -> PyResult<String> {
        let server = kv(py.detach(|| self.agent.serve_metrics(addr)))?;
        let url = server.url();
        let old = self.metrics.lock().replace(server);
        py.detach(move || drop(old));
        Ok(url)
    }

    /// The agent's name.
    #[getter]
    fn name(&self) -> &str {
        self.agent.name()
    }

    /// The port of the metadata listener, if it runs.
    #[getter]
    fn listen_port(&self) -> Option<u16> {
        self.agent.listen_port()
    }

    /// Starts the metadata listener on `port` (0: any free one) and returns
    /// the port it took; for an agent built without `listener`, once its
    /// backends exist. Fails if a listener is on.
    #[pyo3(signature = (port = 0))]
    fn start_listener(&self, port: u16) -> PyResult<u16> {
        kv(self.agent.start_listener(port))
    }

    /// Names of every plugin this process knows.
    #[staticmethod]
    fn plugins() -> Vec<String> {
        Agent::available_plugins()
    }

    /// A plugin's memory types and `{param: default}`.
    #[staticmethod]
    fn plugin_params<'py>(py: Python<'py>, name: &str) -> PyResult<(Vec<&'static str>, Bound<'py, PyDict>)> {
        let (mts, specs) = kv(Agent::plugin_params(name))?;
        let d = PyDict::new(py);
        for s in specs {
            d.set_item(s.name, s.default)?;
        }
        Ok((mts.iter().map(|m| m.as_str()).collect(), d))
    }

    /// Creates the backend `name` with `params` over its defaults.
    #[pyo3(signature = (name, params = None))]
    fn create_backend(&self, py: Python<'_>, name: &str, params: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
        let p = self::params(params)?;
        kv(py.detach(|| self.agent.create_backend(name, &p)))
    }

    /// Names of the created backends, in creation order.
    fn backends(&self) -> Vec<String> {
        self.agent.backends()
    }

    /// The effective parameters of a created backend.
    fn backend_params<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyDict>> {
        params_dict(py, &kv(self.agent.backend_params(name))?)
    }

    /// The memory types a created backend serves.
    fn backend_mem_types(&self, name: &str) -> PyResult<Vec<&'static str>> {
        Ok(kv(self.agent.backend_capabilities(name))?.mem_types.iter().map(|m| m.as_str()).collect())
    }

    /// Registers an `AlignedBuf` (DRAM) with every backend that takes DRAM.
    fn register_buf(&self, py: Python<'_>, buf: Bound<'_, PyAlignedBuf>) -> PyResult<PyRegistration> {
        let b = &buf.get().buf;
        let r = kv(py.detach(|| self.agent.register_buf(b)))?;
        PyRegistration::wrap(py, r, Some(buf.into_any().unbind()))
    }

    /// Registers raw descriptors (memory or storage) with every backend that
    /// takes their type, or only `hints`. For memory the caller promises it
    /// stays allocated until deregistered; `keep` is held alive until then.
    #[pyo3(signature = (descs, hints = Vec::new(), keep = None))]
    fn register(
        &self,
        py: Python<'_>,
        descs: &PyRegDescList,
        hints: Vec<String>,
        keep: Option<Py<PyAny>>,
    ) -> PyResult<PyRegistration> {
        let list = descs.get();
        // SAFETY: this is the Python boundary, where NIXL's contract holds:
        // the caller names memory it owns and keeps allocated until it
        // deregisters (kvferry.Agent passes the owning object as `keep`,
        // which the registration holds alive).
        let r = kv(py.detach(|| unsafe { self.agent.register_mem(&list, &hint_refs(&hints)) }))?;
        PyRegistration::wrap(py, r, keep)
    }

    /// Registers raw descriptors as `register` does, but leaves them
    /// registered until `deregister` is called with the same descriptors
    /// (NIXL's `registerMem`/`deregisterMem`).
    #[pyo3(signature = (descs, hints = Vec::new()))]
    fn register_kept(&self, py: Python<'_>, descs: &PyRegDescList, hints: Vec<String>) -> PyResult<()> {
        let list = descs.get();
        // SAFETY: as in `register`: NIXL's contract at the Python boundary;
        // the caller keeps the memory allocated until it deregisters.
        let r = kv(py.detach(|| unsafe { self.agent.register_mem(&list, &hint_refs(&hints)) }))?;
        r.keep();
        Ok(())
    }

    /// Deregisters exactly the regions registered with these descriptors.
    fn deregister(&self, py: Python<'_>, descs: &PyRegDescList) -> PyResult<()> {
        let list = descs.get();
        kv(py.detach(|| self.agent.deregister_mem(&list)))
    }

    /// Creates a request moving `local[i]` to or from `remote[i]` of `peer`.
    #[pyo3(signature = (op, local, remote, peer, notif = None, hints = Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn request(
        &self,
        py: Python<'_>,
        op: &str,
        local: &PyXferDescList,
        remote: &PyXferDescList,
        peer: &str,
        notif: Option<&Bound<'_, PyAny>>,
        hints: Vec<String>,
    ) -> PyResult<PyRequest> {
        let op = self::op(op)?;
        let msg = notif.map(msg_bytes).transpose()?;
        let (l, r) = (local.list.read(), remote.list.read());
        let h = hint_refs(&hints);
        let req = py.detach(|| {
            let mut b = self.agent.request(op).local(&l).remote(peer, &r).hints(&h);
            if let Some(m) = &msg {
                b = b.notify(m);
            }
            b.build()
        });
        Ok(PyRequest::wrap(kv(req)?))
    }

    /// Resolves local descriptors once, for requests built by index.
    fn prepare_local(&self, py: Python<'_>, descs: &PyXferDescList) -> PyResult<PyPrepared> {
        let l = descs.list.read();
        Ok(PyPrepared::wrap(kv(py.detach(|| self.agent.prepare_local(&l)))?))
    }

    /// Resolves descriptors of `peer` (this agent's name: loopback) once.
    fn prepare_remote(&self, py: Python<'_>, peer: &str, descs: &PyXferDescList) -> PyResult<PyPrepared> {
        let l = descs.list.read();
        Ok(PyPrepared::wrap(kv(py.detach(|| self.agent.prepare_remote(peer, &l)))?))
    }

    /// Builds a request from prepared lists: `local[li[k]]` pairs with
    /// `remote[ri[k]]`. Indices: lists of ints or 1-D integer arrays.
    #[pyo3(signature = (op, local, local_idx, remote, remote_idx, notif = None, hints = Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn make_request(
        &self,
        py: Python<'_>,
        op: &str,
        local: &PyPrepared,
        local_idx: &Bound<'_, PyAny>,
        remote: &PyPrepared,
        remote_idx: &Bound<'_, PyAny>,
        notif: Option<&Bound<'_, PyAny>>,
        hints: Vec<String>,
    ) -> PyResult<PyRequest> {
        let op = self::op(op)?;
        let (li, ri) = (indices(local_idx)?, indices(remote_idx)?);
        let (l, r) = (local.get()?, remote.get()?);
        let msg = notif.map(msg_bytes).transpose()?;
        let req = py.detach(|| self.agent.make_request(op, &l, &li, &r, &ri, msg.as_deref(), &hint_refs(&hints)));
        Ok(PyRequest::wrap(kv(req)?))
    }

    /// Sends a standalone notification to `peer` (maybe this agent).
    #[pyo3(signature = (peer, msg, hints = Vec::new()))]
    fn send_notification(
        &self,
        py: Python<'_>,
        peer: &str,
        msg: &Bound<'_, PyAny>,
        hints: Vec<String>,
    ) -> PyResult<()> {
        let m = msg_bytes(msg)?;
        kv(py.detach(|| self.agent.send_notification(peer, &m, &hint_refs(&hints))))
    }

    /// Takes every notification received so far: `{sender: [bytes, ...]}`.
    fn take_notifications<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let n = self.agent.take_notifications();
        let d = PyDict::new(py);
        for (k, v) in n {
            let msgs: Vec<Bound<'py, PyBytes>> = v.iter().map(|m| PyBytes::new(py, m)).collect();
            d.set_item(k, msgs)?;
        }
        Ok(d)
    }

    /// Blocks until a notification is queued or `timeout` seconds pass.
    fn wait_notifications(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let t = secs(timeout, "timeout")?;
        Ok(py.detach(|| self.agent.wait_notifications(t)))
    }

    /// This agent's full metadata blob.
    fn local_metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let b = kv(py.detach(|| self.agent.local_metadata()))?;
        Ok(PyBytes::new(py, &b))
    }

    /// Metadata of only `descs` (and connection info if asked).
    #[pyo3(signature = (descs, include_conn_info = false, backends = Vec::new()))]
    fn partial_metadata<'py>(
        &self,
        py: Python<'py>,
        descs: &PyRegDescList,
        include_conn_info: bool,
        backends: Vec<String>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let l = descs.get();
        let b = kv(py.detach(|| self.agent.partial_metadata(&l, include_conn_info, &hint_refs(&backends))))?;
        Ok(PyBytes::new(py, &b))
    }

    /// Loads a peer's metadata blob; returns the peer's name.
    fn load_remote_metadata(&self, py: Python<'_>, blob: &[u8]) -> PyResult<String> {
        kv(py.detach(|| self.agent.load_remote_metadata(blob)))
    }

    /// Forgets a peer (and disconnects from it).
    fn invalidate_remote(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        kv(py.detach(|| self.agent.invalidate_remote(name)))
    }

    /// Whether `name`'s metadata is loaded (and covers `descs`, if given).
    #[pyo3(signature = (name, descs = None))]
    fn check_remote(&self, py: Python<'_>, name: &str, descs: Option<&PyXferDescList>) -> bool {
        let l = descs.map(|d| d.get());
        py.detach(|| self.agent.check_remote(name, l.as_ref()))
    }

    /// Names of the loaded peers.
    fn remote_agents(&self) -> Vec<String> {
        self.agent.remote_agents()
    }

    /// Publishes this agent's metadata: `ip` empty to the central store,
    /// else to the listener at `ip:port` (asynchronous).
    #[pyo3(signature = (ip = "", port = 0))]
    fn send_local_metadata(&self, py: Python<'_>, ip: &str, port: u16) -> PyResult<()> {
        let to = meta_peer(ip, port)?;
        kv(py.detach(|| self.agent.send_local_metadata(to)))
    }

    /// Publishes partial metadata (labelled in the central store).
    #[pyo3(signature = (descs, include_conn_info, label, ip = "", port = 0))]
    fn send_partial_metadata(
        &self,
        py: Python<'_>,
        descs: &PyRegDescList,
        include_conn_info: bool,
        label: &str,
        ip: &str,
        port: u16,
    ) -> PyResult<()> {
        let to = meta_peer(ip, port)?;
        let l = descs.get();
        kv(py.detach(|| self.agent.send_partial_metadata(&l, include_conn_info, label, to)))
    }

    /// Fetches and loads `name`'s metadata: from a listener (`ip`) or the
    /// central store. With `background` a store fetch runs on its own
    /// thread (NIXL's asynchronous fetch): `check_remote` tells when it
    /// arrived and `fetch_error` why it did not.
    #[pyo3(signature = (name, label = None, ip = "", port = 0, background = false))]
    fn fetch_remote_metadata(
        &self,
        py: Python<'_>,
        name: &str,
        label: Option<&str>,
        ip: &str,
        port: u16,
        background: bool,
    ) -> PyResult<()> {
        let from = meta_peer(ip, port)?;
        if background && from == MetaPeer::Store {
            // Fail now, as NIXL does, when no central store is configured.
            kv(py.detach(|| self.agent.store().map(drop)))?;
            let (agent, errs) = (self.agent.clone(), self.fetch_errors.clone());
            let (name, label) = (name.to_string(), label.map(str::to_string));
            errs.lock().remove(&name);
            return std::thread::Builder::new()
                .name("kvferry-py-fetch".into())
                .spawn(move || {
                    if let Err(e) = agent.fetch_remote_metadata(&name, label.as_deref(), MetaPeer::Store) {
                        errs.lock().insert(name, e.to_string());
                    }
                })
                .map(drop)
                .map_err(|e| py_err(kvferry::Error::io("spawning a metadata fetch thread", e)));
        }
        kv(py.detach(|| self.agent.fetch_remote_metadata(name, label, from)))
    }

    /// Why the last background fetch of `name` failed, if it did (taken).
    fn fetch_error(&self, name: &str) -> Option<String> {
        self.fetch_errors.lock().remove(name)
    }

    /// Withdraws this agent's metadata from the store or a peer's listener.
    #[pyo3(signature = (ip = "", port = 0))]
    fn invalidate_local_metadata(&self, py: Python<'_>, ip: &str, port: u16) -> PyResult<()> {
        let to = meta_peer(ip, port)?;
        kv(py.detach(|| self.agent.invalidate_local_metadata(to)))
    }

    /// Connects to `peer` ahead of the first transfer.
    fn make_connection(&self, py: Python<'_>, peer: &str) -> PyResult<()> {
        kv(py.detach(|| self.agent.make_connection(peer)))
    }

    /// Describes storage descriptors: `None` where missing, else
    /// `{"size": int, "mode": int, "mtime": float}`.
    fn query_mem<'py>(&self, py: Python<'py>, descs: &PyRegDescList) -> PyResult<Vec<Option<Bound<'py, PyDict>>>> {
        let l = descs.get();
        let infos = kv(py.detach(|| self.agent.query_mem(&l)))?;
        infos
            .into_iter()
            .map(|i| {
                i.map(|i| {
                    let d = PyDict::new(py);
                    d.set_item("size", i.size)?;
                    d.set_item("mode", i.mode)?;
                    d.set_item("mtime", i.mtime.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64())?;
                    Ok(d)
                })
                .transpose()
            })
            .collect()
    }

    /// Exports a file to remote initiators; returns its file id.
    #[pyo3(signature = (path, size, direct = false))]
    fn register_local_file(&self, py: Python<'_>, path: std::path::PathBuf, size: u64, direct: bool) -> PyResult<u64> {
        kv(py.detach(|| self.agent.register_local_file(&path, size, direct)))
    }

    /// Stops exporting a file.
    fn unregister_local_file(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
        kv(py.detach(|| self.agent.unregister_local_file(&path)))
    }

    /// Files this agent exports: `[{"id", "path", "size", "alignment"}]`.
    fn exported_files<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        files(py, self.agent.exported_files())
    }

    /// Files `peer` exports, as its loaded metadata says.
    fn remote_files<'py>(&self, py: Python<'py>, peer: &str) -> PyResult<Vec<Bound<'py, PyDict>>> {
        files(py, kv(self.agent.remote_files(peer))?)
    }

    /// The backend the agent chose for `req`.
    fn chosen_backend(&self, req: &PyRequest) -> String {
        req.backend_name().to_string()
    }

    /// The application keys of the central store.
    fn store(&self, py: Python<'_>) -> PyResult<PyStore> {
        Ok(PyStore { store: kv(py.detach(|| self.agent.store()))? })
    }

    fn __repr__(&self) -> String {
        format!("Agent('{}', backends={:?})", self.agent.name(), self.agent.backends())
    }
}

fn files<'py>(py: Python<'py>, f: Vec<kvferry::ExportedFile>) -> PyResult<Vec<Bound<'py, PyDict>>> {
    f.into_iter()
        .map(|f| {
            let d = PyDict::new(py);
            d.set_item("id", f.id)?;
            d.set_item("path", f.path)?;
            d.set_item("size", f.size)?;
            d.set_item("alignment", f.alignment)?;
            Ok(d)
        })
        .collect()
}

/// Keys of the central metadata store, for the application's own use.
#[pyclass(frozen, module = "kvferry._kvferry", name = "Store")]
#[derive(Debug)]
pub struct PyStore {
    store: kvferry::Store,
}

#[pymethods]
impl PyStore {
    /// Stores `value` at `key`.
    fn put(&self, py: Python<'_>, key: &str, value: &[u8]) -> PyResult<()> {
        kv(py.detach(|| self.store.put(key, value)))
    }

    /// The value at `key`, waiting up to `timeout` seconds for it.
    #[pyo3(signature = (key, timeout = 0.0))]
    fn get<'py>(&self, py: Python<'py>, key: &str, timeout: f64) -> PyResult<Bound<'py, PyBytes>> {
        let t = secs(timeout, "timeout")?;
        let v = kv(py.detach(|| self.store.get(key, t)))?;
        Ok(PyBytes::new(py, &v))
    }

    /// Deletes `key`.
    fn delete(&self, py: Python<'_>, key: &str) -> PyResult<()> {
        kv(py.detach(|| self.store.delete(key)))
    }

    /// Keys under `prefix`.
    fn list(&self, py: Python<'_>, prefix: &str) -> PyResult<Vec<String>> {
        kv(py.detach(|| self.store.list(prefix)))
    }

    /// Where the store is.
    #[getter]
    fn endpoint(&self) -> String {
        self.store.endpoint()
    }
}

/// An embedded kvferry metadata server (`KVFERRY_METADATA_URL=server.url`).
#[pyclass(frozen, module = "kvferry._kvferry", name = "MetaServer")]
#[derive(Debug)]
pub struct PyMetaServer {
    server: Mutex<Option<kvferry::metadata::server::MetaServer>>,
    url: String,
}

#[pymethods]
impl PyMetaServer {
    /// Starts serving on `addr` (`"127.0.0.1:0"` picks a free port).
    #[new]
    #[pyo3(signature = (addr = "127.0.0.1:0"))]
    fn new(py: Python<'_>, addr: &str) -> PyResult<Self> {
        let s = kv(py.detach(|| kvferry::metadata::server::MetaServer::start(addr)))?;
        Ok(PyMetaServer { url: s.url(), server: Mutex::new(Some(s)) })
    }

    /// `http://ip:port`.
    #[getter]
    fn url(&self) -> &str {
        &self.url
    }

    /// Stops the server (a no-op the second time).
    fn stop(&self, py: Python<'_>) {
        let s = self.server.lock().take();
        py.detach(move || {
            if let Some(s) = s {
                s.stop()
            }
        });
    }
}
