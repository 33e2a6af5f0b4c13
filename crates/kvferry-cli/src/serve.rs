//! `kvferry serve`: a long-running target agent. It registers memory (and
//! files, with the POSIX backend), hands its metadata to every client that
//! connects to its rendezvous port, optionally serves it peer to peer on a
//! metadata listener and publishes it to a central store, and serves
//! transfers until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use kvferry::params::parse_size;
use kvferry::{Agent, AgentConfig, AlignedBuf, Error, MemType, MetaPeer, Params, RegDesc, RegDescList, Result};

use crate::rendezvous::{self, Msg};

/// Arguments of `kvferry serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Agent name.
    #[arg(long, default_value = "kvferry-target")]
    pub name: String,
    /// Backends to run (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "tcp")]
    pub backends: Vec<String>,
    /// DRAM to register and serve (e.g. 1G); 0 for none.
    #[arg(long, default_value = "256M")]
    pub mem_size: String,
    /// Files to export to remote initiators (created if missing; needs backends posix and tcp).
    #[arg(long, value_delimiter = ',')]
    pub files: Vec<PathBuf>,
    /// Size of files that do not exist yet (existing files keep their size).
    #[arg(long, default_value = "1G")]
    pub file_size: String,
    /// Open the files with O_DIRECT.
    #[arg(long)]
    pub direct: bool,
    /// Address of the rendezvous port. Clients must present KVFERRY_AUTH_TOKEN
    /// when it is set here; without it anyone who reaches the port gets the
    /// metadata (addresses and access keys): prefer a specific address.
    #[arg(long, default_value = "0.0.0.0")]
    pub ip: String,
    /// Rendezvous port (0: any free port, printed on start).
    #[arg(long, default_value_t = 5555)]
    pub port: u16,
    /// Backend parameter BACKEND.NAME=VALUE (repeatable), e.g. --param tcp.lanes=4.
    #[arg(long)]
    pub param: Vec<String>,
    /// Also serve metadata peer to peer on this port (NIXL's listener; 0 picks
    /// one). It binds where the TCP data port binds (`--param tcp.bind=IP`),
    /// else 0.0.0.0.
    #[arg(long)]
    pub listen_port: Option<u16>,
    /// Publish metadata and exposed descriptors to this metadata server.
    #[arg(long)]
    pub metadata_url: Option<String>,
    /// Publish metadata and exposed descriptors to etcd at these endpoints.
    #[arg(long)]
    pub etcd: Option<String>,
    /// Serve Prometheus metrics at http://METRICS_BIND:PORT/metrics (turns
    /// telemetry on; 0 picks a free port, printed on start).
    #[arg(long)]
    pub metrics_port: Option<u16>,
    /// Address the metrics port binds (the metrics name peers: keep it
    /// private unless a scraper elsewhere needs it).
    #[arg(long, default_value = "127.0.0.1")]
    pub metrics_bind: String,
}

fn config(a: &ServeArgs) -> Result<AgentConfig> {
    let mut cfg = AgentConfig::env_defaults();
    cfg.telemetry |= a.metrics_port.is_some();
    if let Some(p) = a.listen_port {
        cfg = cfg.with_listener(p);
    }
    if let Some(u) = &a.metadata_url {
        cfg = cfg.with_metadata_url(u.clone());
    }
    if let Some(e) = &a.etcd {
        cfg = cfg.with_etcd(&e.split(',').map(str::trim).collect::<Vec<_>>());
    }
    for b in &a.backends {
        let mut p = Params::new();
        for kv in &a.param {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| Error::invalid(format!("--param '{kv}' is not BACKEND.NAME=VALUE")))?;
            let (be, name) = k
                .split_once('.')
                .ok_or_else(|| Error::invalid(format!("--param '{kv}': name the backend, e.g. tcp.lanes=4")))?;
            if be.eq_ignore_ascii_case(b) {
                p.set(name, v);
            }
        }
        cfg = cfg.with_backend(b, p);
    }
    Ok(cfg)
}

/// Starts the `/metrics` exporter (`--metrics-port`) and prints its URL.
fn serve_metrics(agent: &Agent, bind: &str, port: u16) -> Result<kvferry::MetricsServer> {
    let host = if bind.contains(':') { format!("[{bind}]") } else { bind.to_string() };
    let m = agent.serve_metrics(&format!("{host}:{port}"))?;
    println!("KVFERRY-METRICS {}", m.url());
    Ok(m)
}

/// `kvferry serve`.
pub fn run(a: &ServeArgs) -> Result<()> {
    let agent = Agent::new(&a.name, config(a)?)?;
    let mem =
        parse_size(&a.mem_size).ok_or_else(|| Error::invalid(format!("--mem-size '{}' is not a size", a.mem_size)))?;
    let buf = if mem > 0 { Some(AlignedBuf::new(mem as usize)?) } else { None };
    let _mreg = buf.as_ref().map(|b| agent.register_buf(b)).transpose()?;
    // Files are exported to remote initiators (remote file segments): they need
    // POSIX and a network backend; initiators find them in the metadata.
    let default_size = parse_size(&a.file_size)
        .ok_or_else(|| Error::invalid(format!("--file-size '{}' is not a size", a.file_size)))?;
    let mut files = RegDescList::new(MemType::File);
    for f in &a.files {
        let size = std::fs::metadata(f).map(|m| m.len()).ok().filter(|&n| n > 0).unwrap_or(default_size);
        let id = agent.register_local_file(f, size, a.direct)?;
        files.push(RegDesc::new(0, size, id));
    }
    let _metrics = a.metrics_port.map(|port| serve_metrics(&agent, &a.metrics_bind, port)).transpose()?;
    let listener = rendezvous::listen(&a.ip, a.port)?;
    let addr = listener.local_addr().map_err(|e| Error::io("rendezvous: local address", e))?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| Error::io("installing signal handlers", e))?;
    }
    let descs =
        buf.as_ref().map(|b| b.xfer_blocks(0, b.len(), 1)).transpose()?.map(|l| l.to_bytes()).unwrap_or_default();
    let files_bytes = files.to_bytes();
    let published = agent.config().metadata_url.is_some() || !agent.config().etcd_endpoints.is_empty();
    if published {
        agent.send_local_metadata(MetaPeer::Store)?;
        let store = agent.store()?;
        store.put(&format!("/kvferry/serve/{}/descs", agent.name()), &descs)?;
        store.put(&format!("/kvferry/serve/{}/files", agent.name()), &files_bytes)?;
    }
    println!(
        "KVFERRY-TARGET listening on {addr} as '{}' with backends {:?}{}{}{}",
        agent.name(),
        agent.backends(),
        agent
            .listen_addr()
            .map(|a| format!(", metadata listener on port {} (bound to {})", a.port(), a.ip()))
            .unwrap_or_default(),
        if published { ", published to the metadata store" } else { "" },
        if agent.config().auth_token.is_some() { ", auth token required" } else { "" }
    );
    let limits = rendezvous::Limits { deadline: Duration::from_secs(10), ..rendezvous::Limits::default() };
    let server = rendezvous::Server::new(listener, limits, agent.config().auth_token.clone());
    let (ag, descs, files_bytes) = (agent.clone(), Arc::new(descs), Arc::new(files_bytes));
    let handler: rendezvous::Handler = Arc::new(move |s, peer, m, _deadline| match m {
        Msg::Hello { metadata, .. } => {
            // Capped like a listener SEND: the peers cap, regions caps, and
            // (without a token) no replacing a peer loaded from elsewhere.
            let name = ag.load_untrusted_metadata(&metadata, peer.ip())?;
            rendezvous::send(
                s,
                &Msg::Ready {
                    metadata: ag.local_metadata()?,
                    descs: descs.as_ref().clone(),
                    files: files_bytes.as_ref().clone(),
                },
            )?;
            eprintln!("serve: agent '{name}' connected from {peer}");
            Ok(())
        }
        _ => Err(Error::malformed("expected Hello")),
    });
    server.run(&stop, handler)?;
    eprintln!("serve: signalled, shutting down");
    if published {
        let store = agent.store()?;
        let _ = store.delete(&format!("/kvferry/serve/{}/descs", agent.name()));
        let _ = store.delete(&format!("/kvferry/serve/{}/files", agent.name()));
        let _ = agent.invalidate_local_metadata(MetaPeer::Store);
    }
    Ok(())
}
