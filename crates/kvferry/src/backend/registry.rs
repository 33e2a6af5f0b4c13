//! The process-wide registry of backend plugins: the built-ins plus any a
//! user adds with [`register_plugin`].

use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;

use super::BackendPlugin;
use crate::error::{Error, Result};

fn registry() -> &'static RwLock<Vec<Arc<dyn BackendPlugin>>> {
    static REG: OnceLock<RwLock<Vec<Arc<dyn BackendPlugin>>>> = OnceLock::new();
    REG.get_or_init(|| RwLock::new(builtin()))
}

fn builtin() -> Vec<Arc<dyn BackendPlugin>> {
    vec![
        Arc::new(super::local::LocalPlugin),
        Arc::new(super::shm::ShmPlugin),
        Arc::new(super::posix::PosixPlugin),
        Arc::new(super::tcp::TcpPlugin),
        Arc::new(super::obj::ObjPlugin),
    ]
}

/// Every plugin known to this process, built-ins first.
pub fn plugins() -> Vec<Arc<dyn BackendPlugin>> {
    registry().read().clone()
}

/// The plugin called `name` (case-insensitive); the error lists the known ones.
pub fn plugin(name: &str) -> Result<Arc<dyn BackendPlugin>> {
    let reg = registry().read();
    reg.iter().find(|p| p.name().eq_ignore_ascii_case(name)).cloned().ok_or_else(|| {
        let known: Vec<&str> = reg.iter().map(|p| p.name()).collect();
        Error::not_found(format!("no backend plugin named '{name}'; available plugins: {}", known.join(", ")))
    })
}

/// Adds a user plugin to the process-wide registry, so that every agent can
/// `create_backend` it by name. A name that is already taken is refused.
pub fn register_plugin(p: Arc<dyn BackendPlugin>) -> Result<()> {
    let mut reg = registry().write();
    if p.name().is_empty() || !p.name().chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(Error::invalid(format!(
            "plugin name '{}' must be non-empty ASCII letters, digits or '_'",
            p.name()
        )));
    }
    if reg.iter().any(|q| q.name().eq_ignore_ascii_case(p.name())) {
        return Err(Error::invalid(format!("a backend plugin named '{}' is already registered", p.name())));
    }
    reg.push(p);
    Ok(())
}
