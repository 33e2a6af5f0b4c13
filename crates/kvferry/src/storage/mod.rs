//! The storage layer: positioned I/O between memory and registered files.
//!
//! (Step 1 of moving the storage engine out of the POSIX backend: the files
//! moved here unchanged; the module documentation follows with the cleanup.)

use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;

mod align;
mod files;
mod job;
mod plan;
mod serve;
mod sys;
mod threads;
mod uring;

pub(crate) use files::{query, FileTable};
pub(crate) use job::{Engine, IoBatch, Job, MAX_OP_LEN};
pub(crate) use plan::{plan, Entry, Naming, Plan, PlanOpts};
pub(crate) use serve::FileServer;

/// How to start an engine.
#[derive(Clone, Debug)]
pub(crate) struct EngineSpec {
    /// `uring`, `threads`, or `auto` (io_uring when it works).
    pub(crate) kind: String,
    /// io_uring: I/Os in flight.
    pub(crate) queue_depth: u32,
    /// io_uring: bytes in flight (`u64::MAX`: no limit).
    pub(crate) queue_bytes: u64,
    /// Thread pool: workers.
    pub(crate) threads: usize,
    /// io_uring: kernel submission-queue polling.
    pub(crate) sqpoll: bool,
    /// io_uring: how long the idle ring thread polls for new jobs before it sleeps.
    pub(crate) busy_poll: Duration,
}

/// Starts the engine `spec` asks for.
pub(crate) fn start_engine(spec: &EngineSpec) -> Result<Arc<dyn Engine>> {
    let uring = || uring::UringEngine::start(spec.queue_depth, spec.queue_bytes, spec.sqpoll, spec.busy_poll);
    Ok(match spec.kind.as_str() {
        "uring" => Arc::new(uring()?),
        "threads" => Arc::new(threads::ThreadEngine::start(spec.threads)?),
        _ => match uring() {
            Ok(e) => Arc::new(e),
            Err(e) => {
                tracing::info!(error = %e, "POSIX: io_uring unavailable, using the thread pool");
                Arc::new(threads::ThreadEngine::start(spec.threads)?)
            }
        },
    })
}

/// The O_DIRECT alignment (the larger of memory and offset alignment) for the
/// file at `path`, as the storage layer would use it.
pub(crate) fn direct_alignment(path: &std::path::Path) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).ok()?;
    let block = f.metadata().ok().is_some_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()));
    let (mem, off) = files::alignment(f.as_raw_fd(), block);
    Some(mem.max(off))
}
