//! `kvferry bench meta`: how long it takes to publish one agent's metadata
//! and fetch it on another agent, through each way of exchanging it, and
//! how large the blob is.

use std::time::{Duration, Instant};

use clap::Args;
use kvferry::metadata::server::MetaServer;
use kvferry::{Agent, AgentConfig, AlignedBuf, Error, MetaPeer, Params, Result};
use serde::Serialize;

/// Arguments of `kvferry bench meta`.
#[derive(Args, Debug, Clone)]
pub struct MetaArgs {
    /// Registered regions on the publishing agent.
    #[arg(long, default_value_t = 1000)]
    pub regions: usize,
    /// Publish-and-fetch rounds per way (the median is reported).
    #[arg(long, default_value_t = 30)]
    pub iters: usize,
    /// Also measure etcd at these endpoints (`http://host:2379`, comma-separated).
    #[arg(long)]
    pub etcd: Option<String>,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    bench: &'static str,
    way: String,
    regions: usize,
    blob_bytes: usize,
    iters: usize,
    us_p50: f64,
    us_min: f64,
    us_max: f64,
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn agents(tag: &str, cfg: AgentConfig, regions: usize) -> Result<(Agent, Agent, AlignedBuf, kvferry::Registration)> {
    let pid = std::process::id();
    let publisher = Agent::new(&format!("meta-pub-{tag}-{pid}"), cfg.clone().with_backend("tcp", Params::new()))?;
    let fetcher = Agent::new(&format!("meta-fetch-{tag}-{pid}"), cfg.with_backend("tcp", Params::new()))?;
    // Many small regions: one registration descriptor per 4 KiB page.
    let buf = AlignedBuf::new(regions.max(1) * 4096)?;
    let mut list = kvferry::RegDescList::new(kvferry::MemType::Dram);
    for i in 0..regions {
        list.push(kvferry::RegDesc::new(buf.addr() + (i * 4096) as u64, 4096, 0));
    }
    // SAFETY: `buf` is returned with the registration and outlives it at every caller.
    let reg = unsafe { publisher.register_mem(&list, &[]) }?;
    Ok((publisher, fetcher, buf, reg))
}

fn time_rounds(iters: usize, mut round: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    (0..iters)
        .map(|_| {
            let t = Instant::now();
            round()?;
            Ok(t.elapsed().as_secs_f64() * 1e6)
        })
        .collect()
}

fn wait_loaded(a: &Agent, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.check_remote(name, None) {
        if Instant::now() > deadline {
            return Err(Error::timeout(format!("metadata of '{name}' did not arrive within 10 s")));
        }
        std::hint::spin_loop();
    }
    Ok(())
}

/// Runs the measurement.
pub fn run(a: &MetaArgs) -> Result<()> {
    let mut rows = Vec::new();
    let mut push = |way: &str, blob: usize, v: Vec<f64>| {
        let (p50, min, max) = median(v);
        rows.push(Row {
            bench: "meta",
            way: way.into(),
            regions: a.regions,
            blob_bytes: blob,
            iters: a.iters,
            us_p50: p50,
            us_min: min,
            us_max: max,
        });
    };

    // In memory: local_metadata() → load_remote_metadata().
    let (p, f, _b, _r) = agents("mem", AgentConfig::env_defaults(), a.regions)?;
    let blob = p.local_metadata()?.len();
    push("in-memory", blob, time_rounds(a.iters, || f.load_remote_metadata(&p.local_metadata()?).map(drop))?);
    drop((p, f, _r));

    // Peer to peer: the fetcher pulls from the publisher's listener.
    let (p, f, _b, _r) = agents("p2p", AgentConfig::env_defaults().with_listener(0), a.regions)?;
    let port = p.listen_port().ok_or_else(|| Error::internal("listener did not start"))?;
    let to = MetaPeer::addr("127.0.0.1", port)?;
    push(
        "peer-to-peer",
        blob,
        time_rounds(a.iters, || {
            let _ = f.invalidate_remote(p.name());
            f.fetch_remote_metadata(p.name(), None, to)?;
            wait_loaded(&f, p.name())
        })?,
    );
    drop((p, f, _r));

    // A central store: publish, then fetch on the other agent.
    let through_store = |tag: &str, cfg: AgentConfig| -> Result<Vec<f64>> {
        let (p, f, _b, _r) = agents(tag, cfg, a.regions)?;
        let v = time_rounds(a.iters, || {
            let _ = f.invalidate_remote(p.name());
            p.send_local_metadata(MetaPeer::Store)?;
            f.fetch_remote_metadata(p.name(), None, MetaPeer::Store)
        })?;
        p.invalidate_local_metadata(MetaPeer::Store)?;
        Ok(v)
    };
    let srv = MetaServer::start("127.0.0.1:0")?;
    push("meta-server", blob, through_store("srv", AgentConfig::env_defaults().with_metadata_url(srv.url()))?);
    drop(srv);
    if let Some(eps) = &a.etcd {
        let eps: Vec<&str> = eps.split(',').collect();
        let mut cfg = AgentConfig::env_defaults().with_etcd(&eps);
        cfg.metadata_namespace = format!("/kvferry-bench-{}/agents/", std::process::id());
        push("etcd", blob, through_store("etcd", cfg)?);
    }

    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        }
    } else {
        println!("metadata of an agent with {} regions: {} bytes", a.regions, blob);
        println!("{:<14} {:>12} {:>12} {:>12}", "way", "p50 us", "min us", "max us");
        for r in &rows {
            println!("{:<14} {:>12.0} {:>12.0} {:>12.0}", r.way, r.us_p50, r.us_min, r.us_max);
        }
        println!("(publish + fetch + load on a second agent, {} rounds each)", a.iters);
    }
    Ok(())
}
