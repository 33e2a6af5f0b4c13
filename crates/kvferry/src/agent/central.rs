//! Metadata exchange through a central store (the embedded metadata server
//! or etcd), and the application keys that share it.
//!
//! Keys: `{namespace}{agent}/metadata` holds the full blob,
//! `{namespace}{agent}/partial/{label}` labelled partial blobs, all under the
//! agent's lease. A keeper thread renews the lease, re-publishes everything
//! if the store lost it (a restarted store), and watches the namespace: when
//! a fetched peer's metadata key disappears, the peer is invalidated.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{Agent, AgentInner};
use crate::desc::RegDescList;
use crate::error::{Error, Result};
use crate::metadata::store::{self, MetaStore, StoreSpec, OWNED};

/// Where metadata is sent to, or fetched from.
///
/// With [`MetaPeer::Store`] the calls are synchronous and bounded by
/// `metadata_timeout` (a missing agent is `NotFound`). With
/// [`MetaPeer::Addr`] they are asynchronous, as in NIXL: they return once
/// the exchange is started, and [`Agent::check_remote`] tells when a
/// fetched peer's metadata has arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaPeer {
    /// The configured central store (`KVFERRY_METADATA_URL` or `KVFERRY_ETCD_ENDPOINTS`).
    Store,
    /// A peer agent's metadata listener, peer to peer.
    Addr(SocketAddr),
}

impl MetaPeer {
    /// The listener at `ip:port` (a name or an address; port 0 is refused).
    pub fn addr(ip: &str, port: u16) -> Result<MetaPeer> {
        super::p2p::resolve(ip, port).map(MetaPeer::Addr)
    }
}

#[derive(Debug, Default)]
struct State {
    lease: Option<u64>,
    /// Everything published, to re-publish after the store lost it.
    published: BTreeMap<String, Vec<u8>>,
    /// Peers fetched from the store: name → instance.
    watched: HashMap<String, u64>,
}

/// An agent's link to the central store.
#[derive(Debug)]
pub(crate) struct Central {
    store: Arc<dyn MetaStore>,
    ns: String,
    ttl: Duration,
    state: Mutex<State>,
    stop: AtomicBool,
}

impl Central {
    fn key(&self, agent: &str, label: Option<&str>) -> String {
        match label {
            None => format!("{}{agent}/metadata", self.ns),
            Some(l) => format!("{}{agent}/partial/{l}", self.ns),
        }
    }

    fn lease(&self, st: &mut State) -> Result<u64> {
        match st.lease {
            Some(l) => Ok(l),
            None => {
                let l = self.store.grant_lease(self.ttl)?;
                st.lease = Some(l);
                Ok(l)
            }
        }
    }

    /// Publishes under the agent's lease. A key still owned by another live
    /// lease (this agent's previous process, crashed less than a lease ago)
    /// is retried until that lease has had time to expire; after that the
    /// refusal is returned (another live agent uses this name).
    fn publish(&self, key: String, value: Vec<u8>) -> Result<()> {
        let deadline = Instant::now() + self.ttl + Duration::from_millis(500);
        loop {
            match self.publish_once(key.clone(), value.clone()) {
                Err(e)
                    if e.kind() == crate::ErrorKind::NotAllowed
                        && e.message().contains(OWNED)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                r => return r,
            }
        }
    }

    fn publish_once(&self, key: String, value: Vec<u8>) -> Result<()> {
        let mut st = self.state.lock();
        let lease = self.lease(&mut st)?;
        match self.store.put(&key, &value, Some(lease)) {
            Ok(()) => {}
            Err(e) if e.kind() == crate::ErrorKind::NotFound => {
                // The lease is gone (store restarted): take a new one and re-publish all.
                st.lease = None;
                drop(st);
                self.republish()?;
                st = self.state.lock();
                let lease = self.lease(&mut st)?;
                self.store.put(&key, &value, Some(lease))?;
            }
            Err(e) => return Err(e),
        }
        st.published.insert(key, value);
        Ok(())
    }

    fn republish(&self) -> Result<()> {
        let mut st = self.state.lock();
        st.lease = None;
        let lease = self.lease(&mut st)?;
        for (k, v) in &st.published {
            self.store.put(k, v, Some(lease))?;
        }
        Ok(())
    }

    /// The keeper: renews the lease, re-publishes when needed, and watches
    /// fetched peers. Exits when `stop` is set or the agent is gone.
    fn keep(self: Arc<Self>, agent: Weak<AgentInner>) {
        let beat = (self.ttl / 3).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut since = self.store.revision().unwrap_or(0);
        let mut last_beat = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            match self.store.watch(&self.ns, since, beat) {
                Ok(batch) => {
                    let relist = batch.compacted;
                    since = batch.revision;
                    let gone: Vec<String> = {
                        let st = self.state.lock();
                        st.watched
                            .keys()
                            .filter(|p| relist || batch.deleted.contains(&self.key(p, None)))
                            .cloned()
                            .collect()
                    };
                    for peer in gone {
                        if relist && self.store.get(&self.key(&peer, None)).ok().flatten().is_some() {
                            continue;
                        }
                        let Some(inner) = agent.upgrade() else { return };
                        let instance = self.state.lock().watched.remove(&peer);
                        if let Some(instance) = instance {
                            tracing::info!(agent = %inner.name, %peer, "peer's metadata left the store: invalidating it");
                            Agent { inner }.peer_lost(&peer, instance);
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "metadata store watch failed; retrying");
                    std::thread::sleep(beat.min(Duration::from_millis(200)));
                }
            }
            if last_beat.elapsed() >= beat {
                last_beat = Instant::now();
                let lease = self.state.lock().lease;
                if let Some(l) = lease {
                    match self.store.keep_alive(l) {
                        Ok(true) => {}
                        // A transient failure (a busy or unreachable store) is
                        // retried at the next beat: re-publishing under a new
                        // lease while the old one lives would be refused, since
                        // the old lease still owns the keys.
                        Err(e) => {
                            tracing::debug!(error = %e, store = %self.store.endpoint(), "lease keep-alive failed; retrying");
                        }
                        Ok(false) => {
                            if let Err(e) = self.republish() {
                                tracing::warn!(error = %e, store = %self.store.endpoint(), "cannot re-publish metadata yet; will retry");
                            } else {
                                tracing::info!(store = %self.store.endpoint(), "metadata re-published under a new lease");
                            }
                        }
                    }
                }
            }
        }
    }

    pub(crate) fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(l) = self.state.lock().lease.take() {
            let _ = self.store.revoke(l);
        }
    }
}

/// Application keys in the agent's central store: small values such as
/// descriptor lists, ready flags and ranks. Keys are used as given.
#[derive(Debug)]
pub struct Store {
    central: Arc<Central>,
}

impl Store {
    /// Writes `value` at `key` (no lease: it stays until deleted).
    pub fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        self.central.store.put(key, value, None)
    }

    /// Reads `key`, waiting up to `timeout` for it to appear; `NotFound` after that.
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        self.central.store.wait_for(key, timeout)?.ok_or_else(|| {
            Error::not_found(format!(
                "key '{key}' did not appear in {} within {timeout:?}",
                self.central.store.endpoint()
            ))
        })
    }

    /// Deletes `key`.
    pub fn delete(&self, key: &str) -> Result<()> {
        self.central.store.delete(key)
    }

    /// Keys under `prefix`.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.central.store.list(prefix)
    }

    /// Where the store is.
    pub fn endpoint(&self) -> String {
        self.central.store.endpoint()
    }
}

impl Agent {
    pub(crate) fn central(&self) -> Result<Arc<Central>> {
        let mut slot = self.inner.central.lock();
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let cfg = &self.inner.config;
        let spec = StoreSpec {
            url: cfg.metadata_url.clone(),
            etcd_endpoints: cfg.etcd_endpoints.clone(),
            etcd_credentials: cfg.etcd_credentials.clone(),
            timeout: cfg.connect_timeout,
            token: cfg.auth_token.clone(),
        };
        let store = store::open(&spec)?.ok_or_else(|| {
            Error::not_supported(
                "no central metadata store is configured: set KVFERRY_METADATA_URL (kvferry meta-server) or KVFERRY_ETCD_ENDPOINTS, or exchange metadata peer to peer",
            )
        })?;
        let c = Arc::new(Central {
            store,
            ns: self.inner.config.metadata_namespace.clone(),
            ttl: self.inner.config.metadata_lease,
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
        });
        let (c2, weak) = (c.clone(), Arc::downgrade(&self.inner));
        std::thread::Builder::new()
            .name("kvferry-meta-keeper".into())
            .spawn(move || c2.keep(weak))
            .map_err(|e| Error::io("spawning the metadata keeper thread", e))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// The application keys of the central store.
    pub fn store(&self) -> Result<Store> {
        Ok(Store { central: self.central()? })
    }

    /// Publishes this agent's metadata: to the central store (under the
    /// agent's lease) or to a peer's listener.
    pub fn send_local_metadata(&self, to: MetaPeer) -> Result<()> {
        match to {
            MetaPeer::Store => {
                let c = self.central()?;
                c.publish(c.key(self.name(), None), self.local_metadata()?)
            }
            MetaPeer::Addr(addr) => self.p2p_send(addr, None),
        }
    }

    /// Publishes a labelled partial blob (see [`partial_metadata`](Self::partial_metadata)).
    pub fn send_partial_metadata(
        &self,
        descs: &RegDescList,
        include_conn_info: bool,
        label: &str,
        to: MetaPeer,
    ) -> Result<()> {
        if label.is_empty() || label.contains('/') {
            return Err(Error::invalid(format!(
                "partial metadata label '{label}' must be non-empty and contain no '/'"
            )));
        }
        let blob = self.partial_metadata(descs, include_conn_info, &[])?;
        match to {
            MetaPeer::Store => {
                let c = self.central()?;
                c.publish(c.key(self.name(), Some(label)), blob)
            }
            MetaPeer::Addr(addr) => self.p2p_send(addr, Some(blob)),
        }
    }

    /// Fetches `name`'s metadata (the labelled partial blob if `label` is
    /// given) and loads it. From the store it waits up to the agent's
    /// `metadata_timeout` for the entry (`NotFound` after that) and then
    /// watches the peer: when its metadata leaves the store, it is invalidated.
    pub fn fetch_remote_metadata(&self, name: &str, label: Option<&str>, from: MetaPeer) -> Result<()> {
        match from {
            MetaPeer::Store => {
                let c = self.central()?;
                let key = c.key(name, label);
                let timeout = self.inner.config.metadata_timeout;
                let blob = c.store.wait_for(&key, timeout)?.ok_or_else(|| {
                    Error::not_found(format!(
                        "agent '{name}' has published no {} in {} within {timeout:?} (key {key})",
                        label.map(|l| format!("partial metadata '{l}'")).unwrap_or_else(|| "metadata".into()),
                        c.store.endpoint()
                    ))
                })?;
                let loaded = self.load_remote_metadata(&blob)?;
                if loaded != name {
                    return Err(Error::malformed(format!("key {key} holds the metadata of '{loaded}', not '{name}'")));
                }
                let instance = self.peer(name)?.instance;
                c.state.lock().watched.insert(name.to_string(), instance);
                Ok(())
            }
            MetaPeer::Addr(addr) => match label {
                None => self.p2p_fetch(name, addr),
                Some(l) => Err(Error::invalid(format!(
                    "partial metadata labels ('{l}') live in the central store; a listener serves full metadata"
                ))),
            },
        }
    }

    /// Withdraws this agent's metadata: deletes all its keys from the store,
    /// or tells a peer's listener to drop this agent.
    pub fn invalidate_local_metadata(&self, to: MetaPeer) -> Result<()> {
        match to {
            MetaPeer::Store => {
                let c = self.central()?;
                let lease = {
                    let mut st = c.state.lock();
                    st.published.clear();
                    st.lease
                };
                let prefix = format!("{}{}/", c.ns, self.name());
                match lease {
                    // The metadata server lets only the lease holder delete its keys.
                    Some(l) => c.store.delete_leased_prefix(&prefix, l).map(drop),
                    None => c.store.delete_prefix(&prefix).map(drop),
                }
            }
            MetaPeer::Addr(addr) => self.p2p_invalidate(addr),
        }
    }
}
