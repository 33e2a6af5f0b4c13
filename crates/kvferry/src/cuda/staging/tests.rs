//! The staging pipeline driven by a host-memory copy engine that completes
//! copies late, fails on demand and checks that no chunk is touched while a
//! copy into or out of it is in flight.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::*;
use crate::error::ErrorKind;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Start(usize),
    Done(usize),
    Io(usize),
}

#[derive(Default)]
struct HostCopy {
    /// Polls a copy needs before it reports done.
    polls: usize,
    fail_start: Option<usize>,
    fail_done: Option<usize>,
    never_done: bool,
    allocs_left: Option<usize>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next: usize,
    log: Vec<Ev>,
    /// (ticket, dst, src, len, polls seen, done)
    live: Vec<(usize, u64, u64, usize, usize, bool)>,
    violations: Vec<String>,
    allocated: usize,
    freed: usize,
}

impl HostCopy {
    fn log(&self) -> Vec<Ev> {
        self.state.lock().log.clone()
    }
    fn note_io(&self, ptr: u64) {
        let mut s = self.state.lock();
        let busy = s.live.iter().any(|l| !l.5 && (l.1 == ptr || l.2 == ptr));
        if busy {
            s.violations.push(format!("I/O on chunk {ptr:#x} while a copy uses it"));
        }
        let t = s.live.iter().rev().find(|l| l.1 == ptr || l.2 == ptr).map(|l| l.0);
        if let Some(t) = t {
            s.log.push(Ev::Io(t));
        }
    }
    fn outstanding(&self) -> usize {
        self.state.lock().live.iter().filter(|l| !l.5).count()
    }
}

impl DeviceCopy for HostCopy {
    type Ticket = usize;

    unsafe fn start(&self, dst: u64, src: u64, len: usize) -> Result<usize> {
        let mut s = self.state.lock();
        let t = s.next;
        s.next += 1;
        if self.fail_start == Some(t) {
            return Err(Error::new(ErrorKind::Backend, format!("stand-in: start {t} fails")));
        }
        if s.live.iter().any(|l| !l.5 && (l.1 == dst || l.2 == dst || l.1 == src)) {
            s.violations.push(format!("copy {t} reuses a buffer of a copy in flight"));
        }
        // SAFETY: the pipeline's contract: both ranges are live for len bytes.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) };
        s.live.push((t, dst, src, len, 0, false));
        s.log.push(Ev::Start(t));
        Ok(t)
    }

    fn done(&self, t: &usize) -> Result<bool> {
        let mut s = self.state.lock();
        if self.fail_done == Some(*t) {
            s.live.iter_mut().filter(|l| l.0 == *t).for_each(|l| l.5 = true);
            return Err(Error::new(ErrorKind::Backend, format!("stand-in: copy {t} failed")));
        }
        if self.never_done {
            return Ok(false);
        }
        let polls = self.polls;
        let l = s.live.iter_mut().find(|l| l.0 == *t).expect("known ticket");
        l.4 += 1;
        if l.4 > polls && !l.5 {
            l.5 = true;
            s.log.push(Ev::Done(*t));
        }
        Ok(s.live.iter().any(|l| l.0 == *t && l.5))
    }

    fn alloc_host(&self, len: usize) -> Result<*mut u8> {
        let mut s = self.state.lock();
        if self.allocs_left.is_some_and(|n| s.allocated >= n) {
            return Err(Error::new(ErrorKind::Backend, "stand-in: out of pinned memory"));
        }
        s.allocated += 1;
        Ok(Box::into_raw(vec![0u8; len].into_boxed_slice()).cast())
    }

    unsafe fn free_host(&self, _p: *mut u8) {
        // Leaked on purpose: the stand-in only counts; chunk lengths vary by test.
        self.state.lock().freed += 1;
    }
}

fn run(cancel: &AtomicBool, depth: usize) -> Run<'_> {
    Run { depth, deadline: Instant::now() + Duration::from_secs(5), cancel }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn drain_moves_every_byte_in_order_in_chunks() {
    let eng = HostCopy { polls: 2, ..Default::default() };
    let pool = StagingPool::new(&eng, 3, 1000).unwrap();
    let a = pattern(4500);
    let b = pattern(777);
    let spans = [(a.as_ptr() as u64, a.len() as u64), (b.as_ptr() as u64, b.len() as u64)];
    let cancel = AtomicBool::new(false);
    let mut out = Vec::new();
    let mut sizes = Vec::new();
    let n = drain(&eng, &pool, &spans, &run(&cancel, 2), &mut |c| {
        eng.note_io(c.as_ptr() as u64);
        sizes.push(c.len());
        out.extend_from_slice(c);
        Ok(())
    })
    .unwrap();
    assert_eq!(n, 5277);
    assert_eq!(out, [a, b].concat());
    assert_eq!(sizes, [1000, 1000, 1000, 1000, 500, 777]);
    assert!(eng.state.lock().violations.is_empty(), "{:?}", eng.state.lock().violations);
    assert_eq!(eng.outstanding(), 0);
    pool.release(&eng);
    assert_eq!(eng.state.lock().freed, 3);
}

#[test]
fn drain_starts_the_next_copy_before_sending_a_chunk() {
    let eng = HostCopy { polls: 1, ..Default::default() };
    let pool = StagingPool::new(&eng, 2, 64).unwrap();
    let a = pattern(256);
    let cancel = AtomicBool::new(false);
    drain(&eng, &pool, &[(a.as_ptr() as u64, 256)], &run(&cancel, 2), &mut |c| {
        eng.note_io(c.as_ptr() as u64);
        Ok(())
    })
    .unwrap();
    let log = eng.log();
    for i in 0..3 {
        let io = log.iter().position(|e| *e == Ev::Io(i)).unwrap();
        let next = log.iter().position(|e| *e == Ev::Start(i + 1)).unwrap();
        assert!(next < io, "copy {} must start before chunk {i} is sent: {log:?}", i + 1);
    }
}

#[test]
fn fill_overlaps_the_next_receive_with_the_copy_to_the_device() {
    let eng = HostCopy { polls: 3, ..Default::default() };
    let pool = StagingPool::new(&eng, 2, 100).unwrap();
    let src = pattern(950);
    let mut dev = vec![0u8; 950];
    let cancel = AtomicBool::new(false);
    let mut at = 0;
    let mut fills = 0;
    let n = fill(&eng, &pool, &[(dev.as_mut_ptr() as u64, 950)], &run(&cancel, 2), &mut |c| {
        eng.note_io(c.as_ptr() as u64);
        c.copy_from_slice(&src[at..at + c.len()]);
        at += c.len();
        fills += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!((n, fills), (950, 10));
    assert_eq!(dev, src);
    assert!(eng.state.lock().violations.is_empty(), "{:?}", eng.state.lock().violations);
    // Chunk 1 is received while copy 0 is still in flight.
    let log = eng.log();
    let done0 = log.iter().position(|e| *e == Ev::Done(0)).unwrap();
    let start1 = log.iter().position(|e| *e == Ev::Start(1)).unwrap();
    assert!(start1 < done0, "{log:?}");
    assert_eq!(eng.outstanding(), 0);
}

#[test]
fn a_sink_error_stops_the_pipeline_and_settles_copies_in_flight() {
    let eng = HostCopy { polls: 4, ..Default::default() };
    let pool = StagingPool::new(&eng, 4, 10).unwrap();
    let a = pattern(100);
    let cancel = AtomicBool::new(false);
    let mut sent = 0;
    let e = drain(&eng, &pool, &[(a.as_ptr() as u64, 100)], &run(&cancel, 4), &mut |_| {
        sent += 1;
        if sent == 2 {
            return Err(Error::disconnected("peer went away"));
        }
        Ok(())
    })
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RemoteDisconnect);
    assert!(e.to_string().contains("staging chunk 1"), "{e}");
    assert_eq!(eng.outstanding(), 0, "every copy in flight settled before return");
    assert_eq!(pool.free.lock().len(), 4, "every chunk came back");
}

#[test]
fn copy_errors_name_the_chunk_and_return_every_chunk() {
    let eng = HostCopy { fail_start: Some(2), ..Default::default() };
    let pool = StagingPool::new(&eng, 2, 8).unwrap();
    let a = pattern(64);
    let cancel = AtomicBool::new(false);
    let e = drain(&eng, &pool, &[(a.as_ptr() as u64, 64)], &run(&cancel, 2), &mut |_| Ok(())).unwrap_err();
    assert!(e.to_string().contains("chunk 2") && e.to_string().contains("start 2 fails"), "{e}");
    assert_eq!(pool.free.lock().len(), 2);

    let eng = HostCopy { fail_done: Some(1), ..Default::default() };
    let pool = StagingPool::new(&eng, 2, 8).unwrap();
    let mut dev = vec![0u8; 64];
    let e = fill(&eng, &pool, &[(dev.as_mut_ptr() as u64, 64)], &run(&cancel, 2), &mut |_| Ok(())).unwrap_err();
    assert!(e.to_string().contains("copy 1 failed"), "{e}");
    assert_eq!(eng.outstanding(), 0);
}

#[test]
fn cancellation_mid_pipeline_stops_after_the_copies_in_flight() {
    let eng = HostCopy { polls: 1, ..Default::default() };
    let pool = StagingPool::new(&eng, 2, 16).unwrap();
    let a = pattern(1600);
    let cancel = AtomicBool::new(false);
    let mut sent = 0;
    let e = drain(&eng, &pool, &[(a.as_ptr() as u64, 1600)], &run(&cancel, 2), &mut |_| {
        sent += 1;
        if sent == 3 {
            cancel.store(true, Ordering::Release);
        }
        Ok(())
    })
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Canceled);
    assert_eq!(sent, 3);
    assert!(eng.log().iter().filter(|e| matches!(e, Ev::Start(_))).count() < 100);
    assert_eq!(eng.outstanding(), 0);
    assert_eq!(pool.free.lock().len(), 2);
}

#[test]
fn an_exhausted_pool_times_out_with_a_clear_error_and_a_small_one_still_works() {
    let eng = HostCopy::default();
    let pool = StagingPool::new(&eng, 1, 32).unwrap();
    let held = pool.try_take().unwrap();
    let a = pattern(64);
    let cancel = AtomicBool::new(false);
    let short = Run { depth: 2, deadline: Instant::now() + Duration::from_millis(50), cancel: &cancel };
    let e = drain(&eng, &pool, &[(a.as_ptr() as u64, 64)], &short, &mut |_| Ok(())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(e.to_string().contains("staging pool exhausted"), "{e}");
    pool.give(held);
    // One chunk, depth 2: no overlap, but every byte moves.
    let mut out = Vec::new();
    drain(&eng, &pool, &[(a.as_ptr() as u64, 64)], &run(&cancel, 2), &mut |c| {
        out.extend_from_slice(c);
        Ok(())
    })
    .unwrap();
    assert_eq!(out, a);
}

#[test]
fn a_copy_that_never_completes_times_out() {
    let eng = HostCopy { never_done: true, ..Default::default() };
    let pool = StagingPool::new(&eng, 2, 8).unwrap();
    let a = pattern(16);
    let cancel = AtomicBool::new(false);
    let short = Run { depth: 2, deadline: Instant::now() + Duration::from_millis(30), cancel: &cancel };
    let t0 = Instant::now();
    let e = drain(&eng, &pool, &[(a.as_ptr() as u64, 16)], &short, &mut |_| Ok(())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    // The chunks of copies that never settle are not handed back.
    assert_eq!(pool.free.lock().len(), 0);
    assert!(t0.elapsed() < Duration::from_secs(30));
}

#[test]
fn pool_allocation_failure_frees_what_was_allocated_and_names_the_chunk() {
    let eng = HostCopy { allocs_left: Some(2), ..Default::default() };
    let e = StagingPool::new(&eng, 4, 8).unwrap_err();
    assert!(e.to_string().contains("chunk 2 of 4"), "{e}");
    assert_eq!(eng.state.lock().freed, 2);
    assert_eq!(StagingPool::new(&eng, 0, 8).unwrap_err().kind(), ErrorKind::InvalidParam);
}
