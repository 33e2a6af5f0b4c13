//! The open-file table: which files and block devices one owner (a POSIX
//! backend, a file server) has open, and which registered regions (by
//! access key) lie in them. Not to be confused with `agent/files.rs`, the
//! agent's list of files it exports to peers.
//!
//! Two ways to register (see `docs/POSIX.md`):
//!
//! - **fd mode** (NIXL's convention, empty `meta_info`): `dev_id` is a file
//!   descriptor the caller opened. The backend `dup`s it at registration, so it
//!   never closes the caller's descriptor and the caller may close theirs at
//!   any time; the duplicate is closed when the last region on it is
//!   deregistered and no I/O on it is in flight.
//! - **path mode** (`meta_info = "rw,direct,create:/path"`): the backend opens
//!   the path at registration and closes it at deregistration. `dev_id` is an
//!   id the caller picks; transfer descriptors name the file by it.
//!
//! Several regions may share one `dev_id` (ranges of one file); they must then
//! name the same file (fd mode: same device and inode; path mode: same path
//! and flags), and share one open descriptor.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use crate::desc::RegDesc;
use crate::error::{Error, Result};
use crate::sys;
use crate::types::{AccessKey, FileInfo, MemType};

/// The O_DIRECT alignment assumed when the kernel does not report one: 4096
/// covers every logical block size in common use (512 and 4096).
pub(crate) const DEFAULT_DIRECT_ALIGN: u64 = 4096;

/// What a registered file may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Only READ (file → DRAM).
    Read,
    /// Only WRITE (DRAM → file).
    Write,
    /// Both.
    ReadWrite,
}

impl Access {
    pub(crate) fn readable(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }

    pub(crate) fn writable(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }

    fn from_flags(flags: i32) -> Access {
        match flags & libc::O_ACCMODE {
            libc::O_WRONLY => Access::Write,
            libc::O_RDWR => Access::ReadWrite,
            _ => Access::Read,
        }
    }
}

/// A parsed path-mode `meta_info`: `"<flags>:<path>"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PathSpec {
    pub(crate) access: Access,
    pub(crate) direct: bool,
    pub(crate) create: bool,
    pub(crate) trunc: bool,
    pub(crate) path: PathBuf,
}

impl PathSpec {
    /// Parses `meta_info`. Empty means fd mode (`None`). A bare absolute path
    /// means `"rw:<path>"`.
    pub(crate) fn parse(meta: &[u8]) -> Result<Option<PathSpec>> {
        if meta.is_empty() {
            return Ok(None);
        }
        let (flags, path) = if meta.first() == Some(&b'/') {
            (&b"rw"[..], meta)
        } else {
            let colon = meta.iter().position(|&b| b == b':').ok_or_else(|| {
                Error::invalid(format!(
                    "POSIX: meta_info '{}' is not a path-mode file spec: expected '<flags>:<path>' such as 'rw,direct,create:/data/kv.bin' (flags: r, w, rw, direct, create, trunc), or empty meta_info for fd mode",
                    String::from_utf8_lossy(meta)
                ))
            })?;
            (&meta[..colon], &meta[colon + 1..])
        };
        if path.is_empty() {
            return Err(Error::invalid(format!(
                "POSIX: meta_info '{}' names no path after the ':'",
                String::from_utf8_lossy(meta)
            )));
        }
        let mut spec =
            PathSpec { access: Access::Read, direct: false, create: false, trunc: false, path: PathBuf::new() };
        let mut access = None;
        for flag in flags.split(|&b| b == b',').filter(|f| !f.is_empty()) {
            let set_access = |a: Access, access: &mut Option<Access>| match access {
                Some(prev) if *prev != a => Err(Error::invalid(format!(
                    "POSIX: meta_info '{}' gives two access modes; use one of r, w, rw",
                    String::from_utf8_lossy(meta)
                ))),
                _ => {
                    *access = Some(a);
                    Ok(())
                }
            };
            match flag {
                b"r" | b"ro" => set_access(Access::Read, &mut access)?,
                b"w" | b"wo" => set_access(Access::Write, &mut access)?,
                b"rw" => set_access(Access::ReadWrite, &mut access)?,
                b"direct" => spec.direct = true,
                b"create" => spec.create = true,
                b"trunc" => spec.trunc = true,
                other => {
                    return Err(Error::invalid(format!(
                        "POSIX: unknown flag '{}' in meta_info '{}'; valid flags: r, w, rw, direct, create, trunc",
                        String::from_utf8_lossy(other),
                        String::from_utf8_lossy(meta)
                    )))
                }
            }
        }
        spec.access = access.ok_or_else(|| {
            Error::invalid(format!(
                "POSIX: meta_info '{}' gives no access mode; start it with r, w or rw (e.g. 'rw,direct:/path')",
                String::from_utf8_lossy(meta)
            ))
        })?;
        if (spec.create || spec.trunc) && !spec.access.writable() {
            return Err(Error::invalid(format!(
                "POSIX: meta_info '{}': create and trunc need a writable file (w or rw)",
                String::from_utf8_lossy(meta)
            )));
        }
        spec.path = PathBuf::from(OsStr::from_bytes(path));
        Ok(Some(spec))
    }

    fn open(&self) -> Result<OwnedFd> {
        let mut o = std::fs::OpenOptions::new();
        o.read(self.access.readable()).write(self.access.writable()).create(self.create).truncate(self.trunc);
        if self.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.mode(0o644);
        let f = o.open(&self.path).map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::EINVAL) if self.direct => {
                    " (this filesystem refuses O_DIRECT, tmpfs for one: drop 'direct' or use a disk filesystem)"
                }
                Some(libc::ENOENT) if !self.create => " (add 'create' to the flags to create it)",
                _ => "",
            };
            Error::io(format!("POSIX: cannot open '{}'{hint}", self.path.display()), e)
        })?;
        Ok(f.into())
    }
}

/// Where an open file came from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Origin {
    /// fd mode: the caller's descriptor number and the file's identity.
    Fd { fd: RawFd, dev: u64, ino: u64 },
    /// path mode: the spec it was opened with.
    Path(PathSpec),
}

/// One file or block device the backend holds open. Shared (by `Arc`) between
/// its regions and the I/O in flight on it, so the descriptor is closed only
/// once both are gone.
pub(crate) struct OpenFile {
    fd: OwnedFd,
    origin: Origin,
    pub(crate) access: Access,
    /// Opened (or, in fd mode, found) with O_DIRECT.
    pub(crate) direct: bool,
    /// A block device rather than a regular file.
    pub(crate) block: bool,
    /// O_DIRECT alignment of memory addresses.
    pub(crate) mem_align: u64,
    /// O_DIRECT alignment of file offsets and lengths.
    pub(crate) off_align: u64,
    /// Size of a block device (fixed); `None` for files, which may grow.
    pub(crate) device_size: Option<u64>,
}

impl fmt::Debug for OpenFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenFile")
            .field("fd", &self.fd.as_raw_fd())
            .field("name", &self.name())
            .field("direct", &self.direct)
            .finish()
    }
}

impl OpenFile {
    /// `/dev/null`, read-write, for unit tests of code that only carries files.
    #[cfg(test)]
    pub(crate) fn dev_null() -> Arc<OpenFile> {
        Self::test_file(Access::ReadWrite, None, None)
    }

    /// `/dev/null` standing in for a file with the given access, O_DIRECT
    /// alignment (`None`: not O_DIRECT) and device size, for unit tests of
    /// the checks (no filesystem needs to support O_DIRECT).
    #[cfg(test)]
    pub(crate) fn test_file(access: Access, direct: Option<u64>, device_size: Option<u64>) -> Arc<OpenFile> {
        let f = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").unwrap();
        Self::fake(OwnedFd::from(f), access, direct, device_size)
    }

    /// Any descriptor (a pipe, say), read-write, for unit tests of the engines.
    #[cfg(test)]
    pub(crate) fn for_test(fd: OwnedFd) -> Arc<OpenFile> {
        Self::fake(fd, Access::ReadWrite, None, None)
    }

    #[cfg(test)]
    fn fake(fd: OwnedFd, access: Access, direct: Option<u64>, device_size: Option<u64>) -> Arc<OpenFile> {
        let align = direct.unwrap_or(1);
        Arc::new(OpenFile {
            fd,
            origin: Origin::Fd { fd: -1, dev: 0, ino: 0 },
            access,
            direct: direct.is_some(),
            block: device_size.is_some(),
            mem_align: align,
            off_align: align,
            device_size,
        })
    }

    /// The descriptor the engines use.
    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A name for messages: the path, or `fd N`.
    pub(crate) fn name(&self) -> String {
        match &self.origin {
            Origin::Path(p) => format!("'{}'", p.path.display()),
            Origin::Fd { fd, .. } => format!("fd {fd}"),
        }
    }

    fn from_fd(fd: OwnedFd, origin: Origin) -> Result<OpenFile> {
        let raw = fd.as_raw_fd();
        let st = sys::fstat(raw).map_err(|e| Error::io("POSIX: fstat of a registered file", e))?;
        if !st.is_file() && !st.is_block() {
            return Err(Error::invalid(format!(
                "POSIX: {} is neither a regular file nor a block device (mode {:o}); register files or block devices only",
                describe(&origin),
                st.mode
            )));
        }
        let flags = sys::status_flags(raw).map_err(|e| Error::io("POSIX: fcntl(F_GETFL)", e))?;
        let direct = flags & libc::O_DIRECT != 0;
        let (mem_align, off_align) = alignment(raw, st.is_block());
        let device_size = if st.is_block() {
            Some(sys::device_size(raw).map_err(|e| Error::io("POSIX: size of a block device", e))?)
        } else {
            None
        };
        Ok(OpenFile {
            fd,
            origin,
            access: Access::from_flags(flags),
            direct,
            block: st.is_block(),
            mem_align,
            off_align,
            device_size,
        })
    }
}

fn describe(origin: &Origin) -> String {
    match origin {
        Origin::Path(p) => format!("'{}'", p.path.display()),
        Origin::Fd { fd, .. } => format!("fd {fd}"),
    }
}

/// O_DIRECT alignments for `fd`: what `statx(STATX_DIOALIGN)` reports, else a
/// block device's logical block size, else [`DEFAULT_DIRECT_ALIGN`].
pub(crate) fn alignment(fd: RawFd, block: bool) -> (u64, u64) {
    if let Some((mem, off)) = sys::dio_align(fd) {
        return (u64::from(mem), u64::from(off));
    }
    if block {
        if let Ok(n) = sys::logical_block_size(fd) {
            if n.is_power_of_two() {
                return (u64::from(n), u64::from(n));
            }
        }
    }
    (DEFAULT_DIRECT_ALIGN, DEFAULT_DIRECT_ALIGN)
}

/// A FILE or BLOCK registration as the storage layer takes it (the owner's
/// region, seen through what a file needs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileRegistration<'a> {
    /// The region's access key: how transfers name it.
    pub(crate) key: AccessKey,
    /// `File` or `Block`.
    pub(crate) mem_type: MemType,
    /// Start offset in the file.
    pub(crate) addr: u64,
    /// Length; 0 = to the end of the file or device.
    pub(crate) len: u64,
    /// fd mode: the caller's descriptor; path mode: the caller's id for the file.
    pub(crate) dev_id: u64,
    /// Empty (fd mode) or a path-mode spec such as `"rw,direct,create:/path"`.
    pub(crate) meta_info: &'a [u8],
}

/// One registered region: a range of an open file.
#[derive(Debug)]
pub(crate) struct FileRegion {
    /// Start offset.
    pub(crate) addr: u64,
    /// Length; 0 = to the end of the file or device.
    pub(crate) len: u64,
    pub(crate) file: Arc<OpenFile>,
}

impl FileRegion {
    /// Whether `[off, off + len)` lies inside the region (and inside the
    /// device, for block devices).
    pub(crate) fn contains(&self, off: u64, len: u64) -> bool {
        let Some(end) = off.checked_add(len) else { return false };
        let in_region = off >= self.addr && (self.len == 0 || end <= self.addr.saturating_add(self.len));
        in_region && self.file.device_size.is_none_or(|size| end <= size)
    }
}

/// Describes the file or device `desc` names (path mode: the path in
/// `meta_info`; fd mode: `fstat` of the descriptor `dev_id`); `None` if it
/// does not exist.
pub(crate) fn query(desc: &RegDesc) -> Result<Option<FileInfo>> {
    match PathSpec::parse(&desc.meta_info)? {
        Some(spec) => {
            let md = match std::fs::metadata(&spec.path) {
                Ok(md) => md,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => return Ok(None),
                Err(e) => return Err(Error::io(format!("POSIX: stat of '{}'", spec.path.display()), e)),
            };
            let mut size = md.len();
            if md.file_type().is_block_device() {
                // A block device's stat size is 0; its size is where it ends.
                size = std::fs::File::open(&spec.path)
                    .ok()
                    .and_then(|f| sys::device_size(f.as_raw_fd()).ok())
                    .unwrap_or(0);
            }
            Ok(Some(FileInfo { size, mode: md.mode(), mtime: md.modified().unwrap_or(std::time::UNIX_EPOCH) }))
        }
        None => {
            let Ok(fd) = RawFd::try_from(desc.dev_id) else { return Ok(None) };
            match sys::fstat(fd) {
                Ok(st) => {
                    let size = if st.is_block() { sys::device_size(fd).unwrap_or(0) } else { st.size };
                    Ok(Some(FileInfo { size, mode: st.mode, mtime: st.mtime }))
                }
                Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(None),
                Err(e) => Err(Error::io(format!("POSIX: fstat of fd {fd}"), e)),
            }
        }
    }
}

/// Every registration of one backend instance.
#[derive(Debug, Default)]
pub(crate) struct FileTable {
    by_key: HashMap<AccessKey, Arc<FileRegion>>,
    /// Open files by `(memory type, dev_id)`, with the number of regions on each.
    by_dev: HashMap<(MemType, u64), (Arc<OpenFile>, usize)>,
}

impl FileTable {
    /// The live region with this key.
    pub(crate) fn region(&self, key: &AccessKey) -> Option<&Arc<FileRegion>> {
        self.by_key.get(key)
    }

    /// Registers `r`, opening (path mode) or duplicating (fd mode) its file, or
    /// sharing the one already open under the same `dev_id`.
    pub(crate) fn register(&mut self, r: &FileRegistration<'_>) -> Result<()> {
        let spec = PathSpec::parse(r.meta_info)?;
        let origin = match spec {
            Some(p) => Origin::Path(p),
            None => {
                let fd = RawFd::try_from(r.dev_id).map_err(|_| {
                    Error::invalid(format!(
                        "POSIX: dev_id {} is not a file descriptor; in fd mode dev_id is an open fd, or give a path in meta_info ('rw:/path')",
                        r.dev_id
                    ))
                })?;
                let st = sys::fstat(fd).map_err(|e| {
                    Error::io(
                        format!(
                            "POSIX: dev_id {fd} is not an open file descriptor (fd mode); open the file first or give a path in meta_info ('rw:/path')"
                        ),
                        e,
                    )
                })?;
                Origin::Fd { fd, dev: st.dev, ino: st.ino }
            }
        };
        let dev_key = (r.mem_type, r.dev_id);
        let file = match self.by_dev.get(&dev_key) {
            Some((f, _)) if f.origin == origin => f.clone(),
            Some((f, _)) => {
                return Err(Error::invalid(format!(
                    "POSIX: {} dev_id {} already names {} here, not {}; one dev_id names one file: pick another dev_id or deregister the first",
                    r.mem_type,
                    r.dev_id,
                    f.name(),
                    describe(&origin)
                )))
            }
            None => {
                let fd = match &origin {
                    Origin::Path(p) => p.open()?,
                    Origin::Fd { fd, .. } => {
                        sys::dup(*fd).map_err(|e| Error::io(format!("POSIX: dup of fd {fd}"), e))?
                    }
                };
                Arc::new(OpenFile::from_fd(fd, origin)?)
            }
        };
        if r.mem_type == MemType::Block && !file.block {
            tracing::debug!(file = %file.name(), "a regular file registered as BLOCK");
        }
        if let Some(size) = file.device_size {
            let end = r.addr.checked_add(r.len).filter(|&e| e <= size);
            if end.is_none() || r.addr >= size {
                return Err(Error::invalid(format!(
                    "POSIX: region {:#x}+{} lies outside block device {} of {size} bytes",
                    r.addr,
                    r.len,
                    file.name()
                )));
            }
        }
        let region = Arc::new(FileRegion { addr: r.addr, len: r.len, file: file.clone() });
        if self.by_key.insert(r.key, region).is_some() {
            return Err(Error::internal("POSIX: an access key was registered twice"));
        }
        self.by_dev.entry(dev_key).or_insert((file, 0)).1 += 1;
        Ok(())
    }

    /// Forgets `r`; closes its file once no region (and no I/O) uses it.
    pub(crate) fn deregister(&mut self, r: &FileRegistration<'_>) -> Result<()> {
        if self.by_key.remove(&r.key).is_none() {
            return Err(Error::not_found(format!(
                "POSIX: {} region {:#x}+{} (dev {}) is not registered with this backend",
                r.mem_type, r.addr, r.len, r.dev_id
            )));
        }
        let dev_key = (r.mem_type, r.dev_id);
        if let Some((_, n)) = self.by_dev.get_mut(&dev_key) {
            *n -= 1;
            if *n == 0 {
                self.by_dev.remove(&dev_key);
            }
        }
        Ok(())
    }

    /// Adds region `addr+len` of `file` under `key`, for unit tests of the checks.
    #[cfg(test)]
    pub(crate) fn insert_for_test(&mut self, key: AccessKey, addr: u64, len: u64, file: Arc<OpenFile>) {
        self.by_key.insert(key, Arc::new(FileRegion { addr, len, file }));
    }

    /// Number of open files.
    #[cfg(test)]
    pub(crate) fn open_files(&self) -> usize {
        self.by_dev.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_specs_parse() {
        assert_eq!(PathSpec::parse(b"").unwrap(), None);
        let s = PathSpec::parse(b"rw,direct,create:/a:b").unwrap().unwrap();
        assert_eq!(s.access, Access::ReadWrite);
        assert!(s.direct && s.create && !s.trunc);
        assert_eq!(s.path, PathBuf::from("/a:b"));
        let s = PathSpec::parse(b"/plain/path").unwrap().unwrap();
        assert_eq!((s.access, s.direct), (Access::ReadWrite, false));
        assert_eq!(PathSpec::parse(b"r:/x").unwrap().unwrap().access, Access::Read);
        for (bad, says) in [
            (&b"rw"[..], "expected '<flags>:<path>'"),
            (b"rw:", "no path"),
            (b"rw,fast:/x", "unknown flag 'fast'"),
            (b"direct:/x", "no access mode"),
            (b"r,w:/x", "two access modes"),
            (b"r,create:/x", "writable"),
        ] {
            let e = PathSpec::parse(bad).unwrap_err();
            assert!(e.message().contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn regions_share_a_dev_and_check_bounds() {
        let dir = std::env::temp_dir().join(format!("kvferry-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        let meta = format!("rw,create:{}", p.display());
        fn region(addr: u64, len: u64, dev: u64, meta: &str, k: u8) -> FileRegistration<'_> {
            FileRegistration {
                key: AccessKey([k; 16]),
                mem_type: MemType::File,
                addr,
                len,
                dev_id: dev,
                meta_info: meta.as_bytes(),
            }
        }
        let mut t = FileTable::default();
        let (a, b) = (region(0, 4096, 7, &meta, 1), region(4096, 0, 7, &meta, 2));
        t.register(&a).unwrap();
        t.register(&b).unwrap();
        assert_eq!(t.open_files(), 1);
        let other = format!("rw,create:{}", dir.join("g").display());
        let e = t.register(&region(1 << 20, 10, 7, &other, 3)).unwrap_err();
        assert!(e.message().contains("one dev_id names one file"), "{e}");
        assert!(t.region(&a.key).unwrap().contains(0, 4096));
        assert!(!t.region(&a.key).unwrap().contains(1, 4096));
        assert!(t.region(&b.key).unwrap().contains(1 << 40, 4096), "len 0 reaches to the end");
        t.deregister(&a).unwrap();
        assert_eq!(t.open_files(), 1);
        t.deregister(&b).unwrap();
        assert_eq!(t.open_files(), 0);
        assert!(t.deregister(&b).is_err());
        let e = t.register(&region(0, 0, 1 << 40, "", 4)).unwrap_err();
        assert!(e.message().contains("not a file descriptor"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
