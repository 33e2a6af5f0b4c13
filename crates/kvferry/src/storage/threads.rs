//! The thread-pool engine: `threads` workers doing blocking `pread`/`pwrite`,
//! so up to `threads` I/Os are in flight. Works wherever POSIX does (no
//! io_uring needed); short transfers are retried for the remainder.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use super::job::{run_blocking, Engine, Job};
use crate::error::{Error, ErrorKind, Result};

#[derive(Debug, Default)]
struct Queue {
    jobs: VecDeque<Arc<Job>>,
    shutdown: bool,
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<Queue>,
    cv: Condvar,
}

/// The thread-pool engine.
#[derive(Debug)]
pub(crate) struct ThreadEngine {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl ThreadEngine {
    /// Starts `threads` workers.
    pub(crate) fn start(threads: usize) -> Result<ThreadEngine> {
        let shared = Arc::new(Shared::default());
        let mut engine = ThreadEngine { shared: shared.clone(), workers: Vec::with_capacity(threads) };
        for i in 0..threads {
            let s = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("kvferry-posix-io{i}"))
                .spawn(move || worker(&s))
                .map_err(|e| Error::io("POSIX: starting an I/O thread", e))?;
            engine.workers.push(t);
        }
        Ok(engine)
    }
}

fn worker(s: &Shared) {
    loop {
        let (job, i) = {
            let mut q = s.queue.lock();
            loop {
                if let Some(job) = q.jobs.front().cloned() {
                    let (range, more) = job.claim(1, u64::MAX);
                    if !more {
                        q.jobs.pop_front();
                    }
                    if !range.is_empty() {
                        break (job, range.start);
                    }
                    continue;
                }
                if q.shutdown {
                    return;
                }
                s.cv.wait(&mut q);
            }
        };
        let (moved, result) = run_blocking(&job, i);
        job.complete(i, moved, result);
    }
}

impl Engine for ThreadEngine {
    fn name(&self) -> &'static str {
        "threads"
    }

    fn submit(&self, job: Arc<Job>) -> Result<()> {
        let mut q = self.shared.queue.lock();
        if q.shutdown {
            return Err(Error::new(ErrorKind::Canceled, "POSIX: the thread-pool engine is shutting down"));
        }
        q.jobs.push_back(job);
        drop(q);
        self.shared.cv.notify_all();
        Ok(())
    }
}

impl Drop for ThreadEngine {
    fn drop(&mut self) {
        let pending: Vec<Arc<Job>> = {
            let mut q = self.shared.queue.lock();
            q.shutdown = true;
            q.jobs.drain(..).collect()
        };
        for job in pending {
            job.abort(Error::new(ErrorKind::Canceled, "POSIX: the backend shut down before this I/O ran"));
        }
        self.shared.cv.notify_all();
        for t in self.workers.drain(..) {
            let _ = t.join();
        }
    }
}
