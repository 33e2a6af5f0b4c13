//! `kvferry meta-server`: the embedded metadata server as a process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use kvferry::auth::AuthToken;
use kvferry::metadata::server::{MetaServer, MetaServerConfig};
use kvferry::{Error, Result};

/// Arguments of `kvferry meta-server`.
///
/// Every request but `GET /v1/health` needs `Authorization: Bearer <token>`
/// when a token is set; keys written under a lease can be changed only with
/// that lease's (random, 128-bit) id. See docs/METADATA.md.
#[derive(Args, Debug, Clone)]
#[command(after_help = "\
Security: with a token (KVFERRY_AUTH_TOKEN or --token) every request but GET /v1/health needs
`Authorization: Bearer <token>` (401 otherwise); without one, anyone who reaches the port may read
and write unleased keys. Keys written under a lease (?lease=ID) can be changed or deleted only
with that lease's id (128 random bits, never listed); the empty-prefix DELETE is refused.
Full caps answer 413 (value) or 507 (keys, bytes, leases); out of file descriptors the server
backs off and keeps accepting (GET /v1/health counts accept_errors). See docs/METADATA.md.")]
pub struct MetaServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub ip: String,
    /// Port to listen on (0: any free port, printed on start).
    #[arg(long, default_value_t = 9400)]
    pub port: u16,
    /// Shared secret every request but GET /v1/health must present as
    /// `Authorization: Bearer <token>` (401 otherwise). Prefer the
    /// environment variable: a command line is visible to every local user.
    #[arg(long, env = "KVFERRY_AUTH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Largest value in bytes (larger PUTs get 413).
    #[arg(long, default_value_t = MetaServerConfig::default().max_value)]
    pub max_value: usize,
    /// Most keys stored at once (more PUTs get 507).
    #[arg(long, default_value_t = MetaServerConfig::default().max_keys)]
    pub max_keys: usize,
    /// Most bytes stored at once, keys and values plus 64 a key (507 beyond).
    #[arg(long, default_value_t = MetaServerConfig::default().max_bytes)]
    pub max_bytes: usize,
    /// Most live leases (507 beyond).
    #[arg(long, default_value_t = MetaServerConfig::default().max_leases)]
    pub max_leases: usize,
    /// Most open connections; more wait in the accept queue.
    #[arg(long, default_value_t = MetaServerConfig::default().max_connections)]
    pub max_connections: usize,
    /// Most open connections from one source (an IPv4 address or an IPv6
    /// /64); more get 503 and are closed.
    #[arg(long, default_value_t = MetaServerConfig::default().max_connections_per_ip)]
    pub max_connections_per_ip: usize,
    /// Most requests waiting at once (wait_ms > 0); more get 503, ordinary
    /// requests never count. Must be below --max-connections.
    #[arg(long, default_value_t = MetaServerConfig::default().max_waiters)]
    pub max_waiters: usize,
    /// Largest request head in bytes (431 beyond; at least 8192 is read).
    #[arg(long, default_value_t = MetaServerConfig::default().max_header_bytes)]
    pub max_header_bytes: usize,
    /// Milliseconds a connection has to send a request head (idle
    /// connections are closed after it).
    #[arg(long, default_value_t = MetaServerConfig::default().header_timeout.as_millis() as u64)]
    pub header_timeout_ms: u64,
    /// Milliseconds a request has to send its body (408 after).
    #[arg(long, default_value_t = MetaServerConfig::default().body_timeout.as_millis() as u64)]
    pub body_timeout_ms: u64,
    /// Seconds one connection may live (then it is closed after the request
    /// in flight): a client that never reads cannot hold a slot.
    #[arg(long, default_value_t = MetaServerConfig::default().max_connection_time.as_secs())]
    pub max_connection_secs: u64,
    /// Most bytes of bodies over 64 KiB received at once (larger uploads
    /// wait up to a quarter of the body timeout, then get 503); at least --max-value.
    #[arg(long, default_value_t = MetaServerConfig::default().max_body_bytes)]
    pub max_body_bytes: usize,
}

impl MetaServerArgs {
    /// The server configuration these arguments ask for.
    pub fn config(&self) -> Result<MetaServerConfig> {
        let token = match self.token.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(t) => Some(AuthToken::new(t)?),
        };
        Ok(MetaServerConfig {
            token,
            max_value: self.max_value,
            max_keys: self.max_keys,
            max_bytes: self.max_bytes,
            max_leases: self.max_leases,
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            max_waiters: self.max_waiters,
            max_header_bytes: self.max_header_bytes,
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            body_timeout: Duration::from_millis(self.body_timeout_ms),
            max_connection_time: Duration::from_secs(self.max_connection_secs),
            max_body_bytes: self.max_body_bytes,
        })
    }
}

/// Raises the soft descriptor limit towards `want` (up to the hard limit),
/// and warns when even that is below it: the server survives running out
/// (it backs off and keeps accepting) but serves fewer connections.
fn raise_nofile(want: u64) {
    match kvferry::os::raise_fd_limit(want) {
        Ok(now) if now < want => eprintln!(
            "meta-server: only {now} file descriptors (ulimit -n) for --max-connections {}; raise the hard limit to serve that many",
            want.saturating_sub(64)
        ),
        _ => {}
    }
}

/// Serves until SIGINT or SIGTERM.
pub fn run(a: &MetaServerArgs) -> Result<()> {
    let cfg = a.config()?;
    raise_nofile(cfg.max_connections as u64 + 64);
    let auth = if cfg.token.is_some() { "token required" } else { "NO token: anyone who reaches the port may write" };
    let srv = MetaServer::start_with(&format!("{}:{}", a.ip, a.port), cfg)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| Error::io("installing signal handlers", e))?;
    }
    println!("KVFERRY-META-SERVER listening on {}  (agents: KVFERRY_METADATA_URL={}; {auth})", srv.addr(), srv.url());
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("meta-server: signalled, {} keys dropped", srv.len());
    srv.stop();
    Ok(())
}
