//! Central metadata stores: the embedded HTTP server ([`HttpStore`]) and etcd
//! ([`EtcdStore`], through etcd's JSON API). Agents publish their metadata
//! here under a lease, fetch peers' metadata by name, watch for peers that
//! disappear, and applications exchange small values.
//!
//! Every call is bounded in time; an unreachable store is an error that names
//! the endpoint.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::AuthToken;
use crate::error::{Error, Result};

mod http;
pub use http::HttpStore;

mod etcd;
pub use etcd::{EtcdCredentials, EtcdStore};

pub(crate) use super::http_common::OWNED;

/// Which central store to open and how: the part of an agent's
/// configuration a store reads (the agent builds it from its `AgentConfig`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreSpec {
    /// URL of a kvferry metadata server (`http://host:port`).
    pub url: Option<String>,
    /// etcd endpoints (`http://host:2379`, ...).
    pub etcd_endpoints: Vec<String>,
    /// The etcd user, when etcd has authentication enabled (`Debug` redacts the password).
    pub etcd_credentials: Option<EtcdCredentials>,
    /// Bound of connecting, and of each call (plus the wait of long-polls).
    pub timeout: Duration,
    /// The bearer token sent to the metadata server (`Debug` redacts it).
    pub token: Option<AuthToken>,
}

/// What changed under a watched prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchBatch {
    /// The store's revision after these changes: pass it as `since` next time.
    pub revision: u64,
    /// Keys written.
    pub put: Vec<String>,
    /// Keys deleted (or expired with their lease).
    pub deleted: Vec<String>,
    /// The store no longer has every change since `since`: re-list to catch up.
    pub compacted: bool,
}

/// A key-value store with leases and watches, as agents need it.
pub trait MetaStore: Send + Sync + fmt::Debug + 'static {
    /// Where the store is, for error messages.
    fn endpoint(&self) -> String;
    /// Writes `value` at `key`, attached to `lease` if given.
    fn put(&self, key: &str, value: &[u8], lease: Option<u64>) -> Result<()>;
    /// Reads `key`; `None` if absent.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Reads `key`, waiting up to `timeout` for it to appear.
    fn wait_for(&self, key: &str, timeout: Duration) -> Result<Option<Vec<u8>>>;
    /// Deletes `key` (absent is fine).
    fn delete(&self, key: &str) -> Result<()>;
    /// Deletes every key under `prefix`; returns how many.
    fn delete_prefix(&self, prefix: &str) -> Result<usize>;
    /// Deletes the keys under `prefix` that are attached to `lease` (the
    /// metadata server refuses to let one agent delete another's keys);
    /// returns how many. Stores without ownership delete the whole prefix.
    fn delete_leased_prefix(&self, prefix: &str, lease: u64) -> Result<usize> {
        let _ = lease;
        self.delete_prefix(prefix)
    }
    /// Keys under `prefix`, sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Grants a lease of `ttl`; keys attached to it vanish unless it is kept alive.
    fn grant_lease(&self, ttl: Duration) -> Result<u64>;
    /// Renews a lease; `false` if it no longer exists (expired, or the store restarted).
    fn keep_alive(&self, lease: u64) -> Result<bool>;
    /// Revokes a lease and deletes its keys.
    fn revoke(&self, lease: u64) -> Result<()>;
    /// The current revision (pass to [`watch`](Self::watch) to see later changes only).
    fn revision(&self) -> Result<u64>;
    /// Changes under `prefix` after revision `since`, waiting up to `timeout` for one.
    fn watch(&self, prefix: &str, since: u64, timeout: Duration) -> Result<WatchBatch>;
}

/// Opens the store `spec` names: `url` (the embedded server) or
/// `etcd_endpoints`. `None` when neither is set.
pub fn open(spec: &StoreSpec) -> Result<Option<Arc<dyn MetaStore>>> {
    match (&spec.url, spec.etcd_endpoints.is_empty()) {
        (Some(_), false) => Err(Error::invalid(
            "both KVFERRY_METADATA_URL and KVFERRY_ETCD_ENDPOINTS are set; choose one metadata store",
        )),
        (Some(url), true) => Ok(Some(Arc::new(HttpStore::new(url, spec.timeout)?.with_token(spec.token.clone())))),
        (None, false) => open_etcd(spec),
        (None, true) => Ok(None),
    }
}

fn open_etcd(spec: &StoreSpec) -> Result<Option<Arc<dyn MetaStore>>> {
    let store = EtcdStore::connect(&spec.etcd_endpoints, spec.timeout)?.with_credentials(spec.etcd_credentials.clone());
    Ok(Some(Arc::new(store)))
}
