//! `kvferry bench storage --backend obj`: DRAM ↔ objects of an S3-compatible
//! store through the OBJ backend. A descriptor is one object of the block
//! size (objects are written whole); a batch is that many objects in one
//! request. Each thread owns its objects, under a prefix of this run; they
//! are written once before a READ point.

use std::time::{Duration, Instant};

use clap::Args;
use kvferry::{
    Agent, AgentConfig, Error, MemType, Params, RegDesc, RegDescList, Result, XferDesc, XferDescList, XferOp,
};

use super::report::{Point, Timings};
use super::{BufferKind, Common};

/// Where the objects live (nixlbench's `--obj_*` spellings accepted).
#[derive(Args, Debug, Clone, Default)]
pub struct ObjFlags {
    /// Bucket of the OBJ backend (else AWS_DEFAULT_BUCKET).
    #[arg(long, alias = "obj_bucket_name")]
    pub bucket: Option<String>,
    /// S3 endpoint, e.g. http://127.0.0.1:9000 (else AWS_ENDPOINT_URL, else AWS).
    #[arg(long, alias = "obj_endpoint_override")]
    pub endpoint: Option<String>,
    /// Access key id (else AWS_ACCESS_KEY_ID).
    #[arg(long, alias = "obj_access_key")]
    pub access_key: Option<String>,
    /// Secret access key (else AWS_SECRET_ACCESS_KEY).
    #[arg(long, alias = "obj_secret_key")]
    pub secret_key: Option<String>,
    /// Region (else AWS_REGION, else us-east-1).
    #[arg(long, alias = "obj_region")]
    pub region: Option<String>,
    /// http or https for an endpoint given without a scheme.
    #[arg(long, alias = "obj_scheme")]
    pub scheme: Option<String>,
    /// Key prefix of the bench's objects (default: `kvferry-bench/<pid>`).
    #[arg(long)]
    pub obj_prefix: Option<String>,
}

impl ObjFlags {
    /// The OBJ backend's parameters: these flags, then `--param` over them.
    fn params(&self, c: &Common) -> Result<Params> {
        let mut p = Params::new();
        for (k, v) in [
            ("bucket", &self.bucket),
            ("endpoint_override", &self.endpoint),
            ("access_key", &self.access_key),
            ("secret_key", &self.secret_key),
            ("region", &self.region),
            ("scheme", &self.scheme),
        ] {
            if let Some(v) = v {
                p.set(k, v);
            }
        }
        for (k, v) in c.backend_params()?.iter() {
            p.set(k, v);
        }
        Ok(p)
    }
}

/// Runs the sweep of `points` over OBJ; prints each point when `print`.
pub fn run(f: &ObjFlags, c: &Common, op: XferOp, points: &[(usize, usize)], print: bool) -> Result<Vec<Point>> {
    let agent = Agent::new(
        &format!("bench-obj-{}", std::process::id()),
        AgentConfig::env_defaults().with_backend("obj", f.params(c)?),
    )?;
    let prefix = f.obj_prefix.clone().unwrap_or_else(|| format!("kvferry-bench/{}", std::process::id()));
    let bar = super::p2p::progress(points.len(), c.json);
    let mut out = Vec::new();
    for &(block, batch) in points {
        let t = point(&agent, c, &prefix, op, block, batch)?;
        let mut p = t.point("storage", "OBJ", &op.to_string(), None, block as u64, batch, c.threads.max(1), true);
        p.verified = c.check_consistency.then_some(true);
        if print {
            bar.suspend(|| c.emit(&p));
        }
        bar.inc(1);
        out.push(p);
    }
    bar.finish_and_clear();
    Ok(out)
}

fn point(agent: &Agent, c: &Common, prefix: &str, op: XferOp, block: usize, batch: usize) -> Result<Timings> {
    let iters = c.iters_for(block * batch);
    super::run_threads(c.threads.max(1), |t, barrier| {
        let span = block * batch;
        // The second half receives the read-back of --check-consistency.
        let mut buf = c.buffer_or(BufferKind::Huge).alloc(span * 2)?;
        super::pattern::fill(&mut buf.as_mut_slice()[..span], t as u64, 0x0B);
        let _mem = agent.register_buf(&buf)?;
        let dev0 = (t as u64) << 32;
        let mut regs = RegDescList::new(MemType::Obj);
        for i in 0..batch as u64 {
            regs.push(RegDesc::with_meta(0, block as u64, dev0 + i, format!("{prefix}/{block}x{batch}/t{t}/{i}")));
        }
        let _objs = agent.register_storage(&regs, &["obj"])?;
        let objs = XferDescList::from_descs(
            MemType::Obj,
            (0..batch as u64).map(|i| XferDesc::new(0, block as u64, dev0 + i)).collect(),
        );
        let local = buf.xfer_blocks(0, block, batch)?;
        let wait = |r: &kvferry::Request| r.wait(Duration::from_secs(300)).map(drop);
        let mut tm = Timings::default();
        if op == XferOp::Read {
            let w = agent.create_request(XferOp::Write, &local, &objs, agent.name(), None)?;
            w.post(None)?;
            wait(&w)?;
        }
        let t0 = Instant::now();
        let req = agent.create_request(op, &local, &objs, agent.name(), None)?;
        tm.prep.record(t0.elapsed());
        for _ in 0..c.warmup {
            req.post(None)?;
            wait(&req)?;
        }
        barrier.wait();
        super::timed_loop(c, iters, span as u64, &mut tm, |_| &req, wait)?;
        if c.check_consistency {
            let back = buf.xfer_blocks(span, block, batch)?;
            let r = agent.create_request(XferOp::Read, &back, &objs, agent.name(), None)?;
            r.post(None)?;
            wait(&r)?;
            if buf.as_slice()[..span] != buf.as_slice()[span..] {
                return Err(Error::new(
                    kvferry::ErrorKind::Backend,
                    "OBJ verification failed: objects hold other bytes",
                ));
            }
        }
        Ok(tm)
    })
}
