//! Serving files to remote initiators (remote file segments): a network
//! backend keeps a [`FileServer`] of the FILE and BLOCK regions registered
//! with it, and runs each incoming operation through the POSIX storage code:
//! the same registration table (path and fd modes), access, bounds and
//! O_DIRECT checks, and the same every-byte-or-an-error I/O loop.
//!
//! Operations run on the calling thread (a network connection's thread), so a
//! slow disk slows only the initiators of that connection.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use super::align::DirectAlign;
use super::files::{FileTable, OpenFile};
use super::job::{self, IoBatch, IoKind, IoOp, Job, MAX_OP_LEN};
use crate::backend::{AccessKey, Region};
use crate::error::{Error, Result};

/// Direction of a served operation, from the initiator's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Served {
    /// The initiator reads: file → buffer.
    Read,
    /// The initiator writes: buffer → file.
    Write,
}

/// The files a network backend serves.
#[derive(Debug, Default)]
pub(crate) struct FileServer {
    table: RwLock<FileTable>,
}

impl FileServer {
    /// Opens (path mode) or duplicates (fd mode) the region's file.
    pub(crate) fn register(&self, r: &Region) -> Result<()> {
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

    /// Moves the bytes of `entries` — `(key, file offset, len)`, laid out
    /// back to back in `buf` — between `buf` and the files: every byte, or an
    /// error that says which entry failed and why. Bounds were checked by the
    /// caller; access mode and O_DIRECT alignment are checked here.
    ///
    /// # Safety
    ///
    /// `buf` must be valid for reads and writes of the sum of the entries'
    /// lengths for the duration of the call.
    pub(crate) unsafe fn run(&self, dir: Served, entries: &[(AccessKey, u64, u64)], buf: *mut u8) -> Result<()> {
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
        let job = Job::new(IoBatch::new(ops, files.len())?, files)?;
        loop {
            let (range, more) = job.claim(1);
            for i in range {
                let (moved, r) = job::run_blocking(&job, i);
                job.complete(i, moved, r);
            }
            if !more {
                break;
            }
        }
        job.outcome().unwrap_or_else(|| Err(Error::internal("POSIX: a served job did not finish")))
    }
}
