//! Exported files (remote file segments, after Mooncake's NVMe-oF transport):
//! a target exports files by path and gets a file id; initiators on other
//! processes or hosts move bytes between their DRAM and `(file_id, offset,
//! len)` of those files, through a network backend that serves them with the
//! target's storage engine.
//!
//! An exported file is an ordinary FILE registration (`dev_id` = the file id,
//! offset 0, length = the exported size) made with every backend that can
//! serve FILE memory, so the same access rules hold as for memory: only
//! exported files, only inside their size, each access carrying the region's
//! key. The list of exported files (id, path, size, alignment) travels in the
//! agent's metadata as the `files` extension.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Agent;
use crate::desc::{RegDesc, RegDescList};
use crate::error::{Error, Result};
use crate::types::MemType;

/// File ids start here so they never collide with file descriptors used as
/// `dev_id` in fd-mode FILE registrations.
pub const FILE_ID_BASE: u64 = 1 << 40;

/// The metadata extension that lists exported files.
pub(crate) const FILES_EXTENSION: &str = "files";

/// A file an agent exports to remote initiators.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedFile {
    /// The id initiators put in `dev_id` of FILE transfer descriptors.
    pub id: u64,
    /// The path on the target (for humans and tools; initiators use the id).
    pub path: PathBuf,
    /// Bytes that may be read or written: offsets `0..size`.
    pub size: u64,
    /// Alignment required of offsets, lengths and memory (1 unless O_DIRECT).
    pub alignment: u64,
}

/// What the agent keeps per exported file.
#[derive(Debug)]
pub(crate) struct Export {
    pub(crate) file: ExportedFile,
    pub(crate) regs: RegDescList,
}

impl Agent {
    /// Exports the file at `path` (created if missing, grown to `size` if
    /// shorter) to remote initiators and returns its file id. With `direct`
    /// the target opens it with O_DIRECT, and initiators must align offsets,
    /// lengths and their memory to the published alignment.
    ///
    /// Needs a storage backend (POSIX) and a network backend that serves
    /// FILE memory (TCP). Publish the metadata again afterwards so peers see it.
    pub fn register_local_file(&self, path: impl AsRef<Path>, size: u64, direct: bool) -> Result<u64> {
        let path = path.as_ref();
        if size == 0 {
            return Err(Error::invalid(format!(
                "register_local_file({}): size is 0; export at least one byte",
                path.display()
            )));
        }
        let slots = self.slots();
        let serving: Vec<&str> = slots
            .iter()
            .filter(|s| s.caps.mem_types.contains(&MemType::File) && s.caps.remote)
            .map(|s| &*s.name)
            .collect();
        let with: Vec<&str> =
            slots.iter().filter(|s| s.caps.mem_types.contains(&MemType::File)).map(|s| &*s.name).collect();
        if serving.is_empty() {
            return Err(Error::not_supported(format!(
                "register_local_file: no backend of agent '{}' serves FILE memory to remote initiators (backends: {:?}); create TCP and POSIX",
                self.name(),
                self.backends()
            )));
        }
        let abs = std::path::absolute(path).map_err(|e| Error::io(format!("resolving {}", path.display()), e))?;
        let mut exports = self.inner.exports.lock();
        if exports.iter().any(|e| e.file.path == abs) {
            return Err(Error::invalid(format!(
                "{} is already exported; unregister_local_file it first",
                abs.display()
            )));
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&abs)
            .map_err(|e| Error::io(format!("register_local_file: opening {}", abs.display()), e))?;
        let meta = f.metadata().map_err(|e| Error::io(format!("stat {}", abs.display()), e))?;
        if meta.is_file() && meta.len() < size {
            f.set_len(size).map_err(|e| Error::io(format!("growing {} to {size} bytes", abs.display()), e))?;
        }
        drop(f);
        let id = FILE_ID_BASE + self.next_region_id();
        let spec = format!("rw{}:{}", if direct { ",direct" } else { "" }, abs.display());
        let regs = RegDescList::from_descs(MemType::File, vec![RegDesc::with_meta(0, size, id, spec)]);
        self.register_storage(&regs, &with)?.keep();
        let alignment = if direct { crate::storage::direct_alignment(&abs).unwrap_or(4096) } else { 1 };
        let file = ExportedFile { id, path: abs, size, alignment };
        exports.push(Export { file: file.clone(), regs });
        tracing::info!(agent = %self.name(), id, path = %file.path.display(), size, ?serving, "file exported");
        Ok(id)
    }

    /// Stops exporting the file at `path`. In-flight accesses finish first;
    /// later ones fail. Other exported files are not disturbed.
    pub fn unregister_local_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let abs = std::path::absolute(path).map_err(|e| Error::io(format!("resolving {}", path.display()), e))?;
        let mut exports = self.inner.exports.lock();
        let i = exports
            .iter()
            .position(|e| e.file.path == abs)
            .ok_or_else(|| Error::not_found(format!("{} is not exported by agent '{}'", abs.display(), self.name())))?;
        self.deregister_mem(&exports[i].regs)?;
        exports.remove(i);
        Ok(())
    }

    /// The files this agent exports.
    pub fn exported_files(&self) -> Vec<ExportedFile> {
        self.inner.exports.lock().iter().map(|e| e.file.clone()).collect()
    }

    /// The files `peer` exported, as its loaded metadata says.
    pub fn remote_files(&self, peer: &str) -> Result<Vec<ExportedFile>> {
        let p = self.peer(peer)?;
        match p.extensions.iter().find(|(n, _)| n == FILES_EXTENSION) {
            None => Ok(Vec::new()),
            Some((_, bytes)) => postcard::from_bytes(bytes)
                .map_err(|e| Error::malformed(format!("the exported-file list of '{peer}' does not decode: {e}"))),
        }
    }

    /// The `files` metadata extension, if this agent exports any.
    pub(crate) fn files_extension(&self) -> Option<(String, Vec<u8>)> {
        let files = self.exported_files();
        if files.is_empty() {
            return None;
        }
        // Serializing plain data into a Vec cannot fail.
        let bytes = postcard::to_allocvec(&files).expect("postcard serialization into a Vec cannot fail");
        Some((FILES_EXTENSION.to_string(), bytes))
    }
}
