//! Serving files to remote initiators (remote file segments): a network
//! backend keeps a [`FileServer`] of the FILE and BLOCK regions registered
//! with it, and runs each incoming operation through the POSIX storage code:
//! the same registration table (path and fd modes), access, bounds and
//! O_DIRECT checks, and the same every-byte-or-an-error I/O loop.
//!
//! The I/Os of one operation run concurrently on the server's own engine
//! (io_uring where it works, else a thread pool, started with the first served
//! file); the calling thread (a network connection's) waits for them, so a
//! slow disk slows only the initiators of that connection.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::RwLock;

use super::align::DirectAlign;
use super::files::{FileTable, OpenFile};
use super::job::{Engine, IoBatch, IoKind, IoOp, Job, MAX_OP_LEN};
use crate::backend::Region;
use crate::error::{Error, Result};
use crate::types::AccessKey;

/// Direction of a served operation, from the initiator's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Served {
    /// The initiator reads: file → buffer.
    Read,
    /// The initiator writes: buffer → file.
    Write,
}

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
    pub(crate) fn register(&self, r: &Region) -> Result<()> {
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
    pub(crate) fn deregister(&self, r: &Region) -> Result<()> {
        self.table.write().deregister(r)
    }

    /// Whether `key` is a served file region.
    pub(crate) fn serves(&self, key: &AccessKey) -> bool {
        self.table.read().region(key).is_some()
    }

    /// The exported range of the served file region `key`, as `(file offset,
    /// len)`: a range of the file, never of memory. A region registered with
    /// length 0 ("the whole file") reads as reaching the end of the offset
    /// space; the device size of a block device is checked again when an
    /// operation starts.
    pub(crate) fn file_range(&self, key: &AccessKey) -> Option<(u64, u64)> {
        self.table.read().region(key).map(|r| (r.addr, if r.len == 0 { u64::MAX - r.addr } else { r.len }))
    }

    /// Starts moving the bytes of `entries` — `(key, file offset, len)`, laid
    /// out back to back in `buf` — between `buf` and the files, and returns at
    /// once; [`finish`](Self::finish) waits for every byte or an error that
    /// says which entry failed and why. Bounds were checked by the caller;
    /// access mode and O_DIRECT alignment are checked here.
    ///
    /// # Safety
    ///
    /// `buf` must stay valid for reads and writes of the entries' total length
    /// until the job is finished or cancelled (`Job::cancel` returns once no
    /// I/O touches it).
    pub(crate) unsafe fn start(
        &self,
        dir: Served,
        entries: &[(AccessKey, u64, u64)],
        buf: *mut u8,
    ) -> Result<Arc<Job>> {
        let kind = match dir {
            Served::Read => IoKind::Read,
            Served::Write => IoKind::Write,
        };
        let table = self.table.read();
        let mut files: Vec<Arc<OpenFile>> = Vec::new();
        let mut index: HashMap<AccessKey, u32> = HashMap::new();
        let mut ops = Vec::with_capacity(entries.len());
        let mut at = buf as u64;
        for (i, (key, offset, len)) in entries.iter().copied().enumerate() {
            let r = table
                .region(&key)
                .ok_or_else(|| Error::not_found(format!("entry {i}: the file region is no longer exported")))?;
            let f = &r.file;
            let ok = match dir {
                Served::Read => f.access.readable(),
                Served::Write => f.access.writable(),
            };
            if !ok {
                return Err(Error::not_allowed(format!("entry {i}: {} is not open for {dir:?}", f.name())));
            }
            if !r.contains(offset, len) {
                return Err(Error::not_allowed(format!(
                    "entry {i} ({offset:#x}+{len}) lies outside the exported region"
                )));
            }
            if f.direct {
                DirectAlign { mem: f.mem_align, off: f.off_align }.check(i, &f.name(), at, offset, len)?;
            }
            let fi = *index.entry(key).or_insert_with(|| {
                files.push(f.clone());
                (files.len() - 1) as u32
            });
            let seg = u32::try_from(i).unwrap_or(u32::MAX);
            let mut done = 0;
            while done < len {
                let n = (len - done).min(MAX_OP_LEN);
                ops.push(IoOp { kind, file: fi, seg, buf: at + done, len: n, offset: offset + done });
                done += n;
            }
            at += len;
        }
        drop(table);
        let engine =
            self.engine.get().ok_or_else(|| Error::internal("POSIX: serving files before any was registered"))?;
        let job = Job::new(IoBatch::new(ops, files.len())?, files)?;
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
