//! Streaming with notification backpressure (seed 001), on kvferry's own
//! API: a receiver owns a ring of `num_buffers` slots laid out
//! `[seq u64][data]`; a sender WRITEs slots through requests made once per
//! slot and reposted; the receiver polls each slot's sequence number, clears
//! it, and sends `P:<n>` progress every `progress` slots; the sender waits
//! while `sent - progress >= threshold`. Any sequence number other than the
//! expected one is an overrun. Both roles run in this process (two agents,
//! two threads) over the backend named (TCP by default: the full network
//! path on loopback).
//!
//! `cargo run --release -p kvferry --example streaming -- [TCP|SHM|LOCAL]
//! [num_buffers] [buffer_size] [transfers] [threshold] [progress] [consume_us]`
//! (defaults: TCP 64 1048576 700 60 16 0; the seed's 16 MiB slots work too;
//! `consume_us` makes the receiver a slow consumer).
//! The Python version, with two hosts: `examples/python/streaming/`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvferry::{Agent, AlignedBuf, Request, XferDescList, XferOp, XferState};

const EMPTY: u64 = u64::MAX;

/// One run's shape.
#[derive(Clone, Debug)]
struct Config {
    backend: String,
    num_buffers: usize,
    buffer_size: usize,
    transfers: u64,
    threshold: u64,
    progress: u64,
    /// Time the receiver spends on each slot before freeing it (a slow consumer).
    consume: Duration,
}

/// What a run found.
#[derive(Debug)]
struct Outcome {
    mismatches: u64,
    seconds: f64,
    backpressure_waits: u64,
}

/// The sequence word at the head of slot `i` of `buf` (slots of `slot` bytes).
fn seq(buf: &AlignedBuf, slot: usize, i: usize) -> &AtomicU64 {
    assert!((i + 1) * slot <= buf.len() && slot % 8 == 0, "slot {i} lies in the buffer, 8-aligned");
    // SAFETY: the word lies in `buf` (checked above; the buffer is page-aligned
    // and `slot` a multiple of 8), which the returned reference borrows; a peer
    // writes it through kvferry while we read it, so here it is only ever
    // touched atomically.
    unsafe { &*((buf.addr() + (i * slot) as u64) as *const AtomicU64) }
}

fn slots(buf: &AlignedBuf, cfg: &Config) -> kvferry::Result<Vec<XferDescList>> {
    let slot = 8 + cfg.buffer_size;
    (0..cfg.num_buffers).map(|i| buf.xfer_blocks(i * slot, slot, 1)).collect()
}

fn run(cfg: &Config) -> kvferry::Result<Outcome> {
    // Names unique per run: an agent of the previous run may still be
    // going away (its name is free once its last thread lets go of it).
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let tag = format!("{}-{}", std::process::id(), RUNS.fetch_add(1, Ordering::Relaxed));
    let rx = Agent::with_backends(&format!("stream-rx-{tag}"), &[cfg.backend.as_str()])?;
    let tx = Agent::with_backends(&format!("stream-tx-{tag}"), &[cfg.backend.as_str()])?;
    let slot = 8 + cfg.buffer_size;
    if slot % 8 != 0 {
        return Err(kvferry::Error::invalid("buffer_size must be a multiple of 8"));
    }
    let mut ring = AlignedBuf::new(slot * cfg.num_buffers)?;
    let mut src = AlignedBuf::new(slot * cfg.num_buffers)?;
    // Memory as an application has it when it streams: the sender's data is
    // written (here a pattern) and the receiver's ring zeroed, so that the
    // timed run does not include the kernel allocating 2 GiB page by page.
    src.as_mut_slice().iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    ring.as_mut_slice().fill(0);
    let (_rr, _rs) = (rx.register_buf(&ring)?, tx.register_buf(&src)?);
    for i in 0..cfg.num_buffers {
        seq(&ring, slot, i).store(EMPTY, Ordering::Release);
    }
    tx.load_remote_metadata(&rx.local_metadata()?)?;
    rx.load_remote_metadata(&tx.local_metadata()?)?;
    // One request per slot, created once and reposted.
    let (local, remote) = (slots(&src, cfg)?, slots(&ring, cfg)?);
    let reqs: Vec<Request> = (0..cfg.num_buffers)
        .map(|i| {
            tx.create_request(XferOp::Write, &local[i], &remote[i], rx.name(), Some(format!("BUF_{i}").as_bytes()))
        })
        .collect::<kvferry::Result<_>>()?;
    let started = Instant::now();
    let (rxn, txn) = (rx.name().to_string(), tx.name().to_string());
    let receiver = std::thread::scope(|sc| {
        let receiver = sc.spawn(|| receive(&rx, &txn, &ring, slot, cfg));
        let waits = send(&tx, &rxn, &reqs, &src, slot, cfg);
        let mismatches = receiver.join().expect("the receiver thread");
        waits.and_then(|w| mismatches.map(|m| (m, w)))
    });
    let (mismatches, backpressure_waits) = receiver?;
    Ok(Outcome { mismatches, seconds: started.elapsed().as_secs_f64(), backpressure_waits })
}

/// The receiver: checks and clears each slot's sequence number in turn,
/// sending progress every `cfg.progress` slots. Returns the overruns seen.
fn receive(rx: &Agent, sender: &str, ring: &AlignedBuf, slot: usize, cfg: &Config) -> kvferry::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut mismatches = 0;
    for got in 0..cfg.transfers {
        let word = seq(ring, slot, (got % cfg.num_buffers as u64) as usize);
        let mut v = word.load(Ordering::Acquire);
        while v == EMPTY {
            if Instant::now() > deadline {
                return Err(kvferry::Error::timeout(format!("receiver: transfer {got} never arrived")));
            }
            // Yield: on a machine with few cores the thread that moves the
            // bytes (the backend's, or the sender) needs this one's core.
            std::thread::yield_now();
            v = word.load(Ordering::Acquire);
        }
        if v != got {
            // Over TCP the word can land a few bytes at a time: wait while each
            // byte is the expected one's or EMPTY's.
            while v != got && v.to_le_bytes().iter().zip(got.to_le_bytes()).all(|(&b, e)| b == e || b == 0xff) {
                v = word.load(Ordering::Acquire);
            }
            if v != got {
                eprintln!("receiver: slot {}: sequence {v:#x}, expected {got}", got % cfg.num_buffers as u64);
                mismatches += 1;
            }
        }
        let consumed = Instant::now() + cfg.consume;
        while Instant::now() < consumed {
            std::hint::spin_loop();
        }
        word.store(EMPTY, Ordering::Release);
        if (got + 1) % cfg.progress == 0 || got + 1 == cfg.transfers {
            rx.send_notification(sender, format!("P:{}", got + 1).as_bytes(), &[])?;
        }
    }
    Ok(mismatches)
}

/// The sender: waits for progress when `threshold` slots are outstanding and
/// for a slot's previous WRITE before reusing it. Returns how often it waited.
fn send(
    tx: &Agent,
    receiver: &str,
    reqs: &[Request],
    src: &AlignedBuf,
    slot: usize,
    cfg: &Config,
) -> kvferry::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut progress, mut waits) = (0u64, 0u64);
    let drain = |progress: &mut u64| {
        for m in tx.take_notifications().remove(receiver).unwrap_or_default() {
            if let Some(n) = m.strip_prefix(b"P:").and_then(|n| std::str::from_utf8(n).ok()?.parse::<u64>().ok()) {
                *progress = (*progress).max(n);
            }
        }
    };
    for sent in 0..cfg.transfers {
        drain(&mut progress);
        if sent - progress.min(sent) >= cfg.threshold {
            waits += 1;
            while sent - progress.min(sent) >= cfg.threshold {
                if Instant::now() > deadline {
                    return Err(kvferry::Error::timeout("sender: no progress from the receiver"));
                }
                tx.wait_notifications(Duration::from_millis(10));
                drain(&mut progress);
            }
        }
        let i = (sent % cfg.num_buffers as u64) as usize;
        let req = &reqs[i];
        if sent >= cfg.num_buffers as u64 {
            // The slot's previous WRITE must be done before its memory is reused.
            while req.status()? != XferState::Done {
                std::thread::yield_now();
            }
        }
        seq(src, slot, i).store(sent, Ordering::Release);
        req.post(None)?;
    }
    for r in reqs {
        r.wait(Duration::from_secs(30))?;
    }
    Ok(waits)
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: u64| a.get(i).and_then(|v| v.parse().ok()).unwrap_or(d);
    let cfg = Config {
        backend: a.first().cloned().unwrap_or_else(|| "TCP".into()),
        num_buffers: num(1, 64) as usize,
        buffer_size: num(2, 1 << 20) as usize,
        transfers: num(3, 700),
        threshold: num(4, 60),
        progress: num(5, 16).max(1),
        consume: Duration::from_micros(num(6, 0)),
    };
    if cfg.threshold == 0 || cfg.threshold > cfg.num_buffers as u64 {
        eprintln!("threshold must be in 1..={}", cfg.num_buffers);
        std::process::exit(2);
    }
    match run(&cfg) {
        Ok(o) => {
            let gbps = cfg.transfers as f64 * cfg.buffer_size as f64 / o.seconds / 1e9;
            println!(
                "{} x {} B over {}: {:.2} GB/s, {:.1} ms, backpressure waits {}, {}",
                cfg.transfers,
                cfg.buffer_size,
                cfg.backend,
                gbps,
                o.seconds * 1e3,
                o.backpressure_waits,
                if o.mismatches == 0 { "no overrun".to_string() } else { format!("{} OVERRUNS", o.mismatches) }
            );
            std::process::exit(if o.mismatches == 0 { 0 } else { 1 });
        }
        Err(e) => {
            eprintln!("streaming: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both slot sizes that put a header on a 64-byte boundary (the slot a
    /// double-storing copy brought back stale), over TCP and SHM.
    #[test]
    fn no_overrun_with_backpressure() {
        for backend in ["TCP", "SHM"] {
            for buffer_size in [65536, 65480] {
                let cfg = Config {
                    backend: backend.into(),
                    num_buffers: 8,
                    buffer_size,
                    transfers: 400,
                    threshold: 6,
                    progress: 2,
                    // A receiver slower than the sender, so that backpressure
                    // must engage whatever the scheduler does.
                    consume: Duration::from_micros(300),
                };
                let o = run(&cfg).unwrap();
                assert_eq!(o.mismatches, 0, "{cfg:?}");
                assert!(o.backpressure_waits > 0, "the sender had to wait for progress: {cfg:?}");
            }
        }
    }
}
