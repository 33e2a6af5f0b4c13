//! Mooncake's `transfer_engine_nvmeof_generic_bench` spelled on
//! `kvferry bench storage` (seed 002): its flags as aliases, discovery of
//! the target through a metadata service by segment id, its environment
//! variables, and its `Test completed:` line.
//!
//! A Mooncake target is found by its `--local_server_name` in the metadata
//! service given by `--metadata_server`; kvferry's target takes that name
//! as its agent name and publishes its metadata (files included) to the
//! store — an `http://host:port[/metadata]` URL of `kvferry meta-server`,
//! or an `etcd://host:port` / `host:2379` etcd endpoint — and the initiator
//! fetches the agent named `--segment_id`. The NVMe-oF transport flags
//! (`--trtype`, `--traddr`, `--trsvcid`) are accepted and ignored: kvferry
//! serves exported files over its TCP backend.

use clap::Args;
use kvferry::{AgentConfig, Error, Result};

use super::report::Point;

/// Mooncake's flags that kvferry's own do not already spell.
#[derive(Args, Debug, Clone, Default)]
pub struct MooncakeFlags {
    /// Mooncake: this agent's name (its segment id), e.g. 127.0.0.1:8081.
    #[arg(long = "local-server-name", alias = "local_server_name")]
    pub local_server_name: Option<String>,
    /// Mooncake: the metadata service (`http://host:port/metadata` of
    /// `kvferry meta-server`, or an etcd endpoint `etcd://host:2379`).
    #[arg(long = "metadata-server", alias = "metadata_server")]
    pub metadata_server: Option<String>,
    /// Mooncake: the target's segment id (its --local_server_name).
    #[arg(long = "segment-id", alias = "segment_id")]
    pub segment_id: Option<String>,
    /// Mooncake: unit of the `Test completed:` throughput: GB, GiB, Gb or MB.
    #[arg(long = "report-unit", alias = "report_unit", default_value = "GB")]
    pub report_unit: String,
    /// Mooncake's NVMe-oF transport type: accepted and ignored (kvferry serves files over TCP).
    #[arg(long, hide = true)]
    pub trtype: Option<String>,
    /// Mooncake's NVMe-oF target address: accepted and ignored.
    #[arg(long, hide = true)]
    pub traddr: Option<String>,
    /// Mooncake's NVMe-oF service id: accepted and ignored.
    #[arg(long, hide = true)]
    pub trsvcid: Option<String>,
}

/// Units of `--report_unit`: bytes per unit.
fn unit_bytes(unit: &str) -> Result<f64> {
    match unit {
        "GB" => Ok(1e9),
        "GiB" => Ok((1u64 << 30) as f64),
        "Gb" => Ok(1e9 / 8.0),
        "MB" => Ok(1e6),
        "MiB" => Ok((1u64 << 20) as f64),
        _ => Err(Error::invalid(format!("--report_unit '{unit}': expected GB, GiB, Gb or MB"))),
    }
}

impl MooncakeFlags {
    /// Checks the flags before anything starts.
    pub fn check(&self) -> Result<()> {
        unit_bytes(&self.report_unit)?;
        if self.segment_id.is_some() && self.metadata_server.is_none() {
            return Err(Error::invalid("--segment_id needs --metadata_server: where to find the target"));
        }
        Ok(())
    }

    /// `config` with the store `--metadata_server` names, if any.
    pub fn with_store(&self, config: AgentConfig) -> Result<AgentConfig> {
        let Some(url) = &self.metadata_server else { return Ok(config) };
        Ok(match store_of(url)? {
            Store::Http(base) => config.with_metadata_url(base),
            Store::Etcd(ep) => config.with_etcd(&[ep.as_str()]),
        })
    }

    /// Mooncake's summary line over the points measured:
    /// `Test completed: duration 30.00, batch count N, throughput X GB/s`.
    pub fn completed_line(&self, points: &[Point]) -> Result<String> {
        let per = unit_bytes(&self.report_unit)?;
        let batches: u64 = points.iter().map(|p| p.iters).sum();
        let bytes: u64 = points.iter().map(|p| p.bytes).sum();
        let secs: f64 = points.iter().map(|p| p.seconds).sum::<f64>().max(1e-9);
        Ok(format!(
            "Test completed: duration {secs:.2}, batch count {batches}, throughput {:.2} {}/s",
            bytes as f64 / secs / per,
            self.report_unit
        ))
    }
}

/// Where `--metadata_server` points.
#[derive(Debug, PartialEq, Eq)]
enum Store {
    /// A kvferry metadata server's base URL.
    Http(String),
    /// An etcd endpoint (`http://host:port`).
    Etcd(String),
}

fn store_of(url: &str) -> Result<Store> {
    if let Some(rest) = url.strip_prefix("etcd://") {
        return Ok(Store::Etcd(format!("http://{}", rest.trim_end_matches('/'))));
    }
    if let Some(rest) = url.strip_prefix("http://") {
        let hostport = rest.split('/').next().unwrap_or("");
        if hostport.is_empty() {
            return Err(Error::invalid(format!("--metadata_server '{url}' names no host")));
        }
        return Ok(Store::Http(format!("http://{hostport}")));
    }
    if url.contains("://") {
        return Err(Error::invalid(format!(
            "--metadata_server '{url}': expected http://host:port[/metadata] (kvferry meta-server) or etcd://host:port"
        )));
    }
    // Mooncake takes a bare etcd endpoint too.
    Ok(Store::Etcd(format!("http://{url}")))
}

/// Whether an environment switch (`MC_NVMEOF_GENERIC_DIRECT_IO=on`) is on.
fn switch(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true" | "y")
}

/// The value of kvferry's variable or Mooncake's, in that order.
fn env2(ours: &str, theirs: &str) -> Option<String> {
    std::env::var(ours).ok().or_else(|| std::env::var(theirs).ok()).filter(|v| !v.trim().is_empty())
}

/// `KVFERRY_FILES_DIRECT_IO` (or Mooncake's `MC_NVMEOF_GENERIC_DIRECT_IO`): O_DIRECT on.
pub fn env_direct_io() -> bool {
    env2("KVFERRY_FILES_DIRECT_IO", "MC_NVMEOF_GENERIC_DIRECT_IO").is_some_and(|v| switch(&v))
}

/// `KVFERRY_FILES_NUM_WORKERS` (or `MC_NVMEOF_GENERIC_NUM_WORKERS`): the
/// POSIX thread-pool's `threads`; an error if it is not a count.
pub fn env_num_workers() -> Result<Option<usize>> {
    let Some(v) = env2("KVFERRY_FILES_NUM_WORKERS", "MC_NVMEOF_GENERIC_NUM_WORKERS") else { return Ok(None) };
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(Some(n)),
        _ => Err(Error::invalid(format!(
            "KVFERRY_FILES_NUM_WORKERS / MC_NVMEOF_GENERIC_NUM_WORKERS '{v}': expected 1..=1024"
        ))),
    }
}

/// Mooncake's `--files="a b c"`: entries split on whitespace as well as commas.
pub fn split_files(files: &[std::path::PathBuf]) -> Vec<std::path::PathBuf> {
    files
        .iter()
        .flat_map(|p| p.to_string_lossy().split_whitespace().map(std::path::PathBuf::from).collect::<Vec<_>>())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_server_spellings() {
        assert_eq!(store_of("http://127.0.0.1:8080/metadata").unwrap(), Store::Http("http://127.0.0.1:8080".into()));
        assert_eq!(store_of("http://h:1").unwrap(), Store::Http("http://h:1".into()));
        assert_eq!(store_of("etcd://10.0.0.1:2379").unwrap(), Store::Etcd("http://10.0.0.1:2379".into()));
        assert_eq!(store_of("10.0.0.1:2379").unwrap(), Store::Etcd("http://10.0.0.1:2379".into()));
        assert!(store_of("redis://x:1").unwrap_err().to_string().contains("expected http://"));
        assert!(store_of("http:///metadata").is_err());
    }

    #[test]
    fn units_files_and_switches() {
        assert_eq!(unit_bytes("Gb").unwrap(), 1.25e8);
        assert!(unit_bytes("TB").unwrap_err().to_string().contains("GB, GiB, Gb or MB"));
        let f = split_files(&["/a /b".into(), "/c".into()]);
        assert_eq!(f, vec![std::path::PathBuf::from("/a"), "/b".into(), "/c".into()]);
        assert!(switch("on") && switch("1") && !switch("off"));
    }
}
