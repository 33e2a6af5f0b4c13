//! The command's log output: the library's `tracing` events on stderr.
//!
//! What is shown is chosen by `KVFERRY_LOG` (or else `RUST_LOG`) in
//! `tracing-subscriber`'s filter syntax (`debug`, `kvferry=debug,warn`, ...);
//! without either, warnings and errors are shown, so nothing the library
//! warns about stays invisible. `--log-format json` prints one JSON object
//! per event instead of human lines. Logs never go to stdout, which stays
//! for tables and `--json` output.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event (colored on a terminal).
    #[default]
    Human,
    /// One JSON object per event (`timestamp`, `level`, `target`, `fields`).
    Json,
}

/// Installs the subscriber for the whole process. A filter that does not
/// parse is reported once and the default (`warn`) is used.
pub fn init(format: LogFormat) {
    let spec = std::env::var("KVFERRY_LOG").or_else(|_| std::env::var("RUST_LOG")).unwrap_or_default();
    let filter = match spec.trim() {
        "" => EnvFilter::new("warn"),
        s => EnvFilter::try_new(s).unwrap_or_else(|e| {
            eprintln!("kvferry: the log filter '{s}' (KVFERRY_LOG / RUST_LOG) does not parse ({e}); showing warnings");
            EnvFilter::new("warn")
        }),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
