//! The embedded metadata server: a small HTTP key-value store with leases,
//! long-poll waits and an event log, so agents on one machine or a small
//! group can find each other with no external service, and `curl` can
//! inspect it.
//!
//! | request | answer |
//! |---|---|
//! | `GET /v1/kv/{key}` | 200 and the value, or 404 |
//! | `GET /v1/kv/{key}?wait_ms=N` | waits up to N ms for the key to appear |
//! | `PUT /v1/kv/{key}[?lease=ID]` (body: value) | 200 `{"revision":R}`; 404 if the lease is gone |
//! | `DELETE /v1/kv/{key}` | 200 `{"deleted":n}` |
//! | `GET /v1/prefix/{prefix}` | 200 `{"revision":R,"keys":[{"key","len","lease"}]}` |
//! | `DELETE /v1/prefix/{prefix}` | 200 `{"deleted":n}` |
//! | `POST /v1/lease?ttl_ms=N` | 200 `{"id":ID,"ttl_ms":N}` |
//! | `POST /v1/lease/{id}/keepalive` | 200, or 404 once expired |
//! | `DELETE /v1/lease/{id}` | 200; deletes the lease's keys |
//! | `GET /v1/events?prefix=P&since=R&wait_ms=N` | 200 `{"revision","compacted","events":[{"rev","kind","key"}]}` |
//! | `GET /v1/health` | 200 `{"ok":true,"revision":R,"keys":n}` |
//!
//! Keys are percent-decoded URL paths and may contain `/`. Values are raw bytes.
//! A key written with a lease disappears when the lease is not renewed within
//! its TTL: a crashed agent's metadata goes away on its own.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde_json::json;

use crate::error::{Error, Result};

/// Largest value accepted, in bytes.
pub const MAX_VALUE: usize = 16 << 20;
/// Longest key accepted, in bytes.
pub const MAX_KEY: usize = 1024;
/// Longest long-poll accepted.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Events kept for watchers that fall behind.
const EVENT_LOG: usize = 16 * 1024;
/// Requests served at once; more get 503.
const MAX_INFLIGHT: usize = 512;

#[derive(Debug)]
struct Entry {
    value: Arc<Vec<u8>>,
    lease: Option<u64>,
}

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: HashSet<String>,
}

#[derive(Debug, Clone)]
struct Event {
    rev: u64,
    put: bool,
    key: String,
}

#[derive(Debug, Default)]
struct State {
    kv: BTreeMap<String, Entry>,
    leases: HashMap<u64, Lease>,
    rev: u64,
    events: VecDeque<Event>,
    next_lease: u64,
}

impl State {
    fn record(&mut self, put: bool, key: &str) {
        self.rev += 1;
        if self.events.len() == EVENT_LOG {
            self.events.pop_front();
        }
        self.events.push_back(Event { rev: self.rev, put, key: key.to_string() });
    }

    fn remove(&mut self, key: &str) -> bool {
        match self.kv.remove(key) {
            Some(e) => {
                if let Some(l) = e.lease.and_then(|id| self.leases.get_mut(&id)) {
                    l.keys.remove(key);
                }
                self.record(false, key);
                true
            }
            None => false,
        }
    }

    fn expire(&mut self, now: Instant) -> usize {
        let dead: Vec<u64> = self.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
        let mut n = 0;
        for id in dead {
            if let Some(l) = self.leases.remove(&id) {
                for k in l.keys {
                    if self.kv.get(&k).is_some_and(|e| e.lease == Some(id)) {
                        self.kv.remove(&k);
                        self.record(false, &k);
                        n += 1;
                    }
                }
            }
        }
        n
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    inflight: AtomicUsize,
}

/// A running embedded metadata server. Stops when dropped.
pub struct MetaServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Arc<tiny_http::Server>,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for MetaServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetaServer").field("addr", &self.addr).finish()
    }
}

impl MetaServer {
    /// Starts serving on `addr` (`"127.0.0.1:0"` picks a free port).
    pub fn start(addr: &str) -> Result<MetaServer> {
        let server = tiny_http::Server::http(addr).map_err(|e| {
            Error::new(crate::ErrorKind::Backend, format!("metadata server: cannot listen on {addr}: {e}"))
        })?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| Error::internal("metadata server: listening socket has no IP address"))?;
        let server = Arc::new(server);
        let shared = Arc::new(Shared::default());
        let mut threads = Vec::new();
        {
            let (server, shared) = (server.clone(), shared.clone());
            threads.push(spawn("kvferry-meta-accept", move || accept_loop(&server, &shared))?);
        }
        {
            let shared = shared.clone();
            threads.push(spawn("kvferry-meta-reaper", move || {
                while !shared.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                    let mut st = shared.state.lock();
                    if st.expire(Instant::now()) > 0 {
                        shared.changed.notify_all();
                    }
                }
            })?);
        }
        tracing::info!(%addr, "metadata server listening");
        Ok(MetaServer { addr, shared, server, threads })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ip:port`, the value for `KVFERRY_METADATA_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Number of keys stored now.
    pub fn len(&self) -> usize {
        self.shared.state.lock().kv.len()
    }

    /// Whether no key is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops serving and waits for its threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
        self.server.unblock();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for MetaServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Error::io("spawning a metadata server thread", e))
}

fn accept_loop(server: &tiny_http::Server, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::Relaxed) {
        let req = match server.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(_) => break,
        };
        if shared.inflight.fetch_add(1, Ordering::AcqRel) >= MAX_INFLIGHT {
            shared.inflight.fetch_sub(1, Ordering::AcqRel);
            let _ = req.respond(reply(503, json!({"error": "too many requests in flight; retry"})));
            continue;
        }
        let shared2 = shared.clone();
        let spawned = std::thread::Builder::new().name("kvferry-meta-req".into()).spawn(move || {
            handle(req, &shared2);
            shared2.inflight.fetch_sub(1, Ordering::AcqRel);
        });
        if spawned.is_err() {
            shared.inflight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

type Resp = tiny_http::Response<std::io::Cursor<Vec<u8>>>;

fn reply(code: u16, body: serde_json::Value) -> Resp {
    let ct =
        tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]).expect("static header is valid");
    tiny_http::Response::from_data(body.to_string().into_bytes()).with_status_code(code).with_header(ct)
}

fn bytes(value: &[u8]) -> Resp {
    let ct = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/octet-stream"[..])
        .expect("static header is valid");
    tiny_http::Response::from_data(value.to_vec()).with_status_code(200).with_header(ct)
}

fn bad(msg: impl Into<String>) -> Resp {
    reply(400, json!({"error": msg.into()}))
}

/// Percent-decodes a URL path segment; `None` on bad escapes or non-UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes a key for a URL path (keeps unreserved characters and `/`).
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~/".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

fn query(q: &str, name: &str) -> Option<String> {
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| percent_decode(v)).flatten()
    })
}

fn query_u64(q: &str, name: &str) -> std::result::Result<Option<u64>, Resp> {
    match query(q, name) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| bad(format!("query parameter {name}={v} is not a number"))),
    }
}

fn handle(mut req: tiny_http::Request, shared: &Shared) {
    let url = req.url().to_string();
    let (path, q) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let method = req.method().clone();
    let resp = match route(&method, path, q, &mut req, shared) {
        Ok(r) | Err(r) => r,
    };
    let _ = req.respond(resp);
}

fn key_of(rest: &str) -> std::result::Result<String, Resp> {
    let key = percent_decode(rest).ok_or_else(|| bad("the key is not valid percent-encoded UTF-8"))?;
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(bad(format!("keys must be 1 to {MAX_KEY} bytes long")));
    }
    Ok(key)
}

fn wait_of(q: &str) -> std::result::Result<Duration, Resp> {
    Ok(Duration::from_millis(query_u64(q, "wait_ms")?.unwrap_or(0)).min(MAX_WAIT))
}

fn route(
    method: &tiny_http::Method,
    path: &str,
    q: &str,
    req: &mut tiny_http::Request,
    shared: &Shared,
) -> std::result::Result<Resp, Resp> {
    use tiny_http::Method::{Delete, Get, Post, Put};
    if let Some(rest) = path.strip_prefix("/v1/kv/") {
        let key = key_of(rest)?;
        return Ok(match method {
            Get => {
                let deadline = Instant::now() + wait_of(q)?;
                let mut st = shared.state.lock();
                loop {
                    if let Some(e) = st.kv.get(&key) {
                        break bytes(&e.value);
                    }
                    if shared.stop.load(Ordering::Relaxed) || shared.changed.wait_until(&mut st, deadline).timed_out() {
                        match st.kv.get(&key) {
                            Some(e) => break bytes(&e.value),
                            None => break reply(404, json!({"error": format!("no key '{key}'")})),
                        }
                    }
                }
            }
            Put => {
                let lease = query_u64(q, "lease")?;
                let mut body = Vec::new();
                if req.as_reader().take(MAX_VALUE as u64 + 1).read_to_end(&mut body).is_err() {
                    return Err(bad("could not read the request body"));
                }
                if body.len() > MAX_VALUE {
                    return Err(reply(413, json!({"error": format!("values are limited to {MAX_VALUE} bytes")})));
                }
                let mut st = shared.state.lock();
                if let Some(id) = lease {
                    match st.leases.get_mut(&id) {
                        Some(l) => {
                            l.keys.insert(key.clone());
                        }
                        None => {
                            return Err(reply(404, json!({"error": format!("lease {id} does not exist (expired?)")})))
                        }
                    }
                }
                if let Some(old) = st.kv.insert(key.clone(), Entry { value: Arc::new(body), lease }) {
                    if let Some(l) = old.lease.filter(|o| Some(*o) != lease).and_then(|id| st.leases.get_mut(&id)) {
                        l.keys.remove(&key);
                    }
                }
                st.record(true, &key);
                let rev = st.rev;
                shared.changed.notify_all();
                reply(200, json!({"revision": rev}))
            }
            Delete => {
                let mut st = shared.state.lock();
                let n = usize::from(st.remove(&key));
                shared.changed.notify_all();
                reply(200, json!({"deleted": n}))
            }
            _ => reply(405, json!({"error": "use GET, PUT or DELETE on /v1/kv/{key}"})),
        });
    }
    if let Some(rest) = path.strip_prefix("/v1/prefix/") {
        let prefix = percent_decode(rest).ok_or_else(|| bad("the prefix is not valid percent-encoded UTF-8"))?;
        let mut st = shared.state.lock();
        let keys: Vec<String> =
            st.kv.range(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix)).map(|(k, _)| k.clone()).collect();
        return Ok(match method {
            Get => {
                let list: Vec<_> = keys
                    .iter()
                    .filter_map(|k| st.kv.get(k).map(|e| json!({"key": k, "len": e.value.len(), "lease": e.lease})))
                    .collect();
                reply(200, json!({"revision": st.rev, "keys": list}))
            }
            Delete => {
                let n = keys.iter().filter(|k| st.remove(k)).count();
                shared.changed.notify_all();
                reply(200, json!({"deleted": n}))
            }
            _ => reply(405, json!({"error": "use GET or DELETE on /v1/prefix/{prefix}"})),
        });
    }
    if path == "/v1/lease" && *method == Post {
        let ttl = Duration::from_millis(query_u64(q, "ttl_ms")?.ok_or_else(|| bad("POST /v1/lease needs ttl_ms"))?);
        if ttl.is_zero() || ttl > Duration::from_secs(3600) {
            return Err(bad("ttl_ms must be between 1 and 3600000"));
        }
        let mut st = shared.state.lock();
        st.next_lease += 1;
        let id = st.next_lease;
        st.leases.insert(id, Lease { ttl, deadline: Instant::now() + ttl, keys: HashSet::new() });
        return Ok(reply(200, json!({"id": id, "ttl_ms": ttl.as_millis() as u64})));
    }
    if let Some(rest) = path.strip_prefix("/v1/lease/") {
        let (id, action) = rest.split_once('/').unwrap_or((rest, ""));
        let id: u64 = id.parse().map_err(|_| bad(format!("'{id}' is not a lease id")))?;
        let mut st = shared.state.lock();
        return Ok(match (method, action) {
            (Post, "keepalive") => match st.leases.get_mut(&id) {
                Some(l) => {
                    l.deadline = Instant::now() + l.ttl;
                    reply(200, json!({"id": id, "ttl_ms": l.ttl.as_millis() as u64}))
                }
                None => reply(404, json!({"error": format!("lease {id} does not exist (expired?)")})),
            },
            (Delete, "") => {
                if let Some(l) = st.leases.get_mut(&id) {
                    l.deadline = Instant::now();
                }
                st.expire(Instant::now());
                shared.changed.notify_all();
                reply(200, json!({"revoked": id}))
            }
            _ => reply(405, json!({"error": "POST /v1/lease/{id}/keepalive or DELETE /v1/lease/{id}"})),
        });
    }
    if path == "/v1/events" && *method == Get {
        let prefix = query(q, "prefix").unwrap_or_default();
        let since = query_u64(q, "since")?.unwrap_or(0);
        let deadline = Instant::now() + wait_of(q)?;
        let mut st = shared.state.lock();
        loop {
            let compacted = st.events.front().is_some_and(|e| e.rev > since + 1) && since > 0;
            let events: Vec<_> = st
                .events
                .iter()
                .filter(|e| e.rev > since && e.key.starts_with(&prefix))
                .map(|e| json!({"rev": e.rev, "kind": if e.put { "put" } else { "delete" }, "key": e.key}))
                .collect();
            if !events.is_empty() || compacted || shared.stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                return Ok(reply(200, json!({"revision": st.rev, "compacted": compacted, "events": events})));
            }
            let _ = shared.changed.wait_until(&mut st, deadline);
        }
    }
    if path == "/v1/health" {
        let st = shared.state.lock();
        return Ok(reply(200, json!({"ok": true, "revision": st.rev, "keys": st.kv.len()})));
    }
    Err(reply(404, json!({"error": format!("no route {method} {path}; see the kvferry metadata server docs")})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_coding_round_trips() {
        let k = "/kvferry/agents/a b%c/metadata";
        assert_eq!(percent_decode(&percent_encode(k)).as_deref(), Some(k));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(query("a=1&wait_ms=20", "wait_ms").as_deref(), Some("20"));
    }
}
