//! `GET /metrics` over HTTP, for a Prometheus scraper.
//!
//! One small runtime thread serves it. Bounded whatever clients do: at most
//! [`MAX_CONNECTIONS`] connections are served at once (the rest wait in the
//! kernel's backlog), a request's header must arrive within
//! [`HEADER_TIMEOUT`], a connection lives at most [`MAX_CONNECTION_TIME`],
//! request bodies are never read, and answers are rendered from counters
//! (no work a client can make grow). Only `GET` (and `HEAD`) of `/metrics`
//! is answered 200; other paths get 404 and other methods 405.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::Semaphore;

use crate::error::{Error, ErrorKind, Result};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send a request's header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may stay open.
pub const MAX_CONNECTION_TIME: Duration = Duration::from_secs(30);

/// What renders the metrics text on each scrape.
pub type MetricsSource = Arc<dyn Fn() -> Result<String> + Send + Sync>;

/// An HTTP server answering `GET /metrics` with what its source renders
/// (for an agent: [`Agent::metrics_text`](crate::Agent::metrics_text)).
/// Stops when dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsServer").field("addr", &self.addr).finish()
    }
}

impl MetricsServer {
    /// Serves `source` at `http://{addr}/metrics` (`addr` like
    /// `127.0.0.1:9400`; port 0 picks a free one, see [`addr`](Self::addr)).
    pub fn start(addr: &str, source: MetricsSource) -> Result<MetricsServer> {
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            Error::new(ErrorKind::Backend, format!("metrics: cannot listen on {addr}: {e}; is the port free?"))
        })?;
        let addr = listener.local_addr().map_err(|e| Error::io("metrics: reading the listening address", e))?;
        listener.set_nonblocking(true).map_err(|e| Error::io("metrics: setting the listener non-blocking", e))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kvferry-metrics")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| Error::io("metrics: starting its runtime", e))?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)
                .map_err(|e| Error::io("metrics: registering the listener", e))?
        };
        runtime.spawn(accept_loop(listener, source));
        Ok(MetricsServer { addr, runtime: Some(runtime) })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The scrape URL, `http://{addr}/metrics`.
    pub fn url(&self) -> String {
        format!("http://{}/metrics", self.addr)
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, source: MetricsSource) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut pause = Duration::from_millis(5);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((sock, _)) => {
                pause = Duration::from_millis(5);
                let source = source.clone();
                tokio::spawn(async move {
                    serve(sock, source).await;
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed (out of file descriptors?); backing off");
                drop(slot);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn serve(sock: tokio::net::TcpStream, source: MetricsSource) {
    let svc = hyper::service::service_fn(move |req| {
        let source = source.clone();
        async move { Ok::<_, Infallible>(answer(&req, &source)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(16 << 10)
        .serve_connection(hyper_util::rt::TokioIo::new(sock), svc);
    if let Ok(Err(e)) = tokio::time::timeout(MAX_CONNECTION_TIME, conn).await {
        tracing::debug!(error = %e, "metrics: connection ended with an error");
    }
}

fn answer<B>(req: &Request<B>, source: &MetricsSource) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ty: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ty));
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "not found: metrics are at /metrics\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET /metrics is served\n".into());
    }
    match source() {
        Ok(text) => reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", text),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("metrics: {e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::*;

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn serves_metrics_and_refuses_the_rest() {
        let srv = MetricsServer::start("127.0.0.1:0", Arc::new(|| Ok("kvferry_x 1\n".to_string()))).unwrap();
        let ok = get(srv.addr(), "GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200") && ok.ends_with("kvferry_x 1\n"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        let nf = get(srv.addr(), "GET /other HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        let post =
            get(srv.addr(), "POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\nconnection: close\r\n\r\nabc");
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        // Garbage gets an error answer or a close, and the server still serves.
        let bad = get(srv.addr(), "\x00\x01 not http at all\r\n\r\n");
        assert!(bad.is_empty() || bad.starts_with("HTTP/1.1 4"), "{bad}");
        let huge = format!("GET /metrics HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(64 << 10));
        let big = get(srv.addr(), &huge);
        assert!(big.is_empty() || big.starts_with("HTTP/1.1 4"), "{big}");
        let again = get(srv.addr(), "GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    }

    #[test]
    fn silent_clients_do_not_block_scrapes() {
        let srv = MetricsServer::start("127.0.0.1:0", Arc::new(|| Ok("up 1\n".to_string()))).unwrap();
        // More idle connections than the server serves at once: they are cut
        // after the header timeout, and a scrape gets through after that.
        let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS + 4).map(|_| TcpStream::connect(srv.addr()).unwrap()).collect();
        let t = std::time::Instant::now();
        let ok = get(srv.addr(), "GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(t.elapsed() < HEADER_TIMEOUT * 3, "took {:?}", t.elapsed());
        drop(idle);
    }

    #[test]
    fn a_taken_port_is_a_clear_error() {
        let srv = MetricsServer::start("127.0.0.1:0", Arc::new(|| Ok(String::new()))).unwrap();
        let e = MetricsServer::start(&srv.addr().to_string(), Arc::new(|| Ok(String::new()))).unwrap_err();
        assert!(e.to_string().contains("cannot listen"), "{e}");
    }
}
