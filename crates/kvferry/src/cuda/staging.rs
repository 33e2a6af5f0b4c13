//! The staging pipeline: VRAM moves to and from a byte stream (a socket, a
//! file) through a pool of pinned host chunks, the device copy of one chunk
//! overlapping the stream I/O of another.
//!
//! Out (device → stream, [`drain`]): the copies of chunks i+1.. are started
//! before chunk i is handed to the sink. In (stream → device, [`fill`]): the
//! source fills chunk i+1 while chunk i is copied to the device. Both are
//! written against [`DeviceCopy`], so tests drive them with host memory
//! standing in for the device; on a GPU the engine is CUDA streams and events.
//!
//! Invariants: a chunk is reused or returned to the pool only after the copy
//! that uses it completed, also on error and cancellation; every wait is
//! bounded; the first error wins and names its chunk.

// Not yet wired into the TCP and POSIX backends (docs/GPU.md): only its
// tests use it so far.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};

/// A copy engine: starts asynchronous copies and reports their completion.
pub(crate) trait DeviceCopy: Send + Sync {
    /// A started copy.
    type Ticket;

    /// Starts copying `len` bytes from `src` to `dst`.
    ///
    /// # Safety
    ///
    /// Both ranges stay valid, and `dst` untouched by anyone else, until
    /// [`DeviceCopy::done`] returned `Ok(true)` for the ticket.
    unsafe fn start(&self, dst: u64, src: u64, len: usize) -> Result<Self::Ticket>;

    /// Whether the copy completed; never blocks.
    fn done(&self, t: &Self::Ticket) -> Result<bool>;

    /// Allocates host memory for staging (pinned on a GPU).
    fn alloc_host(&self, len: usize) -> Result<*mut u8>;

    /// Frees what [`DeviceCopy::alloc_host`] returned.
    ///
    /// # Safety
    ///
    /// `p` came from `alloc_host` and no copy still uses it.
    unsafe fn free_host(&self, p: *mut u8);
}

/// One staging chunk: `len` bytes of host memory owned by a pool.
#[derive(Debug)]
pub(crate) struct Chunk {
    ptr: *mut u8,
}

// SAFETY: a chunk is a plain allocation owned by one pipeline at a time.
unsafe impl Send for Chunk {}

/// A fixed pool of staging chunks, shared by the pipelines of one engine.
#[derive(Debug)]
pub(crate) struct StagingPool {
    free: Mutex<Vec<Chunk>>,
    cv: Condvar,
    chunk_len: usize,
    count: usize,
}

impl StagingPool {
    /// Allocates `count` chunks of `chunk_len` bytes up front.
    pub(crate) fn new<E: DeviceCopy>(eng: &E, count: usize, chunk_len: usize) -> Result<StagingPool> {
        if count == 0 || chunk_len == 0 {
            return Err(Error::invalid(format!(
                "staging pool of {count} chunks of {chunk_len} bytes: both must be at least 1"
            )));
        }
        let mut v = Vec::with_capacity(count);
        for i in 0..count {
            match eng.alloc_host(chunk_len) {
                Ok(ptr) => v.push(Chunk { ptr }),
                Err(e) => {
                    for c in v {
                        // SAFETY: just allocated, never used by a copy.
                        unsafe { eng.free_host(c.ptr) };
                    }
                    return Err(e.context(format!("allocating staging chunk {i} of {count} ({chunk_len} bytes)")));
                }
            }
        }
        Ok(StagingPool { free: Mutex::new(v), cv: Condvar::new(), chunk_len, count })
    }

    /// Bytes per chunk.
    pub(crate) fn chunk_len(&self) -> usize {
        self.chunk_len
    }

    /// A free chunk, waiting until `deadline` for one to come back.
    fn take(&self, deadline: Instant) -> Result<Chunk> {
        let mut free = self.free.lock();
        loop {
            if let Some(c) = free.pop() {
                return Ok(c);
            }
            if self.cv.wait_until(&mut free, deadline).timed_out() && free.is_empty() {
                return Err(Error::timeout(format!(
                    "staging pool exhausted: all {} chunks of {} bytes stayed busy until the deadline; raise the chunk count or post fewer VRAM transfers at once",
                    self.count, self.chunk_len
                )));
            }
        }
    }

    fn try_take(&self) -> Option<Chunk> {
        self.free.lock().pop()
    }

    fn give(&self, c: Chunk) {
        self.free.lock().push(c);
        self.cv.notify_one();
    }

    /// Frees every chunk. The pool must be idle (every pipeline finished).
    pub(crate) fn release<E: DeviceCopy>(self, eng: &E) {
        for c in self.free.into_inner() {
            // SAFETY: idle pool: no copy uses its chunks.
            unsafe { eng.free_host(c.ptr) };
        }
    }
}

/// Bounds of one pipeline run.
#[derive(Debug)]
pub(crate) struct Run<'a> {
    /// Chunks in flight at most (≥ 1; 2 or more to overlap).
    pub(crate) depth: usize,
    /// When every wait gives up.
    pub(crate) deadline: Instant,
    /// Set by another thread to stop after the copies in flight.
    pub(crate) cancel: &'a AtomicBool,
}

struct Flight<T> {
    ticket: T,
    chunk: Chunk,
    len: usize,
    index: usize,
}

/// The `(addr, len)` pieces of `spans`, each at most `chunk` bytes.
fn pieces(spans: &[(u64, u64)], chunk: usize) -> impl Iterator<Item = (u64, usize)> + '_ {
    spans.iter().flat_map(move |&(a, n)| {
        (0..n.div_ceil(chunk as u64)).map(move |k| {
            let off = k * chunk as u64;
            (a + off, (n - off).min(chunk as u64) as usize)
        })
    })
}

fn wait_done<E: DeviceCopy>(eng: &E, t: &E::Ticket, deadline: Instant) -> Result<()> {
    loop {
        if eng.done(t)? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::timeout("a staging copy did not complete before the deadline"));
        }
        std::thread::yield_now();
    }
}

/// Waits out every copy in flight and returns their chunks (after an error
/// or a cancellation: the chunks must not be reused while a copy runs).
fn settle<E: DeviceCopy>(eng: &E, pool: &StagingPool, q: &mut VecDeque<Flight<E::Ticket>>, deadline: Instant) {
    for f in q.drain(..) {
        // A copy that neither completes nor fails by the deadline leaks its
        // chunk rather than hand memory in use back to the pool.
        let grace = deadline.max(Instant::now() + Duration::from_secs(1));
        match wait_done(eng, &f.ticket, grace) {
            Ok(()) => pool.give(f.chunk),
            Err(e) => tracing::warn!(error = %e, chunk = f.index, "staging chunk leaked: its copy did not settle"),
        }
    }
}

fn canceled(run: &Run<'_>) -> Result<()> {
    if run.cancel.load(Ordering::Acquire) {
        return Err(Error::new(crate::ErrorKind::Canceled, "VRAM staging canceled"));
    }
    Ok(())
}

/// Device → stream: copies `spans` (device ranges) chunk by chunk into
/// staging and hands each chunk, in order, to `sink`. Returns bytes moved.
pub(crate) fn drain<E: DeviceCopy>(
    eng: &E,
    pool: &StagingPool,
    spans: &[(u64, u64)],
    run: &Run<'_>,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<u64> {
    let mut q: VecDeque<Flight<E::Ticket>> = VecDeque::new();
    let r = drain_inner(eng, pool, spans, run, sink, &mut q);
    settle(eng, pool, &mut q, run.deadline);
    r
}

fn drain_inner<E: DeviceCopy>(
    eng: &E,
    pool: &StagingPool,
    spans: &[(u64, u64)],
    run: &Run<'_>,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    q: &mut VecDeque<Flight<E::Ticket>>,
) -> Result<u64> {
    let mut todo = pieces(spans, pool.chunk_len()).enumerate().peekable();
    let mut moved = 0u64;
    loop {
        canceled(run)?;
        while q.len() < run.depth.max(1) && todo.peek().is_some() {
            let chunk = if q.is_empty() { Some(pool.take(run.deadline)?) } else { pool.try_take() };
            let Some(chunk) = chunk else { break };
            let Some((index, (src, len))) = todo.next() else { unreachable!("peeked above") };
            // SAFETY: the chunk is ours until this copy settles; `src` lies in
            // registered device memory the caller keeps alive for the run.
            match unsafe { eng.start(chunk.ptr as u64, src, len) } {
                Ok(ticket) => q.push_back(Flight { ticket, chunk, len, index }),
                Err(e) => {
                    pool.give(chunk);
                    return Err(e.context(format!("staging chunk {index} (device → host)")));
                }
            }
        }
        let Some(f) = q.pop_front() else { return Ok(moved) };
        if let Err(e) = wait_done(eng, &f.ticket, run.deadline) {
            q.push_front(f);
            return Err(e.context("staging device → host"));
        }
        // SAFETY: the copy into the chunk completed; the chunk holds `len` bytes.
        let bytes = unsafe { std::slice::from_raw_parts(f.chunk.ptr, f.len) };
        let r = sink(bytes);
        pool.give(f.chunk);
        r.map_err(|e| e.context(format!("sending staging chunk {}", f.index)))?;
        moved += f.len as u64;
    }
}

/// Stream → device: `source` fills each chunk with the next bytes, which are
/// then copied to `spans` (device ranges) while the next chunk is filled.
pub(crate) fn fill<E: DeviceCopy>(
    eng: &E,
    pool: &StagingPool,
    spans: &[(u64, u64)],
    run: &Run<'_>,
    source: &mut dyn FnMut(&mut [u8]) -> Result<()>,
) -> Result<u64> {
    let mut q: VecDeque<Flight<E::Ticket>> = VecDeque::new();
    let r = fill_inner(eng, pool, spans, run, source, &mut q);
    settle(eng, pool, &mut q, run.deadline);
    r
}

fn fill_inner<E: DeviceCopy>(
    eng: &E,
    pool: &StagingPool,
    spans: &[(u64, u64)],
    run: &Run<'_>,
    source: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    q: &mut VecDeque<Flight<E::Ticket>>,
) -> Result<u64> {
    let mut moved = 0u64;
    for (index, (dst, len)) in pieces(spans, pool.chunk_len()).enumerate() {
        canceled(run)?;
        // Recycle completed chunks; wait for the oldest when at depth or when the pool is dry.
        let mut chunk = None;
        while chunk.is_none() {
            if q.len() < run.depth.max(1) {
                chunk = if q.is_empty() { Some(pool.take(run.deadline)?) } else { pool.try_take() };
            }
            if chunk.is_none() {
                let Some(f) = q.pop_front() else { unreachable!("depth ≥ 1 and an empty queue takes from the pool") };
                if let Err(e) = wait_done(eng, &f.ticket, run.deadline) {
                    q.push_front(f);
                    return Err(e.context("staging host → device"));
                }
                pool.give(f.chunk);
            }
        }
        let chunk = chunk.unwrap_or_else(|| unreachable!("loop above exits with a chunk"));
        // SAFETY: the chunk is ours and no copy uses it; it holds ≥ len bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(chunk.ptr, len) };
        if let Err(e) = source(buf) {
            pool.give(chunk);
            return Err(e.context(format!("receiving staging chunk {index}")));
        }
        // SAFETY: the chunk stays ours until this copy settles; `dst` lies in
        // registered device memory the caller keeps alive for the run.
        match unsafe { eng.start(dst, chunk.ptr as u64, len) } {
            Ok(ticket) => q.push_back(Flight { ticket, chunk, len, index }),
            Err(e) => {
                pool.give(chunk);
                return Err(e.context(format!("staging chunk {index} (host → device)")));
            }
        }
        moved += len as u64;
    }
    while let Some(f) = q.pop_front() {
        if let Err(e) = wait_done(eng, &f.ticket, run.deadline) {
            q.push_front(f);
            return Err(e.context("staging host → device"));
        }
        pool.give(f.chunk);
    }
    Ok(moved)
}

#[cfg(test)]
mod tests;
