//! Rust logs into Python's `logging`: the library's `tracing` events reach
//! `logging.getLogger("kvferry")` (child loggers by module, e.g.
//! `kvferry.backend.tcp`), so a Python application sees every warning
//! kvferry emits, with its own handlers and levels.
//!
//! Events are not handed to Python on the thread that emits them: that
//! thread may hold a Rust lock that a thread holding the GIL waits for
//! (a deadlock). They go through a bounded queue to one forwarder thread,
//! which holds no lock of kvferry's while it takes the GIL. A full queue
//! drops events and counts them (reported with the next event forwarded).
//! Which events are forwarded: `KVFERRY_LOG` (or `RUST_LOG`), a
//! `tracing` filter, default `warn`; Python's logger levels filter further.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;

use pyo3::prelude::*;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Events waiting for the forwarder; beyond this they are dropped (and counted).
const QUEUE: usize = 1024;

/// One event for Python: logger name, `logging` level, message.
struct Record {
    logger: String,
    level: u8,
    message: String,
}

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The layer: formats an event and queues it for the forwarder.
struct ToPython {
    tx: SyncSender<Record>,
}

/// Collects an event's message and fields as `message key=value ...`.
#[derive(Default)]
struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

/// Python `logging`'s number for a `tracing` level.
fn py_level(l: &Level) -> u8 {
    match *l {
        Level::ERROR => 40,
        Level::WARN => 30,
        Level::INFO => 20,
        Level::DEBUG => 10,
        Level::TRACE => 5,
    }
}

/// `kvferry::backend::tcp::conn` → `kvferry.backend.tcp.conn`.
fn logger_name(target: &str) -> String {
    target.replace("::", ".")
}

impl<S: Subscriber> Layer<S> for ToPython {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut text = Text::default();
        event.record(&mut text);
        let r = Record { logger: logger_name(meta.target()), level: py_level(meta.level()), message: text.0 };
        if let Err(TrySendError::Full(_)) = self.tx.try_send(r) {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Hands queued events to Python, one at a time, until the queue closes or
/// the interpreter is shutting down.
fn forward(rx: Receiver<Record>) {
    while let Ok(r) = rx.recv() {
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        let done = Python::try_attach(|py| {
            let log = |name: &str, level: u8, msg: &str| -> PyResult<()> {
                let logger = py.import("logging")?.call_method1("getLogger", (name,))?;
                logger.call_method1("log", (level, msg))?;
                Ok(())
            };
            if dropped > 0 {
                let _ = log("kvferry", 30, &format!("{dropped} kvferry log events were dropped (the queue was full)"));
            }
            // A failing handler must not stop the forwarding.
            let _ = log(&r.logger, r.level, &r.message);
        });
        if done.is_none() {
            return;
        }
    }
}

/// Installs the forwarding once per process, unless another `tracing`
/// subscriber was installed first (then that one gets the events).
pub fn install() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = std::env::var("KVFERRY_LOG")
            .or_else(|_| std::env::var("RUST_LOG"))
            .ok()
            .and_then(|f| EnvFilter::try_new(f).ok())
            .unwrap_or_else(|| EnvFilter::new("warn"));
        let (tx, rx) = sync_channel(QUEUE);
        if tracing_subscriber::registry().with(ToPython { tx }.with_filter(filter)).try_init().is_ok() {
            let _ = std::thread::Builder::new().name("kvferry-log".into()).spawn(move || forward(rx));
        }
    });
}

/// Emits a `tracing` event at `level` from Rust (for tests of the forwarding).
#[pyfunction]
pub fn _emit_log(level: &str, message: &str) {
    match level {
        "error" => tracing::error!(target: "kvferry::py", "{message}"),
        "warn" => tracing::warn!(target: "kvferry::py", "{message}"),
        "info" => tracing::info!(target: "kvferry::py", "{message}"),
        _ => tracing::debug!(target: "kvferry::py", "{message}"),
    }
}
