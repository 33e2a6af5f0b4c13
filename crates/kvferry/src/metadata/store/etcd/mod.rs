//! The etcd store: the existing distributed store for clusters, in every
//! build.
//!
//! kvferry speaks etcd's own JSON API, the gRPC gateway that etcd v3.4 and
//! later serve at `/v3/` on their client port (`/v3/kv/range`,
//! `/v3/kv/put`, `/v3/lease/grant`, `/v3/watch`, ...), over plain HTTP/1.1
//! with the same blocking `ureq` client as the metadata server's
//! ([`HttpStore`](super::HttpStore)). That needs no `protoc` at build time,
//! no gRPC stack and no async runtime, and it is etcd's documented API, so
//! every build of kvferry includes etcd (no cargo feature). The
//! mapping to JSON lives in `gateway` (no I/O, unit-tested); this module is
//! the driver: endpoints, time bounds, authentication, streams.
//!
//! * Every call is bounded by the store's timeout (plus the wait of
//!   [`wait_for`](MetaStore::wait_for) and [`watch`](MetaStore::watch)).
//! * Endpoints are tried in order, starting at the one that answered last;
//!   an endpoint that cannot be reached, or that says it has no leader,
//!   hands the call to the next within the same time bound.
//! * With [`EtcdCredentials`] (`KVFERRY_ETCD_USER`, `KVFERRY_ETCD_PASSWORD`)
//!   the client takes a token from `/v3/auth/authenticate` and takes a new
//!   one when etcd says it expired.
//! * `http://` endpoints only (`host:port` means `http://host:port`): TLS
//!   client URLs are refused with an error that says so.
//! * A watch is one streaming POST; etcd answers it with one JSON object a
//!   line. Closing the connection ends the watch.

mod gateway;

use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;

use self::gateway::{EventKind, Problem};
use super::{MetaStore, WatchBatch};
use crate::error::{Error, ErrorKind, Result};

/// The largest answer, or watch message, the client reads: a value of the
/// metadata plane's largest size in base64 (about 21 MiB) with room to
/// spare. A larger one is refused as malformed rather than held in memory.
const MAX_ANSWER: u64 = 64 << 20;

/// An etcd user and password (etcd with authentication enabled). `Debug`
/// leaves the password out.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdCredentials {
    user: String,
    password: String,
}

impl EtcdCredentials {
    /// `user` with `password`.
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Self {
        EtcdCredentials { user: user.into(), password: password.into() }
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }
}

impl std::fmt::Debug for EtcdCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCredentials").field("user", &self.user).field("password", &"<redacted>").finish()
    }
}

/// A client of an etcd cluster (v3.4 or later), through its JSON gateway.
pub struct EtcdStore {
    /// `http://host:port` each, as configured.
    endpoints: Vec<String>,
    agent: ureq::Agent,
    timeout: Duration,
    /// The endpoint that answered last: the next call starts there.
    preferred: AtomicUsize,
    credentials: Option<EtcdCredentials>,
    /// The token of the last `/v3/auth/authenticate` (a secret).
    token: Mutex<Option<String>>,
}

impl std::fmt::Debug for EtcdStore {
    /// Leaves the credentials and the token out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("timeout", &self.timeout)
            .field("user", &self.credentials.as_ref().map(EtcdCredentials::user))
            .finish()
    }
}

/// Why a call got no usable answer (made into an [`Error`] by [`EtcdStore::error`]).
#[derive(Debug)]
enum Failure {
    /// No endpoint answered: why, endpoint by endpoint.
    Unreachable {
        /// `endpoint: reason`, in the order tried.
        why: Vec<String>,
        /// Every endpoint tried ran out of time.
        timed_out: bool,
    },
    /// `endpoint` answered, but not with what was asked for.
    Answer {
        /// Who answered.
        endpoint: String,
        /// What was wrong.
        problem: Problem,
    },
}

impl Failure {
    fn problem(&self) -> Option<&Problem> {
        match self {
            Failure::Answer { problem, .. } => Some(problem),
            Failure::Unreachable { .. } => None,
        }
    }
}

/// Why reading one endpoint's answer failed.
#[derive(Debug)]
enum ReadError {
    /// The connection failed: try the next endpoint.
    Transport(ureq::Error),
    /// The answer was wrong.
    Answer(Problem),
}

impl From<Problem> for ReadError {
    fn from(p: Problem) -> Self {
        ReadError::Answer(p)
    }
}

impl From<ureq::Error> for ReadError {
    fn from(e: ureq::Error) -> Self {
        match e {
            ureq::Error::BodyExceedsLimit(limit) => {
                ReadError::Answer(Problem::Malformed(format!("the answer is larger than {limit} bytes")))
            }
            e => ReadError::Transport(e),
        }
    }
}

/// How reading a streaming answer ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StreamEnd {
    /// The caller had what it wanted.
    Enough,
    /// etcd closed the stream.
    Closed,
    /// The time for the answer was up.
    TimeUp,
}

fn is_timeout(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Timeout(_) => true,
        ureq::Error::Io(io) => matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock),
        _ => false,
    }
}

/// The answer of a unary call: all of it, parsed.
fn read_unary(mut resp: ureq::http::Response<ureq::Body>) -> std::result::Result<Value, ReadError> {
    let status = resp.status().as_u16();
    let bytes = resp.body_mut().with_config().limit(MAX_ANSWER).read_to_vec()?;
    Ok(gateway::answer(status, &bytes)?)
}

/// Reads a streaming answer (one JSON object a line), handing each
/// message's `result` to `on` until `on` says it has enough (`true`), etcd
/// closes the stream, or the answer's time is up.
fn read_stream(
    resp: ureq::http::Response<ureq::Body>,
    on: &mut dyn FnMut(Value) -> std::result::Result<bool, Problem>,
) -> std::result::Result<StreamEnd, ReadError> {
    let status = resp.status().as_u16();
    let mut reader = BufReader::new(resp.into_body().into_reader());
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_ANSWER + 1).read_until(b'\n', &mut line) {
            Ok(0) => return Ok(StreamEnd::Closed),
            Ok(_) if line.len() as u64 > MAX_ANSWER => {
                return Err(Problem::Malformed(format!("a stream message is larger than {MAX_ANSWER} bytes")).into())
            }
            Ok(_) if line.iter().all(u8::is_ascii_whitespace) => {}
            Ok(_) => {
                if on(gateway::answer(status, &line)?)? {
                    return Ok(StreamEnd::Enough);
                }
            }
            Err(e) => {
                let e = ureq::Error::from(e);
                return if is_timeout(&e) { Ok(StreamEnd::TimeUp) } else { Err(e.into()) };
            }
        }
    }
}

fn revision_u64(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

impl EtcdStore {
    /// A client of etcd at `endpoints` (`http://host:2379`, ...; `host:port`
    /// means `http://host:port`), each call bounded by `timeout`. Nothing is
    /// sent yet: an unreachable etcd is reported by the first call.
    pub fn connect(endpoints: &[String], timeout: Duration) -> Result<Self> {
        let mut eps = Vec::new();
        for ep in endpoints.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let host_port = if let Some(rest) = ep.strip_prefix("http://") {
                rest
            } else if ep.starts_with("https://") {
                return Err(Error::not_supported(format!(
                    "etcd endpoint '{ep}': kvferry's etcd client speaks http:// only; use an http:// client URL of etcd (or a local TLS proxy)"
                )));
            } else if ep.contains("://") {
                return Err(Error::invalid(format!("etcd endpoint '{ep}' must look like http://host:2379")));
            } else {
                ep
            };
            let host_port = host_port.trim_end_matches('/');
            if host_port.is_empty() || host_port.contains(['/', '?', '#', '@', ' ']) {
                return Err(Error::invalid(format!("etcd endpoint '{ep}' must look like http://host:2379")));
            }
            eps.push(format!("http://{host_port}"));
        }
        if eps.is_empty() {
            return Err(Error::invalid("no etcd endpoints given: set KVFERRY_ETCD_ENDPOINTS=http://host:2379"));
        }
        let agent =
            ureq::Agent::config_builder().http_status_as_error(false).timeout_connect(Some(timeout)).build().into();
        Ok(EtcdStore {
            endpoints: eps,
            agent,
            timeout,
            preferred: AtomicUsize::new(0),
            credentials: None,
            token: Mutex::new(None),
        })
    }

    /// Authenticates as `credentials` (etcd with authentication enabled);
    /// `None` sends no token.
    pub fn with_credentials(mut self, credentials: Option<EtcdCredentials>) -> Self {
        self.credentials = credentials;
        self
    }

    /// The error for `what`, which failed for `f`.
    fn error(&self, what: &str, f: Failure) -> Error {
        let eps = self.endpoints.join(",");
        match f {
            Failure::Unreachable { why, timed_out } => Error::new(
                if timed_out { ErrorKind::Timeout } else { ErrorKind::RemoteDisconnect },
                format!(
                    "etcd {eps}: {what}: {}; check that etcd runs there and KVFERRY_ETCD_ENDPOINTS is right",
                    why.join("; ")
                ),
            ),
            Failure::Answer { endpoint, problem } => match &problem {
                Problem::Malformed(m) => Error::malformed(format!(
                    "etcd {endpoint}: {what}: the answer is not etcd's JSON API ({m}); is {endpoint} the client URL of etcd v3.4 or later?"
                )),
                Problem::Etcd { code, message } => {
                    let (kind, hint) = if problem.is_auth_token()
                        || *code == gateway::UNAUTHENTICATED
                        || *code == gateway::PERMISSION_DENIED
                        || message.contains("authentication failed")
                    {
                        let hint = match &self.credentials {
                            None => "; etcd wants a user: set KVFERRY_ETCD_USER and KVFERRY_ETCD_PASSWORD",
                            Some(_) => "; check KVFERRY_ETCD_USER and KVFERRY_ETCD_PASSWORD, and that the user's role may use these keys",
                        };
                        (ErrorKind::NotAllowed, hint)
                    } else if problem.try_another() {
                        (ErrorKind::RemoteDisconnect, "; check the cluster's health (etcdctl endpoint health)")
                    } else {
                        (ErrorKind::Backend, "")
                    };
                    Error::new(kind, format!("etcd {endpoint}: {what}: etcd refused it: {message} (code {code}){hint}"))
                }
            },
        }
    }

    /// POSTs `body` to `path` on one endpoint.
    fn post(
        &self,
        endpoint: &str,
        path: &str,
        body: &[u8],
        left: Duration,
        connect: Duration,
        body_wait: Option<Duration>,
    ) -> std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let r = self.agent.post(format!("{endpoint}{path}")).header("content-type", "application/json");
        let token = self.token.lock().clone();
        let r = match token {
            Some(t) => r.header("authorization", t),
            None => r,
        };
        r.config()
            .timeout_global(Some(left))
            .timeout_connect(Some(connect))
            .timeout_recv_body(body_wait)
            .build()
            .send(body)
    }

    /// Sends `body` to `path`, trying the endpoints in turn, and hands the
    /// first answer to `read`. The whole call is bounded by the timeout plus
    /// `wait`; `stream` bounds reading the answer by `wait` alone once it
    /// has begun (a watch that sees no change ends then).
    fn exchange<T>(
        &self,
        path: &str,
        body: &Value,
        wait: Duration,
        stream: bool,
        read: &mut dyn FnMut(ureq::http::Response<ureq::Body>) -> std::result::Result<T, ReadError>,
    ) -> std::result::Result<T, Failure> {
        let bytes = body.to_string().into_bytes();
        let deadline = Instant::now() + self.timeout + wait;
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let (mut why, mut timed_out) = (Vec::new(), true);
        for i in 0..n {
            let idx = (first + i) % n;
            let ep = &self.endpoints[idx];
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                why.push(format!("{ep}: not tried, the time was up"));
                break;
            }
            // Leave the endpoints after this one some time to connect.
            let connect = (left / u32::try_from(n - i).unwrap_or(u32::MAX)).min(self.timeout);
            let body_wait = stream.then_some(wait);
            let fail = match self.post(ep, path, &bytes, left, connect, body_wait).map_err(ReadError::from) {
                Ok(resp) => match read(resp) {
                    Ok(t) => {
                        self.preferred.store(idx, Ordering::Relaxed);
                        return Ok(t);
                    }
                    Err(e) => e,
                },
                Err(e) => e,
            };
            match fail {
                ReadError::Transport(e) => {
                    timed_out &= is_timeout(&e);
                    let reason = match is_timeout(&e) {
                        true => format!("no answer within {:?}", self.timeout + wait),
                        false => e.to_string(),
                    };
                    why.push(if n > 1 { format!("{ep}: {reason}") } else { reason });
                }
                ReadError::Answer(p) if p.try_another() && i + 1 < n => {
                    timed_out = false;
                    why.push(format!("{ep}: {p}"));
                }
                ReadError::Answer(problem) => return Err(Failure::Answer { endpoint: ep.clone(), problem }),
            }
        }
        Err(Failure::Unreachable { why, timed_out })
    }

    /// [`exchange`](Self::exchange) with the token etcd wants: taken before
    /// the first call and again when etcd says it expired.
    fn authed<T>(
        &self,
        path: &str,
        body: &Value,
        wait: Duration,
        stream: bool,
        read: &mut dyn FnMut(ureq::http::Response<ureq::Body>) -> std::result::Result<T, ReadError>,
    ) -> std::result::Result<T, Failure> {
        let Some(creds) = &self.credentials else { return self.exchange(path, body, wait, stream, read) };
        if self.token.lock().is_none() {
            self.authenticate(creds)?;
        }
        match self.exchange(path, body, wait, stream, read) {
            Err(f) if f.problem().is_some_and(Problem::is_auth_token) => {
                self.authenticate(creds)?;
                self.exchange(path, body, wait, stream, read)
            }
            r => r,
        }
    }

    fn authenticate(&self, creds: &EtcdCredentials) -> std::result::Result<(), Failure> {
        *self.token.lock() = None;
        let body = gateway::authenticate(&creds.user, &creds.password);
        let token = self.exchange("/v3/auth/authenticate", &body, Duration::ZERO, false, &mut |resp| {
            Ok(gateway::parse_token(&read_unary(resp)?)?)
        })?;
        *self.token.lock() = Some(token);
        Ok(())
    }

    /// A unary call: `body` to `path`, the answer's object back.
    fn unary(&self, path: &str, body: &Value) -> std::result::Result<Value, Failure> {
        self.authed(path, body, Duration::ZERO, false, &mut read_unary)
    }

    /// [`unary`](Self::unary), its answer parsed by `parse`, failures made errors about `what`.
    fn call<T>(
        &self,
        what: &str,
        path: &str,
        body: &Value,
        parse: impl Fn(&Value) -> std::result::Result<T, Problem>,
    ) -> Result<T> {
        let mut read = |resp| Ok(parse(&read_unary(resp)?)?);
        self.authed(path, body, Duration::ZERO, false, &mut read).map_err(|f| self.error(what, f))
    }

    fn range(&self, what: &str, key: &str, prefix: bool, keys_only: bool) -> Result<gateway::RangeAnswer> {
        self.call(what, "/v3/kv/range", &gateway::range(key, prefix, keys_only), gateway::parse_range)
    }

    fn lease_id(&self, lease: u64) -> Result<i64> {
        i64::try_from(lease).map_err(|_| {
            Error::not_found(format!("etcd {}: lease {lease} is not one etcd grants", self.endpoints.join(",")))
        })
    }

    /// Watches `key` (a prefix with `prefix`) from revision `start` for up
    /// to `wait`, handing each message to `on` until it has enough.
    fn watch_stream(
        &self,
        what: &str,
        key: &str,
        prefix: bool,
        start: i64,
        wait: Duration,
        on: &mut dyn FnMut(gateway::WatchMessage) -> std::result::Result<bool, Problem>,
    ) -> Result<StreamEnd> {
        let body = gateway::watch_create(key, prefix, start);
        let mut read = |resp| read_stream(resp, &mut |v| on(gateway::parse_watch(&v)?));
        self.authed("/v3/watch", &body, wait, true, &mut read).map_err(|f| self.error(what, f))
    }
}

/// A watch etcd ended without compaction: refused (permissions, an expired
/// token).
fn canceled(m: &gateway::WatchMessage) -> Problem {
    Problem::Etcd { code: 0, message: format!("the watch was canceled: {}", m.cancel_reason) }
}

impl MetaStore for EtcdStore {
    fn endpoint(&self) -> String {
        self.endpoints.join(",")
    }

    fn put(&self, key: &str, value: &[u8], lease: Option<u64>) -> Result<()> {
        let id = lease.map(|l| self.lease_id(l)).transpose()?;
        let body = gateway::put(key, value, id);
        match self.unary("/v3/kv/put", &body) {
            Err(f) if lease.is_some() && f.problem().is_some_and(Problem::is_lease_not_found) => Err(Error::not_found(
                format!("etcd {}: lease {} is gone (expired)", self.endpoint(), lease.unwrap_or(0)),
            )),
            r => r.map(drop).map_err(|f| self.error(&format!("put {key}"), f)),
        }
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let r = self.range(&format!("get {key}"), key, false, false)?;
        Ok(r.kvs.into_iter().next().map(|kv| kv.value))
    }

    fn wait_for(&self, key: &str, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let r = self.range(&format!("get {key}"), key, false, false)?;
        if let Some(kv) = r.kvs.into_iter().next() {
            return Ok(Some(kv.value));
        }
        if timeout.is_zero() {
            return Ok(None);
        }
        let (mut found, mut compacted) = (None, false);
        self.watch_stream(&format!("wait for {key}"), key, false, r.revision.saturating_add(1), timeout, &mut |m| {
            if m.compact_revision > 0 {
                compacted = true;
                return Ok(true);
            }
            if m.canceled {
                return Err(canceled(&m));
            }
            found = m.events.into_iter().find(|e| e.kind == EventKind::Put).map(|e| e.kv.value);
            Ok(found.is_some())
        })?;
        if compacted {
            // The changes since the read are gone: read again.
            return self.get(key);
        }
        Ok(found)
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.call(&format!("delete {key}"), "/v3/kv/deleterange", &gateway::delete_range(key, false), |_| Ok(()))
    }

    fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        let body = gateway::delete_range(prefix, true);
        let n = self.call(&format!("delete prefix {prefix}"), "/v3/kv/deleterange", &body, gateway::parse_deleted)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let r = self.range(&format!("list {prefix}"), prefix, true, true)?;
        let mut keys: Vec<String> = r.kvs.into_iter().filter_map(|kv| String::from_utf8(kv.key).ok()).collect();
        keys.sort();
        Ok(keys)
    }

    fn grant_lease(&self, ttl: Duration) -> Result<u64> {
        let secs = ttl.as_secs().max(1) as i64 + i64::from(ttl.subsec_nanos() > 0);
        let id =
            self.call("grant lease", "/v3/lease/grant", &gateway::lease_grant(secs), gateway::parse_lease_grant)?;
        Ok(id as u64) // positive: parse_lease_grant refuses the rest
    }

    fn keep_alive(&self, lease: u64) -> Result<bool> {
        let Ok(id) = self.lease_id(lease) else { return Ok(false) };
        // A keep-alive is a stream: etcd answers each request on it, and
        // closes it when the request body ends. The first answer is the one;
        // reading on to the close lets the connection serve the next call.
        let mut ttl = None;
        let mut read = |resp| {
            read_stream(resp, &mut |v| {
                let t = gateway::parse_keep_alive(&v)?;
                ttl.get_or_insert(t);
                Ok(false)
            })
        };
        match self.authed("/v3/lease/keepalive", &gateway::lease(id), Duration::ZERO, false, &mut read) {
            // An unknown lease has no TTL left (etcd 3.4), or is an error
            // (other versions): gone all the same, so the caller re-publishes.
            Err(f) if f.problem().is_some_and(Problem::is_lease_not_found) => Ok(false),
            Err(f) => Err(self.error("keep lease alive", f)),
            Ok(_) => match ttl {
                Some(t) => Ok(t > 0),
                None => Err(self.error(
                    "keep lease alive",
                    Failure::Answer {
                        endpoint: self.endpoint(),
                        problem: Problem::Malformed("the keep-alive stream ended without an answer".into()),
                    },
                )),
            },
        }
    }

    fn revoke(&self, lease: u64) -> Result<()> {
        let Ok(id) = self.lease_id(lease) else { return Ok(()) };
        match self.unary("/v3/lease/revoke", &gateway::lease(id)) {
            Err(f) if f.problem().is_some_and(Problem::is_lease_not_found) => Ok(()),
            r => r.map(drop).map_err(|f| self.error("revoke lease", f)),
        }
    }

    fn revision(&self) -> Result<u64> {
        Ok(revision_u64(self.range("read the revision", "\0", false, true)?.revision))
    }

    fn watch(&self, prefix: &str, since: u64, timeout: Duration) -> Result<WatchBatch> {
        let start = i64::try_from(since.saturating_add(1)).unwrap_or(i64::MAX);
        let mut batch = WatchBatch { revision: since, ..WatchBatch::default() };
        self.watch_stream("watch", prefix, true, start, timeout, &mut |m| {
            // The first message's revision is the store's at creation: the
            // changes up to it may still be on their way, so it is not news.
            if !m.created {
                batch.revision = batch.revision.max(revision_u64(m.revision));
            }
            if m.compact_revision > 0 {
                batch.compacted = true;
                return Ok(true);
            }
            if m.canceled {
                return Err(canceled(&m));
            }
            for e in m.events {
                batch.revision = batch.revision.max(revision_u64(e.kv.mod_revision));
                let key = String::from_utf8(e.kv.key).unwrap_or_default();
                match e.kind {
                    EventKind::Put => batch.put.push(key),
                    EventKind::Delete => batch.deleted.push(key),
                }
            }
            Ok(!batch.put.is_empty() || !batch.deleted.is_empty())
        })?;
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpListener;

    use super::*;

    /// A fake server on a loopback port: answers every request with the
    /// bytes `answer` (after reading its head and body), then closes the
    /// connection.
    fn fake_raw(answer: Vec<u8>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut len = 0usize;
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    line.clear();
                }
                let _ = std::io::copy(&mut (&mut r).take(len as u64), &mut std::io::sink());
                let _ = s.write_all(&answer);
            }
        });
        url
    }

    /// A fake server that answers HTTP `status` (`200 OK`) with `body`.
    fn fake(status: &str, body: &str) -> String {
        fake_raw(format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes())
    }

    /// A port nothing listens on.
    fn dead() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    fn store(eps: &[&str]) -> EtcdStore {
        EtcdStore::connect(&eps.iter().map(|e| e.to_string()).collect::<Vec<_>>(), Duration::from_millis(500)).unwrap()
    }

    #[test]
    fn endpoints_are_checked() {
        let s = store(&["127.0.0.1:2379", " http://h:1/ ", ""]);
        assert_eq!(s.endpoint(), "http://127.0.0.1:2379,http://h:1");
        let e = EtcdStore::connect(&["https://h:2379".into()], Duration::from_secs(1)).unwrap_err();
        assert!(e.kind() == ErrorKind::NotSupported && e.message().contains("http://"), "{e}");
        for bad in ["ftp://h:1", "http://", "http://h:1/path", "http://h 1"] {
            let e = EtcdStore::connect(&[bad.into()], Duration::from_secs(1)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidParam, "{bad}: {e}");
        }
        let e = EtcdStore::connect(&[], Duration::from_secs(1)).unwrap_err();
        assert!(e.message().contains("KVFERRY_ETCD_ENDPOINTS"), "{e}");
    }

    #[test]
    fn credentials_stay_out_of_debug() {
        let s = store(&["h:1"]).with_credentials(Some(EtcdCredentials::new("kv", "pa55word")));
        *s.token.lock() = Some("tok3n".into());
        let d = format!("{s:?} {:?}", s.credentials);
        assert!(d.contains("kv") && !d.contains("pa55word") && !d.contains("tok3n"), "{d}");
    }

    #[test]
    fn garbage_answers_are_clear_errors() {
        // (status, body, whether every call must fail: a JSON object whose
        // fields are merely unknown reads as an empty answer to some calls).
        let answers = [
            ("200 OK", "garbage", true),
            ("404 Not Found", "404 page not found\n", true),
            ("200 OK", r#"{"kvs":["#, true),
            ("200 OK", r#"{"result":3}"#, true),
            ("200 OK", r#"{"header":{"revision":"-"}}"#, false),
            ("502 Bad Gateway", "{}", true),
            ("200 OK", r#"{"kvs":[{"key":"%%%%"}]}"#, false),
            ("200 OK", r#"{"kvs":{"a":1},"events":7,"ID":"x"}"#, false),
        ];
        for (status, body, all_fail) in answers {
            let url = fake(status, body);
            let s = store(&[&url]);
            let e = s.get("k").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Malformed, "{e}");
            assert!(e.message().contains(&url) && e.message().contains("v3.4"), "{e}");
            let results = [
                s.list("/p/").map(drop),
                s.put("k", b"v", Some(1)),
                s.grant_lease(Duration::from_secs(1)).map(drop),
                s.keep_alive(1).map(drop),
                s.revision().map(drop),
                s.watch("/p/", 0, Duration::from_millis(50)).map(drop),
                s.wait_for("k", Duration::from_millis(50)).map(drop),
            ];
            if all_fail {
                assert!(results.iter().all(Result::is_err), "{body}: {results:?}");
            }
        }
        // Not HTTP at all: the endpoint is named, with what to check.
        let url = fake_raw(b"SSH-2.0-OpenSSH_9.2\r\n".to_vec());
        let e = store(&[&url]).get("k").unwrap_err();
        assert!(e.message().contains(&url) && e.message().contains("KVFERRY_ETCD_ENDPOINTS"), "{e}");
    }

    #[test]
    fn etcd_errors_keep_their_meaning() {
        let gone = fake(
            "404 Not Found",
            r#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#,
        );
        let s = store(&[&gone]);
        assert_eq!(s.put("k", b"v", Some(7)).unwrap_err().kind(), ErrorKind::NotFound);
        assert!(!s.keep_alive(7).unwrap());
        s.revoke(7).unwrap();
        // Without a lease the same answer is etcd's refusal, not NotFound.
        assert_eq!(s.put("k", b"v", None).unwrap_err().kind(), ErrorKind::Backend);
        let auth = fake(
            "400 Bad Request",
            r#"{"error":"etcdserver: user name is empty","message":"etcdserver: user name is empty","code":3}"#,
        );
        let e = store(&[&auth]).get("k").unwrap_err();
        assert!(e.kind() == ErrorKind::NotAllowed && e.message().contains("KVFERRY_ETCD_USER"), "{e}");
    }

    #[test]
    fn calls_fail_over_in_order_within_the_timeout() {
        let ok = fake("200 OK", r#"{"header":{"revision":"42"}}"#);
        let (d1, d2) = (dead(), dead());
        let s = store(&[&d1, &ok]);
        assert_eq!(s.revision().unwrap(), 42);
        assert_eq!(s.preferred.load(Ordering::Relaxed), 1, "the endpoint that answered is tried first next time");
        assert_eq!(s.revision().unwrap(), 42);
        // None answers: every endpoint is named.
        let e = store(&[&d1, &d2]).revision().unwrap_err();
        assert!(
            e.kind() == ErrorKind::RemoteDisconnect && e.message().contains(&d1) && e.message().contains(&d2),
            "{e}"
        );
        // A server that accepts and never answers: a bounded Timeout.
        let mute = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", mute.local_addr().unwrap());
        let t = Instant::now();
        let e = store(&[&url]).get("k").unwrap_err();
        assert!(e.kind() == ErrorKind::Timeout && e.message().contains(&url), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        // A member without a leader hands the call on.
        let no_leader = fake(
            "503 Service Unavailable",
            r#"{"error":"etcdserver: no leader","message":"etcdserver: no leader","code":14}"#,
        );
        assert_eq!(store(&[&no_leader, &ok]).revision().unwrap(), 42);
        let e = store(&[&no_leader]).revision().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::RemoteDisconnect, "{e}");
    }
}
