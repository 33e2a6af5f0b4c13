//! Agent configuration. `impl Default` is the single source of defaults; each
//! field's doc ends with its default and why.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::params::Params;

/// How an [`Agent`](crate::Agent) behaves. Build with `AgentConfig::default()`
/// and the setters, or read the environment with [`AgentConfig::from_env`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// Serve metadata requests from peers on `listen_addr:listen_port`.
    /// Default: off, as in NIXL; turn on for peer-to-peer metadata exchange.
    pub listener: bool,
    /// Address the metadata listener binds. Default: `0.0.0.0` (all interfaces).
    pub listen_addr: IpAddr,
    /// Port of the metadata listener; 0 picks a free one. Default: 0.
    pub listen_port: u16,
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
    /// handshake. Default: `KVFERRY_AUTH_TOKEN` if set, else none.
    pub auth_token: Option<String>,
    /// Backends created with the agent, in order, with their parameters.
    /// Default: none (add them with `create_backend`), or `KVFERRY_BACKENDS`
    /// through [`AgentConfig::from_env`].
    pub backends: Vec<(String, Params)>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            listener: false,
            listen_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            listen_port: 0,
            worker_threads: 0,
            connect_timeout: Duration::from_secs(2),
            peer_timeout: Duration::from_secs(2),
            metadata_timeout: Duration::from_secs(5),
            auth_token: std::env::var("KVFERRY_AUTH_TOKEN").ok().filter(|t| !t.is_empty()),
            backends: Vec::new(),
        }
    }
}

impl AgentConfig {
    /// Turns the metadata listener on at `port` (0: any free port).
    pub fn with_listener(mut self, port: u16) -> Self {
        self.listener = true;
        self.listen_port = port;
        self
    }

    /// Sets the peer timeout (see [`peer_timeout`](Self::peer_timeout)).
    pub fn with_peer_timeout(mut self, t: Duration) -> Self {
        self.peer_timeout = t;
        self
    }

    /// Sets the shared secret (see [`auth_token`](Self::auth_token)).
    pub fn with_auth_token(mut self, token: impl Into<String>) -> Self {
        self.auth_token = Some(token.into());
        self
    }

    /// Adds a backend to create with the agent.
    pub fn with_backend(mut self, name: &str, params: Params) -> Self {
        self.backends.push((name.to_string(), params));
        self
    }

    /// Defaults, plus the backends named by the environment:
    /// `KVFERRY_BACKENDS=tcp,posix` and `KVFERRY_<BACKEND>_<PARAM>=value`
    /// (for example `KVFERRY_TCP_LANES=8`).
    pub fn from_env() -> Result<Self> {
        Self::from_vars(std::env::vars())
    }

    /// [`from_env`](Self::from_env) over explicit variables, for tests and embedding.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let mut cfg = AgentConfig::default();
        if let Some((_, t)) = vars.iter().find(|(k, _)| k == "KVFERRY_AUTH_TOKEN") {
            cfg.auth_token = Some(t.clone()).filter(|t| !t.is_empty());
        }
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
        assert_eq!(cfg.auth_token.as_deref(), Some("s3cret"));
        let bad = AgentConfig::from_vars([("KVFERRY_BACKENDS".to_string(), "tc p".to_string())]);
        assert!(bad.is_err());
    }
}
