//! The engine API: a batch of positioned I/Os on open files, and the
//! completion state engines report into.
//!
//! An engine takes [`Job`]s: `(file, buffer address, length, offset, op)`
//! tuples over a list of open files, and runs them with many I/Os in flight.
//! Nothing here knows about agents or requests, so any owner of open files
//! and registered memory can drive an engine: the POSIX backend for local
//! DRAM ↔ FILE transfers, and a remote-file target serving peers.
//!
//! A job is finished when every I/O moved every byte, or, after an error or
//! a cancel, when no I/O of it is in flight any more: only then may its
//! memory and files be released.

use std::fmt;
use std::io;
use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::table::OpenFile;
use crate::error::{Error, ErrorKind, Result};
use crate::types::XferOp;

/// The largest single I/O an engine issues (io_uring lengths are 32 bits, and
/// Linux moves at most about 2 GiB per call).
pub(crate) const MAX_OP_LEN: u64 = 1 << 30;

/// One positioned I/O: `len` bytes between memory at `buf` and `offset` of
/// the job's file number `file`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IoOp {
    /// [`XferOp::Read`]: file → memory; [`XferOp::Write`]: memory → file.
    pub(crate) kind: XferOp,
    /// Index into the job's files.
    pub(crate) file: u32,
    /// The request segment it belongs to (for messages).
    pub(crate) seg: u32,
    /// Memory address.
    pub(crate) buf: u64,
    /// Bytes, at most [`MAX_OP_LEN`].
    pub(crate) len: u64,
    /// File offset.
    pub(crate) offset: u64,
}

/// A checked, shareable list of I/Os, built once and run by many jobs.
#[derive(Clone, Debug)]
pub(crate) struct IoBatch {
    ops: Arc<[IoOp]>,
    files: usize,
}

impl IoBatch {
    /// Checks lengths and file indices (`files` = number of files the jobs will carry).
    pub(crate) fn new(ops: Vec<IoOp>, files: usize) -> Result<Self> {
        for (i, op) in ops.iter().enumerate() {
            if op.len == 0 || op.len > MAX_OP_LEN || op.file as usize >= files {
                return Err(Error::internal(format!(
                    "POSIX: I/O {i} is malformed (len {}, file {} of {files})",
                    op.len, op.file
                )));
            }
            if op.buf.checked_add(op.len).is_none() || op.offset.checked_add(op.len).is_none() {
                return Err(Error::invalid(format!("POSIX: I/O {i} overflows the address space")));
            }
        }
        if ops.is_empty() {
            return Err(Error::invalid("POSIX: a job needs at least one I/O"));
        }
        Ok(IoBatch { ops: ops.into(), files })
    }

    /// Number of I/Os.
    pub(crate) fn len(&self) -> usize {
        self.ops.len()
    }

    /// The I/Os.
    pub(crate) fn ops(&self) -> &[IoOp] {
        &self.ops
    }
}

#[derive(Debug, Default)]
struct JobState {
    /// Next I/O to hand out.
    next: usize,
    /// I/Os handed out and not yet completed.
    in_flight: usize,
    /// I/Os that moved every byte.
    done: usize,
    error: Option<Error>,
    canceled: bool,
    finished: bool,
}

/// One run of an [`IoBatch`] over open files, and its completion state.
pub(crate) struct Job {
    batch: IoBatch,
    files: Vec<Arc<OpenFile>>,
    state: Mutex<JobState>,
    cv: Condvar,
    /// `state.finished`, readable without the lock (for polling waiters).
    done: AtomicBool,
    /// Set by an engine that can take I/Os back from the kernel (io_uring's
    /// async cancel): called once by [`cancel`](Job::cancel).
    on_cancel: OnceLock<CancelHook>,
}

/// What an engine runs when one of its jobs is canceled.
pub(crate) type CancelHook = Arc<dyn Fn() + Send + Sync>;

/// How often a [`Job::cancel`] that is still waiting for the kernel logs it.
pub(crate) const CANCEL_WARN_EVERY: Duration = Duration::from_secs(10);

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.state.lock();
        f.debug_struct("Job")
            .field("ops", &self.batch.len())
            .field("done", &s.done)
            .field("in_flight", &s.in_flight)
            .field("finished", &s.finished)
            .finish()
    }
}

/// Why an I/O failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The OS said no.
    Os(io::Error),
    /// A read returned 0: the file ends before the range does.
    Eof,
    /// A write returned 0.
    NoProgress,
    /// The job was canceled or failed elsewhere before this I/O finished.
    Stopped,
}

impl Job {
    /// A job running `batch` over `files` (indexed by [`IoOp::file`]). The
    /// files stay open while the job lives.
    pub(crate) fn new(batch: IoBatch, files: Vec<Arc<OpenFile>>) -> Result<Arc<Job>> {
        if files.len() < batch.files {
            return Err(Error::internal(format!("POSIX: a job of {} files got {}", batch.files, files.len())));
        }
        Ok(Arc::new(Job {
            batch,
            files,
            state: Mutex::new(JobState::default()),
            cv: Condvar::new(),
            done: AtomicBool::new(false),
            on_cancel: OnceLock::new(),
        }))
    }

    /// Whether the job writes to files (its first I/O does; jobs go one way).
    pub(crate) fn is_write(&self) -> bool {
        self.batch.ops.first().is_some_and(|o| o.kind == XferOp::Write)
    }

    /// I/O `i`.
    pub(crate) fn op(&self, i: usize) -> &IoOp {
        &self.batch.ops[i]
    }

    /// The descriptor I/O `op` runs on.
    pub(crate) fn fd(&self, op: &IoOp) -> RawFd {
        self.files[op.file as usize].raw()
    }

    /// Hands out up to `max_ops` I/Os to start, whose lengths add up to at
    /// most `max_bytes` (but always at least one). Returns their indices and
    /// whether more remain to hand out later (when not, the engine can forget
    /// the job).
    pub(crate) fn claim(&self, max_ops: usize, max_bytes: u64) -> (Range<usize>, bool) {
        let mut s = self.state.lock();
        if s.canceled || s.error.is_some() || max_ops == 0 {
            return (0..0, false);
        }
        let start = s.next;
        let mut end = start.saturating_add(max_ops).min(self.batch.len());
        if max_bytes != u64::MAX {
            let mut bytes = 0u64;
            for (i, op) in self.batch.ops[start..end].iter().enumerate() {
                bytes = bytes.saturating_add(op.len);
                if bytes > max_bytes && i > 0 {
                    end = start + i;
                    break;
                }
            }
        }
        s.next = end;
        s.in_flight += end - start;
        (start..end, end < self.batch.len())
    }

    /// Whether the job stopped (canceled or failed): engines stop retrying its I/Os.
    pub(crate) fn stopped(&self) -> bool {
        let s = self.state.lock();
        s.canceled || s.error.is_some()
    }

    /// Reports the end of I/O `i`, which was handed out by [`claim`](Self::claim).
    pub(crate) fn complete(&self, i: usize, moved: u64, result: std::result::Result<(), Failure>) {
        let err = result.err().map(|f| self.failure(i, moved, f));
        let mut s = self.state.lock();
        s.in_flight -= 1;
        match err {
            None => s.done += 1,
            Some(e) => {
                if s.error.is_none() && !(s.canceled && e.kind() == ErrorKind::Canceled) {
                    s.error = Some(e);
                }
            }
        }
        self.settle(&mut s);
    }

    /// Stops handing out I/Os because the engine cannot run them (shutdown).
    pub(crate) fn abort(&self, why: Error) {
        let mut s = self.state.lock();
        if s.error.is_none() {
            s.error = Some(why);
        }
        self.settle(&mut s);
    }

    fn settle(&self, s: &mut JobState) {
        let all = s.done == self.batch.len();
        let stopped = s.canceled || s.error.is_some();
        if !s.finished && (all || (stopped && s.in_flight == 0)) {
            s.finished = true;
            self.done.store(true, Ordering::Release);
            self.cv.notify_all();
        }
    }

    /// `None` while running; the outcome once finished.
    pub(crate) fn outcome(&self) -> Option<Result<()>> {
        let s = self.state.lock();
        if !s.finished {
            return None;
        }
        Some(match (&s.error, s.done == self.batch.len()) {
            (_, true) => Ok(()),
            (Some(e), false) => Err(e.clone()),
            (None, false) => Err(Error::new(ErrorKind::Canceled, "POSIX: the transfer was canceled")),
        })
    }

    /// Blocks until finished or until `timeout` passes; returns whether finished.
    ///
    /// For the first `poll` of it, the thread polls (yielding the CPU between
    /// looks) instead of sleeping: a short wait then costs no wake-up, which
    /// on a virtual machine is tens of microseconds.
    pub(crate) fn wait(&self, timeout: Duration, poll: Duration) -> bool {
        let start = Instant::now();
        let deadline = start.checked_add(timeout);
        if !poll.is_zero() {
            let until = start + poll.min(timeout);
            while !self.done.load(Ordering::Acquire) {
                if Instant::now() >= until {
                    break;
                }
                std::thread::yield_now();
            }
        }
        let mut s = self.state.lock();
        while !s.finished {
            match deadline {
                Some(d) => {
                    if self.cv.wait_until(&mut s, d).timed_out() {
                        return s.finished;
                    }
                }
                None => self.cv.wait(&mut s),
            }
        }
        true
    }

    /// Lets the engine running this job take its I/Os back from the kernel
    /// on [`cancel`](Job::cancel); the first hook set stays.
    pub(crate) fn set_on_cancel(&self, hook: &CancelHook) {
        let _ = self.on_cancel.set(hook.clone());
    }

    /// Stops handing out I/Os, asks the engine to take back those in the
    /// kernel (io_uring: `IORING_OP_ASYNC_CANCEL`, which ends I/Os still
    /// queued or waiting interruptibly, e.g. on a hung network file system),
    /// and blocks until none is in flight, so that the caller may release the
    /// job's memory.
    ///
    /// The wait has no deadline, on purpose: the buffers are the caller's
    /// registered memory, and returning while the kernel may still write
    /// into them would let it write into freed memory. Local storage I/O
    /// always completes; an I/O the kernel cannot interrupt (a pread on a
    /// hard-mounted NFS server that is gone, in the thread-pool engine) keeps
    /// this waiting as long as it lasts. Every [`CANCEL_WARN_EVERY`] such a
    /// wait is logged with what is still in flight, so it is never silent.
    pub(crate) fn cancel(&self) {
        let mut s = self.state.lock();
        s.canceled = true;
        self.settle(&mut s);
        if s.finished {
            return;
        }
        if let Some(hook) = self.on_cancel.get() {
            drop(s);
            hook();
            s = self.state.lock();
        }
        let start = Instant::now();
        while !s.finished {
            if self.cv.wait_for(&mut s, CANCEL_WARN_EVERY).timed_out() && !s.finished {
                tracing::warn!(
                    in_flight = s.in_flight,
                    waited_s = start.elapsed().as_secs(),
                    "POSIX: a canceled transfer still waits for I/O the kernel has not finished (hung storage?); \
                     its memory must stay allocated until then, so cancel keeps waiting"
                );
            }
        }
    }

    fn failure(&self, i: usize, moved: u64, f: Failure) -> Error {
        let op = self.op(i);
        let file = self.files[op.file as usize].name();
        let at = op.offset.saturating_add(moved);
        let missing = op.len.saturating_sub(moved);
        let what = format!(
            "POSIX: {} of segment {} {} {file}",
            op.kind,
            op.seg,
            match op.kind {
                XferOp::Read => "from",
                XferOp::Write => "to",
            }
        );
        match f {
            Failure::Os(e) => {
                let hint = match e.raw_os_error() {
                    Some(libc::ENOSPC) => "; the filesystem is full: free space or write elsewhere",
                    Some(libc::EDQUOT) => "; the disk quota is exhausted",
                    Some(libc::EINVAL) if self.files[op.file as usize].direct => {
                        "; O_DIRECT refused the request: check alignment"
                    }
                    Some(libc::EBADF) => "; the file is not open for this direction (check r/w flags)",
                    _ => "",
                };
                Error::io(format!("{what} failed at offset {at} with {missing} of {} bytes left{hint}", op.len), e)
            }
            Failure::Eof => Error::new(
                ErrorKind::Backend,
                format!(
                    "{what}: end of file at offset {at}, {missing} of {} bytes missing; the file is shorter than the request",
                    op.len
                ),
            ),
            Failure::NoProgress => Error::new(
                ErrorKind::Backend,
                format!("{what}: the write made no progress at offset {at}, {missing} of {} bytes left", op.len),
            ),
            Failure::Stopped => Error::new(ErrorKind::Canceled, format!("{what}: stopped before it finished")),
        }
    }
}

/// A way to run jobs: io_uring or a thread pool.
pub(crate) trait Engine: Send + Sync + fmt::Debug + 'static {
    /// `uring` or `threads`.
    fn name(&self) -> &'static str;

    /// Queues `job`; never waits for its I/O.
    fn submit(&self, job: Arc<Job>) -> Result<()>;
}

/// Runs I/O `i` of `job` to the end with blocking `pread`/`pwrite`, retrying
/// short transfers for the remainder. Returns the bytes moved and the outcome.
pub(crate) fn run_blocking(job: &Job, i: usize) -> (u64, std::result::Result<(), Failure>) {
    let op = *job.op(i);
    let fd = job.fd(&op);
    let mut moved = 0u64;
    let mut interrupted = 0;
    while moved < op.len {
        if job.stopped() {
            return (moved, Err(Failure::Stopped));
        }
        let (buf, len, off) = (op.buf + moved, (op.len - moved) as usize, op.offset + moved);
        // SAFETY: `buf..buf+len` lies in memory registered with the agent, which
        // the job's owner keeps valid until the job is finished (cancel and drop
        // wait for in-flight I/Os); `fd` is kept open by the job's files.
        let r = unsafe {
            match op.kind {
                XferOp::Read => crate::sys::pread(fd, buf as *mut u8, len, off),
                XferOp::Write => crate::sys::pwrite(fd, buf as *const u8, len, off),
            }
        };
        match r {
            Ok(0) => return (moved, Err(if op.kind == XferOp::Read { Failure::Eof } else { Failure::NoProgress })),
            Ok(n) => moved += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted && interrupted < 64 => interrupted += 1,
            Err(e) => return (moved, Err(Failure::Os(e))),
        }
    }
    (moved, Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(lens: &[u64]) -> Arc<Job> {
        let mut offset = 0;
        let ops = lens
            .iter()
            .map(|&len| {
                let op = IoOp { kind: XferOp::Read, file: 0, seg: 0, buf: 4096, len, offset };
                offset += len;
                op
            })
            .collect();
        Job::new(IoBatch::new(ops, 1).unwrap(), vec![OpenFile::dev_null()]).unwrap()
    }

    #[test]
    fn claims_respect_the_op_and_byte_budgets() {
        let j = job(&[4096; 10]);
        // The byte budget stops before the op that would pass it...
        assert_eq!(j.claim(64, 10 * 1024), (0..2, true));
        // ...but always hands out one, however small the budget.
        assert_eq!(j.claim(64, 1), (2..3, true));
        assert_eq!(j.claim(3, u64::MAX), (3..6, true));
        assert_eq!(j.claim(0, u64::MAX), (0..0, false), "no slot, nothing claimed");
        assert_eq!(j.claim(64, u64::MAX), (6..10, false), "the rest; nothing left to hand out");
        // One op larger than the whole budget still goes (an idle ring starts it).
        assert_eq!(job(&[8 << 20, 4096]).claim(64, 1 << 20), (0..1, true));
    }

    #[test]
    fn a_stopped_job_hands_out_nothing_and_a_waiter_returns() {
        let j = job(&[4096; 4]);
        assert_eq!(j.claim(2, u64::MAX), (0..2, true));
        j.complete(0, 4096, Ok(()));
        j.complete(1, 0, Err(Failure::Eof));
        assert_eq!(j.claim(2, u64::MAX), (0..0, false));
        // Finished (an error, nothing in flight): polling and sleeping waits both return at once.
        assert!(j.wait(Duration::from_secs(5), Duration::from_millis(1)));
        assert!(j.wait(Duration::from_secs(5), Duration::ZERO));
        assert!(j.outcome().unwrap().unwrap_err().message().contains("end of file"));
    }

    /// Cancel keeps its promise even when no engine can take the I/O back:
    /// it returns only after the in-flight I/O completed, and runs the
    /// engine's cancel hook once.
    #[test]
    fn cancel_returns_only_once_nothing_is_in_flight() {
        let j = job(&[4096; 3]);
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = calls.clone();
        let hook: CancelHook = Arc::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        j.set_on_cancel(&hook);
        assert_eq!(j.claim(1, u64::MAX), (0..1, true));
        let (tx, rx) = std::sync::mpsc::channel();
        let j2 = j.clone();
        std::thread::spawn(move || {
            j2.cancel();
            let _ = tx.send(());
        });
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "cancel waits for the I/O in flight");
        assert_eq!(j.claim(2, u64::MAX), (0..0, false), "a canceled job hands out nothing more");
        j.complete(0, 0, Err(Failure::Stopped));
        rx.recv_timeout(Duration::from_secs(5)).expect("cancel returns once nothing is in flight");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(j.outcome().unwrap().unwrap_err().kind(), ErrorKind::Canceled);
        j.cancel();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a finished job's cancel returns at once");
    }
}
