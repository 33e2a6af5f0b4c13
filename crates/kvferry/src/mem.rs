//! Memory types and the owned, aligned buffer that the safe registration API takes.

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::desc::{RegDesc, RegDescList, XferDesc, XferDescList};
use crate::error::{Error, Result};

/// Where the bytes a descriptor names live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MemType {
    /// Host memory: `addr` is a virtual address of the owning process, `dev_id` is 0.
    Dram,
    /// GPU memory: `addr` is a device address, `dev_id` the CUDA ordinal.
    Vram,
    /// A block device: `addr` is a byte offset, `dev_id` names the device.
    Block,
    /// An object in an object store: `addr` is an offset, `dev_id` the key id.
    Obj,
    /// A file: `addr` is a byte offset, `dev_id` a file descriptor or registered file id.
    File,
}

impl MemType {
    /// Every memory type, in a fixed order.
    pub const ALL: [MemType; 5] = [MemType::Dram, MemType::Vram, MemType::Block, MemType::Obj, MemType::File];

    /// NIXL's spelling: `DRAM`, `VRAM`, `BLOCK`, `OBJ`, `FILE`.
    pub fn as_str(self) -> &'static str {
        match self {
            MemType::Dram => "DRAM",
            MemType::Vram => "VRAM",
            MemType::Block => "BLOCK",
            MemType::Obj => "OBJ",
            MemType::File => "FILE",
        }
    }

    /// Whether a registration of length 0 means "the whole file, device or object".
    pub fn is_storage(self) -> bool {
        matches!(self, MemType::Block | MemType::Obj | MemType::File)
    }
}

impl fmt::Display for MemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MemType {
    type Err = Error;

    /// Parses NIXL's names case-insensitively, plus the aliases NIXL's Python
    /// API accepts (`cpu`, `cuda`, `gpu`, `BLK`, `OBJECT`).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_uppercase().as_str() {
            "DRAM" | "CPU" => Ok(MemType::Dram),
            "VRAM" | "CUDA" | "GPU" => Ok(MemType::Vram),
            "BLOCK" | "BLK" => Ok(MemType::Block),
            "OBJ" | "OBJECT" => Ok(MemType::Obj),
            "FILE" => Ok(MemType::File),
            _ => {
                Err(Error::invalid(format!("unknown memory type '{s}': expected one of DRAM, VRAM, BLOCK, OBJ, FILE")))
            }
        }
    }
}

/// The system page size, used as the default alignment of [`AlignedBuf`].
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions; it returns -1 on error, handled below.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

struct RawAlloc {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: RawAlloc is a plain heap allocation with no thread affinity; access to
// its bytes is coordinated by the transfer protocol, as with any DMA buffer.
unsafe impl Send for RawAlloc {}
// SAFETY: see above; RawAlloc itself holds no interior state besides the bytes.
unsafe impl Sync for RawAlloc {}

impl Drop for RawAlloc {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by alloc_zeroed with this exact layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// An owned, zeroed, page-aligned (so O_DIRECT-ready) host buffer.
///
/// It is the memory-safe way to take part in transfers: registering it with
/// [`Agent::register_buf`](crate::Agent::register_buf) keeps the allocation
/// alive for as long as the registration exists, even if the `AlignedBuf` is
/// dropped first.
///
/// While a transfer that targets this buffer is in flight, its bytes may
/// change under a shared borrow, exactly as with any buffer a NIC or DMA
/// engine writes into. Read the contents once the transfer is complete.
///
/// ```
/// let mut buf = kvferry::AlignedBuf::new(1 << 20).unwrap();
/// buf.as_mut_slice()[0] = 7;
/// assert_eq!(buf.addr() % 4096, 0);
/// ```
pub struct AlignedBuf {
    alloc: Arc<RawAlloc>,
    len: usize,
}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to the page size.
    pub fn new(len: usize) -> Result<Self> {
        Self::with_align(len, page_size())
    }

    /// Allocates `len` zeroed bytes aligned to `align` (a power of two).
    pub fn with_align(len: usize, align: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::invalid("AlignedBuf length is 0: ask for at least one byte"));
        }
        let layout = Layout::from_size_align(len, align).map_err(|_| {
            Error::invalid(format!("AlignedBuf: alignment {align} is not a power of two, or {len} bytes is too large"))
        })?;
        // SAFETY: layout has a non-zero size (len > 0 checked above).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr)
            .ok_or_else(|| Error::new(crate::ErrorKind::Backend, format!("out of memory allocating {len} bytes")))?;
        Ok(AlignedBuf { alloc: Arc::new(RawAlloc { ptr, layout }), len })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a buffer has at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The address of the first byte.
    pub fn as_ptr(&self) -> *const u8 {
        self.alloc.ptr.as_ptr()
    }

    /// The address of the first byte, for writing.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.alloc.ptr.as_ptr()
    }

    /// The address of the first byte as a descriptor address.
    pub fn addr(&self) -> u64 {
        self.as_ptr() as u64
    }

    /// The contents.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the allocation holds len initialized (zeroed) bytes and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// The contents, for writing.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access from this handle.
        unsafe { std::slice::from_raw_parts_mut(self.alloc.ptr.as_ptr(), self.len) }
    }

    /// A registration descriptor covering the whole buffer (DRAM, device 0).
    pub fn reg_desc(&self) -> RegDesc {
        RegDesc::new(self.addr(), self.len as u64, 0)
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
        match offset.checked_add(len) {
            Some(end) if end <= self.len && len > 0 => Ok(XferDesc::new(self.addr() + offset as u64, len as u64, 0)),
            _ => {
                Err(Error::invalid(format!("range {offset}+{len} is outside the {}-byte buffer (or empty)", self.len)))
            }
        }
    }

    /// A list of `count` consecutive descriptors of `block` bytes from `offset`.
    pub fn xfer_blocks(&self, offset: usize, block: usize, count: usize) -> Result<XferDescList> {
        let mut l = XferDescList::with_capacity(MemType::Dram, count);
        for i in 0..count {
            l.push(self.xfer_desc(offset + i * block, block)?);
        }
        Ok(l)
    }

    pub(crate) fn keepalive(&self) -> Arc<dyn std::any::Any + Send + Sync> {
        self.alloc.clone()
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf").field("addr", &format_args!("{:#x}", self.addr())).field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_type_names_round_trip() {
        for m in MemType::ALL {
            assert_eq!(m.as_str().parse::<MemType>().unwrap(), m);
        }
        assert_eq!("cuda".parse::<MemType>().unwrap(), MemType::Vram);
        let e = "HBM".parse::<MemType>().unwrap_err();
        assert!(e.message().contains("DRAM, VRAM"), "{e}");
    }

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        let b = AlignedBuf::with_align(10_000, 4096).unwrap();
        assert_eq!(b.addr() % 4096, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        assert!(AlignedBuf::new(0).is_err());
        assert!(AlignedBuf::with_align(8, 3).is_err());
        assert!(b.xfer_desc(9_999, 2).is_err());
        assert_eq!(b.xfer_blocks(0, 1000, 10).unwrap().len(), 10);
    }
}
