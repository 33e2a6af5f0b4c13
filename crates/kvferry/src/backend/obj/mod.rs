//! `OBJ`: transfers between an agent's DRAM and objects in an S3-compatible
//! store (NIXL's OBJ plugin), DRAM ↔ OBJ.
//!
//! As with POSIX, the agent is its own "remote": register DRAM and OBJ
//! regions on one agent and create a request with its own name. A WRITE
//! moves DRAM → object (PUT, or a multipart upload in parallel parts above
//! `multipart_threshold`), a READ object → DRAM (ranged GETs of at most
//! `part_size`, several in flight).
//!
//! An OBJ registration descriptor names one object: `meta_info` is its key
//! in the bucket, `dev_id` the number the caller's transfer descriptors use
//! for it, `len` its size (0: whatever the object holds, found with a HEAD
//! at registration, which fails if the object does not exist). Transfer
//! descriptors address bytes of an object by offset (`addr`) and `dev_id`.
//!
//! ```no_run
//! use kvferry::{Agent, AgentConfig, AlignedBuf, MemType, Params, RegDesc, RegDescList, XferDesc, XferDescList, XferOp};
//! let params = Params::new().with("bucket", "kv-tier").with("endpoint_override", "http://127.0.0.1:9000");
//! let agent = Agent::new("obj-tier", AgentConfig::default().with_backend("OBJ", params))?;
//! let buf = AlignedBuf::new(4 << 20)?;
//! let _mem = agent.register_buf(&buf)?;
//! let mut objs = RegDescList::new(MemType::Obj);
//! objs.push(RegDesc::with_meta(0, 4 << 20, 7, "layer0/block42"));
//! let _obj = agent.register_storage(&objs, &[])?;
//! let dram = buf.xfer_blocks(0, 4 << 20, 1)?;
//! let obj = XferDescList::from_descs(MemType::Obj, vec![XferDesc::new(0, 4 << 20, 7)]);
//! let req = agent.create_request(XferOp::Write, &dram, &obj, "obj-tier", None)?;
//! req.post(None)?;
//! req.wait(std::time::Duration::from_secs(30))?;
//! # Ok::<(), kvferry::Error>(())
//! ```
//!
//! Guarantees: a request is done only when the store acknowledged every
//! byte (a PUT or the completion of a multipart upload answered 200; every
//! GET range arrived whole). A failed part aborts its upload, so a failed
//! WRITE leaves the object as it was. Retries are the S3 client's, bounded
//! by `retries` and `timeout`; past them the request fails. A WRITE is
//! whole objects from offset 0 unless `allow_rmw` is set.
//!
//! Layout: `config` (parameters, the S3 client), `plan` (segments → S3
//! operations, no I/O), `io` (the operations, async), `xfer` (a posting as
//! a task on the backend's runtime); this file is the backend itself.

mod config;
mod io;
mod plan;
mod xfer;

use std::collections::HashMap;
use std::sync::Arc;

use object_store::path::Path;
use parking_lot::RwLock;

use super::{Backend, BackendContext, BackendPlugin, BackendXfer, Capabilities, FileInfo, PeerInfo, Region, XferPlan};
use crate::desc::RegDesc;
use crate::error::{Error, Result};
use crate::notif::NotifSink;
use crate::params::{ParamSpec, Params};
use crate::types::{AccessKey, MemType};
use config::{Config, MAX_PARTS, NAME, PARAMS};

/// An object's index in one request's object list.
pub(crate) type ObjectId = u32;

/// The `OBJ` plugin.
#[derive(Debug)]
pub struct ObjPlugin;

impl BackendPlugin for ObjPlugin {
    fn name(&self) -> &str {
        NAME
    }

    fn mem_types(&self) -> Vec<MemType> {
        vec![MemType::Dram, MemType::Obj]
    }

    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }

    fn create(&self, ctx: BackendContext, params: &Params) -> Result<Arc<dyn Backend>> {
        let params = params.resolved(PARAMS);
        let (cfg, store) = Config::from_params(&params)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.threads)
            .thread_name("kvf-obj")
            .enable_all()
            .build()
            .map_err(|e| Error::io("backend OBJ: cannot start its I/O runtime", e))?;
        let io = Arc::new(io::Io {
            store,
            bucket: cfg.bucket.clone(),
            permits: Arc::new(tokio::sync::Semaphore::new(cfg.max_in_flight)),
            max_in_flight: cfg.max_in_flight,
            part_size: cfg.shape.part_size,
            multipart_threshold: cfg.shape.multipart_threshold,
        });
        tracing::info!(agent = %ctx.agent_name, bucket = %cfg.bucket, "OBJ backend created");
        Ok(Arc::new(ObjBackend {
            inner: Arc::new(Inner {
                agent: ctx.agent_name,
                notifs: ctx.notifs,
                table: RwLock::new(HashMap::new()),
                io,
                cfg,
                runtime: parking_lot::Mutex::new(Some(runtime)),
            }),
            params,
        }))
    }
}

/// One registered object.
#[derive(Debug)]
struct ObjRegion {
    path: Path,
    /// The registered size; 0: whatever the object holds.
    len: u64,
}

#[derive(Debug)]
struct Inner {
    agent: Arc<str>,
    notifs: NotifSink,
    table: RwLock<HashMap<AccessKey, ObjRegion>>,
    io: Arc<io::Io>,
    cfg: Config,
    /// Taken (and shut down) when the backend goes.
    runtime: parking_lot::Mutex<Option<tokio::runtime::Runtime>>,
}

impl Inner {
    fn runtime(&self) -> Result<tokio::runtime::Handle> {
        self.runtime
            .lock()
            .as_ref()
            .map(|r| r.handle().clone())
            .ok_or_else(|| Error::new(crate::ErrorKind::Canceled, "OBJ: the backend is shutting down"))
    }

    /// Runs `fut` on the runtime and waits for it. Called from the agent's
    /// (the user's) threads, never from the runtime's own: a task spawned
    /// there could wait behind the blocked caller.
    fn block_on<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime()?.spawn(async move {
            let _ = tx.send(fut.await);
        });
        let bound = self.cfg.timeout * 2 + std::time::Duration::from_secs(1);
        rx.recv_timeout(bound).map_err(|_| {
            Error::new(
                crate::ErrorKind::Timeout,
                format!(
                    "OBJ: no answer within {bound:?}: the store is slow or down, or {} requests in flight were ahead of this one (max_in_flight)",
                    self.cfg.max_in_flight
                ),
            )
        })?
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.get_mut().take() {
            rt.shutdown_background();
        }
    }
}

/// The OBJ backend instance of one agent.
#[derive(Debug)]
pub struct ObjBackend {
    inner: Arc<Inner>,
    params: Params,
}

/// The object key a descriptor's `meta_info` names, checked.
fn object_path(meta: &[u8]) -> Result<Path> {
    let key = std::str::from_utf8(meta)
        .map_err(|_| Error::invalid("OBJ: a descriptor's meta_info (the object key) is not UTF-8"))?;
    if key.is_empty() || key.len() > 1024 {
        return Err(Error::invalid(format!(
            "OBJ: object key '{key}' must be 1 to 1024 bytes (put the key in the descriptor's meta_info)"
        )));
    }
    Path::parse(key).map_err(|e| Error::invalid(format!("OBJ: object key '{key}' is not a valid key: {e}")))
}

impl Backend for ObjBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            mem_types: vec![MemType::Dram, MemType::Obj],
            local: true,
            remote: false,
            notifications: false,
            rank: 30,
        }
    }

    fn params(&self) -> Params {
        self.params.clone()
    }

    fn register(&self, region: &Region) -> Result<Vec<u8>> {
        match region.mem_type {
            MemType::Dram => Ok(Vec::new()),
            MemType::Obj => {
                if region.addr != 0 {
                    return Err(Error::invalid(format!(
                        "OBJ: a registration descriptor names a whole object: its addr must be 0, not {:#x} (transfer descriptors give offsets)",
                        region.addr
                    )));
                }
                let path = object_path(&region.meta_info)?;
                if region.len == 0 {
                    let io = self.inner.io.clone();
                    let p = path.clone();
                    if self.inner.block_on(async move { io.head(&p).await })?.is_none() {
                        return Err(Error::not_found(format!(
                            "OBJ: object '{path}' does not exist in bucket '{}': register it with its length (len > 0) to create it with a WRITE",
                            self.inner.cfg.bucket
                        )));
                    }
                }
                self.inner.table.write().insert(region.key, ObjRegion { path, len: region.len });
                Ok(Vec::new())
            }
            other => Err(Error::not_supported(format!("OBJ moves DRAM and OBJ, not {other}"))),
        }
    }

    fn deregister(&self, region: &Region) -> Result<()> {
        if region.mem_type == MemType::Obj {
            self.inner.table.write().remove(&region.key);
        }
        Ok(())
    }

    fn load_remote(&self, _peer: &PeerInfo) -> Result<()> {
        // Nothing to load: OBJ serves this agent's own objects only.
        Ok(())
    }

    fn unload_remote(&self, _peer: &str) {}

    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn BackendXfer>> {
        if !plan.loopback {
            return Err(Error::not_supported(format!(
                "OBJ moves bytes between this agent's DRAM and its own objects; '{}' is another agent (use a network backend)",
                plan.peer
            )));
        }
        if plan.local_mem != MemType::Dram || plan.remote_mem != MemType::Obj {
            return Err(Error::not_supported(format!(
                "OBJ moves DRAM ↔ OBJ, not {} ↔ {}",
                plan.local_mem, plan.remote_mem
            )));
        }
        let (keys, objects, pieces) = self.pieces(&plan)?;
        let ops = plan::plan(plan.op, &pieces, self.inner.cfg.shape, |o| objects[o as usize].to_string())?;
        for op in &ops {
            if let plan::Op::Multipart { obj, parts } = op {
                if parts.len() as u64 > MAX_PARTS {
                    return Err(Error::invalid(format!(
                        "OBJ: object '{}' would take {} parts, over S3's {MAX_PARTS}: raise part_size",
                        objects[*obj as usize],
                        parts.len()
                    )));
                }
            }
        }
        Ok(Box::new(xfer::ObjXfer {
            inner: self.inner.clone(),
            keys,
            objects: objects.into(),
            ops: ops.into(),
            posting: None,
            notif: None,
        }))
    }

    fn send_notification(&self, _peer: &str, _msg: &[u8]) -> Result<()> {
        Err(Error::not_supported("OBJ does not send notifications"))
    }

    fn query_mem(&self, mem_type: MemType, desc: &RegDesc) -> Result<Option<FileInfo>> {
        if mem_type != MemType::Obj {
            return Err(Error::not_supported(format!("OBJ queries OBJ descriptors, not {mem_type}")));
        }
        let path = object_path(&desc.meta_info)?;
        let io = self.inner.io.clone();
        let meta = self.inner.block_on(async move { io.head(&path).await })?;
        Ok(meta.map(|m| FileInfo { size: m.size, mode: 0o100644, mtime: m.last_modified.into() }))
    }
}

/// A request's objects (each once) and its segments as pieces of them.
type Pieces = (Vec<AccessKey>, Vec<Path>, Vec<plan::Piece>);

impl ObjBackend {
    fn pieces(&self, plan: &XferPlan) -> Result<Pieces> {
        let table = self.inner.table.read();
        let (mut keys, mut objects): (Vec<AccessKey>, Vec<Path>) = (Vec::new(), Vec::new());
        // By key (a request names a region by its access key) and by object
        // (two registrations of one object are one object to write).
        let mut by_key: HashMap<AccessKey, (usize, u64)> = HashMap::new();
        let mut by_path: HashMap<Path, usize> = HashMap::new();
        let mut pieces = Vec::with_capacity(plan.segments.len());
        for (i, s) in plan.segments.iter().enumerate() {
            let (obj, obj_len) = match by_key.get(&s.remote_key) {
                Some(o) => *o,
                None => {
                    let r = table.get(&s.remote_key).ok_or_else(|| {
                        Error::not_found(format!(
                            "OBJ: segment {i} names an object region this backend does not hold (dev {}); register the object with OBJ",
                            s.remote_dev
                        ))
                    })?;
                    keys.push(s.remote_key);
                    let next = objects.len();
                    let obj = *by_path.entry(r.path.clone()).or_insert(next);
                    if obj == next {
                        objects.push(r.path.clone());
                    }
                    by_key.insert(s.remote_key, (obj, r.len));
                    (obj, r.len)
                }
            };
            pieces.push(plan::Piece {
                obj: obj as ObjectId,
                offset: s.remote_addr,
                len: s.len,
                mem: s.local_addr,
                obj_len,
            });
        }
        Ok((keys, objects, pieces))
    }
}
