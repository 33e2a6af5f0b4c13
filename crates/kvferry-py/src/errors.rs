//! kvferry errors as Python exceptions.
//!
//! The classes live in `kvferry._errors` (Python, so that they can inherit
//! from builtins such as `TimeoutError`); this module looks them up once and
//! raises the one that matches the [`ErrorKind`], with the Rust message.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use kvferry::ErrorKind;

/// A kvferry error on its way to Python (the orphan rule forbids a direct
/// `From<kvferry::Error> for PyErr`).
#[derive(Debug)]
pub struct KvError(pub kvferry::Error);

impl From<kvferry::Error> for KvError {
    fn from(e: kvferry::Error) -> Self {
        KvError(e)
    }
}

/// The name of a kind as `kvferry._errors` spells its class, minus `Error`.
pub fn kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidParam => "InvalidParam",
        ErrorKind::Backend => "Backend",
        ErrorKind::NotFound => "NotFound",
        ErrorKind::Mismatch => "Mismatch",
        ErrorKind::NotAllowed => "NotAllowed",
        ErrorKind::RepostActive => "RepostActive",
        ErrorKind::NotSupported => "NotSupported",
        ErrorKind::RemoteDisconnect => "RemoteDisconnect",
        ErrorKind::Canceled => "Canceled",
        ErrorKind::Timeout => "Timeout",
        ErrorKind::Malformed => "Malformed",
        _ => "Internal",
    }
}

static CLASSES: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn class_for<'py>(py: Python<'py>, kind: ErrorKind) -> PyResult<Bound<'py, PyType>> {
    let table = CLASSES.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py.import("kvferry._errors")?.getattr("_BY_KIND")?.unbind())
    })?;
    Ok(table.bind(py).get_item(kind_name(kind))?.cast_into::<PyType>()?)
}

impl From<KvError> for PyErr {
    fn from(e: KvError) -> PyErr {
        let e = e.0;
        Python::attach(|py| match class_for(py, e.kind()) {
            Ok(cls) => PyErr::from_type(cls, (e.message().to_string(), kind_name(e.kind()), e.kind().nixl_status())),
            Err(lookup) => PyRuntimeError::new_err(format!("{e} (and kvferry._errors failed to load: {lookup})")),
        })
    }
}

/// A kvferry error as a Python exception.
pub fn py_err(e: kvferry::Error) -> PyErr {
    KvError(e).into()
}

/// Converts a kvferry result for Python.
pub fn kv<T>(r: kvferry::Result<T>) -> PyResult<T> {
    r.map_err(|e| KvError(e).into())
}
