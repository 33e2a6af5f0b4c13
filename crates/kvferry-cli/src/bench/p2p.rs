//! `kvferry bench p2p`: point-to-point bandwidth and latency between two
//! agents, in the shape of nixlbench (block and batch sweeps, its table) and
//! Mooncake's transfer_engine_bench (target, initiator and loopback modes).

use std::io::{BufRead, BufReader, IsTerminal};
use std::process::{Child, Command, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use kvferry::{Agent, AgentConfig, AlignedBuf, Error, Params, Request, Result, XferDescList, XferOp, XferState};

use super::report::{self, Point, Timings};
use super::{pattern, sweep, Common};
use crate::rendezvous::{self, Msg};

/// Where this process plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Starts its own target (a child process on 127.0.0.1; in-process for LOCAL).
    Loopback,
    /// Serves one initiator on --ip/--port, then exits.
    Target,
    /// Connects to a target at --ip/--port and measures.
    Initiator,
}

/// Arguments of `kvferry bench p2p`.
#[derive(Args, Debug, Clone)]
pub struct P2pArgs {
    /// loopback (default: own target on 127.0.0.1), target, or initiator.
    #[arg(long, value_enum, default_value_t = Mode::Loopback)]
    pub mode: Mode,
    /// Backend to measure: tcp, shm or local.
    #[arg(long, default_value = "tcp")]
    pub backend: String,
    /// Target address (initiator: where to connect; target: where to listen).
    #[arg(long, default_value = "127.0.0.1")]
    pub ip: String,
    /// Target rendezvous port (0 in target mode: any free port, printed on start).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    #[command(flatten)]
    pub common: Common,
}

/// Kills the loopback target if the run ends early.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Give the target a moment to exit on its own after the rendezvous closes.
        for _ in 0..50 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent(role: &str, backend: &str, params: &Params) -> Result<Agent> {
    let name = format!("bench-{role}-{}", std::process::id());
    Agent::new(&name, AgentConfig::default().with_backend(backend, params.clone()))
}

/// Runs the target side: serve one initiator, then return when it leaves.
pub fn run_target(args: &P2pArgs) -> Result<()> {
    let listener = rendezvous::listen(&args.ip, args.port)?;
    let addr = listener.local_addr().map_err(|e| Error::io("rendezvous: local address", e))?;
    println!("KVFERRY-TARGET listening on {addr}");
    let (mut s, peer) = listener.accept().map_err(|e| Error::io("rendezvous: accept", e))?;
    let _ = s.set_nodelay(true);
    let Msg::Hello { backend, buf_len, pattern_seed, metadata } = rendezvous::recv(&mut s, Duration::from_secs(60))?
    else {
        return Err(Error::malformed(format!("rendezvous: {peer} did not start with Hello")));
    };
    let params = args.common.backend_params()?;
    let result = (|| {
        let a = agent("target", &backend, &params)?;
        let mut buf = AlignedBuf::new(buf_len as usize)?;
        pattern::fill(buf.as_mut_slice(), 0, pattern_seed);
        let reg = a.register_buf(&buf)?;
        a.load_remote_metadata(&metadata)?;
        let descs = buf.xfer_blocks(0, buf.len(), 1)?.to_bytes();
        Ok::<_, Error>((a, buf, reg, descs))
    })();
    match result {
        Ok((a, _buf, _reg, descs)) => {
            rendezvous::send(&mut s, &Msg::Ready { metadata: a.local_metadata()?, descs, files: Vec::new() })?;
            rendezvous::wait_closed(&mut s, None);
            Ok(())
        }
        Err(e) => {
            let _ = rendezvous::send(&mut s, &Msg::Failed(e.to_string()));
            Err(e)
        }
    }
}

/// What the initiator holds for a whole sweep.
pub struct Session {
    pub agent: Agent,
    pub buf: AlignedBuf,
    _reg: kvferry::Registration,
    pub remote_name: String,
    pub remote_base: u64,
    /// Keeps an in-process target alive (LOCAL).
    _local_target: Option<(Agent, AlignedBuf, kvferry::Registration)>,
    _child: Option<ChildGuard>,
    _rendezvous: Option<std::net::TcpStream>,
}

const TARGET_SEED: u8 = 0xA5;
const INIT_SEED: u8 = 0x3C;

/// Sets up an initiator and its target (per `args.mode`).
pub fn connect(args: &P2pArgs, buf_len: usize) -> Result<Session> {
    let params = args.common.backend_params()?;
    let agent = agent("initiator", &args.backend, &params)?;
    // The second half of the local buffer receives read-backs for verification.
    let mut buf = AlignedBuf::new(buf_len * 2)?;
    pattern::fill(&mut buf.as_mut_slice()[..buf_len], 0, INIT_SEED);
    let reg = agent.register_buf(&buf)?;
    if args.mode == Mode::Loopback && args.backend.eq_ignore_ascii_case("local") {
        let t = self::agent("target", &args.backend, &params)?;
        let mut tb = AlignedBuf::new(buf_len)?;
        pattern::fill(tb.as_mut_slice(), 0, TARGET_SEED);
        let treg = t.register_buf(&tb)?;
        agent.load_remote_metadata(&t.local_metadata()?)?;
        let (remote_name, remote_base) = (t.name().to_string(), tb.addr());
        return Ok(Session {
            agent,
            buf,
            _reg: reg,
            remote_name,
            remote_base,
            _local_target: Some((t, tb, treg)),
            _child: None,
            _rendezvous: None,
        });
    }
    let (addr, child) = match args.mode {
        Mode::Loopback => {
            let (addr, child) = spawn_target(args)?;
            (addr, Some(child))
        }
        _ => (format!("{}:{}", args.ip, args.port), None),
    };
    let mut s = rendezvous::connect(&addr, Duration::from_secs(30))?;
    rendezvous::send(
        &mut s,
        &Msg::Hello {
            backend: args.backend.clone(),
            buf_len: buf_len as u64,
            pattern_seed: TARGET_SEED,
            metadata: agent.local_metadata()?,
        },
    )?;
    let Msg::Ready { metadata, descs, .. } = rendezvous::recv(&mut s, Duration::from_secs(60))? else {
        return Err(Error::malformed("rendezvous: the target did not answer Ready"));
    };
    let remote_name = agent.load_remote_metadata(&metadata)?;
    let descs = XferDescList::from_bytes(&descs)?;
    let remote_base = descs.get(0).map(|d| d.addr).ok_or_else(|| Error::malformed("the target exposed no buffer"))?;
    Ok(Session {
        agent,
        buf,
        _reg: reg,
        remote_name,
        remote_base,
        _local_target: None,
        _child: child,
        _rendezvous: Some(s),
    })
}

fn spawn_target(args: &P2pArgs) -> Result<(String, ChildGuard)> {
    let exe = std::env::current_exe().map_err(|e| Error::io("locating the kvferry binary", e))?;
    let mut cmd = Command::new(exe);
    cmd.args(["bench", "p2p", "--mode", "target", "--ip", "127.0.0.1", "--port", "0", "--backend", &args.backend]);
    for p in &args.common.param {
        cmd.args(["--param", p]);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Error::io("starting the loopback target process", e))?;
    let out = child.stdout.take().ok_or_else(|| Error::internal("target stdout was not captured"))?;
    let guard = ChildGuard(child);
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).map_err(|e| Error::io("reading the target's address", e))?;
    let addr = line
        .trim()
        .strip_prefix("KVFERRY-TARGET listening on ")
        .ok_or_else(|| {
            Error::new(kvferry::ErrorKind::Backend, format!("the loopback target did not start (it said {line:?})"))
        })?
        .to_string();
    Ok((addr, guard))
}

/// Measures one (block, batch) point with `threads` threads.
pub fn run_point(s: &Session, c: &Common, op: XferOp, block: usize, batch: usize) -> Result<Timings> {
    let threads = c.threads.max(1);
    let iters = c.iters_for(block * batch);
    let barrier = Barrier::new(threads);
    let results: Vec<Result<Timings>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                scope.spawn(move || -> Result<Timings> {
                    let span = block * batch;
                    let local = s.buf.xfer_blocks(t * span, block, batch)?;
                    // Remote blocks in reverse order: nothing merges, every descriptor is moved as is.
                    let mut remote = XferDescList::with_capacity(local.mem_type(), batch);
                    for i in (0..batch).rev() {
                        remote.push(kvferry::XferDesc::new(
                            s.remote_base + (t * span + i * block) as u64,
                            block as u64,
                            0,
                        ));
                    }
                    let mut tm = Timings::default();
                    for _ in 0..iters.clamp(1, 20) {
                        let t0 = Instant::now();
                        let r = s.agent.create_request(op, &local, &remote, &s.remote_name, None)?;
                        tm.prep.record(t0.elapsed());
                        drop(r);
                    }
                    let req = s.agent.create_request(op, &local, &remote, &s.remote_name, None)?;
                    for _ in 0..c.warmup {
                        complete(&req)?;
                    }
                    barrier.wait();
                    let start = Instant::now();
                    let deadline = c.duration.map(|d| start + Duration::from_secs_f64(d));
                    let mut n = 0u64;
                    loop {
                        let t0 = Instant::now();
                        let st = req.post(None)?;
                        tm.post.record(t0.elapsed());
                        if st != XferState::Done {
                            complete_posted(&req)?;
                        }
                        tm.complete.record(t0.elapsed());
                        n += 1;
                        match deadline {
                            Some(d) if Instant::now() >= d => break,
                            None if n >= iters => break,
                            _ => {}
                        }
                    }
                    tm.elapsed = start.elapsed();
                    tm.iters = n;
                    tm.bytes = n * span as u64;
                    if c.check_consistency {
                        verify(s, op, &local, &remote, t * span, span)?;
                    }
                    Ok(tm)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::internal("a bench thread panicked"))))
            .collect()
    });
    let mut total = Timings::default();
    for r in results {
        total.merge(&r?);
    }
    Ok(total)
}

fn complete(req: &Request) -> Result<()> {
    if req.post(None)? != XferState::Done {
        complete_posted(req)?;
    }
    Ok(())
}

/// Busy-polls a posted request to completion (latency matters), bounded.
fn complete_posted(req: &Request) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut spins = 0u32;
    while req.status()? != XferState::Done {
        spins += 1;
        if spins % 1024 == 0 && Instant::now() > deadline {
            return Err(Error::timeout("a benchmark transfer did not finish within 60 s"));
        }
        std::hint::spin_loop();
    }
    Ok(())
}

/// Checks that the bytes landed: READ results against the target's pattern;
/// WRITE results by reading them back into the scratch half of the buffer.
fn verify(s: &Session, op: XferOp, local: &XferDescList, remote: &XferDescList, off: usize, span: usize) -> Result<()> {
    let half = s.buf.len() / 2;
    let buf = s.buf.as_slice();
    match op {
        XferOp::Read => {
            for (l, r) in local.iter().zip(remote.iter()) {
                let lo = (l.addr - s.buf.addr()) as usize;
                let ro = r.addr - s.remote_base;
                if let Some(at) = pattern::first_mismatch(&buf[lo..lo + l.len as usize], ro, TARGET_SEED) {
                    return Err(Error::new(
                        kvferry::ErrorKind::Backend,
                        format!("READ verification failed at remote offset {}", ro + at as u64),
                    ));
                }
            }
        }
        XferOp::Write => {
            let scratch = s.buf.xfer_blocks(half + off, span / remote.len(), remote.len())?;
            let back = s.agent.create_request(XferOp::Read, &scratch, remote, &s.remote_name, None)?;
            complete(&back)?;
            if buf[half + off..half + off + span] != buf[off..off + span] {
                return Err(Error::new(
                    kvferry::ErrorKind::Backend,
                    "WRITE verification failed: the target holds other bytes than were written",
                ));
            }
        }
    }
    Ok(())
}

/// `kvferry bench p2p`.
pub fn run(args: &P2pArgs) -> Result<Vec<Point>> {
    if args.mode == Mode::Target {
        run_target(args)?;
        return Ok(Vec::new());
    }
    let c = &args.common;
    let op: XferOp = c.op.parse()?;
    let points = sweep(c)?;
    let buf_len = points.iter().map(|(b, n)| b * n).max().unwrap_or(0) * c.threads.max(1);
    let s = connect(args, buf_len)?;
    let bar = progress(points.len(), c.json);
    if !c.json {
        println!("{}", report::table_header(false));
    }
    let mut out = Vec::new();
    for (block, batch) in points {
        let t = run_point(&s, c, op, block, batch)?;
        let mut p = t.point(
            "p2p",
            &args.backend.to_ascii_uppercase(),
            &op.to_string(),
            None,
            block as u64,
            batch,
            c.threads.max(1),
            false,
        );
        p.verified = c.check_consistency.then_some(true);
        bar.suspend(|| c.emit(&p));
        bar.inc(1);
        out.push(p);
    }
    bar.finish_and_clear();
    Ok(out)
}

pub(crate) fn progress(n: usize, json: bool) -> indicatif::ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(n as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}
