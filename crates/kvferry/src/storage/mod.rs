//! The storage layer: positioned I/O between memory and registered files and
//! block devices, shared by every backend that touches storage.
//!
//! ```text
//!   POSIX backend (local DRAM ↔ FILE/BLOCK)    TCP target (exported files)
//!          │ prepare                                 │ each file frame
//!          └───────────────► plan() ◄────────────────┘
//!                 lookup · access · bounds · O_DIRECT · chunking
//!                              │ IoBatch → Job
//!                 Engine: io_uring ring │ thread pool
//!                              │
//!               crate::sys: pread/pwrite, statx, ioctl
//! ```
//!
//! What it owns:
//!
//! - `table.rs`: the open-file table — which files and block devices are
//!   open (fd mode and path mode, see `docs/POSIX.md`) and which registered
//!   regions, by access key, lie in them. A table holds FILE and BLOCK
//!   regions only: a memory key is never found in it, so a file key can
//!   never produce a memory span and a memory key never a file range.
//! - `plan.rs`: [`plan()`], the one check of a storage operation before a
//!   byte moves — lookup, access (READ needs a readable registration, WRITE a
//!   writable one), bounds, O_DIRECT alignment — and its split into I/Os.
//!   Every caller gets the same checks with the same strictness.
//! - `align.rs`: the O_DIRECT rules (memory address, file offset and
//!   length), with errors that name the misaligned field.
//! - `naming.rs`: [`Naming`], how the messages of `plan.rs` and `align.rs`
//!   name their caller and its entries.
//! - `job.rs`: the engine API — a batch of positioned I/Os ([`IoBatch`]) run
//!   as a [`Job`] with many I/Os in flight, done only when every byte moved
//!   (short transfers are retried; end of file, ENOSPC and OS errors fail
//!   it), and released only once no I/O is in flight.
//! - `uring.rs`, `threads.rs`: the two engines; [`start_engine`] picks one.
//! - `serve.rs`: [`FileServer`], the table, plan and engine a network
//!   backend serves exported files with.
//! - the raw OS calls (`fstat`, `statx`, `pread`, ...) live in `crate::sys`:
//!   this layer holds no `unsafe` of files.
//!
//! Directions are the crate's [`XferOp`](crate::types::XferOp):
//! `Read` moves file → memory, `Write` memory → file.
//!
//! What it must never import: the agent, any backend, the metadata plane.
//! It takes what it needs as its own small types ([`FileRegistration`],
//! [`Entry`], [`EngineSpec`]) and the vocabulary below it (`types`, `mem`,
//! `desc`, `error`); backends import it, never the other way round, and no
//! backend imports another to reach storage.

use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;

mod align;
mod job;
mod naming;
mod plan;
mod serve;
mod table;
mod threads;
mod uring;

pub(crate) use job::{Engine, IoBatch, Job, MAX_OP_LEN};
pub(crate) use naming::Naming;
pub(crate) use plan::{plan, Entry, Plan, PlanOpts};
pub(crate) use serve::FileServer;
pub(crate) use table::{query, FileRegistration, FileTable};
pub(crate) use uring::probe as probe_io_uring;

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
    let (mem, off) = table::alignment(f.as_raw_fd(), block);
    Some(mem.max(off))
}
