//! The storage sample (seed 000), client and server, on kvferry's own API.
//!
//! The client runs a local DRAM → FILE WRITE and FILE → DRAM READ loop, then,
//! for each server of `--agents_file` (lines `<agent name> <ip> <port>`),
//! fetches the server's metadata from its listener, pushes its own, and
//! sends its memory descriptors in a notification (`WRITE:` or `READ:` and
//! the serialized list). The server moves client memory → its DRAM → its
//! files (WRITE) or files → DRAM → client memory (READ), pipelined: the
//! storage I/O of a descriptor starts as soon as its network transfer
//! landed, while the others are still in flight; then it notifies
//! `DONE_<op>`. The client checks every byte it gets back, the server every
//! byte its files hold. Storage backend: GDS where present, else POSIX; a
//! clear error without either.
//!
//! ```text
//! cargo run --release -p kvferry --example storage -- --role server --fileprefix /data/kv --name srv0 --port 5555
//! cargo run --release -p kvferry --example storage -- --role client --agents_file agents.txt --fileprefix /tmp/kv --name cli
//! ```
//!
//! Flags: `--buf_size` (bytes per descriptor, default 1 MiB), `--batch_size`
//! (descriptors, 64), `--iterations` (1), `--direct` (O_DIRECT files),
//! `--timeout` (seconds, 120). The Python version, with two hosts:
//! `examples/python/storage/`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kvferry::{
    Agent, AgentConfig, AlignedBuf, Error, MemType, MetaPeer, Params, RegDesc, RegDescList, Registration, Request,
    Result, XferDesc, XferDescList, XferOp,
};

/// One run's flags.
#[derive(Clone, Debug)]
struct Config {
    role: String,
    agents_file: Option<String>,
    fileprefix: String,
    name: String,
    port: u16,
    buf_size: usize,
    batch_size: usize,
    iterations: usize,
    direct: bool,
    timeout: Duration,
}

impl Config {
    fn parse(args: &[String]) -> Result<Config> {
        let mut m: HashMap<&str, &str> = HashMap::new();
        let mut direct = false;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let key = a.strip_prefix("--").ok_or_else(|| Error::invalid(format!("'{a}' is not a --flag")))?;
            if key == "direct" {
                direct = true;
                continue;
            }
            let v = it.next().ok_or_else(|| Error::invalid(format!("--{key} needs a value")))?;
            m.insert(key, v);
        }
        let num = |k: &str, d: usize| -> Result<usize> {
            m.get(k).map_or(Ok(d), |v| v.parse().map_err(|_| Error::invalid(format!("--{k} '{v}' is not a number"))))
        };
        let req = |k: &str| m.get(k).map(|v| v.to_string()).ok_or_else(|| Error::invalid(format!("--{k} is required")));
        let cfg = Config {
            role: req("role")?,
            agents_file: m.get("agents_file").map(|v| v.to_string()),
            fileprefix: req("fileprefix")?,
            name: req("name")?,
            port: num("port", 5555)? as u16,
            buf_size: num("buf_size", 1 << 20)?,
            batch_size: num("batch_size", 64)?,
            iterations: num("iterations", 1)?,
            direct,
            timeout: Duration::from_secs(num("timeout", 120)? as u64),
        };
        if cfg.buf_size == 0 || cfg.batch_size == 0 || cfg.iterations == 0 {
            return Err(Error::invalid("--buf_size, --batch_size and --iterations must be positive"));
        }
        if cfg.direct && cfg.buf_size % 4096 != 0 {
            return Err(Error::invalid("--direct needs --buf_size a multiple of 4096"));
        }
        match (cfg.role.as_str(), &cfg.agents_file) {
            ("client", None) => Err(Error::invalid("--role client needs --agents_file")),
            ("client", Some(_)) | ("server", _) => Ok(cfg),
            (r, _) => Err(Error::invalid(format!("--role '{r}' is not client or server"))),
        }
    }
}

/// The storage backend, as the seed picks it: GDS where present, else POSIX.
fn storage_backend() -> Result<&'static str> {
    let plugins = Agent::available_plugins();
    ["GDS", "POSIX"].into_iter().find(|b| plugins.iter().any(|p| p == b)).ok_or_else(|| {
        Error::not_supported(format!(
            "no storage backend (GDS or POSIX) in this build (plugins: {plugins:?}); one is required"
        ))
    })
}

/// Descriptor `i`'s bytes: a pattern that differs per descriptor and size.
fn pattern(i: usize, n: usize) -> Vec<u8> {
    (0..n).map(|k| (k as u8).wrapping_mul(31) ^ (i as u8).wrapping_mul(97) ^ (k >> 12) as u8).collect()
}

/// An agent's buffer, its files, and their descriptors.
struct Side {
    agent: Agent,
    buf: AlignedBuf,
    dram: Vec<XferDescList>,
    files: Vec<XferDescList>,
    paths: Vec<String>,
    _regs: (Registration, Registration),
}

fn side(cfg: &Config, listener: bool) -> Result<Side> {
    let storage = storage_backend()?;
    let mut ac = AgentConfig::default().with_backend("TCP", Params::new()).with_backend(storage, Params::new());
    if listener {
        ac = ac.with_listener(cfg.port);
    }
    let agent = Agent::new(&cfg.name, ac)?;
    let (n, k) = (cfg.buf_size, cfg.batch_size);
    // Private huge pages: O_DIRECT pins the pages of every I/O, and 2 MiB
    // pages make that 512 times fewer pins than memfd's 4 KiB ones.
    let mut buf = AlignedBuf::huge(n * k)?;
    // Touched now, as an application's buffers are: the first network
    // transfer into fresh memory otherwise pays its page faults (and any
    // huge-page compaction) inside the timed phase.
    buf.as_mut_slice().fill(0);
    let mode = if cfg.direct { "rw,direct,create" } else { "rw,create" };
    let paths: Vec<String> = (0..k).map(|i| format!("{}{}_{i}.bin", cfg.fileprefix, cfg.name)).collect();
    let regs = RegDescList::from_descs(
        MemType::File,
        paths.iter().enumerate().map(|(i, p)| RegDesc::with_meta(0, 0, i as u64 + 1, format!("{mode}:{p}"))).collect(),
    );
    let files_reg = agent.register_storage(&regs, &[storage])?;
    let buf_reg = agent.register_buf(&buf)?;
    let dram = (0..k).map(|i| buf.xfer_blocks(i * n, n, 1)).collect::<Result<_>>()?;
    let files = (0..k)
        .map(|i| XferDescList::from_descs(MemType::File, vec![XferDesc::new(0, n as u64, i as u64 + 1)]))
        .collect();
    Ok(Side { agent, buf, dram, files, paths, _regs: (buf_reg, files_reg) })
}

fn report(who: &str, what: &str, t: Duration, bytes: usize) {
    println!("[{who}] {what}: {:.1} ms, {:.3} GB/s", t.as_secs_f64() * 1e3, bytes as f64 / t.as_secs_f64() / 1e9);
}

/// Posts every request and waits for all.
fn run_all(reqs: &[Request], timeout: Duration) -> Result<()> {
    for r in reqs {
        r.post(None)?;
    }
    reqs.iter().try_for_each(|r| r.wait(timeout).map(drop))
}

/// Runs `iterations` rounds of `first[i]` then `second[i]` for every slot
/// `i`, pipelined: `second[i]` is posted as soon as `first[i]` is done, and
/// at most `window` first steps are in flight, the next one posted as each
/// lands (across rounds too, once its slot's `second` of the round before
/// is done). A bounded window matters: 64 storage reads posted at once all
/// finish near the end, so the network would wait for the slowest. Requests
/// finish about in the order posted, so each is waited for in turn (asleep,
/// not polling: on a small machine the transport's threads need the cores).
fn pipelined(first: &[Request], second: &[Request], iterations: usize, window: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let (k, total) = (first.len(), first.len() * iterations);
    let window = window.clamp(1, k.max(1));
    let mut posted = 0;
    for step in 0..total {
        while posted < total && posted < step + window {
            let slot = posted % k;
            if posted >= k {
                // The slot's memory is reused: its last round must be done.
                second[slot].wait(left())?;
            }
            first[slot].post(None)?;
            posted += 1;
        }
        first[step % k].wait(left())?;
        second[step % k].post(None)?;
    }
    second.iter().try_for_each(|r| r.wait(left()).map(drop))
}

fn verify(s: &Side, cfg: &Config, who: &str) -> bool {
    let n = cfg.buf_size;
    let bad: Vec<usize> =
        (0..cfg.batch_size).filter(|&i| s.buf.as_slice()[i * n..(i + 1) * n] != pattern(i, n)).collect();
    println!(
        "[{}] {who}: {}",
        cfg.name,
        if bad.is_empty() { "verified OK".into() } else { format!("MISMATCH in {bad:?}") }
    );
    bad.is_empty()
}

/// The local loop: one request moves every descriptor to its file (and one
/// back), `iterations` times after one untimed posting (which creates the
/// files' blocks).
fn local_loop(s: &mut Side, cfg: &Config) -> Result<bool> {
    let total = cfg.buf_size * cfg.batch_size * cfg.iterations;
    for i in 0..cfg.batch_size {
        s.buf.as_mut_slice()[i * cfg.buf_size..(i + 1) * cfg.buf_size].copy_from_slice(&pattern(i, cfg.buf_size));
    }
    let me = s.agent.name().to_string();
    let dram = s.buf.xfer_blocks(0, cfg.buf_size, cfg.batch_size)?;
    let files = XferDescList::from_descs(MemType::File, s.files.iter().flat_map(|f| f.iter().copied()).collect());
    for (op, what) in [(XferOp::Write, "local WRITE (DRAM->FILE)"), (XferOp::Read, "local READ (FILE->DRAM)")] {
        let req = s.agent.create_request(op, &dram, &files, &me, None)?;
        run_all(std::slice::from_ref(&req), cfg.timeout)?;
        if op == XferOp::Read {
            s.buf.as_mut_slice().fill(0);
        }
        let t = Instant::now();
        for _ in 0..cfg.iterations {
            run_all(std::slice::from_ref(&req), cfg.timeout)?;
        }
        report(&cfg.name, what, t.elapsed(), total);
    }
    Ok(verify(s, cfg, "local read-back"))
}

/// Waits for a notification from `peer` that `want` accepts.
fn await_notif(agent: &Agent, peer: &str, timeout: Duration, want: impl Fn(&[u8]) -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if agent.take_notifications().remove(peer).unwrap_or_default().iter().any(|m| want(m)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::timeout(format!("no answer from '{peer}' within --timeout")));
        }
        agent.wait_notifications(Duration::from_millis(50));
    }
}

fn client(cfg: &Config) -> Result<bool> {
    let mut s = side(cfg, false)?;
    let mut ok = local_loop(&mut s, cfg)?;
    let total = cfg.buf_size * cfg.batch_size * cfg.iterations;
    let file = cfg.agents_file.as_deref().unwrap_or_default();
    let list = std::fs::read_to_string(file).map_err(|e| Error::io(format!("reading --agents_file {file}"), e))?;
    let mine = XferDescList::from_descs(MemType::Dram, s.dram.iter().flat_map(|d| d.iter().copied()).collect());
    for line in list.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [name, ip, port] = f[..] else {
            return Err(Error::invalid(format!("agents file line '{line}': want '<agent name> <ip> <port>'")));
        };
        let to = MetaPeer::addr(ip, port.parse().map_err(|_| Error::invalid(format!("bad port in '{line}'")))?)?;
        let deadline = Instant::now() + cfg.timeout;
        while !s.agent.check_remote(name, None) {
            if Instant::now() > deadline {
                return Err(Error::timeout(format!(
                    "no answer from {name} at {ip}:{port} (connection refused or timed out)"
                )));
            }
            s.agent.fetch_remote_metadata(name, None, to)?;
            s.agent.send_local_metadata(to)?;
            std::thread::sleep(Duration::from_millis(100));
        }
        for op in ["WRITE", "READ"] {
            if op == "READ" {
                s.buf.as_mut_slice().fill(0);
            }
            let t = Instant::now();
            let mut msg = format!("{op}:").into_bytes();
            msg.extend(mine.to_bytes());
            s.agent.send_notification(name, &msg, &[])?;
            let done = format!("DONE_{op}");
            await_notif(&s.agent, name, cfg.timeout, |m| m == done.as_bytes())?;
            report(&cfg.name, &format!("remote {op} via {name}"), t.elapsed(), total);
        }
        ok &= verify(&s, cfg, &format!("remote read-back from {name}"));
        s.agent.send_notification(name, b"BYE", &[])?;
    }
    Ok(ok)
}

/// Serves one client request: `op` between the client's `remote` memory, this
/// agent's DRAM and its files, pipelined.
fn serve(s: &Side, cfg: &Config, peer: &str, op: &str, remote: &XferDescList) -> Result<()> {
    if remote.len() != cfg.batch_size || remote.iter().any(|d| d.len != cfg.buf_size as u64) {
        return Err(Error::invalid(format!(
            "'{peer}' sent {} descriptors; this server moves {} of {} bytes",
            remote.len(),
            cfg.batch_size,
            cfg.buf_size
        )));
    }
    // The client pushed its metadata before it sent this: wait for it to load.
    let deadline = Instant::now() + cfg.timeout;
    while !s.agent.check_remote(peer, Some(remote)) {
        if Instant::now() > deadline {
            return Err(Error::timeout(format!("'{peer}' asked for a {op}, but its metadata never arrived")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let me = s.agent.name().to_string();
    let write = op == "WRITE";
    let (net_op, sto_op) = if write { (XferOp::Read, XferOp::Write) } else { (XferOp::Write, XferOp::Read) };
    let mut net = Vec::new();
    let mut sto = Vec::new();
    for (i, d) in remote.iter().enumerate() {
        let r = XferDescList::from_descs(MemType::Dram, vec![*d]);
        net.push(s.agent.create_request(net_op, &s.dram[i], &r, peer, None)?);
        sto.push(s.agent.create_request(sto_op, &s.dram[i], &s.files[i], &me, None)?);
    }
    // First steps in flight at once: half the slots, so that the other half
    // is in its second step or waiting for reuse. For 64 of 1 MiB here, 32
    // beat 8, 16, 24 and 64 in both directions.
    let window = (cfg.batch_size / 2).max(1);
    let t = Instant::now();
    if write {
        pipelined(&net, &sto, cfg.iterations, window, cfg.timeout)?;
    } else {
        pipelined(&sto, &net, cfg.iterations, window, cfg.timeout)?;
    }
    report(&cfg.name, &format!("{op} for {peer}"), t.elapsed(), cfg.buf_size * cfg.batch_size * cfg.iterations);
    Ok(())
}

fn server(cfg: &Config, ready: Option<std::sync::mpsc::Sender<u16>>) -> Result<bool> {
    let s = side(cfg, true)?;
    let port = s.agent.listen_port().unwrap_or(cfg.port);
    println!("[{}] serving on port {port}", cfg.name);
    if let Some(tx) = ready {
        let _ = tx.send(port);
    }
    let mut quiet_until = Instant::now() + cfg.timeout;
    loop {
        if Instant::now() > quiet_until {
            return Err(Error::timeout("no request from any client within --timeout"));
        }
        s.agent.wait_notifications(Duration::from_millis(50));
        for (peer, msgs) in s.agent.take_notifications() {
            for m in msgs {
                if m == b"BYE" {
                    let ok = s
                        .paths
                        .iter()
                        .enumerate()
                        .all(|(i, p)| std::fs::read(p).map(|b| b == pattern(i, cfg.buf_size)).unwrap_or(false));
                    println!("[{}] {peer} done; files {}", cfg.name, if ok { "verified OK" } else { "MISMATCH" });
                    return Ok(ok);
                }
                let (op, blob) = match m.iter().position(|&b| b == b':') {
                    Some(i) => (std::str::from_utf8(&m[..i]).unwrap_or(""), &m[i + 1..]),
                    None => ("", &m[..]),
                };
                if op != "WRITE" && op != "READ" {
                    eprintln!("[{}] ignoring a message from {peer} that is not WRITE:, READ: or BYE", cfg.name);
                    continue;
                }
                serve(&s, cfg, &peer, op, &XferDescList::from_bytes(blob)?)?;
                s.agent.send_notification(&peer, format!("DONE_{op}").as_bytes(), &[])?;
                quiet_until = Instant::now() + cfg.timeout;
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome =
        Config::parse(&args).and_then(|cfg| if cfg.role == "client" { client(&cfg) } else { server(&cfg, None) });
    match outcome {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("storage: {e}");
            std::process::exit(if e.kind() == kvferry::ErrorKind::NotSupported { 2 } else { 3 });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    /// A server and a client in one process over TCP on loopback: every
    /// byte written to the server's files and read back verified.
    #[test]
    fn client_and_server_verify_every_byte() {
        let dir = std::env::temp_dir().join(format!("kvferry-storage-example-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // 12 descriptors against a window of 6, over 3 rounds: the pipeline wraps.
        let small = "--buf_size 65536 --batch_size 12 --iterations 3 --timeout 30";
        let srv = Config::parse(&flags(&format!(
            "--role server --fileprefix {}/s --name ex-srv-{} --port 0 {small}",
            dir.display(),
            std::process::id()
        )))
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let srv_name = srv.name.clone();
        let server = std::thread::spawn(move || server(&srv, Some(tx)));
        let port = rx.recv_timeout(Duration::from_secs(30)).expect("the server started");
        let agents = dir.join("agents.txt");
        std::fs::write(&agents, format!("{srv_name} 127.0.0.1 {port}\n")).unwrap();
        let cli = Config::parse(&flags(&format!(
            "--role client --agents_file {} --fileprefix {}/c --name ex-cli-{} {small}",
            agents.display(),
            dir.display(),
            std::process::id()
        )))
        .unwrap();
        assert!(client(&cli).unwrap(), "the client read back every byte");
        assert!(server.join().unwrap().unwrap(), "the server's files hold every byte");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_flags_are_clear_errors() {
        for (args, want) in [
            ("--role client --fileprefix x --name a", "--agents_file"),
            ("--role peer --fileprefix x --name a", "not client or server"),
            ("--role server --name a", "--fileprefix is required"),
            ("--role server --fileprefix x --name a --buf_size 0", "must be positive"),
            ("--role server --fileprefix x --name a --direct --buf_size 100", "multiple of 4096"),
            ("--role server --fileprefix x --name a --batch_size many", "not a number"),
            ("role server", "not a --flag"),
        ] {
            let e = Config::parse(&flags(args)).unwrap_err();
            assert!(e.message().contains(want), "{args}: {e}");
        }
    }
}
