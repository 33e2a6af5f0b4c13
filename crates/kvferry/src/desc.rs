//! Descriptors and typed descriptor lists.
//!
//! A transfer descriptor is `(addr, len, dev_id)`; what the fields mean depends
//! on the list's [`MemType`] (see its variants). A registration descriptor adds
//! `meta_info` bytes: an object key, or a path-mode file spec such as
//! `"rw,direct,create:/path"`.

use std::ops::Index;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::mem::AlignedBuf;
use crate::types::MemType;

/// One contiguous range to move: `(addr, len, dev_id)`.
///
/// Laid out as three native-endian `u64`s in that order (`repr(C)`), the
/// layout of one row of an Nx3 `uint64` array, so that a million rows from
/// Python are one `memcpy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(C)]
pub struct XferDesc {
    /// Address (DRAM, VRAM) or byte offset (FILE, BLOCK, OBJ).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Device: 0 for DRAM, CUDA ordinal for VRAM, file descriptor or id for FILE.
    pub dev_id: u64,
}

impl XferDesc {
    /// A descriptor of `len` bytes at `addr` on device `dev_id`.
    pub const fn new(addr: u64, len: u64, dev_id: u64) -> Self {
        XferDesc { addr, len, dev_id }
    }

    /// One past the last byte, or `None` if `addr + len` overflows.
    pub fn end(&self) -> Option<u64> {
        self.addr.checked_add(self.len)
    }

    /// A DRAM descriptor of `len` bytes at `offset` into the `size` bytes
    /// that start at address `base` (a buffer of this process). Fails if the
    /// range is empty or does not lie inside.
    pub fn in_range(base: u64, size: usize, offset: usize, len: usize) -> Result<XferDesc> {
        match offset.checked_add(len) {
            Some(end) if end <= size && len > 0 => Ok(XferDesc::new(base + offset as u64, len as u64, 0)),
            _ => Err(Error::invalid(format!("range {offset}+{len} is outside the {size}-byte buffer (or empty)"))),
        }
    }
}

/// A range to register, with backend-specific `meta_info` bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RegDesc {
    /// Address (DRAM, VRAM) or byte offset (FILE, BLOCK, OBJ).
    pub addr: u64,
    /// Length in bytes; 0 for FILE, BLOCK and OBJ means "the whole thing".
    pub len: u64,
    /// Device: see [`XferDesc::dev_id`].
    pub dev_id: u64,
    /// Backend-specific bytes: an object key, or `"rw,direct,create:/path"` for files.
    pub meta_info: Vec<u8>,
}

impl RegDesc {
    /// A registration descriptor with empty `meta_info`.
    pub fn new(addr: u64, len: u64, dev_id: u64) -> Self {
        RegDesc { addr, len, dev_id, meta_info: Vec::new() }
    }

    /// A registration descriptor with `meta_info`.
    pub fn with_meta(addr: u64, len: u64, dev_id: u64, meta_info: impl Into<Vec<u8>>) -> Self {
        RegDesc { addr, len, dev_id, meta_info: meta_info.into() }
    }

    /// The transfer descriptor for the same range (drops `meta_info`).
    pub fn xfer(&self) -> XferDesc {
        XferDesc::new(self.addr, self.len, self.dev_id)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::XferDesc {}
    impl Sealed for super::RegDesc {}
}

/// What both descriptor kinds share; implemented by [`XferDesc`] and [`RegDesc`] only.
pub trait Desc: sealed::Sealed + Clone + PartialEq + Serialize + for<'de> Deserialize<'de> {
    /// The `(addr, len, dev_id)` triple.
    fn triple(&self) -> XferDesc;
    /// A one-byte tag that tells the two kinds apart in serialized lists.
    #[doc(hidden)]
    const TAG: u8;
}

impl Desc for XferDesc {
    fn triple(&self) -> XferDesc {
        *self
    }
    const TAG: u8 = b'X';
}

impl Desc for RegDesc {
    fn triple(&self) -> XferDesc {
        self.xfer()
    }
    const TAG: u8 = b'R';
}

/// A list of descriptors of one memory type.
///
/// ```
/// use kvferry::{MemType, XferDesc, XferDescList};
/// let mut l = XferDescList::new(MemType::Dram);
/// l.push(XferDesc::new(0x1000, 64, 0));
/// let bytes = l.to_bytes();
/// assert_eq!(XferDescList::from_bytes(&bytes).unwrap(), l);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DescList<D> {
    mem_type: MemType,
    descs: Vec<D>,
}

/// A list of transfer descriptors.
pub type XferDescList = DescList<XferDesc>;
/// A list of registration descriptors.
pub type RegDescList = DescList<RegDesc>;

const LIST_MAGIC: &[u8; 4] = b"KVFD";
const LIST_VERSION: u8 = 1;

impl<D: Desc> DescList<D> {
    /// An empty list of `mem_type`.
    pub fn new(mem_type: MemType) -> Self {
        DescList { mem_type, descs: Vec::new() }
    }

    /// An empty list with room for `n` descriptors.
    pub fn with_capacity(mem_type: MemType, n: usize) -> Self {
        DescList { mem_type, descs: Vec::with_capacity(n) }
    }

    /// A list from descriptors.
    pub fn from_descs(mem_type: MemType, descs: Vec<D>) -> Self {
        DescList { mem_type, descs }
    }

    /// The memory type every descriptor in the list has.
    pub fn mem_type(&self) -> MemType {
        self.mem_type
    }

    /// Appends a descriptor.
    pub fn push(&mut self, d: D) {
        self.descs.push(d);
    }

    /// Removes and returns the descriptor at `index`.
    pub fn remove(&mut self, index: usize) -> Result<D> {
        if index >= self.descs.len() {
            return Err(Error::invalid(format!(
                "remove: index {index} is out of range for a list of {} descriptors",
                self.descs.len()
            )));
        }
        Ok(self.descs.remove(index))
    }

    /// The descriptor at `index`, if any.
    pub fn get(&self, index: usize) -> Option<&D> {
        self.descs.get(index)
    }

    /// Number of descriptors.
    pub fn len(&self) -> usize {
        self.descs.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }

    /// Iterates over the descriptors.
    pub fn iter(&self) -> std::slice::Iter<'_, D> {
        self.descs.iter()
    }

    /// The descriptors as a slice.
    pub fn as_slice(&self) -> &[D] {
        &self.descs
    }

    /// Total bytes the list covers.
    pub fn total_len(&self) -> u64 {
        self.descs.iter().map(|d| d.triple().len).fold(0u64, u64::saturating_add)
    }

    /// Serializes the list so it can be sent to a peer ([`from_bytes`](Self::from_bytes) reads it).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.descs.len() * 8);
        out.extend_from_slice(LIST_MAGIC);
        out.push(LIST_VERSION);
        out.push(D::TAG);
        // postcard cannot fail writing plain data to a Vec.
        postcard::to_extend(self, out).expect("postcard serialization into a Vec cannot fail")
    }

    /// Reads a list written by [`to_bytes`](Self::to_bytes); bad bytes get a clear error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let what = if D::TAG == b'X' { "transfer" } else { "registration" };
        if bytes.len() < 6 || &bytes[..4] != LIST_MAGIC {
            return Err(Error::malformed(format!(
                "these {} bytes are not a serialized kvferry descriptor list (bad magic)",
                bytes.len()
            )));
        }
        if bytes[4] != LIST_VERSION {
            return Err(Error::malformed(format!(
                "descriptor list format version {} is not supported (this build reads version {LIST_VERSION}); upgrade kvferry on this side",
                bytes[4]
            )));
        }
        if bytes[5] != D::TAG {
            return Err(Error::mismatch(format!("expected a serialized {what} descriptor list, got the other kind")));
        }
        let (list, rest): (Self, &[u8]) = postcard::take_from_bytes(&bytes[6..])
            .map_err(|e| Error::malformed(format!("serialized {what} descriptor list is truncated or corrupt: {e}")))?;
        if !rest.is_empty() {
            return Err(Error::malformed(format!(
                "serialized {what} descriptor list has {} trailing bytes",
                rest.len()
            )));
        }
        Ok(list)
    }

    /// Checks each descriptor: no `addr + len` overflow and no zero length
    /// (zero is allowed for storage registrations: the whole file or device).
    pub fn validate(&self, allow_zero_len: bool) -> Result<()> {
        for (i, d) in self.descs.iter().enumerate() {
            let t = d.triple();
            if t.len == 0 && !allow_zero_len {
                return Err(Error::invalid(format!(
                    "descriptor {i} ({:#x}, len 0, dev {}) has zero length; only FILE, BLOCK and OBJ registrations may use 0 for 'the whole thing'",
                    t.addr, t.dev_id
                )));
            }
            if t.end().is_none() {
                return Err(Error::invalid(format!(
                    "descriptor {i}: addr {:#x} + len {} overflows 64 bits",
                    t.addr, t.len
                )));
            }
        }
        Ok(())
    }
}

impl XferDescList {
    /// A DRAM list of `count` consecutive descriptors of `block` bytes from
    /// `offset` into the `size` bytes at address `base` (see
    /// [`XferDesc::in_range`]). Fails if a block does not lie inside.
    pub fn blocks_in(base: u64, size: usize, offset: usize, block: usize, count: usize) -> Result<XferDescList> {
        let mut l = XferDescList::with_capacity(MemType::Dram, count.min(size));
        for i in 0..count {
            let at = i.checked_mul(block).and_then(|o| o.checked_add(offset)).ok_or_else(|| {
                Error::invalid(format!("block {i} of {block} bytes from {offset} overflows the address space"))
            })?;
            l.push(XferDesc::in_range(base, size, at, block)?);
        }
        Ok(l)
    }
}

/// The descriptors of an owned buffer. They live here rather than beside the
/// allocator so that `mem` does not depend on descriptors (`desc` sits above it).
impl AlignedBuf {
    /// A registration descriptor covering the whole buffer (DRAM, device 0).
    pub fn reg_desc(&self) -> RegDesc {
        RegDesc::new(self.addr(), self.len() as u64, 0)
    }

    /// A one-element registration list covering the whole buffer.
    pub fn reg_list(&self) -> RegDescList {
        let mut l = RegDescList::new(MemType::Dram);
        l.push(self.reg_desc());
        l
    }

    /// A transfer descriptor for `len` bytes at `offset` into the buffer.
    ///
    /// Fails if the range does not lie inside the buffer.
    pub fn xfer_desc(&self, offset: usize, len: usize) -> Result<XferDesc> {
        XferDesc::in_range(self.addr(), self.len(), offset, len)
    }

    /// A list of `count` consecutive descriptors of `block` bytes from `offset`.
    pub fn xfer_blocks(&self, offset: usize, block: usize, count: usize) -> Result<XferDescList> {
        XferDescList::blocks_in(self.addr(), self.len(), offset, block, count)
    }
}

impl RegDescList {
    /// The transfer descriptors of the same ranges (NIXL's `trim`).
    pub fn trim(&self) -> XferDescList {
        DescList { mem_type: self.mem_type, descs: self.descs.iter().map(RegDesc::xfer).collect() }
    }

    /// Fails if two descriptors of the list overlap on the same device.
    pub fn check_no_overlap(&self) -> Result<()> {
        let mut v: Vec<(usize, XferDesc)> = self.descs.iter().map(|d| d.xfer()).enumerate().collect();
        v.sort_by_key(|(_, d)| (d.dev_id, d.addr));
        for w in v.windows(2) {
            let (ia, a) = w[0];
            let (ib, b) = w[1];
            // A zero length storage registration covers the whole device.
            let a_end = if a.len == 0 { u64::MAX } else { a.end().unwrap_or(u64::MAX) };
            if a.dev_id == b.dev_id && b.addr < a_end {
                return Err(Error::invalid(format!(
                    "descriptors {ia} ({:#x}+{}) and {ib} ({:#x}+{}) overlap on device {}; register each range once",
                    a.addr, a.len, b.addr, b.len, a.dev_id
                )));
            }
        }
        Ok(())
    }
}

impl<D> Index<usize> for DescList<D> {
    type Output = D;
    fn index(&self, i: usize) -> &D {
        &self.descs[i]
    }
}

impl<'a, D> IntoIterator for &'a DescList<D> {
    type Item = &'a D;
    type IntoIter = std::slice::Iter<'a, D>;
    fn into_iter(self) -> Self::IntoIter {
        self.descs.iter()
    }
}

impl<D: Desc> Extend<D> for DescList<D> {
    fn extend<T: IntoIterator<Item = D>>(&mut self, iter: T) {
        self.descs.extend(iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_ops() {
        let mut l = XferDescList::new(MemType::Dram);
        l.push(XferDesc::new(1, 2, 0));
        l.push(XferDesc::new(10, 2, 0));
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].addr, 10);
        assert_eq!(l.remove(0).unwrap().addr, 1);
        assert!(l.remove(5).is_err());
        assert_eq!(l.iter().count(), 1);
        assert_eq!(l.total_len(), 2);
    }

    #[test]
    fn serialization_round_trips_and_rejects_garbage() {
        let mut r = RegDescList::new(MemType::File);
        r.push(RegDesc::with_meta(0, 0, 3, "rw:/tmp/x"));
        let b = r.to_bytes();
        assert_eq!(RegDescList::from_bytes(&b).unwrap(), r);
        assert_eq!(XferDescList::from_bytes(&b).unwrap_err().kind(), crate::ErrorKind::Mismatch);
        for cut in 0..b.len() {
            assert!(RegDescList::from_bytes(&b[..cut]).is_err());
        }
        assert!(RegDescList::from_bytes(b"garbage!").is_err());
        let mut future = b.clone();
        future[4] = 9;
        assert!(RegDescList::from_bytes(&future).unwrap_err().message().contains("version 9"));
        let mut trailing = b;
        trailing.push(0);
        assert!(RegDescList::from_bytes(&trailing).is_err());
    }

    #[test]
    fn buffer_descriptors_stay_inside_the_buffer() {
        let b = AlignedBuf::with_align(10_000, 4096).unwrap();
        assert!(b.xfer_desc(9_999, 2).is_err());
        assert!(b.xfer_desc(0, 0).is_err());
        assert_eq!(b.xfer_desc(9_999, 1).unwrap(), XferDesc::new(b.addr() + 9_999, 1, 0));
        let l = b.xfer_blocks(0, 1000, 10).unwrap();
        assert_eq!((l.len(), l.mem_type(), l[9].addr), (10, MemType::Dram, b.addr() + 9_000));
        assert!(b.xfer_blocks(0, 1000, 11).is_err());
        assert!(b.xfer_blocks(0, 1000, usize::MAX).is_err(), "a huge count is an error, not a huge allocation");
        assert!(b.xfer_blocks(usize::MAX, 1, 1).is_err());
        assert_eq!(b.reg_list()[0], RegDesc::new(b.addr(), 10_000, 0));
    }

    #[test]
    fn validation() {
        let l = XferDescList::from_descs(MemType::Dram, vec![XferDesc::new(0, 0, 0)]);
        assert!(l.validate(false).unwrap_err().message().contains("zero length"));
        let l = XferDescList::from_descs(MemType::Dram, vec![XferDesc::new(u64::MAX, 2, 0)]);
        assert!(l.validate(false).unwrap_err().message().contains("overflows"));
        let r = RegDescList::from_descs(MemType::Dram, vec![RegDesc::new(0, 100, 0), RegDesc::new(50, 100, 0)]);
        assert!(r.check_no_overlap().unwrap_err().message().contains("overlap"));
        let r = RegDescList::from_descs(MemType::Dram, vec![RegDesc::new(0, 100, 0), RegDesc::new(50, 100, 1)]);
        r.check_no_overlap().unwrap();
    }
}
