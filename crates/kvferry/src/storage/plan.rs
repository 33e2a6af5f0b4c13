//! The one check of a storage operation, done before any byte moves.
//!
//! [`plan`] takes a list of [`Entry`]s — `len` bytes between memory at `buf`
//! and `offset` of the file region named by `key` — and, for each, in this
//! order:
//!
//! 1. looks the key up in the [`FileTable`] (`NotFound` if it names no live
//!    file region: memory keys live in other tables and are never found here);
//! 2. refuses an empty entry (`InvalidParam`);
//! 3. checks access: a READ needs a readable registration, a WRITE a writable
//!    one (`NotAllowed`);
//! 4. checks bounds: the range lies inside the registered region and, for a
//!    block device, inside the device (`NotAllowed`);
//! 5. for an O_DIRECT file, checks that memory address, file offset and
//!    length are aligned (`InvalidParam` naming the field);
//! 6. splits the entry into I/Os of at most `max_io` bytes (for O_DIRECT, a
//!    multiple of the file's offset alignment, so every piece stays aligned).
//!
//! The POSIX backend plans a request once at `prepare`; a network backend
//! serving exported files plans every incoming frame. Both get the same
//! checks with the same strictness: these are the checks that guard who may
//! touch which bytes of a file, and they exist only here.

use std::collections::HashMap;
use std::sync::Arc;

use super::align::DirectAlign;
use super::job::{IoBatch, IoOp, Job};
use super::naming::Naming;
use super::table::{FileRegion, FileTable, OpenFile};
use crate::error::{Error, Result};
use crate::types::{AccessKey, XferOp};

/// One entry of a storage operation: `len` bytes between memory at `buf`
/// and `offset` of the file region `key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The file region's access key.
    pub(crate) key: AccessKey,
    /// File offset.
    pub(crate) offset: u64,
    /// Bytes.
    pub(crate) len: u64,
    /// Memory address (or, for a plan started at a base address later, the
    /// offset from that base: see [`Plan::into_job`]).
    pub(crate) buf: u64,
}

/// What [`plan`] needs besides the entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PlanOpts {
    /// How messages name the caller.
    pub(crate) naming: Naming,
    /// Longest single I/O: at least 4096, at most [`MAX_OP_LEN`](super::MAX_OP_LEN).
    pub(crate) max_io: u64,
}

/// One file region a plan uses.
#[derive(Debug)]
pub(crate) struct PlannedFile {
    /// The region's key.
    pub(crate) key: AccessKey,
    /// The first entry on it (for messages).
    pub(crate) first: u32,
    /// The open file, as it was when planned.
    pub(crate) file: Arc<OpenFile>,
}

/// A checked storage operation: its I/Os and the file regions they use
/// (index = [`IoOp::file`]).
#[derive(Debug)]
pub(crate) struct Plan {
    batch: IoBatch,
    files: Vec<PlannedFile>,
}

/// Checks `entries` against `table` for an `op` and splits them into I/Os
/// (see the module documentation for the checks, in order). Errors name the
/// entry by its index and say what to change.
pub(crate) fn plan(
    table: &FileTable,
    op: XferOp,
    entries: impl IntoIterator<Item = Entry>,
    opts: PlanOpts,
) -> Result<Plan> {
    let mut files: Vec<PlannedFile> = Vec::new();
    let mut index: HashMap<AccessKey, u32> = HashMap::new();
    let mut ops = Vec::new();
    for (i, e) in entries.into_iter().enumerate() {
        let seg = u32::try_from(i).unwrap_or(u32::MAX);
        let r = check(table, op, i, &e, opts.naming)?;
        let f = &r.file;
        let chunk = if f.direct { (opts.max_io / f.off_align).max(1) * f.off_align } else { opts.max_io };
        let fi = *index.entry(e.key).or_insert_with(|| {
            files.push(PlannedFile { key: e.key, first: seg, file: f.clone() });
            (files.len() - 1) as u32
        });
        let mut done = 0u64;
        while done < e.len {
            let n = chunk.min(e.len - done);
            ops.push(IoOp { kind: op, file: fi, seg, buf: e.buf + done, len: n, offset: e.offset + done });
            done += n;
        }
    }
    let batch = IoBatch::new(ops, files.len())?;
    Ok(Plan { batch, files })
}

/// Entry `i`'s checks, in the module's order: lookup, empty, access, bounds,
/// memory overflow, O_DIRECT alignment. Returns the region it names.
fn check<'t>(table: &'t FileTable, op: XferOp, i: usize, e: &Entry, naming: Naming) -> Result<&'t Arc<FileRegion>> {
    let Naming { who, item } = naming;
    let r = table.region(&e.key).ok_or_else(|| {
        Error::not_found(format!(
            "{who}: {item} {i} ({:#x}+{}) names a file region that is not registered here now (it was \
             deregistered, or registered with another backend only); register it and create the request again",
            e.offset, e.len
        ))
    })?;
    let f = &r.file;
    if e.len == 0 {
        return Err(Error::invalid(format!(
            "{who}: {item} {i} (offset {:#x} of {}) is empty; every {item} moves at least one byte",
            e.offset,
            f.name()
        )));
    }
    match op {
        XferOp::Write if !f.access.writable() => {
            return Err(Error::not_allowed(format!(
                "{who}: {item} {i}: {} is open read-only; register it with 'w' or 'rw' to WRITE to it",
                f.name()
            )))
        }
        XferOp::Read if !f.access.readable() => {
            return Err(Error::not_allowed(format!(
                "{who}: {item} {i}: {} is open write-only; register it with 'r' or 'rw' to READ from it",
                f.name()
            )))
        }
        _ => {}
    }
    if !r.contains(e.offset, e.len) {
        return Err(Error::not_allowed(format!(
            "{who}: {item} {i} ({:#x}+{}) lies outside its registered region {:#x}+{} of {}{}",
            e.offset,
            e.len,
            r.addr,
            r.len,
            f.name(),
            f.device_size.map(|d| format!(" (a device of {d} bytes)")).unwrap_or_default()
        )));
    }
    if e.buf.checked_add(e.len).is_none() {
        return Err(Error::invalid(format!(
            "{who}: {item} {i}: memory at {:#x} + {} bytes overflows the address space",
            e.buf, e.len
        )));
    }
    if f.direct {
        DirectAlign { mem: f.mem_align, off: f.off_align }.check(naming, i, &f.name(), e.buf, e.offset, e.len)?;
    }
    Ok(r)
}

impl Plan {
    /// The I/Os, to run as many jobs as the owner likes.
    pub(crate) fn batch(&self) -> &IoBatch {
        &self.batch
    }

    /// The file regions used, in [`IoOp::file`] order.
    pub(crate) fn files(&self) -> &[PlannedFile] {
        &self.files
    }

    /// A job running the plan with every memory address moved up by `base`
    /// (0: the entries held absolute addresses). The planned alignment
    /// checks covered the offsets from `base`, so `base` itself must be
    /// aligned for every O_DIRECT file: a staging buffer is page-aligned.
    pub(crate) fn into_job(self, base: u64) -> Result<Arc<Job>> {
        let files: Vec<Arc<OpenFile>> = self.files.into_iter().map(|f| f.file).collect();
        if base == 0 {
            return Job::new(self.batch, files);
        }
        if let Some(f) = files.iter().find(|f| f.direct && base % f.mem_align != 0) {
            return Err(Error::internal(format!(
                "storage: a buffer at {base:#x} is not aligned to {} for O_DIRECT on {}",
                f.mem_align,
                f.name()
            )));
        }
        let mut ops = self.batch.ops().to_vec();
        for op in &mut ops {
            op.buf = op
                .buf
                .checked_add(base)
                .ok_or_else(|| Error::invalid(format!("storage: a buffer at {base:#x} overflows the address space")))?;
        }
        Job::new(IoBatch::new(ops, files.len())?, files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::storage::table::Access;
    use crate::storage::MAX_OP_LEN;

    const RW: AccessKey = AccessKey([1; 16]);
    const RO: AccessKey = AccessKey([2; 16]);
    const WO: AccessKey = AccessKey([3; 16]);
    const DIRECT: AccessKey = AccessKey([4; 16]);
    const DEVICE: AccessKey = AccessKey([5; 16]);
    const WHOLE: AccessKey = AccessKey([6; 16]);

    /// Regions: RW 4096+64K, RO 0+4K, WO 0+4K, DIRECT (512-aligned) 0+1M,
    /// DEVICE 0+0 on a device of 8 KiB, WHOLE 0+0 (the whole file).
    fn table() -> FileTable {
        let mut t = FileTable::default();
        t.insert_for_test(RW, 4096, 64 << 10, OpenFile::test_file(Access::ReadWrite, None, None));
        t.insert_for_test(RO, 0, 4096, OpenFile::test_file(Access::Read, None, None));
        t.insert_for_test(WO, 0, 4096, OpenFile::test_file(Access::Write, None, None));
        t.insert_for_test(DIRECT, 0, 1 << 20, OpenFile::test_file(Access::ReadWrite, Some(512), None));
        t.insert_for_test(DEVICE, 0, 0, OpenFile::test_file(Access::ReadWrite, None, Some(8192)));
        t.insert_for_test(WHOLE, 0, 0, OpenFile::test_file(Access::ReadWrite, None, None));
        t
    }

    fn entry(key: AccessKey, offset: u64, len: u64, buf: u64) -> Entry {
        Entry { key, offset, len, buf }
    }

    fn posix(max_io: u64) -> PlanOpts {
        PlanOpts { naming: Naming::POSIX, max_io }
    }

    fn refused(op: XferOp, e: Entry) -> crate::Error {
        plan(&table(), op, [entry(RW, 4096, 16, 0x1000), e], posix(1 << 20)).unwrap_err()
    }

    #[test]
    fn a_valid_plan_lists_its_ios_and_files() {
        let entries = [entry(RW, 4096, 100, 0x10000), entry(RO, 0, 4096, 0x20000), entry(RW, 8192, 8, 0x30000)];
        let p = plan(&table(), XferOp::Read, entries, posix(1 << 20)).unwrap();
        let ops = p.batch().ops();
        assert_eq!(ops.len(), 3);
        assert_eq!(
            ops[2],
            IoOp { kind: XferOp::Read, file: 0, seg: 2, buf: 0x30000, len: 8, offset: 8192 },
            "the same region shares one file index"
        );
        assert_eq!(ops[1].file, 1);
        let files: Vec<(AccessKey, u32)> = p.files().iter().map(|f| (f.key, f.first)).collect();
        assert_eq!(files, vec![(RW, 0), (RO, 1)]);
    }

    #[test]
    fn an_unknown_key_is_not_found() {
        // A memory region's key lives in another table: here it is unknown too.
        let e = refused(XferOp::Write, entry(AccessKey([9; 16]), 0, 4096, 0x1000));
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        assert!(e.message().contains("segment 1"), "names the entry: {e}");
        assert!(e.message().contains("not registered here"), "{e}");
    }

    #[test]
    fn out_of_bounds_is_not_allowed() {
        for (key, offset, len) in [
            (RW, 0, 16),                     // before the region
            (RW, 4095, 16),                  // straddles its start
            (RW, 4096 + (64 << 10) - 8, 16), // straddles its end
            (RW, u64::MAX - 4, 16),          // offset + len overflows
            (DEVICE, 8192 - 8, 16),          // a whole-device region ends at the device's end
        ] {
            let e = refused(XferOp::Read, entry(key, offset, len, 0x1000));
            assert_eq!(e.kind(), ErrorKind::NotAllowed, "{offset:#x}+{len}: {e}");
            assert!(e.message().contains("lies outside its registered region"), "{e}");
        }
        let e = refused(XferOp::Read, entry(DEVICE, 8192 - 8, 16, 0x1000));
        assert!(e.message().contains("a device of 8192 bytes"), "{e}");
        // A whole-file region reaches any offset (a file may grow).
        plan(&table(), XferOp::Write, [entry(WHOLE, 1 << 40, 4096, 0x1000)], posix(1 << 20)).unwrap();
    }

    #[test]
    fn wrong_access_is_not_allowed() {
        let e = refused(XferOp::Write, entry(RO, 0, 4096, 0x1000));
        assert_eq!(e.kind(), ErrorKind::NotAllowed, "{e}");
        assert!(e.message().contains("read-only"), "{e}");
        let e = refused(XferOp::Read, entry(WO, 0, 4096, 0x1000));
        assert_eq!(e.kind(), ErrorKind::NotAllowed, "{e}");
        assert!(e.message().contains("write-only"), "{e}");
        plan(&table(), XferOp::Read, [entry(RO, 0, 4096, 0x1000)], posix(1 << 20)).unwrap();
        plan(&table(), XferOp::Write, [entry(WO, 0, 4096, 0x1000)], posix(1 << 20)).unwrap();
    }

    #[test]
    fn misaligned_direct_io_names_the_field() {
        for (field, offset, len, buf) in
            [("address", 0, 4096, 0x1001), ("offset", 100, 4096, 0x1000), ("length", 0, 100, 0x1000)]
        {
            let e = refused(XferOp::Write, entry(DIRECT, offset, len, buf));
            assert_eq!(e.kind(), ErrorKind::InvalidParam, "{field}: {e}");
            assert!(e.message().contains(&format!("O_DIRECT {field} misaligned in segment 1")), "{e}");
        }
        // The same misalignment on a buffered file is fine.
        plan(&table(), XferOp::Write, [entry(RW, 4096 + 100, 100, 0x1001)], posix(1 << 20)).unwrap();
    }

    #[test]
    fn empty_and_overflowing_entries_are_refused() {
        let e = refused(XferOp::Read, entry(RW, 4096, 0, 0x1000));
        assert_eq!(e.kind(), ErrorKind::InvalidParam, "{e}");
        assert!(e.message().contains("is empty"), "{e}");
        let e = refused(XferOp::Read, entry(WHOLE, 0, 4096, u64::MAX - 100));
        assert_eq!(e.kind(), ErrorKind::InvalidParam, "{e}");
        assert!(e.message().contains("overflows"), "{e}");
    }

    #[test]
    fn a_large_entry_is_chunked() {
        // 10 MiB + 512 in 4 MiB pieces: 4M, 4M, 2M + 512.
        let len = (10 << 20) + 512;
        let p = plan(&table(), XferOp::Write, [entry(WHOLE, 4096, len, 0x100000)], posix(4 << 20)).unwrap();
        let got: Vec<(u64, u64, u64)> = p.batch().ops().iter().map(|o| (o.buf, o.offset, o.len)).collect();
        assert_eq!(
            got,
            vec![
                (0x100000, 4096, 4 << 20),
                (0x100000 + (4 << 20), 4096 + (4 << 20), 4 << 20),
                (0x100000 + (8 << 20), 4096 + (8 << 20), (2 << 20) + 512),
            ]
        );
        assert!(p.batch().ops().iter().all(|o| o.seg == 0 && o.kind == XferOp::Write));
        // The server's pieces are as long as the engine allows.
        let served = PlanOpts { naming: Naming::SERVED, max_io: MAX_OP_LEN };
        let p = plan(&table(), XferOp::Read, [entry(WHOLE, 0, (2 << 30) + 1, 0)], served).unwrap();
        let lens: Vec<u64> = p.batch().ops().iter().map(|o| o.len).collect();
        assert_eq!(lens, vec![1 << 30, 1 << 30, 1]);
    }

    #[test]
    fn direct_pieces_stay_aligned() {
        // A max_io that is not a multiple of the alignment is rounded down to one.
        let p = plan(&table(), XferOp::Read, [entry(DIRECT, 0, 8192, 0x10000)], posix(5000)).unwrap();
        let lens: Vec<u64> = p.batch().ops().iter().map(|o| o.len).collect();
        assert_eq!(lens, vec![4608, 3584], "pieces of 9 × 512");
        assert!(p.batch().ops().iter().all(|o| o.offset % 512 == 0 && o.buf % 512 == 0));
    }

    #[test]
    fn a_served_plan_starts_at_its_staging_buffer() {
        let served = PlanOpts { naming: Naming::SERVED, max_io: MAX_OP_LEN };
        let entries = [entry(DIRECT, 0, 4096, 0), entry(DIRECT, 8192, 512, 4096)];
        let job = plan(&table(), XferOp::Read, entries, served).unwrap().into_job(0x7000_0000).unwrap();
        assert_eq!((job.op(0).buf, job.op(1).buf), (0x7000_0000, 0x7000_1000));
        let e = plan(&table(), XferOp::Read, entries, served).unwrap().into_job(0x7000_0100).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Internal, "a staging buffer is page-aligned: {e}");
        // The server's messages name frame entries.
        let e = plan(&table(), XferOp::Write, [entry(RO, 0, 4096, 0)], served).unwrap_err();
        assert!(e.message().starts_with("exported files: entry 0:"), "{e}");
    }
}
