//! The OBJ backend's S3 operations, async, on the backend's own runtime.
//!
//! Every S3 request holds one of the backend's `max_in_flight` permits
//! while it runs, so all requests together never have more in flight.
//! Bytes leave registered memory when their request is about to be sent
//! (a PUT or part copies its spans into the body) and land in it as the
//! response arrives (a ranged GET copies each chunk to its place, never
//! past the range asked for).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::StreamExt;
use object_store::aws::AmazonS3;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::plan::{Op, Span};
use crate::error::{Error, ErrorKind, Result};

/// The largest object a read-modify-write reads into memory: S3's largest
/// single PUT.
const MAX_RMW: u64 = 5 << 30;

/// What the operations of every request share.
#[derive(Debug)]
pub(super) struct Io {
    pub store: Arc<AmazonS3>,
    pub bucket: String,
    pub permits: Arc<Semaphore>,
    pub max_in_flight: usize,
    pub part_size: u64,
    pub multipart_threshold: u64,
}

impl Io {
    async fn permit(&self) -> Result<OwnedSemaphorePermit> {
        self.permits.clone().acquire_owned().await.map_err(|_| Error::new(ErrorKind::Canceled, "OBJ: shutting down"))
    }

    /// Runs every operation of one posting, `max_in_flight` at a time; all
    /// run to their end (a multipart upload that fails aborts itself), and
    /// the first error is the posting's.
    pub(super) async fn run(self: Arc<Self>, ops: Arc<[Op]>, objects: Arc<[Path]>) -> Result<()> {
        let n = self.max_in_flight;
        let each = (0..ops.len()).map(|i| {
            let (io, ops, objects) = (self.clone(), ops.clone(), objects.clone());
            async move { io.run_op(&ops[i], &objects).await }
        });
        let mut results = futures_util::stream::iter(each).buffer_unordered(n);
        let mut first = None;
        while let Some(r) = results.next().await {
            if let (Err(e), None) = (r, &first) {
                first = Some(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    async fn run_op(&self, op: &Op, objects: &[Path]) -> Result<()> {
        match op {
            Op::Get { obj, offset, len, mem } => self.get(&objects[*obj as usize], *offset, *len, *mem).await,
            Op::Put { obj, data } => self.put(&objects[*obj as usize], data).await,
            Op::Multipart { obj, parts } => self.multipart(&objects[*obj as usize], parts).await,
            Op::Rmw { obj, patches } => self.rmw(&objects[*obj as usize], patches).await,
        }
    }

    /// A ranged GET of `[offset, offset + len)` into memory at `mem`.
    async fn get(&self, path: &Path, offset: u64, len: u64, mem: u64) -> Result<()> {
        let _permit = self.permit().await?;
        let range = offset..offset + len;
        let what = || format!("READ of bytes {}..{} of object '{path}'", range.start, range.end);
        let opts = GetOptions { range: Some(GetRange::Bounded(range.clone())), ..GetOptions::default() };
        let got = self.store.get_opts(path, opts).await.map_err(|e| {
            if range_not_satisfiable(&e) {
                Error::new(
                    ErrorKind::Backend,
                    format!("OBJ: {}: it starts at or past the object's end; read within its size", what()),
                )
            } else {
                self.error(e, &what())
            }
        })?;
        let mut stream = got.into_stream();
        let mut done = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.error(e, &what()))?;
            if chunk.len() as u64 > len - done {
                // The store chooses what it sends: never past the range.
                return Err(Error::new(
                    ErrorKind::Backend,
                    format!("OBJ: {}: the store sent more bytes than the range holds", what()),
                ));
            }
            copy_in(mem + done, &chunk);
            done += chunk.len() as u64;
        }
        if done != len {
            return Err(Error::new(
                ErrorKind::Backend,
                format!("OBJ: {}: the object ends at byte {}; read within its size", what(), offset + done),
            ));
        }
        Ok(())
    }

    /// One PUT: the object becomes `data`.
    async fn put(&self, path: &Path, data: &[Span]) -> Result<()> {
        let _permit = self.permit().await?;
        let body: PutPayload = data.iter().map(copy_out).collect();
        self.store.put(path, body).await.map_err(|e| self.error(e, &format!("WRITE (PUT) of object '{path}'")))?;
        Ok(())
    }

    /// A multipart upload of `parts`, in parallel; aborted when a part or
    /// the completion fails, so that nothing half-written becomes visible.
    /// Each part runs as its own task holding its permit (its body is a
    /// copy: it touches no registered memory), so parts progress while this
    /// one waits for the next permit.
    async fn multipart(&self, path: &Path, parts: &[Vec<Span>]) -> Result<()> {
        let what = format!("WRITE (multipart upload) of object '{path}'");
        let mut upload = Upload(Some({
            let _permit = self.permit().await?;
            self.store.put_multipart(path).await.map_err(|e| self.error(e, &what))?
        }));
        let mut tasks = Parts(Vec::with_capacity(parts.len()));
        let mut failed = None;
        for part in parts {
            if tasks.0.iter().any(|t| t.is_finished()) {
                failed = tasks.first_error().await;
                if failed.is_some() {
                    break;
                }
            }
            let permit = self.permit().await?;
            let body: PutPayload = part.iter().map(copy_out).collect();
            let fut = upload.get().put_part(body);
            tasks.0.push(tokio::spawn(async move {
                let r = fut.await;
                drop(permit);
                r
            }));
        }
        // Every part ends (or is stopped) before the upload completes or is
        // aborted: a part stored after the abort would linger.
        if failed.is_some() {
            tasks.stop().await;
        } else {
            failed = tasks.wait_all().await;
        }
        let outcome = match failed {
            Some(e) => Err(e),
            None => {
                let _permit = self.permit().await?;
                upload.get().complete().await.map(drop)
            }
        };
        let mut done = upload.0.take().expect("the upload is held until here");
        if let Err(e) = outcome {
            if let Err(a) = done.abort().await {
                tracing::warn!(object = %path, error = %a, "OBJ: aborting a failed multipart upload failed too; the store drops it by its lifecycle rules");
            }
            return Err(self.error(e, &what));
        }
        Ok(())
    }

    /// Read, patch, put back.
    async fn rmw(&self, path: &Path, patches: &[(u64, Span)]) -> Result<()> {
        let what = format!("WRITE into object '{path}' (read-modify-write)");
        let mut body = {
            let _permit = self.permit().await?;
            let got = self.store.get(path).await.map_err(|e| self.error(e, &what))?;
            if got.meta.size > MAX_RMW {
                return Err(Error::invalid(format!(
                    "{what}: the object holds {} bytes, over the {MAX_RMW} a read-modify-write holds in memory; write it whole",
                    got.meta.size
                )));
            }
            got.bytes().await.map_err(|e| self.error(e, &what))?.to_vec()
        };
        for (offset, span) in patches {
            let at = *offset as usize;
            if at > body.len() {
                return Err(Error::invalid(format!(
                    "{what}: offset {offset} is past the object's end ({} bytes); an object grows only from its end",
                    body.len()
                )));
            }
            let end = at + span.len as usize;
            if end > body.len() {
                body.resize(end, 0);
            }
            body[at..end].copy_from_slice(&copy_out(span));
        }
        let body = Bytes::from(body);
        if body.len() as u64 > self.multipart_threshold {
            let part = self.part_size as usize;
            let _permit = self.permit().await?;
            let mut upload = self.store.put_multipart(path).await.map_err(|e| self.error(e, &what))?;
            let mut r = Ok(());
            for chunk in (0..body.len()).step_by(part) {
                r = upload.put_part(body.slice(chunk..(chunk + part).min(body.len())).into()).await;
                if r.is_err() {
                    break;
                }
            }
            if r.is_ok() {
                r = upload.complete().await.map(drop);
            }
            if let Err(e) = r {
                let _ = upload.abort().await;
                return Err(self.error(e, &what));
            }
            return Ok(());
        }
        let _permit = self.permit().await?;
        self.store.put(path, body.into()).await.map_err(|e| self.error(e, &what))?;
        Ok(())
    }

    /// The size and modification time of `path`; `None` when it does not exist.
    pub(super) async fn head(&self, path: &Path) -> Result<Option<object_store::ObjectMeta>> {
        let _permit = self.permit().await?;
        match self.store.head(path).await {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(e, &format!("HEAD of object '{path}'"))),
        }
    }

    /// An S3 failure as a kvferry error: what failed, in which bucket, why.
    pub(super) fn error(&self, e: object_store::Error, what: &str) -> Error {
        let (kind, hint) = match &e {
            object_store::Error::NotFound { .. } => (ErrorKind::NotFound, "the object (or the bucket) does not exist"),
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => (
                ErrorKind::NotAllowed,
                "check access_key/secret_key (or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and the bucket's policy",
            ),
            _ => (ErrorKind::Backend, "check that the endpoint answers and the bucket exists"),
        };
        // The causes too: the client's own message often stops at "HTTP error".
        let mut why = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            let s_text = s.to_string();
            if !why.contains(&s_text) {
                why = format!("{why}: {s_text}");
            }
            src = s.source();
        }
        Error::new(kind, format!("OBJ: {what} in bucket '{}' failed: {why} ({hint})", self.bucket))
    }
}

/// The part tasks of one multipart upload; those still running when it is
/// dropped (the posting was canceled) are aborted.
struct Parts(Vec<tokio::task::JoinHandle<object_store::Result<()>>>);

impl Parts {
    /// The first error among the finished parts (which are removed).
    async fn first_error(&mut self) -> Option<object_store::Error> {
        let mut first = None;
        let mut i = 0;
        while i < self.0.len() {
            if self.0[i].is_finished() {
                let r = (&mut self.0[i]).await;
                self.0.swap_remove(i);
                if let Some(e) = part_error(r) {
                    first.get_or_insert(e);
                }
            } else {
                i += 1;
            }
        }
        first
    }

    /// Stops the parts still running and waits until they are gone.
    async fn stop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
        for t in self.0.drain(..) {
            let _ = t.await;
        }
    }

    /// Waits for every part; the first error, if any.
    async fn wait_all(&mut self) -> Option<object_store::Error> {
        let mut first = None;
        for t in self.0.drain(..) {
            if let Some(e) = part_error(t.await) {
                first.get_or_insert(e);
            }
        }
        first
    }
}

fn part_error(r: std::result::Result<object_store::Result<()>, tokio::task::JoinError>) -> Option<object_store::Error> {
    match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(e) => Some(object_store::Error::JoinError { source: e }),
    }
}

impl Drop for Parts {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// A multipart upload in progress: dropped before it completed or was
/// aborted (its posting was canceled), it is aborted in the background, so
/// that the store does not keep its parts.
struct Upload(Option<Box<dyn object_store::MultipartUpload>>);

impl Upload {
    fn get(&mut self) -> &mut Box<dyn object_store::MultipartUpload> {
        self.0.as_mut().expect("the upload is held until it completes or aborts")
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let (Some(mut u), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = u.abort().await;
            });
        }
    }
}

/// The bytes of a local span, copied into a request body.
fn copy_out(s: &Span) -> Bytes {
    // SAFETY: the agent checked that `s` lies in DRAM registered with this
    // agent, and the request's owner keeps its local memory alive while the
    // request is in flight (the contract of every asynchronous backend:
    // POSIX's io_uring and TCP read it the same way); cancel and drop
    // return only once this task no longer runs.
    Bytes::copy_from_slice(unsafe { std::slice::from_raw_parts(s.addr as *const u8, s.len as usize) })
}

/// Copies `data` to local memory at `addr`.
fn copy_in(addr: u64, data: &[u8]) {
    // SAFETY: `addr..addr + data.len()` lies within a segment the agent
    // checked against this agent's registered DRAM (the caller never copies
    // past its range), alive while the request is in flight (as in copy_out).
    unsafe { crate::sys::copy_once(addr as *mut u8, data.as_ptr(), data.len()) };
}

/// Whether the store answered a GET with 416 (the range starts at or past
/// the object's end). object_store has no variant for it, so this reads
/// the status from its message, exactly: a bare "416" also matches a port,
/// a request id or a duration in the text of any other error (a test's 404
/// was once reported as a read past the end that way).
fn range_not_satisfiable(e: &object_store::Error) -> bool {
    if matches!(e, object_store::Error::NotFound { .. }) {
        return false;
    }
    let text = e.to_string();
    text.contains("status code: 416") || text.contains("Range Not Satisfiable") || text.contains("InvalidRange")
}

#[cfg(test)]
mod tests {
    use super::range_not_satisfiable;

    fn generic(msg: &str) -> object_store::Error {
        object_store::Error::Generic { store: "S3", source: msg.to_string().into() }
    }

    #[test]
    fn only_a_416_answer_is_a_range_past_the_end() {
        assert!(range_not_satisfiable(&generic(
            "Error performing GET http://127.0.0.1:9000/b/k in 2ms - Server returned non-2xx status code: 416 \
             Range Not Satisfiable: <Error><Code>InvalidRange</Code></Error>"
        )));
        // A 404 whose text holds "416" (the server's port) is not one.
        let missing = object_store::Error::NotFound {
            path: "never/written".into(),
            source: "Error performing GET http://127.0.0.1:34160/b/never/written - 404 Not Found".into(),
        };
        assert!(!range_not_satisfiable(&missing));
        assert!(!range_not_satisfiable(&generic("Error performing GET http://127.0.0.1:41600/b/k: 500 Internal")));
    }
}
