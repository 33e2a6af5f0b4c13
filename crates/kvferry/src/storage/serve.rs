//! Serving files to remote initiators (remote file segments): a network
//! backend keeps a [`FileServer`] of the FILE and BLOCK regions registered
//! with it, and runs each incoming operation through the storage layer: the
//! same registration table (path and fd modes), the same [`plan`] (lookup,
//! access, bounds, O_DIRECT, chunking) and the same every-byte-or-an-error
//! I/O loop as the POSIX backend.
//!
//! The I/Os of one operation run concurrently on the server's own engine
//! (io_uring where it works, else a thread pool, started with the first served
//! file); the calling thread (a network connection's) waits for them, so a
//! slow disk slows only the initiators of that connection.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::RwLock;

use super::job::{Engine, Job, MAX_OP_LEN};
use super::naming::Naming;
use super::plan::{plan, Entry, Plan, PlanOpts};
use super::table::{FileRegistration, FileTable};
use crate::error::{Error, Result};
use crate::types::{AccessKey, XferOp};

/// I/Os a server keeps in flight at once, over all its connections.
const SERVE_QUEUE_DEPTH: u32 = 64;
/// Bytes a server keeps in flight at once. Virtual disks tend to complete
/// everything queued in one go: a modest budget makes the first answers
/// ready sooner, so sending overlaps the next reads (on the reference VM,
/// 8 MiB served remote reads at 0.88× the local disk, 64 MiB at 0.77×).
const SERVE_QUEUE_BYTES: u64 = 8 << 20;
/// Threads of the fallback engine.
const SERVE_THREADS: usize = 4;
/// Longest an operation may take before it fails (storage I/O always ends;
/// this bounds a wedged device).
const SERVE_TIMEOUT: Duration = Duration::from_secs(60);

/// The files a network backend serves.
#[derive(Debug, Default)]
pub(crate) struct FileServer {
    table: RwLock<FileTable>,
    engine: OnceLock<Arc<dyn Engine>>,
}

impl FileServer {
    /// Opens (path mode) or duplicates (fd mode) the region's file, and starts
    /// the engine with the first one.
    pub(crate) fn register(&self, r: &FileRegistration<'_>) -> Result<()> {
        if self.engine.get().is_none() {
            let e = super::start_engine(&super::EngineSpec {
                kind: "auto".into(),
                queue_depth: SERVE_QUEUE_DEPTH,
                queue_bytes: SERVE_QUEUE_BYTES,
                threads: SERVE_THREADS,
                sqpoll: false,
                // Connection threads wait for one operation at a time, between
                // sends: they sleep rather than poll.
                busy_poll: Duration::ZERO,
            })?;
            let _ = self.engine.set(e);
        }
        self.table.write().register(r)
    }

    /// Forgets the region; its file closes when no region and no I/O use it.
    pub(crate) fn deregister(&self, r: &FileRegistration<'_>) -> Result<()> {
        self.table.write().deregister(r)
    }

    /// Whether `key` is a served file region.
    pub(crate) fn serves(&self, key: &AccessKey) -> bool {
        self.table.read().region(key).is_some()
    }

    /// Checks `entries` — laid out back to back in one staging buffer, each
    /// [`Entry::buf`] the offset from its start — for an `op` with the one
    /// storage [`plan`]: lookup among the served file regions (a memory key
    /// is never found here), access, bounds, O_DIRECT alignment, chunking.
    pub(crate) fn plan(&self, op: XferOp, entries: impl IntoIterator<Item = Entry>) -> Result<Plan> {
        plan(&self.table.read(), op, entries, PlanOpts { naming: Naming::SERVED, max_io: MAX_OP_LEN })
    }

    /// Starts the I/Os of `plan` between the staging buffer at `buf` and the
    /// files, and returns at once; [`finish`](Self::finish) waits for every
    /// byte or an error that says which entry failed and why.
    ///
    /// # Safety
    ///
    /// `buf` must be page-aligned and stay valid for reads and writes of the
    /// plan's total length until the job is finished or cancelled
    /// (`Job::cancel` returns once no I/O touches it).
    pub(crate) unsafe fn start(&self, plan: Plan, buf: *mut u8) -> Result<Arc<Job>> {
        let engine =
            self.engine.get().ok_or_else(|| Error::internal("POSIX: serving files before any was registered"))?;
        let job = plan.into_job(buf as u64)?;
        engine.submit(job.clone())?;
        Ok(job)
    }

    /// Waits (bounded) for a started job and returns its outcome; on timeout
    /// it cancels the job, which returns once no I/O touches the buffer.
    pub(crate) fn finish(job: &Job) -> Result<()> {
        if !job.wait(SERVE_TIMEOUT, Duration::ZERO) {
            // Returns once no I/O is in flight, so `buf` is no longer touched.
            job.cancel();
        }
        job.outcome().unwrap_or_else(|| {
            Err(Error::timeout(format!("POSIX: a served operation took longer than {SERVE_TIMEOUT:?}")))
        })
    }
}
