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

/// The text printed for an error that ends a command: `kvferry: <error>`,
/// then one `  caused by: <cause>` line for each error in its `source()`
/// chain whose text the lines above do not already hold (`Error::io` puts
/// the OS error in its message and keeps it as the source, so it would
/// otherwise be printed twice).
pub fn error_report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = format!("kvferry: {e}");
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str("\n  caused by: ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrap(&'static str, Option<std::io::Error>);

    impl std::fmt::Display for Wrap {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Wrap {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_ref().map(|e| e as _)
        }
    }

    #[test]
    fn report_prints_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let e = kvferry::Error::io("open /nope", io);
        let r = error_report(&e);
        assert!(r.starts_with("kvferry: "), "{r}");
        assert_eq!(r.matches("No such file").count(), 1, "the OS error is already in the message: {r}");
        assert!(!r.contains("caused by"), "{r}");
        let w = Wrap("binding the metrics port failed", Some(std::io::Error::other("address in use")));
        assert_eq!(error_report(&w), "kvferry: binding the metrics port failed\n  caused by: address in use");
        assert_eq!(error_report(&Wrap("plain", None)), "kvferry: plain");
    }
}
