//! The `kvferry._kvferry` extension module: kvferry's agent, requests,
//! descriptor lists and buffers for Python. The Python package `kvferry`
//! (and its NIXL-compatible `kvferry.nixl`) is built on top of it; use those,
//! not this module, from Python code.
//!
//! Rules kept here: every call that can wait releases the GIL
//! (`Python::detach`) and no Rust thread needs it but the log forwarder
//! (`logs.rs`), which holds no lock of kvferry's when it takes it; malformed input from
//! Python raises an exception, never a panic; errors keep kvferry's kind and
//! message (see `kvferry._errors`).

use pyo3::prelude::*;

mod agent;
mod buf;
mod desc;
mod errors;
mod logs;
mod request;

/// The extension module.
#[pymodule]
fn _kvferry(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<agent::PyAgent>()?;
    m.add_class::<agent::PyStore>()?;
    m.add_class::<agent::PyMetaServer>()?;
    m.add_class::<buf::PyAlignedBuf>()?;
    m.add_class::<desc::PyXferDescList>()?;
    m.add_class::<desc::PyRegDescList>()?;
    m.add_class::<request::PyRequest>()?;
    m.add_class::<request::PyPrepared>()?;
    m.add_class::<request::PyRegistration>()?;
    m.add_function(wrap_pyfunction!(logs::_emit_log, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    logs::install();
    m.add("MEM_TYPES", kvferry::MemType::ALL.iter().map(|t| t.as_str()).collect::<Vec<_>>())?;
    Ok(())
}
