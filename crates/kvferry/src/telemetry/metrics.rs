//! An agent's counters and histograms, in a Prometheus registry of its own.
//!
//! Families (every one carries the constant label `agent`):
//!
//! | family | labels | what |
//! |---|---|---|
//! | `kvferry_tx_bytes_total`, `kvferry_rx_bytes_total` | backend, peer | bytes WRITE sent / READ received |
//! | `kvferry_tx_requests_total`, `kvferry_rx_requests_total` | backend, peer | postings completed |
//! | `kvferry_xfer_time_seconds` | backend, op | post to completion seen (histogram) |
//! | `kvferry_post_time_seconds` | backend, op | time inside `post` (histogram) |
//! | `kvferry_errors_total` | backend, kind | failed postings by [`ErrorKind`] |
//! | `kvferry_registered_bytes`, `kvferry_registrations` | | memory and files registered now |
//! | `kvferry_loaded_peers` | | remote agents loaded now |
//! | `kvferry_notifs_queued`, `kvferry_notifs_dropped_total` | | notifications held, refused |
//! | `kvferry_served_bytes_total` | backend, peer, op | bytes peers' requests moved here, as their target |
//! | `kvferry_served_frames_total`, `kvferry_refused_frames_total` | backend, peer | frames served, refused |
//! | `kvferry_serve_time_seconds` | backend, peer | time to serve a frame, header to answer (histogram) |
//!
//! Peer names are chosen by peers, so the `peer` label is bounded: the
//! first [`PEER_LABELS`] peers get their own series, the rest share
//! `other`. Label sets are resolved once per request ([`XferMetrics`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::backend::{ServedStats, SERVE_TIME_BOUNDS};
use crate::error::{Error, ErrorKind, Result};
use crate::types::XferOp;

/// Peers with a `peer` label of their own; later ones are counted as `other`.
pub const PEER_LABELS: usize = 64;

/// The label value shared by peers beyond [`PEER_LABELS`].
pub const OTHER_PEER: &str = "other";

/// An agent's metrics (see the module doc for the families).
pub struct AgentMetrics {
    registry: Registry,
    tx_bytes: IntCounterVec,
    rx_bytes: IntCounterVec,
    tx_requests: IntCounterVec,
    rx_requests: IntCounterVec,
    xfer_time: HistogramVec,
    post_time: HistogramVec,
    errors: IntCounterVec,
    registered_bytes: IntGauge,
    registrations: IntGauge,
    loaded_peers: IntGauge,
    notifs_queued: IntGauge,
    notifs_dropped: IntCounter,
    served_bytes: IntCounterVec,
    served_frames: IntCounterVec,
    refused_frames: IntCounterVec,
    /// The agent's name, for the families rendered by hand.
    agent: String,
    /// Peers that have a label of their own.
    peers: Mutex<HashSet<String>>,
    /// Held while rendering: the counters that follow the agent's totals are
    /// advanced by differences, once.
    render: Mutex<()>,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").field("peers", &self.peers.lock().len()).finish()
    }
}

fn metric_err(e: prometheus::Error) -> Error {
    Error::internal(format!("metrics registry: {e}"))
}

/// The agent's state that the gauges (and the totals kept elsewhere) show,
/// read when metrics are rendered.
#[derive(Clone, Debug, Default)]
pub struct AgentGauges {
    /// Bytes of memory and files registered now.
    pub registered_bytes: u64,
    /// Registrations held now.
    pub registrations: u64,
    /// Remote agents loaded now.
    pub loaded_peers: u64,
    /// Notifications received and not yet taken.
    pub notifs_queued: u64,
    /// Notifications refused so far (a full queue).
    pub notifs_dropped: u64,
    /// What each backend served to each peer as its target: `(backend, peer, totals)`.
    pub served: Vec<(String, String, ServedStats)>,
}

/// Advances `c` to `total` (a total counted elsewhere); never backwards.
fn follow(c: &IntCounter, total: u64) {
    let seen = c.get();
    if total > seen {
        c.inc_by(total - seen);
    }
}

impl AgentMetrics {
    /// A registry for agent `agent` with every family registered.
    pub fn new(agent: &str) -> Result<AgentMetrics> {
        let labels = [("agent".to_string(), agent.to_string())].into_iter().collect();
        let registry = Registry::new_custom(None, Some(labels)).map_err(metric_err)?;
        let counters = |name: &str, help: &str, l: &[&str]| -> Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), l).map_err(metric_err)?;
            registry.register(Box::new(c.clone())).map_err(metric_err)?;
            Ok(c)
        };
        // 1 µs to about 4 s, by factors of 4.
        let buckets = exponential_buckets(1e-6, 4.0, 12).map_err(metric_err)?;
        let histograms = |name: &str, help: &str| -> Result<HistogramVec> {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.clone()), &["backend", "op"])
                .map_err(metric_err)?;
            registry.register(Box::new(h.clone())).map_err(metric_err)?;
            Ok(h)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge> {
            let g = IntGauge::new(name, help).map_err(metric_err)?;
            registry.register(Box::new(g.clone())).map_err(metric_err)?;
            Ok(g)
        };
        let bp = ["backend", "peer"];
        let notifs_dropped =
            IntCounter::new("kvferry_notifs_dropped_total", "Notifications refused because the queue was full.")
                .map_err(metric_err)?;
        registry.register(Box::new(notifs_dropped.clone())).map_err(metric_err)?;
        Ok(AgentMetrics {
            tx_bytes: counters("kvferry_tx_bytes_total", "Bytes sent by completed WRITE postings.", &bp)?,
            rx_bytes: counters("kvferry_rx_bytes_total", "Bytes received by completed READ postings.", &bp)?,
            tx_requests: counters("kvferry_tx_requests_total", "Completed WRITE postings.", &bp)?,
            rx_requests: counters("kvferry_rx_requests_total", "Completed READ postings.", &bp)?,
            xfer_time: histograms("kvferry_xfer_time_seconds", "From post to completion seen, per posting.")?,
            post_time: histograms("kvferry_post_time_seconds", "Time spent inside post, per posting.")?,
            errors: counters("kvferry_errors_total", "Failed postings by error kind.", &["backend", "kind"])?,
            registered_bytes: gauge("kvferry_registered_bytes", "Bytes of memory and files registered.")?,
            registrations: gauge("kvferry_registrations", "Registrations held.")?,
            loaded_peers: gauge("kvferry_loaded_peers", "Remote agents whose metadata is loaded.")?,
            notifs_queued: gauge("kvferry_notifs_queued", "Notifications received and not yet taken.")?,
            notifs_dropped,
            served_bytes: counters(
                "kvferry_served_bytes_total",
                "Bytes peers' requests moved here.",
                &["backend", "peer", "op"],
            )?,
            served_frames: counters("kvferry_served_frames_total", "Frames served to peers.", &bp)?,
            refused_frames: counters("kvferry_refused_frames_total", "Frames of peers refused.", &bp)?,
            agent: agent.to_string(),
            registry,
            peers: Mutex::new(HashSet::new()),
            render: Mutex::new(()),
        })
    }

    /// The `peer` label for `peer`: its name while fewer than
    /// [`PEER_LABELS`] peers have one, else [`OTHER_PEER`].
    fn peer_label(&self, peer: &str) -> String {
        let mut p = self.peers.lock();
        if p.contains(peer) || (p.len() < PEER_LABELS && p.insert(peer.to_string())) {
            peer.to_string()
        } else {
            OTHER_PEER.to_string()
        }
    }

    /// The series one request updates, resolved once (at request creation).
    pub(crate) fn xfer(&self, backend: &str, op: XferOp, peer: &str) -> Arc<XferMetrics> {
        let peer = self.peer_label(peer);
        let (bytes, requests) = match op {
            XferOp::Write => (&self.tx_bytes, &self.tx_requests),
            XferOp::Read => (&self.rx_bytes, &self.rx_requests),
        };
        let bp = [backend, peer.as_str()];
        let op = match op {
            XferOp::Write => "WRITE",
            XferOp::Read => "READ",
        };
        let bo = [backend, op];
        Arc::new(XferMetrics {
            bytes: bytes.with_label_values(&bp),
            requests: requests.with_label_values(&bp),
            xfer_time: self.xfer_time.with_label_values(&bo),
            post_time: self.post_time.with_label_values(&bo),
            errors: self.errors.clone(),
            backend: backend.to_string(),
        })
    }

    /// Renders every family in Prometheus' text format (version 0.0.4),
    /// with the gauges set from `g` first.
    pub fn render(&self, g: &AgentGauges) -> Result<String> {
        let _one = self.render.lock();
        let clamp = |v: u64| v.min(i64::MAX as u64) as i64;
        self.registered_bytes.set(clamp(g.registered_bytes));
        self.registrations.set(clamp(g.registrations));
        self.loaded_peers.set(clamp(g.loaded_peers));
        self.notifs_queued.set(clamp(g.notifs_queued));
        follow(&self.notifs_dropped, g.notifs_dropped);
        let served: Vec<_> = g.served.iter().filter(|(_, _, st)| st.frames + st.refused > 0).collect();
        for (b, peer, st) in &served {
            let (b, peer) = (b.as_str(), peer.as_str());
            follow(&self.served_bytes.with_label_values(&[b, peer, "WRITE"]), st.write_bytes);
            follow(&self.served_bytes.with_label_values(&[b, peer, "READ"]), st.read_bytes);
            follow(&self.served_frames.with_label_values(&[b, peer]), st.frames);
            follow(&self.refused_frames.with_label_values(&[b, peer]), st.refused);
        }
        let mut text = TextEncoder::new().encode_to_string(&self.registry.gather()).map_err(metric_err)?;
        serve_time_family(&mut text, &self.agent, &served);
        Ok(text)
    }
}

/// Appends `kvferry_serve_time_seconds`, a histogram whose buckets the
/// backends count themselves (so it is written here, not by the registry).
fn serve_time_family(text: &mut String, agent: &str, served: &[&(String, String, ServedStats)]) {
    use std::fmt::Write as _;
    if served.is_empty() {
        return;
    }
    text.push_str("# HELP kvferry_serve_time_seconds Time to serve a peer's frame, header to answer.\n");
    text.push_str("# TYPE kvferry_serve_time_seconds histogram\n");
    for (b, peer, st) in served {
        let labels = format!("backend=\"{}\",peer=\"{}\",agent=\"{}\"", escape(b), escape(peer), escape(agent));
        let mut cum = 0u64;
        for (i, n) in st.time_buckets.iter().enumerate() {
            cum += n;
            let le = SERVE_TIME_BOUNDS.get(i).map(|b| b.to_string()).unwrap_or_else(|| "+Inf".into());
            let _ = writeln!(text, "kvferry_serve_time_seconds_bucket{{{labels},le=\"{le}\"}} {cum}");
        }
        let _ = writeln!(text, "kvferry_serve_time_seconds_sum{{{labels}}} {}", st.time_sum.as_secs_f64());
        let _ = writeln!(text, "kvferry_serve_time_seconds_count{{{labels}}} {cum}");
    }
}

/// A label value in Prometheus' text format: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The series of one request (its backend, op and peer), resolved once.
pub(crate) struct XferMetrics {
    bytes: IntCounter,
    requests: IntCounter,
    xfer_time: Histogram,
    post_time: Histogram,
    errors: IntCounterVec,
    backend: String,
}

impl XferMetrics {
    /// Counts one posting that ended: `Ok` adds its bytes and request,
    /// an error its kind; both record the times.
    pub(crate) fn record(&self, post: Duration, total: Duration, bytes: u64, r: std::result::Result<(), ErrorKind>) {
        self.post_time.observe(post.as_secs_f64());
        self.xfer_time.observe(total.as_secs_f64());
        match r {
            Ok(()) => {
                self.bytes.inc_by(bytes);
                self.requests.inc();
            }
            Err(kind) => self.errors.with_label_values(&[self.backend.as_str(), &kind_label(kind)]).inc(),
        }
    }
}

/// The `kind` label of an error: its name in snake case (`remote_disconnect`).
fn kind_label(kind: ErrorKind) -> String {
    let name = format!("{kind:?}");
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postings_show_in_the_text_format() {
        let m = AgentMetrics::new("a1").unwrap();
        let x = m.xfer("TCP", XferOp::Write, "b");
        x.record(Duration::from_micros(3), Duration::from_micros(40), 4096, Ok(()));
        x.record(Duration::from_micros(3), Duration::from_micros(40), 4096, Ok(()));
        x.record(Duration::from_micros(3), Duration::from_millis(2), 4096, Err(ErrorKind::RemoteDisconnect));
        let r = m.xfer("SHM", XferOp::Read, "c");
        r.record(Duration::from_micros(1), Duration::from_micros(9), 100, Ok(()));
        let served = ServedStats {
            write_bytes: 10,
            read_bytes: 20,
            frames: 3,
            refused: 1,
            time_buckets: vec![0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            time_sum: Duration::from_micros(20),
        };
        let g = AgentGauges {
            registered_bytes: 1 << 20,
            registrations: 2,
            loaded_peers: 2,
            notifs_queued: 1,
            notifs_dropped: 3,
            served: vec![("TCP".into(), "b\"x".into(), served.clone())],
        };
        let text = m.render(&g).unwrap();
        for line in [
            r#"kvferry_tx_bytes_total{backend="TCP",peer="b",agent="a1"} 8192"#,
            r#"kvferry_tx_requests_total{backend="TCP",peer="b",agent="a1"} 2"#,
            r#"kvferry_rx_bytes_total{backend="SHM",peer="c",agent="a1"} 100"#,
            r#"kvferry_errors_total{backend="TCP",kind="remote_disconnect",agent="a1"} 1"#,
            r#"kvferry_xfer_time_seconds_count{backend="TCP",op="WRITE",agent="a1"} 3"#,
            r#"kvferry_registered_bytes{agent="a1"} 1048576"#,
            r#"kvferry_loaded_peers{agent="a1"} 2"#,
            r#"kvferry_notifs_dropped_total{agent="a1"} 3"#,
            r#"kvferry_served_bytes_total{backend="TCP",op="READ",peer="b\"x",agent="a1"} 20"#,
            r#"kvferry_refused_frames_total{backend="TCP",peer="b\"x",agent="a1"} 1"#,
            r#"kvferry_serve_time_seconds_bucket{backend="TCP",peer="b\"x",agent="a1",le="0.000004"} 2"#,
            r#"kvferry_serve_time_seconds_bucket{backend="TCP",peer="b\"x",agent="a1",le="+Inf"} 3"#,
            r#"kvferry_serve_time_seconds_count{backend="TCP",peer="b\"x",agent="a1"} 3"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(text.contains("# TYPE kvferry_xfer_time_seconds histogram"));
        // The dropped counter follows the agent's count without double counting.
        let served = ServedStats { write_bytes: 15, ..served };
        let text = m
            .render(&AgentGauges { notifs_dropped: 5, served: vec![("TCP".into(), "b\"x".into(), served)], ..g })
            .unwrap();
        assert!(text.contains(r#"kvferry_notifs_dropped_total{agent="a1"} 5"#), "{text}");
        assert!(
            text.contains(r#"kvferry_served_bytes_total{backend="TCP",op="WRITE",peer="b\"x",agent="a1"} 15"#),
            "{text}"
        );
    }

    #[test]
    fn peer_labels_are_bounded() {
        let m = AgentMetrics::new("a").unwrap();
        for i in 0..PEER_LABELS + 50 {
            m.xfer("TCP", XferOp::Write, &format!("peer-{i}\"\n{{}}")).record(
                Duration::ZERO,
                Duration::ZERO,
                1,
                Ok(()),
            );
        }
        let text = m.render(&AgentGauges::default()).unwrap();
        let series = text.lines().filter(|l| l.starts_with("kvferry_tx_bytes_total{")).count();
        assert_eq!(series, PEER_LABELS + 1, "{PEER_LABELS} named peers and `other`");
        assert!(text.contains(r#"peer="other",agent="a"} 50"#), "{text}");
        // Hostile names are escaped, never break a line.
        assert!(text.lines().all(|l| l.starts_with('#') || l.starts_with("kvferry_")), "{text}");
    }

    #[test]
    fn error_kinds_are_snake_case() {
        assert_eq!(kind_label(ErrorKind::RemoteDisconnect), "remote_disconnect");
        assert_eq!(kind_label(ErrorKind::Timeout), "timeout");
    }
}
