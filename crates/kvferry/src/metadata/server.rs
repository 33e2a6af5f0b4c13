//! The embedded metadata server: a small HTTP key-value store with leases,
//! long-poll waits and an event log, so agents on one machine or a small
//! group can find each other with no external service, and `curl` can
//! inspect it.
//!
//! | request | answer |
//! |---|---|
//! | `GET /v1/kv/{key}` | 200 and the value, or 404 |
//! | `GET /v1/kv/{key}?wait_ms=N` | waits up to N ms for the key to appear |
//! | `PUT /v1/kv/{key}[?lease=ID]` (body: value) | 200 `{"revision":R}`; 404 if the lease is gone; 403 if another lease owns the key |
//! | `DELETE /v1/kv/{key}[?lease=ID]` | 200 `{"deleted":n}`; 403 if the key is leased and `ID` is not its lease |
//! | `GET /v1/prefix/{prefix}` | 200 `{"revision":R,"keys":[{"key","len","leased"}]}` |
//! | `DELETE /v1/prefix/{prefix}[?lease=ID]` | 200 `{"deleted":n,"kept":m}`: only the keys of lease `ID` (without: only unleased keys); the empty prefix is refused |
//! | `POST /v1/lease?ttl_ms=N` | 200 `{"id":"<32 hex digits>","ttl_ms":N}` |
//! | `POST /v1/lease/{id}/keepalive` | 200, or 404 once expired |
//! | `DELETE /v1/lease/{id}` | 200; deletes the lease's keys; 404 if unknown |
//! | `GET /v1/events?prefix=P&since=R&wait_ms=N` | 200 `{"revision","compacted","events":[{"rev","kind","key"}]}` |
//! | `GET /v1/health` | 200 `{"ok":true,"revision":R,"keys":n,...}` (no token needed) |
//!
//! Keys are percent-decoded URL paths and may contain `/`. Values are raw bytes.
//! A key written with a lease disappears when the lease is not renewed within
//! its TTL: a crashed agent's metadata goes away on its own.
//!
//! Security (see `docs/METADATA.md`): with a token configured every request
//! but `GET /v1/health` needs `Authorization: Bearer <token>` (401
//! otherwise). Lease ids are 128 random bits and are the capability: a key
//! written under a live lease can be overwritten or deleted only by a
//! request that presents that lease. Everything is bounded by
//! [`MetaServerConfig`]: connections, waiting long-polls, header bytes,
//! header and body read times, value size, key count, total bytes, leases.
//!
//! The store's semantics (lease ownership, prefix deletes, leases, listings,
//! the event log) are in `server/state.rs`, which knows nothing of HTTP or
//! tokio; this file parses requests, waits, and maps results to status codes.

// The Err of the request helpers is the HTTP answer itself (built once per
// refused request, never on the data path), so its size does not matter.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::http_common::percent_decode;
use crate::admission::ConnGate;
use crate::auth::AuthToken;
use crate::error::{Error, Result};

mod state;

use state::{lease_text, LeaseId, Limits, State, StoreError};

pub use super::http_common::MAX_VALUE;
/// Longest key accepted, in bytes.
pub const MAX_KEY: usize = 1024;
/// Longest long-poll accepted.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Longest lease TTL accepted.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// Most events in one `GET /v1/events` answer; the rest come on the next call.
const MAX_EVENTS_PER_ANSWER: usize = 1024;
/// Listings of up to this many keys are built on a request worker without
/// a permit; larger ones take one of [`LARGE_LISTINGS`].
const SMALL_LISTING: usize = 1024;
/// Large listings built or being sent at once.
const LARGE_LISTINGS: usize = 2;
/// Bodies up to this size do not take from `max_body_bytes`.
const SMALL_BODY: usize = 64 << 10;

/// The limits and the token of a [`MetaServer`]. `Default` gives the
/// documented defaults and no token.
#[derive(Clone, Debug)]
pub struct MetaServerConfig {
    /// With a token, every request but `GET /v1/health` must carry
    /// `Authorization: Bearer <token>` (401 otherwise).
    pub token: Option<AuthToken>,
    /// Largest value, in bytes (413 beyond). Default 16 MiB.
    pub max_value: usize,
    /// Most keys stored at once (507 beyond). Default 100 000.
    pub max_keys: usize,
    /// Most bytes stored at once, keys and values plus 64 bytes a key (507
    /// beyond). Default 1 GiB.
    pub max_bytes: usize,
    /// Most live leases (507 beyond). Default 65 536.
    pub max_leases: usize,
    /// Most open connections; more wait in the kernel's accept queue until
    /// one closes. Default 1024.
    pub max_connections: usize,
    /// Most open connections from one source (an IPv4 address or an IPv6
    /// /64, see [`crate::admission::source_of`]); more are answered 503 and
    /// closed at once, so one host cannot hold every connection. Default 256
    /// (a value above `max_connections` acts as `max_connections`).
    pub max_connections_per_ip: usize,
    /// Most requests waiting at once (`wait_ms` > 0 on `GET /v1/kv` and
    /// `GET /v1/events`); more get 503 at once. Ordinary requests never
    /// count against it. Default 256 (must be below `max_connections`).
    pub max_waiters: usize,
    /// Largest request head (request line and headers) in bytes (431
    /// beyond; at least 8192). Default 64 KiB.
    pub max_header_bytes: usize,
    /// Time a connection has to send a complete request head, also between
    /// requests on a kept-alive connection (then it is closed). Default 10 s.
    pub header_timeout: Duration,
    /// Time a request has to send its whole body (408 after). Default 30 s.
    pub body_timeout: Duration,
    /// Most bytes of request bodies over 64 KiB being received at once; a
    /// large upload waits for room up to a quarter of `body_timeout`, then
    /// gets 503.
    /// Smaller bodies are not counted (they are bounded by
    /// `max_connections` × 64 KiB). Default 256 MiB (at least `max_value`).
    pub max_body_bytes: usize,
    /// Longest life of one connection: then it finishes the request in
    /// flight (1 s more at most) and is closed, so a client that never
    /// reads its answers cannot hold a connection slot. Default 120 s
    /// (must be over 60 s, the longest wait).
    pub max_connection_time: Duration,
}

impl Default for MetaServerConfig {
    fn default() -> Self {
        MetaServerConfig {
            token: None,
            max_value: MAX_VALUE,
            max_keys: 100_000,
            max_bytes: 1 << 30,
            max_leases: 65_536,
            max_connections: 1024,
            max_connections_per_ip: 256,
            max_waiters: 256,
            max_header_bytes: 64 << 10,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connection_time: Duration::from_secs(120),
            max_body_bytes: 256 << 20,
        }
    }
}

impl MetaServerConfig {
    /// Requires `token` on every request but `GET /v1/health`.
    pub fn with_token(mut self, token: Option<AuthToken>) -> Self {
        self.token = token;
        self
    }

    fn check(&self) -> Result<()> {
        let zero = [
            ("max_value", self.max_value),
            ("max_keys", self.max_keys),
            ("max_bytes", self.max_bytes),
            ("max_leases", self.max_leases),
            ("max_connections", self.max_connections),
            ("max_connections_per_ip", self.max_connections_per_ip),
            ("max_waiters", self.max_waiters),
        ];
        if let Some((name, _)) = zero.iter().find(|(_, v)| *v == 0) {
            return Err(Error::invalid(format!("metadata server: {name} must be at least 1")));
        }
        if self.max_waiters >= self.max_connections {
            return Err(Error::invalid(format!(
                "metadata server: max_waiters ({}) must be below max_connections ({}) so that waiting requests cannot take every connection",
                self.max_waiters, self.max_connections
            )));
        }
        if self.max_connections > Semaphore::MAX_PERMITS {
            return Err(Error::invalid("metadata server: max_connections is too large"));
        }
        if self.header_timeout.is_zero() || self.body_timeout.is_zero() {
            return Err(Error::invalid("metadata server: header_timeout and body_timeout must be above zero"));
        }
        if self.max_value > u32::MAX as usize || self.max_body_bytes < self.max_value {
            return Err(Error::invalid(format!(
                "metadata server: max_value ({}) must be at most 4 GiB and at most max_body_bytes ({})",
                self.max_value, self.max_body_bytes
            )));
        }
        if self.max_body_bytes > Semaphore::MAX_PERMITS {
            return Err(Error::invalid("metadata server: max_body_bytes is too large"));
        }
        if self.max_connection_time.is_zero() {
            return Err(Error::invalid("metadata server: max_connection_time must be above zero"));
        }
        if self.token.as_ref().is_some_and(|t| !t.is_usable()) {
            return Err(Error::invalid(
                "metadata server: the auth token is empty or too long; fix KVFERRY_AUTH_TOKEN / --token",
            ));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Shared {
    cfg: MetaServerConfig,
    state: Mutex<State>,
    /// The revision, for waiters: bumped after every change.
    changed: watch::Sender<u64>,
    waiters: Arc<Semaphore>,
    /// Listings of over [`SMALL_LISTING`] keys in memory at once.
    large_listings: Arc<Semaphore>,
    /// Bytes of large bodies being received (`max_body_bytes`).
    body_budget: Arc<Semaphore>,
    stop: AtomicBool,
    accept_errors: AtomicU64,
    connections: AtomicU64,
    /// Connections refused because their source held `max_connections_per_ip`.
    refused_per_ip: AtomicU64,
}

impl Shared {
    fn notify(&self, rev: u64) {
        self.changed.send_replace(rev);
    }
}

/// A running embedded metadata server. Stops when dropped.
///
/// It runs on its own small tokio runtime (two worker threads); nothing of
/// the data plane runs there.
pub struct MetaServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl fmt::Debug for MetaServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetaServer").field("addr", &self.addr).finish()
    }
}

impl MetaServer {
    /// Starts serving on `addr` (`"127.0.0.1:0"` picks a free port) with
    /// the default limits and no token.
    pub fn start(addr: &str) -> Result<MetaServer> {
        Self::start_with(addr, MetaServerConfig::default())
    }

    /// Starts serving on `addr` with `cfg`'s token and limits.
    pub fn start_with(addr: &str, cfg: MetaServerConfig) -> Result<MetaServer> {
        cfg.check()?;
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            Error::new(crate::ErrorKind::Backend, format!("metadata server: cannot listen on {addr}: {e}"))
        })?;
        let addr = listener.local_addr().map_err(|e| Error::io("metadata server: reading the listening address", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("metadata server: setting the listener non-blocking", e))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kvferry-meta")
            .max_blocking_threads(4)
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| Error::io("metadata server: starting its runtime", e))?;
        let shared = Arc::new(Shared {
            waiters: Arc::new(Semaphore::new(cfg.max_waiters)),
            large_listings: Arc::new(Semaphore::new(LARGE_LISTINGS)),
            body_budget: Arc::new(Semaphore::new(cfg.max_body_bytes)),
            state: Mutex::new(State::new(Limits {
                max_keys: cfg.max_keys,
                max_bytes: cfg.max_bytes,
                max_leases: cfg.max_leases,
            })),
            cfg,
            changed: watch::Sender::new(0),
            stop: AtomicBool::new(false),
            accept_errors: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            refused_per_ip: AtomicU64::new(0),
        });
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)
                .map_err(|e| Error::io("metadata server: registering the listener", e))?
        };
        runtime.spawn(accept_loop(listener, shared.clone()));
        {
            let shared = shared.clone();
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                loop {
                    tick.tick().await;
                    let mut st = shared.state.lock();
                    if st.expire(Instant::now()) > 0 {
                        let rev = st.rev();
                        drop(st);
                        shared.notify(rev);
                    }
                }
            });
        }
        tracing::info!(%addr, "metadata server listening");
        Ok(MetaServer { addr, shared, runtime: Some(runtime) })
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
        self.shared.state.lock().len()
    }

    /// Whether no key is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many times accepting a connection failed (out of descriptors,
    /// for example); the server backs off and keeps accepting.
    pub fn accept_errors(&self) -> u64 {
        self.shared.accept_errors.load(Ordering::Relaxed)
    }

    /// How many connections were refused because their source already held
    /// `max_connections_per_ip` connections.
    pub fn refused_per_ip(&self) -> u64 {
        self.shared.refused_per_ip.load(Ordering::Relaxed)
    }

    /// Stops serving and waits for its threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.notify(u64::MAX);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for MetaServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Accepts connections while fewer than `max_connections` are open; one
/// whose source holds `max_connections_per_ip` already gets a 503 and is
/// closed (the answer fits a fresh socket's buffer, so this never waits). An
/// accept error (EMFILE, ENFILE, ENOMEM, a connection reset before it was
/// taken) is logged and followed by a pause that grows to 1 s; the loop
/// never exits, so the server serves again as soon as descriptors free up.
async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(shared.cfg.max_connections));
    // The semaphore bounds the total; the gate only counts per source.
    let sources = ConnGate::new(usize::MAX, shared.cfg.max_connections_per_ip.min(shared.cfg.max_connections));
    let mut pause = Duration::from_millis(5);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((sock, peer)) => {
                pause = Duration::from_millis(5);
                let source = match sources.admit(peer.ip()) {
                    Ok(s) => s,
                    Err(why) => {
                        let n = shared.refused_per_ip.fetch_add(1, Ordering::Relaxed);
                        if n.is_power_of_two() || n == 0 {
                            tracing::warn!(%peer, refused = n + 1, "metadata server: connection refused: {why} (max_connections_per_ip)");
                        }
                        let body =
                            json!({ "error": format!("metadata server: {why} (max_connections_per_ip)") }).to_string();
                        let answer = format!(
                            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = sock.try_write(answer.as_bytes());
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                let shared = shared.clone();
                tokio::spawn(async move {
                    shared.connections.fetch_add(1, Ordering::Relaxed);
                    serve_connection(sock, &shared).await;
                    shared.connections.fetch_sub(1, Ordering::Relaxed);
                    drop((source, slot));
                });
            }
            Err(e) => {
                let n = shared.accept_errors.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() || n == 0 {
                    tracing::warn!(error = %e, errors = n + 1, "metadata server: accept failed (out of file descriptors? raise `ulimit -n`); backing off and accepting again");
                }
                drop(slot);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn serve_connection(sock: tokio::net::TcpStream, shared: &Arc<Shared>) {
    let cfg = &shared.cfg;
    let sh = shared.clone();
    let svc = hyper::service::service_fn(move |req| {
        let sh = sh.clone();
        async move { Ok::<_, Infallible>(handle(req, &sh).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(cfg.header_timeout)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .serve_connection(hyper_util::rt::TokioIo::new(sock), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "metadata server: connection ended with an error");
            }
        }
        _ = tokio::time::sleep(cfg.max_connection_time) => {
            // Finish the request in flight if the client takes its answer, then close.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

type Resp = Response<Body>;

/// A whole answer in memory, handed to hyper in [`BODY_CHUNK`] pieces, with
/// the permit that allowed building it (a large listing). hyper asks for
/// the next piece only once the previous one was written, so the permit is
/// given back when the answer was (nearly all) sent or the connection died:
/// slow readers cannot pile up large answers in memory.
struct Body {
    rest: Bytes,
    permit: Option<OwnedSemaphorePermit>,
}

/// Bytes handed to hyper at a time.
const BODY_CHUNK: usize = 64 << 10;

impl Body {
    fn new(b: Bytes) -> Body {
        Body { rest: b, permit: None }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<hyper::body::Frame<Bytes>, Infallible>>> {
        let _ = cx;
        let this = self.get_mut();
        if this.rest.is_empty() {
            this.permit = None;
            return std::task::Poll::Ready(None);
        }
        let n = this.rest.len().min(BODY_CHUNK);
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(this.rest.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.rest.len() as u64)
    }
}

fn reply(code: u16, body: Value) -> Resp {
    let mut r = Response::new(Body::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

fn error(code: u16, msg: impl Into<String>) -> Resp {
    reply(code, json!({"error": msg.into()}))
}

fn bytes(value: Bytes) -> Resp {
    let mut r = Response::new(Body::new(value));
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/octet-stream"));
    r
}

fn bad(msg: impl Into<String>) -> Resp {
    error(400, msg)
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

fn parse_lease(s: &str) -> std::result::Result<LeaseId, Resp> {
    if s.len() != 32 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad(format!(
            "'{}' is not a lease id (32 hex digits, as POST /v1/lease returned)",
            s.chars().take(64).collect::<String>()
        )));
    }
    LeaseId::from_str_radix(s, 16).map_err(|_| bad("lease id is not hexadecimal"))
}

fn lease_of(q: &str) -> std::result::Result<Option<LeaseId>, Resp> {
    query(q, "lease").map(|s| parse_lease(&s)).transpose()
}

/// The one place store refusals become HTTP answers.
fn refused(e: StoreError) -> Resp {
    let code = match e {
        StoreError::LeaseGone(_) => 404,
        StoreError::OwnedPut(_) | StoreError::OwnedDelete(_) => 403,
        StoreError::TooManyKeys(_) | StoreError::TooManyBytes(..) | StoreError::TooManyLeases(_) => 507,
        StoreError::EmptyPrefix => 400,
    };
    error(code, e.to_string())
}

/// 200 with `body` after a change to revision `rev` (waiters are woken), or the refusal.
fn changed<T>(sh: &Shared, r: std::result::Result<(T, u64), StoreError>, body: impl FnOnce(T) -> Value) -> Resp {
    match r {
        Ok((t, rev)) => {
            sh.notify(rev);
            reply(200, body(t))
        }
        Err(e) => refused(e),
    }
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

fn authorized(req: &Request<Incoming>, token: Option<&AuthToken>) -> bool {
    let Some(token) = token else { return true };
    let presented = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    token.verify(presented)
}

/// Bytes of the request head as hyper parsed it (target and headers).
fn head_len(req: &Request<Incoming>) -> usize {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    target + req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum::<usize>()
}

async fn handle(req: Request<Incoming>, sh: &Arc<Shared>) -> Resp {
    // hyper bounds its read buffer near max_header_bytes; this makes the
    // limit exact whatever size the last read happened to be.
    if head_len(&req) > sh.cfg.max_header_bytes {
        return error(
            431,
            format!("the request head is over {} bytes (the server's max_header_bytes)", sh.cfg.max_header_bytes),
        );
    }
    let path = req.uri().path().to_string();
    if path != "/v1/health" && !authorized(&req, sh.cfg.token.as_ref()) {
        let mut r = error(
            401,
            "this metadata server needs `Authorization: Bearer <token>` with its token (KVFERRY_AUTH_TOKEN)",
        );
        r.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, hyper::header::HeaderValue::from_static("Bearer"));
        return r;
    }
    match route(req, &path, sh).await {
        Ok(r) | Err(r) => r,
    }
}

/// Runs `check` against the state until it answers or `wait` passes. A
/// request that has to wait takes one of the `max_waiters` slots (503 when
/// none is free); one whose answer is ready at once takes none.
async fn wait_until<F>(sh: &Shared, wait: Duration, mut check: F) -> Resp
where
    F: FnMut(&State, bool) -> Option<Resp>,
{
    {
        // An answer that is ready now needs no waiting slot.
        let st = sh.state.lock();
        if let Some(r) = check(&st, wait.is_zero()) {
            return r;
        }
    }
    let Ok(_slot) = sh.waiters.clone().try_acquire_owned() else {
        return error(
            503,
            format!(
                "{} requests are already waiting (the server's max_waiters); retry later, or ask without wait_ms",
                sh.cfg.max_waiters
            ),
        );
    };
    let mut rx = sh.changed.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        rx.borrow_and_update();
        {
            let st = sh.state.lock();
            let last = sh.stop.load(Ordering::Relaxed) || tokio::time::Instant::now() >= deadline;
            if let Some(r) = check(&st, last) {
                return r;
            }
        }
        if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
            let st = sh.state.lock();
            return check(&st, true).expect("a final check answers");
        }
    }
}

async fn read_body(req: Request<Incoming>, sh: &Shared) -> std::result::Result<Bytes, Resp> {
    let max = sh.cfg.max_value;
    let too_big = || error(413, format!("values are limited to {max} bytes (the server's max_value)"));
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_big());
    }
    // Bodies over SMALL_BODY take their size (declared, or max_value when
    // chunked) from the max_body_bytes budget while they arrive, so a
    // thousand slow uploads cannot take the memory; small ones (metadata
    // blobs, flags) never wait for it.
    let deadline = tokio::time::Instant::now() + sh.cfg.body_timeout;
    let need = declared.map_or(max, |n| n as usize);
    let permit = if need > SMALL_BODY {
        let want = u32::try_from(need).unwrap_or(u32::MAX);
        let room = sh.cfg.body_timeout / 4;
        match tokio::time::timeout(room, sh.body_budget.clone().acquire_many_owned(want)).await {
            Ok(Ok(p)) => Some(p),
            _ => {
                return Err(error(
                    503,
                    format!(
                        "other uploads held the server's max_body_bytes ({} bytes) for {room:?}; retry later",
                        sh.cfg.max_body_bytes
                    ),
                ))
            }
        }
    } else {
        None
    };
    let body = match tokio::time::timeout_at(deadline, Limited::new(req.into_body(), max).collect()).await {
        Err(_) => Err(error(408, format!("the request body did not arrive within {:?}", sh.cfg.body_timeout))),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_big()),
        Ok(Err(e)) => Err(bad(format!("could not read the request body: {e}"))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    };
    drop(permit);
    body
}

/// Routes a request to the handler of its path; parsing only, the store
/// semantics are in [`state`].
async fn route(req: Request<Incoming>, path: &str, sh: &Arc<Shared>) -> std::result::Result<Resp, Resp> {
    let q = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    if let Some(rest) = path.strip_prefix("/v1/kv/") {
        return kv(req, method, key_of(rest)?, &q, sh).await;
    }
    if let Some(rest) = path.strip_prefix("/v1/prefix/") {
        let prefix = percent_decode(rest).ok_or_else(|| bad("the prefix is not valid percent-encoded UTF-8"))?;
        if prefix.len() > MAX_KEY {
            return Err(bad(format!("prefixes are at most {MAX_KEY} bytes long")));
        }
        return match method {
            Method::GET => list(prefix, sh).await,
            Method::DELETE => {
                // The empty prefix is refused before its lease is even read.
                let lease = if prefix.is_empty() { None } else { lease_of(&q)? };
                let mut st = sh.state.lock();
                let r = st.delete_prefix(&prefix, lease).map(|n| (n, st.rev()));
                drop(st);
                Ok(changed(sh, r, |(n, kept)| json!({"deleted": n, "kept": kept})))
            }
            _ => Ok(error(405, "use GET or DELETE on /v1/prefix/{prefix}")),
        };
    }
    if path == "/v1/lease" && method == Method::POST {
        return grant(&q, sh);
    }
    if let Some(rest) = path.strip_prefix("/v1/lease/") {
        let (id, action) = rest.split_once('/').unwrap_or((rest, ""));
        return lease(method, parse_lease(id)?, action, sh);
    }
    if path == "/v1/events" && method == Method::GET {
        return events(&q, sh).await;
    }
    if path == "/v1/health" {
        return Ok(health(sh));
    }
    Err(error(404, format!("no route {method} {path}; see the kvferry metadata server docs (docs/METADATA.md)")))
}

/// `GET` (with an optional long-poll), `PUT` and `DELETE` on `/v1/kv/{key}`.
async fn kv(
    req: Request<Incoming>,
    method: Method,
    key: String,
    q: &str,
    sh: &Arc<Shared>,
) -> std::result::Result<Resp, Resp> {
    Ok(match method {
        Method::GET => {
            let wait = wait_of(q)?;
            wait_until(sh, wait, |st, last| match st.get(&key) {
                Some(v) => Some(bytes(v.clone())),
                None if last => Some(error(404, format!("no key '{key}'"))),
                None => None,
            })
            .await
        }
        Method::PUT => {
            let lease = lease_of(q)?;
            let body = read_body(req, sh).await?;
            let r = sh.state.lock().put(key, body, lease).map(|rev| (rev, rev));
            changed(sh, r, |rev| json!({"revision": rev}))
        }
        Method::DELETE => {
            let lease = lease_of(q)?;
            let mut st = sh.state.lock();
            let r = st.delete(&key, lease).map(|n| (n, st.rev()));
            drop(st);
            changed(sh, r, |n| json!({"deleted": n}))
        }
        _ => error(405, "use GET, PUT or DELETE on /v1/kv/{key}"),
    })
}

/// `GET /v1/prefix/{prefix}`. The keys are snapshot under the lock (a clone
/// of each), the JSON built outside it: a long listing does not stall other
/// requests. A large one (over [`SMALL_LISTING`] keys) first takes one of
/// [`LARGE_LISTINGS`] permits, held until its answer was sent, so that many
/// clients asking at once cannot each hold a copy of the whole store.
async fn list(prefix: String, sh: &Arc<Shared>) -> std::result::Result<Resp, Resp> {
    let large = sh.state.lock().count_prefix(&prefix, SMALL_LISTING) > SMALL_LISTING;
    let permit = if large {
        let wait = sh.cfg.body_timeout / 4;
        match tokio::time::timeout(wait, sh.large_listings.clone().acquire_owned()).await {
            Ok(Ok(p)) => Some(p),
            _ => {
                return Err(error(
                    503,
                    format!(
                        "metadata server busy: {LARGE_LISTINGS} listings of over {SMALL_LISTING} keys are being sent; retry shortly or list a narrower prefix"
                    ),
                ))
            }
        }
    } else {
        None
    };
    let (rev, keys) = sh.state.lock().list(&prefix);
    let small = keys.len() <= SMALL_LISTING;
    let build = move || {
        let list: Vec<Value> =
            keys.into_iter().map(|k| json!({"key": k.key, "len": k.len, "leased": k.leased})).collect();
        reply(200, json!({"revision": rev, "keys": list}))
    };
    let mut r = if small {
        build()
    } else {
        // Off the two request workers (a few blocking threads at most).
        tokio::task::spawn_blocking(build)
            .await
            .unwrap_or_else(|e| error(500, format!("building the listing failed: {e}")))
    };
    r.body_mut().permit = permit;
    Ok(r)
}

/// `POST /v1/lease?ttl_ms=N`: a lease with a fresh random id.
fn grant(q: &str, sh: &Shared) -> std::result::Result<Resp, Resp> {
    let ttl = Duration::from_millis(query_u64(q, "ttl_ms")?.ok_or_else(|| bad("POST /v1/lease needs ttl_ms"))?);
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(bad(format!("ttl_ms must be between 1 and {}", MAX_TTL.as_millis())));
    }
    let mut raw = [0u8; 16];
    getrandom::fill(&mut raw).map_err(|e| error(500, format!("no randomness for a lease id: {e}")))?;
    let id = LeaseId::from_le_bytes(raw);
    let r = sh.state.lock().grant(id, ttl, Instant::now());
    Ok(match r {
        Ok(()) => reply(200, json!({"id": lease_text(id), "ttl_ms": ttl.as_millis() as u64})),
        Err(e) => refused(e),
    })
}

/// `POST /v1/lease/{id}/keepalive` and `DELETE /v1/lease/{id}`.
fn lease(method: Method, id: LeaseId, action: &str, sh: &Shared) -> std::result::Result<Resp, Resp> {
    Ok(match (method, action) {
        (Method::POST, "keepalive") => match sh.state.lock().keepalive(id, Instant::now()) {
            Ok(ttl) => reply(200, json!({"id": lease_text(id), "ttl_ms": ttl.as_millis() as u64})),
            Err(e) => refused(e),
        },
        (Method::DELETE, "") => {
            let mut st = sh.state.lock();
            let r = st.revoke(id).map(|n| (n, st.rev()));
            drop(st);
            changed(sh, r, |n| json!({"revoked": lease_text(id), "deleted": n}))
        }
        _ => error(405, "POST /v1/lease/{id}/keepalive or DELETE /v1/lease/{id}"),
    })
}

/// `GET /v1/events?prefix=P&since=R&wait_ms=N`: a page of at most
/// [`MAX_EVENTS_PER_ANSWER`] events (about 1 MiB, so that no answer built
/// under the lock is large), waiting for one if none is new.
async fn events(q: &str, sh: &Arc<Shared>) -> std::result::Result<Resp, Resp> {
    let prefix = query(q, "prefix").unwrap_or_default();
    let since = query_u64(q, "since")?.unwrap_or(0);
    let wait = wait_of(q)?;
    let mut scanned = since;
    Ok(wait_until(sh, wait, move |st, last| {
        let page = st.events(&prefix, since, scanned, MAX_EVENTS_PER_ANSWER);
        scanned = scanned.max(page.revision);
        let events: Vec<Value> = page
            .events
            .iter()
            .map(|e| json!({"rev": e.rev, "kind": if e.put { "put" } else { "delete" }, "key": e.key}))
            .collect();
        (!events.is_empty() || page.compacted || last)
            .then(|| reply(200, json!({"revision": page.revision, "compacted": page.compacted, "events": events})))
    })
    .await)
}

/// `GET /v1/health` (no token needed).
fn health(sh: &Shared) -> Resp {
    let st = sh.state.lock();
    reply(
        200,
        json!({
            "ok": true,
            "revision": st.rev(),
            "keys": st.len(),
            "bytes": st.bytes(),
            "leases": st.leases(),
            "connections": sh.connections.load(Ordering::Relaxed),
            "accept_errors": sh.accept_errors.load(Ordering::Relaxed),
            "refused_per_ip": sh.refused_per_ip.load(Ordering::Relaxed),
            "auth": sh.cfg.token.is_some(),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_found_and_decoded() {
        assert_eq!(query("a=1&wait_ms=20", "wait_ms").as_deref(), Some("20"));
    }

    #[test]
    fn lease_ids_round_trip_and_malformed_ones_are_refused() {
        let id: LeaseId = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;
        assert_eq!(parse_lease(&lease_text(id)).ok(), Some(id));
        assert!(parse_lease("1").is_err());
        assert!(parse_lease(&"g".repeat(32)).is_err());
        assert!(parse_lease(&"0".repeat(33)).is_err());
    }

    #[test]
    fn bad_configurations_are_refused() {
        let c = MetaServerConfig { max_waiters: 2048, ..MetaServerConfig::default() };
        assert!(c.check().is_err());
        let c = MetaServerConfig { max_keys: 0, ..MetaServerConfig::default() };
        assert!(c.check().is_err());
        assert!(MetaServerConfig::default().check().is_ok());
    }
}
