//! Telemetry: what a request took ([`XferTelemetry`]) and what an agent
//! moved ([`AgentMetrics`], in Prometheus' text format), after NIXL's
//! `getXferTelemetry` and its agent events (`agent_tx_bytes`,
//! `agent_xfer_time`, `agent_err_*`, …).
//!
//! Both are off unless [`AgentConfig::telemetry`](crate::AgentConfig) is set
//! (or `KVFERRY_TELEMETRY=1`, or NIXL's `NIXL_TELEMETRY_ENABLE=y`). Off, a
//! request carries no telemetry state and a posting pays one branch; on, a
//! posting reads the clock twice and updates counters resolved when the
//! request was created (no label lookup, no lock, no allocation per posting).
//!
//! [`MetricsServer`] serves an agent's metrics at `GET /metrics` for a
//! Prometheus scraper (`kvferry serve --metrics-port N`).

mod exporter;
mod metrics;

use std::time::{Duration, SystemTime};

pub use exporter::MetricsServer;
pub(crate) use metrics::XferMetrics;
pub use metrics::{AgentGauges, AgentMetrics, OTHER_PEER, PEER_LABELS};

/// Environment variables that turn telemetry on: kvferry's, then NIXL's.
pub const TELEMETRY_ENV: [&str; 2] = ["KVFERRY_TELEMETRY", "NIXL_TELEMETRY_ENABLE"];

/// Whether a telemetry switch's value means "on" (`1`, `y`, `yes`, `true`,
/// `on`, any case), as NIXL reads `NIXL_TELEMETRY_ENABLE`.
pub fn switch_on(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "1" | "y" | "yes" | "true" | "on")
}

/// What one posting of a request took, as NIXL's `nixlXferTelemetry`
/// reports it: recorded when the posting completed (or failed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XferTelemetry {
    /// When the posting started (wall clock).
    pub start: SystemTime,
    /// How long `post` itself took.
    pub post_duration: Duration,
    /// From the start of `post` until completion was seen (by `post`,
    /// `status` or `wait`): an upper bound that includes how late the
    /// application looked.
    pub xfer_duration: Duration,
    /// Bytes the posting moved (or was to move, when it failed).
    pub total_bytes: u64,
    /// Descriptors of the request, after merging contiguous runs.
    pub desc_count: usize,
    /// The backend that carried it.
    pub backend: String,
    /// Whether it completed (`false`: it failed or was canceled).
    pub ok: bool,
}

impl XferTelemetry {
    /// Microseconds since the Unix epoch of [`start`](Self::start) (NIXL's `startTime`).
    pub fn start_us(&self) -> u64 {
        self.start.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
    }
}
