//! The client of the embedded metadata server (see [`crate::metadata::server`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;

use super::{MetaStore, WatchBatch};
use crate::auth::AuthToken;
use crate::error::{Error, ErrorKind, Result};
use crate::metadata::http_common::{percent_encode, MAX_VALUE};

/// A client of a kvferry metadata server at `http://host:port`.
///
/// It sends the bearer token given to [`with_token`](Self::with_token) on
/// every call. The server's lease ids are 128-bit capabilities; the
/// [`MetaStore`] handles this client returns stand for them and never leave
/// the process.
pub struct HttpStore {
    base: String,
    agent: ureq::Agent,
    timeout: Duration,
    /// `Bearer <token>`, when a token is set.
    bearer: Option<String>,
    /// Lease handle → the server's lease id.
    leases: Mutex<HashMap<u64, String>>,
    next_lease: AtomicU64,
}

impl std::fmt::Debug for HttpStore {
    /// Leaves the token and the lease ids out: they are secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpStore")
            .field("base", &self.base)
            .field("timeout", &self.timeout)
            .field("token", &self.bearer.as_ref().map(|_| "<redacted>"))
            .field("leases", &self.leases.lock().len())
            .finish()
    }
}

impl HttpStore {
    /// A client for `url` (`http://host:port`); every call is bounded by
    /// `timeout` (plus the wait of long-polls).
    pub fn new(url: &str, timeout: Duration) -> Result<Self> {
        let base = url.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            return Err(Error::invalid(format!("metadata URL '{url}' must look like http://host:port")));
        }
        let agent =
            ureq::Agent::config_builder().http_status_as_error(false).timeout_connect(Some(timeout)).build().into();
        Ok(HttpStore {
            base,
            agent,
            timeout,
            bearer: None,
            leases: Mutex::new(HashMap::new()),
            next_lease: AtomicU64::new(1),
        })
    }

    /// Sends `token` as `Authorization: Bearer <token>` on every call (the
    /// server's `--token` / `KVFERRY_AUTH_TOKEN`).
    pub fn with_token(mut self, token: Option<AuthToken>) -> Self {
        self.bearer = token.map(|t| format!("Bearer {}", String::from_utf8_lossy(t.as_bytes())));
        self
    }

    /// The server's id for lease handle `lease`.
    fn lease_id(&self, lease: u64) -> Result<String> {
        self.leases.lock().get(&lease).cloned().ok_or_else(|| {
            Error::not_found(format!("metadata server {}: lease {lease} is not one this client holds", self.base))
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn fail(&self, what: &str, e: ureq::Error) -> Error {
        let kind = match e {
            ureq::Error::Timeout(_) => ErrorKind::Timeout,
            _ => ErrorKind::RemoteDisconnect,
        };
        Error::new(kind, format!("metadata server {}: {what}: {e}; is `kvferry meta-server` running there?", self.base))
    }

    fn prep<B>(&self, r: ureq::RequestBuilder<B>, total: Option<Duration>) -> ureq::RequestBuilder<B> {
        let r = r.header("connection", "close");
        let r = match &self.bearer {
            Some(b) => r.header("authorization", b),
            None => r,
        };
        r.config().timeout_global(total).build()
    }

    fn call(&self, method: &str, path: &str, body: Option<&[u8]>, wait: Duration) -> Result<(u16, Vec<u8>)> {
        let url = self.url(path);
        // One connection per call: on a reused connection the server's
        // header and body writes meet Nagle and the client's delayed ACK
        // (40 ms a request); a fresh connection is in quick-ACK mode and costs
        // about 100 µs on loopback.
        let total = Some(self.timeout + wait);
        let resp = match (method, body) {
            ("GET", _) => self.prep(self.agent.get(&url), total).call(),
            ("DELETE", _) => self.prep(self.agent.delete(&url), total).call(),
            ("PUT", Some(b)) => self.prep(self.agent.put(&url), total).send(b),
            ("POST", _) => self.prep(self.agent.post(&url), total).send_empty(),
            _ => return Err(Error::internal(format!("HttpStore: unsupported call {method}"))),
        };
        let mut resp = resp.map_err(|e| self.fail(&format!("{method} {path}"), e))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_VALUE as u64 + 1024)
            .read_to_vec()
            .map_err(|e| self.fail(&format!("reading the answer to {method} {path}"), e))?;
        Ok((status, bytes))
    }

    fn json(&self, what: &str, status: u16, bytes: &[u8]) -> Result<Value> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::malformed(format!("metadata server {}: {what}: answer is not JSON: {e}", self.base)))?;
        if status != 200 {
            let msg = v.get("error").and_then(Value::as_str).unwrap_or("no details");
            let (kind, hint) = match status {
                401 => {
                    (ErrorKind::NotAllowed, "; set KVFERRY_AUTH_TOKEN (AgentConfig::auth_token) to the server's token")
                }
                403 => (ErrorKind::NotAllowed, ""),
                _ => (ErrorKind::Backend, ""),
            };
            return Err(Error::new(kind, format!("metadata server {}: {what}: HTTP {status}: {msg}{hint}", self.base)));
        }
        Ok(v)
    }

    fn kv(key: &str) -> String {
        format!("/v1/kv/{}", percent_encode(key))
    }
}

impl MetaStore for HttpStore {
    fn endpoint(&self) -> String {
        self.base.clone()
    }

    fn put(&self, key: &str, value: &[u8], lease: Option<u64>) -> Result<()> {
        let path = match lease {
            Some(l) => format!("{}?lease={}", Self::kv(key), self.lease_id(l)?),
            None => Self::kv(key),
        };
        let (st, b) = self.call("PUT", &path, Some(value), Duration::ZERO)?;
        if st == 404 && lease.is_some() {
            self.leases.lock().remove(&lease.unwrap_or(0));
            return Err(Error::not_found(format!(
                "metadata server {}: lease {} is gone (expired, or the server restarted)",
                self.base,
                lease.unwrap_or(0)
            )));
        }
        self.json(&format!("put {key}"), st, &b).map(drop)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.wait_for(key, Duration::ZERO)
    }

    fn wait_for(&self, key: &str, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let path = format!("{}?wait_ms={}", Self::kv(key), timeout.as_millis());
        let (st, b) = self.call("GET", &path, None, timeout)?;
        match st {
            200 => Ok(Some(b)),
            404 => Ok(None),
            _ => self.json(&format!("get {key}"), st, &b).map(|_| None),
        }
    }

    fn delete(&self, key: &str) -> Result<()> {
        let (st, b) = self.call("DELETE", &Self::kv(key), None, Duration::ZERO)?;
        self.json(&format!("delete {key}"), st, &b).map(drop)
    }

    fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        let (st, b) = self.call("DELETE", &format!("/v1/prefix/{}", percent_encode(prefix)), None, Duration::ZERO)?;
        Ok(self.json(&format!("delete prefix {prefix}"), st, &b)?.get("deleted").and_then(Value::as_u64).unwrap_or(0)
            as usize)
    }

    fn delete_leased_prefix(&self, prefix: &str, lease: u64) -> Result<usize> {
        let path = format!("/v1/prefix/{}?lease={}", percent_encode(prefix), self.lease_id(lease)?);
        let (st, b) = self.call("DELETE", &path, None, Duration::ZERO)?;
        Ok(self.json(&format!("delete prefix {prefix}"), st, &b)?.get("deleted").and_then(Value::as_u64).unwrap_or(0)
            as usize)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let (st, b) = self.call("GET", &format!("/v1/prefix/{}", percent_encode(prefix)), None, Duration::ZERO)?;
        let v = self.json(&format!("list {prefix}"), st, &b)?;
        Ok(v.get("keys")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|k| k.get("key").and_then(Value::as_str).map(String::from)).collect())
            .unwrap_or_default())
    }

    fn grant_lease(&self, ttl: Duration) -> Result<u64> {
        let (st, b) =
            self.call("POST", &format!("/v1/lease?ttl_ms={}", ttl.as_millis().max(1)), None, Duration::ZERO)?;
        let id = self
            .json("grant lease", st, &b)?
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| id.len() == 32 && id.bytes().all(|c| c.is_ascii_hexdigit()))
            .map(String::from)
            .ok_or_else(|| {
                Error::malformed(format!(
                    "metadata server {}: lease answer has no 32-hex-digit id (an older kvferry meta-server?)",
                    self.base
                ))
            })?;
        let handle = self.next_lease.fetch_add(1, Ordering::Relaxed);
        self.leases.lock().insert(handle, id);
        Ok(handle)
    }

    fn keep_alive(&self, lease: u64) -> Result<bool> {
        let Ok(id) = self.lease_id(lease) else { return Ok(false) };
        let (st, b) = self.call("POST", &format!("/v1/lease/{id}/keepalive"), None, Duration::ZERO)?;
        match st {
            404 => {
                self.leases.lock().remove(&lease);
                Ok(false)
            }
            _ => self.json("keep lease alive", st, &b).map(|_| true),
        }
    }

    fn revoke(&self, lease: u64) -> Result<()> {
        let Some(id) = self.leases.lock().remove(&lease) else { return Ok(()) };
        let (st, b) = self.call("DELETE", &format!("/v1/lease/{id}"), None, Duration::ZERO)?;
        match st {
            404 => Ok(()), // already gone: what revoking wanted
            _ => self.json("revoke lease", st, &b).map(drop),
        }
    }

    fn revision(&self) -> Result<u64> {
        let (st, b) = self.call("GET", "/v1/health", None, Duration::ZERO)?;
        Ok(self.json("health", st, &b)?.get("revision").and_then(Value::as_u64).unwrap_or(0))
    }

    fn watch(&self, prefix: &str, since: u64, timeout: Duration) -> Result<WatchBatch> {
        let path =
            format!("/v1/events?prefix={}&since={since}&wait_ms={}", percent_encode(prefix), timeout.as_millis());
        let (st, b) = self.call("GET", &path, None, timeout)?;
        let v = self.json("watch", st, &b)?;
        let mut w = WatchBatch {
            revision: v.get("revision").and_then(Value::as_u64).unwrap_or(since),
            compacted: v.get("compacted").and_then(Value::as_bool).unwrap_or(false),
            ..WatchBatch::default()
        };
        for e in v.get("events").and_then(Value::as_array).into_iter().flatten() {
            let key = e.get("key").and_then(Value::as_str).unwrap_or_default().to_string();
            match e.get("kind").and_then(Value::as_str) {
                Some("put") => w.put.push(key),
                Some("delete") => w.deleted.push(key),
                _ => return Err(Error::malformed(format!("metadata server {}: unknown event {e}", self.base))),
            }
        }
        // A restarted server counts from 0 again: everything since is news.
        if w.revision < since {
            w.compacted = true;
        }
        Ok(w)
    }
}
