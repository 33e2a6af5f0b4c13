//! `kvferry bench p2p`: point-to-point bandwidth and latency between two
//! agents, in the shape of nixlbench (block and batch sweeps, its table) and
//! Mooncake's transfer_engine_bench (target, initiator and loopback modes).

use std::io::{BufRead, BufReader, IsTerminal};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use kvferry::{
    Agent, AgentConfig, AlignedBuf, Error, MetaPeer, Params, Request, Result, XferDescList, XferOp, XferState,
};

use super::report::{self, Point, Timings};
use super::{pattern, sweep, BufferKind, Common};
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
    /// Target mode: the largest buffer an initiator may ask for (e.g. 8G);
    /// larger requests are refused and the target keeps waiting. Default:
    /// half of MemAvailable. Initiators must present KVFERRY_AUTH_TOKEN when
    /// the target has it set.
    #[arg(long)]
    pub max_buffer: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub common: Common,
}

/// Finding peers through the central store instead of --ip/--port, as
/// nixlbench does with etcd: targets publish themselves and their buffers,
/// initiators take ranks, and everyone finds everyone by name.
#[derive(Args, Debug, Clone, Default)]
pub struct StoreArgs {
    /// Use the central store (KVFERRY_METADATA_URL or KVFERRY_ETCD_ENDPOINTS, or the flags below).
    #[arg(long = "store")]
    pub enabled: bool,
    /// Metadata server URL (implies --store).
    #[arg(long)]
    pub metadata_url: Option<String>,
    /// etcd endpoints, comma-separated (implies --store).
    #[arg(long)]
    pub etcd: Option<String>,
    /// Job name: the store prefix that groups one run's targets and initiators.
    #[arg(long, default_value = "default")]
    pub job: String,
    /// This agent's name (default: role and pid).
    #[arg(long)]
    pub name: Option<String>,
    /// Targets an initiator waits for and spreads its threads over.
    #[arg(long, default_value_t = 1)]
    pub targets: usize,
    /// Initiators taking part: targets wait for all of them to finish.
    #[arg(long, default_value_t = 1)]
    pub initiators: usize,
    /// Seconds to wait for the other participants.
    #[arg(long, default_value_t = 300.0)]
    pub wait: f64,
}

impl StoreArgs {
    fn on(&self) -> bool {
        self.enabled || self.metadata_url.is_some() || self.etcd.is_some()
    }

    fn config(&self) -> AgentConfig {
        let mut cfg = AgentConfig::env_defaults();
        if let Some(u) = &self.metadata_url {
            cfg = cfg.with_metadata_url(u.clone());
        }
        if let Some(e) = &self.etcd {
            let eps: Vec<&str> = e.split(',').map(str::trim).collect();
            cfg = cfg.with_etcd(&eps);
        }
        cfg
    }

    fn key(&self, what: &str) -> String {
        format!("/kvferry/bench/{}/{what}", self.job)
    }

    /// Waits until at least `n` keys exist under `prefix`; returns them sorted.
    fn wait_for_keys(&self, store: &kvferry::Store, prefix: &str, n: usize, who: &str) -> Result<Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs_f64(self.wait);
        loop {
            let keys = store.list(prefix)?;
            if keys.len() >= n {
                return Ok(keys);
            }
            if Instant::now() > deadline {
                return Err(Error::timeout(format!(
                    "only {} of {n} {who} appeared under {prefix} in {} within {} s",
                    keys.len(),
                    store.endpoint(),
                    self.wait
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Kills the loopback target if the run ends early.
pub(crate) struct ChildGuard(Child);

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
    Agent::new(&name, AgentConfig::env_defaults().with_backend(backend, params.clone()))
}

/// Bytes of the target buffer one initiator uses.
fn span_per_initiator(c: &Common) -> Result<usize> {
    Ok(sweep(c)?.iter().map(|(b, n)| b * n).max().unwrap_or(0) * c.threads.max(1))
}

/// A target that publishes itself through the store and serves until every
/// initiator of the job says it is done.
fn run_target_store(args: &P2pArgs) -> Result<()> {
    let st = &args.store;
    let name = st.name.clone().unwrap_or_else(|| format!("bench-target-{}", std::process::id()));
    let a = Agent::new(&name, st.config().with_backend(&args.backend, args.common.backend_params()?))?;
    let store = a.store()?;
    let len = span_per_initiator(&args.common)? * st.initiators.max(1);
    let mut buf = args.common.buffer_or(BufferKind::Shared).alloc(len)?;
    pattern::fill(buf.as_mut_slice(), 0, TARGET_SEED);
    let _reg = a.register_buf(&buf)?;
    // A previous run of the same job may have left its "done" marks.
    if store.list(&st.key("targets/"))?.is_empty() {
        for k in store.list(&st.key("done/"))? {
            store.delete(&k)?;
        }
    }
    a.send_local_metadata(MetaPeer::Store)?;
    store.put(&st.key(&format!("targets/{name}")), &buf.xfer_blocks(0, len, 1)?.to_bytes())?;
    println!("KVFERRY-TARGET '{name}' published to {} (job {})", store.endpoint(), st.job);
    let done = st.wait_for_keys(&store, &st.key("done/"), st.initiators.max(1), "finished initiators");
    store.delete(&st.key(&format!("targets/{name}")))?;
    a.invalidate_local_metadata(MetaPeer::Store)?;
    if store.list(&st.key("targets/"))?.is_empty() {
        for k in store.list(&st.key(""))? {
            store.delete(&k)?;
        }
    }
    done.map(drop)
}

/// An initiator that takes a rank and finds its targets through the store.
fn connect_store(args: &P2pArgs) -> Result<Session> {
    let st = &args.store;
    let name = st.name.clone().unwrap_or_else(|| format!("bench-initiator-{}", std::process::id()));
    let agent = Agent::new(&name, st.config().with_backend(&args.backend, args.common.backend_params()?))?;
    let store = agent.store()?;
    let span = span_per_initiator(&args.common)?;
    let mut buf = args.common.buffer_or(BufferKind::Shared).alloc(span * 2)?;
    pattern::fill(&mut buf.as_mut_slice()[..span], 0, INIT_SEED);
    let reg = agent.register_buf(&buf)?;
    agent.send_local_metadata(MetaPeer::Store)?;
    store.put(&st.key(&format!("initiators/{name}")), b"")?;
    let inits = st.wait_for_keys(&store, &st.key("initiators/"), st.initiators.max(1), "initiators")?;
    let rank = inits.iter().position(|k| k.ends_with(&format!("/{name}"))).unwrap_or(0);
    if rank >= st.initiators.max(1) {
        return Err(Error::invalid(format!(
            "initiator rank {rank} is beyond --initiators {}: stale keys of an old run under job '{}'? use a new --job",
            st.initiators, st.job
        )));
    }
    let targets = st.wait_for_keys(&store, &st.key("targets/"), st.targets.max(1), "targets")?;
    let mut remotes = Vec::new();
    for key in targets.iter().take(st.targets.max(1)) {
        let tname = key.rsplit('/').next().unwrap_or_default().to_string();
        agent.fetch_remote_metadata(&tname, None, MetaPeer::Store)?;
        let descs = XferDescList::from_bytes(&store.get(key, Duration::from_secs(5))?)?;
        let d = descs.get(0).ok_or_else(|| Error::malformed(format!("target '{tname}' exposed no buffer")))?;
        if ((rank + 1) * span) as u64 > d.len {
            return Err(Error::invalid(format!(
                "target '{tname}' exposes {} bytes but initiator rank {rank} needs {}: start targets and initiators with the same --block-sizes, --batch-sizes, --threads and --initiators",
                d.len,
                (rank + 1) * span
            )));
        }
        remotes.push((tname, d.addr));
    }
    Ok(Session {
        agent,
        buf,
        _reg: reg,
        remotes,
        rank_off: rank * span,
        done_key: Some(st.key(&format!("done/{name}"))),
        _local_target: None,
        _child: None,
        _rendezvous: None,
    })
}

/// The default `--max-buffer`: half of the memory available now (so that a
/// peer's request cannot set off the OOM killer), or 1 GiB if
/// `/proc/meminfo` cannot be read.
fn default_max_buffer() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib * 1024 / 2)
        .unwrap_or(1 << 30)
}

/// The largest buffer this target allocates for an initiator.
fn max_buffer(args: &P2pArgs) -> Result<u64> {
    match &args.max_buffer {
        None => Ok(default_max_buffer()),
        Some(v) => kvferry::params::parse_size(v)
            .ok_or_else(|| Error::invalid(format!("--max-buffer '{v}' is not a size (e.g. 4G)"))),
    }
}

/// Runs the target side: serve one initiator, then return when it leaves.
/// Clients that fail the handshake (no token, a buffer above
/// `--max-buffer`, garbage, too slow) get an error and the target keeps
/// waiting for a good one; handshakes run concurrently within
/// [`rendezvous::Limits`].
pub fn run_target(args: &P2pArgs) -> Result<()> {
    let max = max_buffer(args)?;
    let listener = rendezvous::listen(&args.ip, args.port)?;
    let addr = listener.local_addr().map_err(|e| Error::io("rendezvous: local address", e))?;
    println!("KVFERRY-TARGET listening on {addr}");
    let token = AgentConfig::env_defaults().auth_token;
    let params = args.common.backend_params()?;
    // A client that passes the handshake but whose setup fails (an unknown
    // backend, metadata that will not load) is told why, and the target
    // waits for the next one: no single client can end it.
    loop {
        let listener = listener.try_clone().map_err(|e| Error::io("rendezvous: listener", e))?;
        let (mut s, peer, hello) = rendezvous::accept_first(listener, token.clone(), move |peer, m| {
            match m {
            Msg::Hello { buf_len, .. } if *buf_len > max => Err(Error::invalid(format!(
                "the initiator asks for a {buf_len}-byte target buffer, above this target's --max-buffer of {max} bytes: start the target with a larger --max-buffer, or the initiator with smaller --block-sizes, --batch-sizes or --threads"
            ))),
            _ => rendezvous::check_hello(peer, m),
        }
        })?;
        let Msg::Hello { backend, buf_len, pattern_seed, metadata } = hello else {
            return Err(Error::internal("rendezvous: accepted a client that did not send Hello"));
        };
        let result = (|| {
            let a = agent("target", &backend, &params)?;
            let mut buf = args.common.buffer_or(BufferKind::Shared).alloc(buf_len as usize)?;
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
                return Ok(());
            }
            Err(e) => {
                eprintln!("rendezvous: client {peer}: {e}; waiting for another initiator");
                let _ = rendezvous::send(&mut s, &Msg::Failed(e.to_string()));
            }
        }
    }
}

/// What the initiator holds for a whole sweep.
pub struct Session {
    pub agent: Agent,
    pub buf: AlignedBuf,
    _reg: kvferry::Registration,
    /// The targets (name, buffer base); thread `t` uses `remotes[t % len]`.
    pub remotes: Vec<(String, u64)>,
    /// Where this initiator's slice starts in every target buffer (rank × span).
    pub rank_off: usize,
    /// Store key marking this initiator done (store mode).
    done_key: Option<String>,
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
    let mut buf = args.common.buffer_or(BufferKind::Shared).alloc(buf_len * 2)?;
    pattern::fill(&mut buf.as_mut_slice()[..buf_len], 0, INIT_SEED);
    let reg = agent.register_buf(&buf)?;
    if args.mode == Mode::Loopback && args.backend.eq_ignore_ascii_case("local") {
        let t = self::agent("target", &args.backend, &params)?;
        let mut tb = args.common.buffer_or(BufferKind::Shared).alloc(buf_len)?;
        pattern::fill(tb.as_mut_slice(), 0, TARGET_SEED);
        let treg = t.register_buf(&tb)?;
        agent.load_remote_metadata(&t.local_metadata()?)?;
        let remotes = vec![(t.name().to_string(), tb.addr())];
        return Ok(Session {
            agent,
            buf,
            _reg: reg,
            remotes,
            rank_off: 0,
            done_key: None,
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
    let mut s = rendezvous::connect_auth(&addr, Duration::from_secs(30), agent.config().auth_token.as_ref())?;
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
        remotes: vec![(remote_name, remote_base)],
        rank_off: 0,
        done_key: None,
        _local_target: None,
        _child: child,
        _rendezvous: Some(s),
    })
}

fn spawn_target(args: &P2pArgs) -> Result<(String, ChildGuard)> {
    let mut argv: Vec<String> = ["bench", "p2p", "--mode", "target", "--ip", "127.0.0.1", "--port", "0", "--backend"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    argv.push(args.backend.clone());
    for p in &args.common.param {
        argv.extend(["--param".to_string(), p.clone()]);
    }
    if let Some(b) = args.common.buffer {
        argv.extend(["--buffer".to_string(), b.as_str().to_string()]);
    }
    spawn_child(&argv)
}

/// Starts `kvferry <argv>` as a loopback target and returns the rendezvous
/// address it prints; the guard kills it if the run ends early.
pub(crate) fn spawn_child(argv: &[String]) -> Result<(String, ChildGuard)> {
    spawn_child_saying(argv, "KVFERRY-TARGET listening on ")
}

/// Starts `kvferry argv…` and returns what its first line says after `prefix`.
pub(crate) fn spawn_child_saying(argv: &[String], prefix: &str) -> Result<(String, ChildGuard)> {
    let exe = std::env::current_exe().map_err(|e| Error::io("locating the kvferry binary", e))?;
    let mut cmd = Command::new(exe);
    cmd.args(argv);
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
        .strip_prefix(prefix)
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
    super::run_threads(threads, |t, barrier| {
        let span = block * batch;
        let local = s.buf.xfer_blocks(t * span, block, batch)?;
        let (rname, rbase) = &s.remotes[t % s.remotes.len()];
        let roff = s.rank_off + t * span;
        // Remote blocks in reverse order: nothing merges, every descriptor is moved as is.
        let mut remote = XferDescList::with_capacity(local.mem_type(), batch);
        for i in (0..batch).rev() {
            remote.push(kvferry::XferDesc::new(rbase + (roff + i * block) as u64, block as u64, 0));
        }
        let mut tm = Timings::default();
        for _ in 0..iters.clamp(1, 20) {
            let t0 = Instant::now();
            let r = s.agent.create_request(op, &local, &remote, rname, None)?;
            tm.prep.record(t0.elapsed());
            drop(r);
        }
        let req = s.agent.create_request(op, &local, &remote, rname, None)?;
        for _ in 0..c.warmup {
            complete(&req)?;
        }
        barrier.wait();
        super::timed_loop(c, iters, span as u64, &mut tm, |_| &req, complete_posted)?;
        if c.check_consistency {
            verify(s, (rname, *rbase), op, &local, &remote, t * span, span)?;
        }
        Ok(tm)
    })
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
fn verify(
    s: &Session,
    target: (&str, u64),
    op: XferOp,
    local: &XferDescList,
    remote: &XferDescList,
    off: usize,
    span: usize,
) -> Result<()> {
    let (rname, rbase) = target;
    let half = s.buf.len() / 2;
    let buf = s.buf.as_slice();
    match op {
        XferOp::Read => {
            for (l, r) in local.iter().zip(remote.iter()) {
                let lo = (l.addr - s.buf.addr()) as usize;
                let ro = r.addr - rbase;
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
            let back = s.agent.create_request(XferOp::Read, &scratch, remote, rname, None)?;
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
        if args.store.on() {
            run_target_store(args)?;
        } else {
            run_target(args)?;
        }
        return Ok(Vec::new());
    }
    let c = &args.common;
    let op: XferOp = c.op.parse()?;
    let points = sweep(c)?;
    let buf_len = points.iter().map(|(b, n)| b * n).max().unwrap_or(0) * c.threads.max(1);
    let s = if args.store.on() {
        if args.mode == Mode::Loopback {
            return Err(Error::invalid("--store finds peers by name: run --mode target and --mode initiator"));
        }
        connect_store(args)?
    } else {
        connect(args, buf_len)?
    };
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
    if let Some(k) = &s.done_key {
        s.agent.store()?.put(k, b"")?;
    }
    Ok(out)
}

/// A bar over `n` points on stderr; hidden with `--json` or when stderr is not a terminal.
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

/// A spinner naming the step running (the summary run); hidden like [`progress`].
pub(crate) fn spinner(json: bool) -> indicatif::ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}
