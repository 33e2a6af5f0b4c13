//! Agent configuration. `impl Default` is the single source of defaults; each
//! field's doc ends with its default and why.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use crate::auth::AuthToken;
use crate::backend::BackendConfig;
use crate::error::{Error, Result};
use crate::metadata::listener::ListenerLimits;
use crate::metadata::store::EtcdCredentials;
use crate::notif::NotifLimits;
use crate::params::Params;

/// How an [`Agent`](crate::Agent) behaves. Build with `AgentConfig::default()`
/// (pure: it never reads the environment) and the setters, or read the
/// environment with [`AgentConfig::from_env`] (everything, backends included)
/// or [`AgentConfig::env_defaults`] (token and central store only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// Serve metadata requests from peers on `listen_addr:listen_port`.
    /// Default: off, as in NIXL; turn on for peer-to-peer metadata exchange.
    pub listener: bool,
    /// Address the metadata listener binds. Default: `None`, which binds
    /// where the data port binds: the TCP backend's `bind` parameter when it
    /// names a specific address (a loopback-only data port gets a
    /// loopback-only listener), else `0.0.0.0` (all interfaces, as in NIXL).
    pub listen_addr: Option<IpAddr>,
    /// Port of the metadata listener; 0 picks a free one. Default: 0.
    pub listen_port: u16,
    /// Bounds of the metadata listener and of the peers loaded through it
    /// (connections in all and per address, the request deadline, body
    /// sizes, peers and regions). Default: [`ListenerLimits::default`].
    pub listener_limits: ListenerLimits,
    /// Threads a backend may use for its own work (progress, storage I/O).
    /// Default: 0, which lets each backend pick from the CPU count.
    pub worker_threads: usize,
    /// How long to try to open a connection. Default: 2 s.
    pub connect_timeout: Duration,
    /// A peer that does not answer for this long is declared gone: its
    /// requests fail with `RemoteDisconnect` and its metadata is dropped.
    /// Default: 2 s, short enough for serving, long enough for a busy host.
    pub peer_timeout: Duration,
    /// How long metadata calls (fetch, wait for a peer) may take. Default: 5 s.
    pub metadata_timeout: Duration,
    /// A shared secret: peers without the same token are refused at the
    /// handshake of every port the agent opens. Default: none
    /// ([`from_env`](Self::from_env) reads `KVFERRY_AUTH_TOKEN`). Never
    /// printed (`Debug` redacts it).
    pub auth_token: Option<AuthToken>,
    /// URL of a kvferry metadata server (`http://host:port`) for central
    /// metadata. Default: none ([`from_env`](Self::from_env) reads
    /// `KVFERRY_METADATA_URL`).
    pub metadata_url: Option<String>,
    /// etcd endpoints for central metadata (etcd v3.4 or later, `http://`).
    /// Default: none ([`from_env`](Self::from_env) reads
    /// `KVFERRY_ETCD_ENDPOINTS`, or NIXL's `NIXL_ETCD_ENDPOINTS`, comma-separated).
    pub etcd_endpoints: Vec<String>,
    /// The etcd user and password, for an etcd with authentication
    /// enabled. Default: none ([`from_env`](Self::from_env) reads
    /// `KVFERRY_ETCD_USER` and `KVFERRY_ETCD_PASSWORD`). `Debug` redacts the
    /// password.
    pub etcd_credentials: Option<EtcdCredentials>,
    /// Key prefix of agents' metadata in the central store. Default:
    /// `/kvferry/agents/` ([`from_env`](Self::from_env) reads
    /// `KVFERRY_ETCD_NAMESPACE`, or `NIXL_ETCD_NAMESPACE`).
    pub metadata_namespace: String,
    /// Lease on everything the agent publishes centrally: a crashed agent's
    /// metadata disappears this long after its last renewal. Default: 5 s.
    pub metadata_lease: Duration,
    /// How many bytes of received notifications the agent holds until the
    /// application takes them, per sender and in all; past them new ones are
    /// refused (and counted). Default: [`NotifLimits::default`] (16 MiB per
    /// sender, 128 MiB in all): bounded memory whatever peers send.
    pub notif_limits: NotifLimits,
    /// Backends created with the agent, in order, with their parameters.
    /// Default: none (add them with `create_backend`), or `KVFERRY_BACKENDS`
    /// through [`AgentConfig::from_env`].
    pub backends: Vec<(String, Params)>,
    /// Per-request telemetry ([`Request::telemetry`](crate::Request::telemetry))
    /// and agent metrics ([`Agent::metrics_text`](crate::Agent::metrics_text)).
    /// Default: off, costing nothing measurable ([`from_env`](Self::from_env)
    /// reads `KVFERRY_TELEMETRY`, or NIXL's `NIXL_TELEMETRY_ENABLE`: `1`/`y`/`yes`/`true`).
    pub telemetry: bool,
}

impl Default for AgentConfig {
    /// The defaults, and nothing else: the environment is read only by
    /// [`from_env`](Self::from_env) and [`env_defaults`](Self::env_defaults).
    fn default() -> Self {
        AgentConfig {
            listener: false,
            listen_addr: None,
            listener_limits: ListenerLimits::default(),
            listen_port: 0,
            worker_threads: 0,
            connect_timeout: Duration::from_secs(2),
            peer_timeout: Duration::from_secs(2),
            metadata_timeout: Duration::from_secs(5),
            auth_token: None,
            metadata_url: None,
            etcd_endpoints: Vec::new(),
            etcd_credentials: None,
            metadata_namespace: DEFAULT_NAMESPACE.to_string(),
            metadata_lease: Duration::from_secs(5),
            notif_limits: NotifLimits::default(),
            backends: Vec::new(),
            telemetry: false,
        }
    }
}

impl AgentConfig {
    /// Overlays the settings the environment may set (token, central store,
    /// namespace), read through `lookup`; blank values count as unset.
    fn with_settings_from(mut self, lookup: &dyn Fn(&str) -> Option<String>) -> Self {
        let env = |name: &str, alias: Option<&str>| -> Option<String> {
            lookup(name).or_else(|| alias.and_then(lookup)).filter(|v| !v.trim().is_empty())
        };
        if let Some(t) = env(crate::auth::AUTH_TOKEN_ENV, None) {
            self.auth_token = Some(AuthToken::from_config(t));
        }
        if let Some(url) = env("KVFERRY_METADATA_URL", None) {
            self.metadata_url = Some(url);
        }
        if let Some(eps) = env("KVFERRY_ETCD_ENDPOINTS", Some("NIXL_ETCD_ENDPOINTS")) {
            self.etcd_endpoints = eps.split(',').map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
        }
        if let Some(ns) = env("KVFERRY_ETCD_NAMESPACE", Some("NIXL_ETCD_NAMESPACE")) {
            self.metadata_namespace = ns;
        }
        if let Some(v) = env(crate::telemetry::TELEMETRY_ENV[0], Some(crate::telemetry::TELEMETRY_ENV[1])) {
            self.telemetry = crate::telemetry::switch_on(&v);
        }
        if let Some(user) = env("KVFERRY_ETCD_USER", None) {
            let password = lookup("KVFERRY_ETCD_PASSWORD").unwrap_or_default();
            self.etcd_credentials = Some(EtcdCredentials::new(user, password));
        }
        self
    }

    /// The defaults with the settings the environment overrides:
    /// `KVFERRY_AUTH_TOKEN`, `KVFERRY_METADATA_URL`, `KVFERRY_ETCD_ENDPOINTS`
    /// (or NIXL's `NIXL_ETCD_ENDPOINTS`), `KVFERRY_ETCD_NAMESPACE` (or
    /// `NIXL_ETCD_NAMESPACE`), `KVFERRY_ETCD_USER` and
    /// `KVFERRY_ETCD_PASSWORD`, `KVFERRY_TELEMETRY` (or `NIXL_TELEMETRY_ENABLE`), but no backends (`KVFERRY_BACKENDS` is read
    /// only by [`from_env`](Self::from_env)). For programs that choose their
    /// backends themselves yet honour the deployment's token and store, as
    /// the `kvferry` CLI does.
    pub fn env_defaults() -> Self {
        AgentConfig::default().with_settings_from(&|name| std::env::var(name).ok())
    }
}

/// Default key prefix of agents' metadata in a central store.
pub const DEFAULT_NAMESPACE: &str = "/kvferry/agents/";

impl AgentConfig {
    /// Turns the metadata listener on at `port` (0: any free port).
    pub fn with_listener(mut self, port: u16) -> Self {
        self.listener = true;
        self.listen_port = port;
        self
    }

    /// The address the metadata listener binds: [`listen_addr`](Self::listen_addr)
    /// if set, else the TCP backend's `bind` parameter when it is a specific
    /// address, else `0.0.0.0`.
    pub fn listener_bind_addr(&self) -> IpAddr {
        if let Some(a) = self.listen_addr {
            return a;
        }
        self.backends
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("tcp"))
            .find_map(|(_, p)| p.raw("bind").and_then(|b| b.trim().parse::<IpAddr>().ok()))
            .filter(|a| !a.is_unspecified())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    /// Sets the peer timeout (see [`peer_timeout`](Self::peer_timeout)).
    pub fn with_peer_timeout(mut self, t: Duration) -> Self {
        self.peer_timeout = t;
        self
    }

    /// Sets the shared secret (see [`auth_token`](Self::auth_token)).
    /// An empty or over-long token fails closed: it admits no peer (see
    /// [`AuthToken::new`] for the checked constructor).
    pub fn with_auth_token(mut self, token: impl Into<String>) -> Self {
        self.auth_token = Some(AuthToken::from_config(token.into()));
        self
    }

    /// Uses the kvferry metadata server at `url` for central metadata.
    pub fn with_metadata_url(mut self, url: impl Into<String>) -> Self {
        self.metadata_url = Some(url.into());
        self.etcd_endpoints.clear();
        self
    }

    /// Uses etcd at `endpoints` for central metadata.
    pub fn with_etcd(mut self, endpoints: &[&str]) -> Self {
        self.etcd_endpoints = endpoints.iter().map(|e| e.to_string()).collect();
        self.metadata_url = None;
        self
    }

    /// What backends read of this configuration (timeouts, token, worker
    /// threads): the agent hands it to every backend it creates.
    pub fn backend_config(&self) -> BackendConfig {
        BackendConfig {
            connect_timeout: self.connect_timeout,
            peer_timeout: self.peer_timeout,
            auth_token: self.auth_token.clone(),
            worker_threads: self.worker_threads,
        }
    }

    /// Adds a backend to create with the agent.
    pub fn with_backend(mut self, name: &str, params: Params) -> Self {
        self.backends.push((name.to_string(), params));
        self
    }

    /// Everything the environment configures: the settings of
    /// [`env_defaults`](Self::env_defaults), plus the backends it names,
    /// `KVFERRY_BACKENDS=tcp,posix` and `KVFERRY_<BACKEND>_<PARAM>=value`
    /// (for example `KVFERRY_TCP_LANES=8`).
    pub fn from_env() -> Result<Self> {
        Self::from_vars(std::env::vars())
    }

    /// [`from_env`](Self::from_env) over explicit variables, for tests and embedding.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let mut cfg = AgentConfig::default()
            .with_settings_from(&|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()));
        let Some((_, list)) = vars.iter().find(|(k, _)| k == "KVFERRY_BACKENDS") else {
            return Ok(cfg);
        };
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let upper = name.to_ascii_uppercase();
            if !upper.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(Error::invalid(format!("KVFERRY_BACKENDS: '{name}' is not a backend name")));
            }
            let prefix = format!("KVFERRY_{upper}_");
            let params: Params = vars
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|p| (p.to_ascii_lowercase(), v.clone())))
                .collect();
            cfg.backends.push((upper, params));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_backends_and_params() {
        let vars = [
            ("KVFERRY_BACKENDS", "tcp, local"),
            ("KVFERRY_TCP_LANES", "8"),
            ("KVFERRY_LOCAL_X", "y"),
            ("KVFERRY_AUTH_TOKEN", "s3cret"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let cfg = AgentConfig::from_vars(vars).unwrap();
        assert_eq!(cfg.backends.len(), 2);
        assert_eq!(cfg.backends[0].0, "TCP");
        assert_eq!(cfg.backends[0].1.raw("lanes"), Some("8"));
        assert_eq!(cfg.backends[1].1.raw("x"), Some("y"));
        assert!(cfg.auth_token.as_ref().is_some_and(|t| t.verify(b"s3cret")));
        assert!(!format!("{cfg:?}").contains("s3cret"), "Debug must not print the token");
        assert_eq!(cfg.metadata_namespace, DEFAULT_NAMESPACE);
        let nixl = [("NIXL_ETCD_ENDPOINTS", "http://a:2379, http://b:2379"), ("NIXL_ETCD_NAMESPACE", "/nixl/agents/")]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        let cfg = AgentConfig::from_vars(nixl).unwrap();
        assert_eq!(cfg.etcd_endpoints, vec!["http://a:2379".to_string(), "http://b:2379".to_string()]);
        assert_eq!(cfg.metadata_namespace, "/nixl/agents/");
        let both =
            [("KVFERRY_ETCD_NAMESPACE", "/k/"), ("NIXL_ETCD_NAMESPACE", "/n/"), ("KVFERRY_METADATA_URL", "http://m:1")]
                .map(|(k, v)| (k.to_string(), v.to_string()));
        let cfg = AgentConfig::from_vars(both).unwrap();
        assert_eq!(cfg.metadata_namespace, "/k/", "kvferry's name wins over NIXL's alias");
        assert_eq!(cfg.metadata_url.as_deref(), Some("http://m:1"));
        let user = [("KVFERRY_ETCD_USER", "kv"), ("KVFERRY_ETCD_PASSWORD", "pa55word")]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        let cfg = AgentConfig::from_vars(user).unwrap();
        assert_eq!(cfg.etcd_credentials, Some(EtcdCredentials::new("kv", "pa55word")));
        assert!(!format!("{cfg:?}").contains("pa55word"), "Debug must not print the etcd password");
        let bad = AgentConfig::from_vars([("KVFERRY_BACKENDS".to_string(), "tc p".to_string())]);
        assert!(bad.is_err());
    }

    #[test]
    fn default_is_pure_and_env_defaults_name_no_backends() {
        let d = AgentConfig::default();
        assert_eq!((d.auth_token.as_ref(), d.metadata_url.as_deref()), (None, None));
        assert!(d.etcd_endpoints.is_empty() && d.backends.is_empty());
        assert_eq!(d.metadata_namespace, DEFAULT_NAMESPACE);
        let vars = [("KVFERRY_AUTH_TOKEN", "t"), ("KVFERRY_BACKENDS", "tcp")];
        let lookup = |n: &str| vars.iter().find(|(k, _)| *k == n).map(|(_, v)| v.to_string());
        let s = AgentConfig::default().with_settings_from(&lookup);
        assert!(s.auth_token.is_some_and(|t| t.verify(b"t")));
        assert!(s.backends.is_empty(), "only from_env reads KVFERRY_BACKENDS");
        let blank = AgentConfig::default().with_auth_token("x").with_settings_from(&|_| Some(" ".into()));
        assert!(blank.auth_token.is_some(), "a blank variable leaves the setting alone");
    }

    #[test]
    fn listener_binds_where_the_data_port_binds() {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        assert_eq!(AgentConfig::default().listener_bind_addr(), any, "no TCP backend: every interface");
        let mut p = Params::new();
        p.set("bind", "127.0.0.1");
        let lo = AgentConfig::default().with_backend("TCP", p);
        assert_eq!(lo.listener_bind_addr(), "127.0.0.1".parse::<IpAddr>().unwrap());
        let mut p = Params::new();
        p.set("bind", "0.0.0.0");
        assert_eq!(AgentConfig::default().with_backend("tcp", p).listener_bind_addr(), any);
        let mut set = lo.clone();
        set.listen_addr = Some("127.0.0.2".parse().unwrap());
        assert_eq!(set.listener_bind_addr(), "127.0.0.2".parse::<IpAddr>().unwrap(), "an explicit address wins");
        let env = AgentConfig::from_vars(
            [("KVFERRY_BACKENDS", "tcp"), ("KVFERRY_TCP_BIND", "127.0.0.1")]
                .map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .unwrap();
        assert_eq!(env.listener_bind_addr(), "127.0.0.1".parse::<IpAddr>().unwrap());
    }
}
