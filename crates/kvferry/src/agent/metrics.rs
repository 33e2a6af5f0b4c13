//! The agent's side of telemetry: its metrics rendered with the state the
//! gauges show, and an HTTP exporter for them.

use std::sync::Arc;

use super::Agent;
use crate::error::{Error, ErrorKind, Result};
use crate::telemetry::{AgentGauges, MetricsServer};

impl Agent {
    /// Whether telemetry is on ([`AgentConfig::telemetry`](crate::AgentConfig)):
    /// requests record [`XferTelemetry`](crate::XferTelemetry) and the agent counts metrics.
    pub fn telemetry_enabled(&self) -> bool {
        self.inner.metrics.is_some()
    }

    /// The agent's metrics in Prometheus' text format (see
    /// [`telemetry`](crate::telemetry) for the families), for an
    /// application that serves them itself. `NotSupported` while telemetry is off.
    pub fn metrics_text(&self) -> Result<String> {
        let Some(m) = &self.inner.metrics else {
            return Err(Error::new(
                ErrorKind::NotSupported,
                format!(
                    "agent '{}': telemetry is off; set AgentConfig::telemetry or KVFERRY_TELEMETRY=1 before creating it",
                    self.name()
                ),
            ));
        };
        m.render(&self.gauges())
    }

    fn gauges(&self) -> AgentGauges {
        let (registered_bytes, registrations) = {
            let r = self.inner.regions.read();
            (r.iter().map(|(_, v)| v.region.len).sum(), r.len() as u64)
        };
        AgentGauges {
            registered_bytes,
            registrations,
            loaded_peers: self.inner.peers.read().len() as u64,
            notifs_queued: self.inner.notifs.len() as u64,
            notifs_dropped: self.inner.notifs.dropped(),
            served: self
                .inner
                .backends
                .read()
                .iter()
                .flat_map(|b| b.backend.served().into_iter().map(|(peer, st)| (b.name.to_string(), peer, st)))
                .collect(),
        }
    }

    /// Serves [`metrics_text`](Self::metrics_text) at `http://{addr}/metrics`
    /// until the returned server is dropped (`addr` like `127.0.0.1:9400`;
    /// port 0 picks one). The server does not keep the agent alive: once it
    /// is gone, scrapes get 500. `NotSupported` while telemetry is off.
    pub fn serve_metrics(&self, addr: &str) -> Result<MetricsServer> {
        self.metrics_text()?;
        let weak = Arc::downgrade(&self.inner);
        MetricsServer::start(
            addr,
            Arc::new(move || match weak.upgrade() {
                Some(inner) => Agent { inner }.metrics_text(),
                None => Err(Error::new(ErrorKind::NotFound, "the agent was dropped")),
            }),
        )
    }
}
