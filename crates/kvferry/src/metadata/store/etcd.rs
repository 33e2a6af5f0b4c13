//! The etcd store: the existing distributed store for clusters. etcd-client is
//! asynchronous; this wrapper owns a one-worker tokio runtime and bounds every
//! call, so the rest of kvferry stays synchronous (control plane only).

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions, WatchOptions};

use super::{MetaStore, WatchBatch};
use crate::error::{Error, ErrorKind, Result};

/// A client of an etcd cluster.
pub struct EtcdStore {
    endpoints: Vec<String>,
    client: Client,
    rt: tokio::runtime::Runtime,
    timeout: Duration,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("endpoints", &self.endpoints).finish()
    }
}

impl EtcdStore {
    /// Connects to `endpoints` (`http://host:2379`, ...), each call bounded by `timeout`.
    pub fn connect(endpoints: &[String], timeout: Duration) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kvferry-etcd")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the etcd client runtime", e))?;
        let opts = ConnectOptions::new().with_connect_timeout(timeout).with_timeout(timeout);
        let eps = endpoints.to_vec();
        let client = rt
            .block_on(async { tokio::time::timeout(timeout * 2, Client::connect(eps, Some(opts))).await })
            .map_err(|_| Self::unreachable(endpoints, "connect", "timed out"))?
            .map_err(|e| Self::unreachable(endpoints, "connect", &e.to_string()))?;
        Ok(EtcdStore { endpoints: endpoints.to_vec(), client, rt, timeout })
    }

    fn unreachable(eps: &[String], what: &str, why: &str) -> Error {
        Error::new(
            ErrorKind::RemoteDisconnect,
            format!(
                "etcd {}: {what}: {why}; check that etcd runs there and KVFERRY_ETCD_ENDPOINTS is right",
                eps.join(",")
            ),
        )
    }

    fn run<T>(
        &self,
        what: &str,
        extra: Duration,
        f: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        self.rt
            .block_on(async { tokio::time::timeout(self.timeout + extra, f).await })
            .map_err(|_| {
                Error::timeout(format!(
                    "etcd {}: {what} took longer than {:?}",
                    self.endpoints.join(","),
                    self.timeout + extra
                ))
            })?
            .map_err(|e| Self::unreachable(&self.endpoints, what, &e.to_string()))
    }
}

impl MetaStore for EtcdStore {
    fn endpoint(&self) -> String {
        self.endpoints.join(",")
    }

    fn put(&self, key: &str, value: &[u8], lease: Option<u64>) -> Result<()> {
        let mut c = self.client.clone();
        let opts = lease.map(|l| PutOptions::new().with_lease(l as i64));
        let r = self.run(&format!("put {key}"), Duration::ZERO, c.put(key, value.to_vec(), opts));
        match r {
            Err(e) if lease.is_some() && e.message().contains("lease not found") => Err(Error::not_found(format!(
                "etcd {}: lease {} is gone (expired)",
                self.endpoint(),
                lease.unwrap_or(0)
            ))),
            r => r.map(drop),
        }
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let mut c = self.client.clone();
        let r = self.run(&format!("get {key}"), Duration::ZERO, c.get(key, None))?;
        Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
    }

    fn wait_for(&self, key: &str, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let mut c = self.client.clone();
        let r = self.run(&format!("get {key}"), Duration::ZERO, c.get(key, None))?;
        if let Some(kv) = r.kvs().first() {
            return Ok(Some(kv.value().to_vec()));
        }
        if timeout.is_zero() {
            return Ok(None);
        }
        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
        let mut c = self.client.clone();
        let key_owned = key.to_string();
        let fut = async move {
            let (mut w, mut stream) =
                c.watch(key_owned, Some(WatchOptions::new().with_start_revision(rev + 1))).await?;
            let found = loop {
                match tokio::time::timeout(timeout, stream.message()).await {
                    Err(_) => break None,
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok(None)) => break None,
                    Ok(Ok(Some(resp))) => {
                        if let Some(v) = resp
                            .events()
                            .iter()
                            .find(|e| e.event_type() == EventType::Put)
                            .and_then(|e| e.kv())
                            .map(|kv| kv.value().to_vec())
                        {
                            break Some(v);
                        }
                    }
                }
            };
            let _ = w.cancel().await;
            Ok(found)
        };
        self.run(&format!("wait for {key}"), timeout, fut)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let mut c = self.client.clone();
        self.run(&format!("delete {key}"), Duration::ZERO, c.delete(key, None)).map(drop)
    }

    fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        let mut c = self.client.clone();
        let r = self.run(
            &format!("delete prefix {prefix}"),
            Duration::ZERO,
            c.delete(prefix, Some(DeleteOptions::new().with_prefix())),
        )?;
        Ok(r.deleted() as usize)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let mut c = self.client.clone();
        let r = self.run(
            &format!("list {prefix}"),
            Duration::ZERO,
            c.get(prefix, Some(GetOptions::new().with_prefix().with_keys_only())),
        )?;
        let mut keys: Vec<String> = r.kvs().iter().filter_map(|kv| kv.key_str().ok().map(String::from)).collect();
        keys.sort();
        Ok(keys)
    }

    fn grant_lease(&self, ttl: Duration) -> Result<u64> {
        let mut c = self.client.clone();
        let secs = ttl.as_secs().max(1) as i64 + i64::from(ttl.subsec_nanos() > 0);
        Ok(self.run("grant lease", Duration::ZERO, c.lease_grant(secs, None))?.id() as u64)
    }

    fn keep_alive(&self, lease: u64) -> Result<bool> {
        let mut c = self.client.clone();
        let fut = async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease as i64).await?;
            keeper.keep_alive().await?;
            Ok(stream.message().await?.map(|r| r.ttl() > 0).unwrap_or(false))
        };
        match self.run("keep lease alive", Duration::ZERO, fut) {
            // A restarted etcd answers an unknown lease with an error, not a
            // zero TTL: the lease is gone all the same, so the caller re-publishes.
            Err(e) if e.message().contains("lease not found") => Ok(false),
            r => r,
        }
    }

    fn revoke(&self, lease: u64) -> Result<()> {
        let mut c = self.client.clone();
        match self.run("revoke lease", Duration::ZERO, c.lease_revoke(lease as i64)) {
            Err(e) if e.message().contains("lease not found") => Ok(()),
            r => r.map(drop),
        }
    }

    fn revision(&self) -> Result<u64> {
        let mut c = self.client.clone();
        let r = self.run("status", Duration::ZERO, c.get("\0", None))?;
        Ok(r.header().map(|h| h.revision() as u64).unwrap_or(0))
    }

    fn watch(&self, prefix: &str, since: u64, timeout: Duration) -> Result<WatchBatch> {
        let mut c = self.client.clone();
        let prefix = prefix.to_string();
        let fut = async move {
            let opts = WatchOptions::new().with_prefix().with_start_revision(since as i64 + 1);
            let (mut w, mut stream) = c.watch(prefix, Some(opts)).await?;
            let mut batch = WatchBatch { revision: since, ..WatchBatch::default() };
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match tokio::time::timeout_at(deadline, stream.message()).await {
                    Err(_) | Ok(Ok(None)) => break,
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok(Some(resp))) => {
                        if resp.compact_revision() > 0 {
                            batch.compacted = true;
                        }
                        if let Some(h) = resp.header() {
                            batch.revision = batch.revision.max(h.revision() as u64);
                        }
                        for e in resp.events() {
                            let Some(kv) = e.kv() else { continue };
                            batch.revision = batch.revision.max(kv.mod_revision() as u64);
                            let key = kv.key_str().unwrap_or_default().to_string();
                            match e.event_type() {
                                EventType::Put => batch.put.push(key),
                                EventType::Delete => batch.deleted.push(key),
                            }
                        }
                        if !batch.put.is_empty() || !batch.deleted.is_empty() || batch.compacted {
                            break;
                        }
                    }
                }
            }
            let _ = w.cancel().await;
            Ok(batch)
        };
        self.run("watch", timeout, fut)
    }
}
