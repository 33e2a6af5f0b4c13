//! The `kvferry` command: benchmarks, a storage/memory target, a setup check.

use clap::{Parser, Subcommand};

mod bench;
mod info;
mod logging;
mod meta_server;
mod rendezvous;
mod serve;

/// kvferry: move bytes between the memories and storage of inference workers.
#[derive(Parser, Debug)]
#[command(name = "kvferry", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log lines on stderr: human or json. What is logged: KVFERRY_LOG or
    /// RUST_LOG (e.g. `debug`, `kvferry=debug`); warnings by default.
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Human)]
    log_format: logging::LogFormat,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Benchmarks. With no subcommand: a short sweep of every backend and a summary table.
    Bench {
        #[command(subcommand)]
        which: Option<BenchCmd>,
        /// Summary as JSON lines.
        #[arg(long)]
        json: bool,
        /// Write a chart of the summary's bandwidth and latency against
        /// block size here: an SVG or a PNG, told by the extension.
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
    },
    /// Setup check: plugins, io_uring, cross-memory attach, namespaces, GPU, etcd.
    Info {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// A long-running target agent serving memory and files until signalled.
    Serve(Box<serve::ServeArgs>),
    /// The embedded metadata server (set KVFERRY_METADATA_URL=http://ip:port on agents).
    MetaServer(meta_server::MetaServerArgs),
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// Point-to-point transfers between two agents (loopback, target, initiator).
    P2p(Box<bench::p2p::P2pArgs>),
    /// DRAM ↔ file or block device transfers through the POSIX backend.
    Storage(Box<bench::storage::StorageArgs>),
    /// Time to publish and fetch metadata: in memory, peer to peer, metadata server, etcd.
    Meta(bench::meta::MetaArgs),
}

fn main() {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let r = match cli.cmd {
        Cmd::Bench { which: None, json, plot } => bench::summary::run(json, plot.as_deref()),
        // A --plot name that is not .svg or .png fails before the run, not after it.
        Cmd::Bench { which: Some(BenchCmd::P2p(a)), .. } => bench::plot::check(a.common.plot.as_deref())
            .and_then(|()| bench::p2p::run(&a))
            // A target measures nothing: there is no chart to draw.
            .and_then(|pts| if pts.is_empty() { Ok(()) } else { a.common.plot(&pts, "kvferry bench p2p") }),
        Cmd::Bench { which: Some(BenchCmd::Storage(a)), .. } => bench::plot::check(a.common.plot.as_deref())
            .and_then(|()| bench::storage::run(&a))
            .and_then(|pts| a.common.plot(&pts, "kvferry bench storage")),
        Cmd::Info { json } => {
            info::run(json);
            Ok(())
        }
        Cmd::Serve(a) => serve::run(&a),
        Cmd::MetaServer(a) => meta_server::run(&a),
        Cmd::Bench { which: Some(BenchCmd::Meta(a)), .. } => bench::meta::run(&a),
    };
    if let Err(e) = r {
        // Printed once, here, with its cause chain; commands return errors
        // rather than logging them.
        eprintln!("{}", logging::error_report(&e));
        std::process::exit(1);
    }
}
