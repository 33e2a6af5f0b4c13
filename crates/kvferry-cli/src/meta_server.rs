//! `kvferry meta-server`: the embedded metadata server as a process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use kvferry::metadata::server::MetaServer;
use kvferry::{Error, Result};

/// Arguments of `kvferry meta-server`.
#[derive(Args, Debug, Clone)]
pub struct MetaServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub ip: String,
    /// Port to listen on (0: any free port, printed on start).
    #[arg(long, default_value_t = 9400)]
    pub port: u16,
}

/// Serves until SIGINT or SIGTERM.
pub fn run(a: &MetaServerArgs) -> Result<()> {
    let srv = MetaServer::start(&format!("{}:{}", a.ip, a.port))?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| Error::io("installing signal handlers", e))?;
    }
    println!("KVFERRY-META-SERVER listening on {}  (agents: KVFERRY_METADATA_URL={})", srv.addr(), srv.url());
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("meta-server: signalled, {} keys dropped", srv.len());
    srv.stop();
    Ok(())
}
