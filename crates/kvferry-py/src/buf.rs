//! `AlignedBuf` for Python: page-aligned DRAM that numpy can view without a
//! copy (`numpy.asarray(buf)`, through `__array_interface__`).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use kvferry::AlignedBuf;

use crate::desc::{PyRegDescList, PyXferDescList};
use crate::errors::kv;

/// Page-aligned, zeroed DRAM owned by kvferry.
#[pyclass(subclass, frozen, module = "kvferry._kvferry", name = "AlignedBuf")]
#[derive(Debug)]
pub struct PyAlignedBuf {
    pub(crate) buf: AlignedBuf,
}

impl PyAlignedBuf {
    fn check(&self, offset: usize, len: usize) -> PyResult<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.buf.len()) {
            return Err(PyValueError::new_err(format!(
                "range {offset}+{len} is outside the buffer of {} bytes",
                self.buf.len()
            )));
        }
        Ok(())
    }
}

#[pymethods]
impl PyAlignedBuf {
    /// Allocates `size` zeroed bytes aligned to `align` (0: the page size;
    /// `huge`: 2 MiB huge pages where the OS has them).
    #[new]
    #[pyo3(signature = (size, align = 0, huge = false))]
    fn new(size: usize, align: usize, huge: bool) -> PyResult<Self> {
        let buf = if huge {
            AlignedBuf::huge(size)
        } else if align == 0 {
            AlignedBuf::new(size)
        } else {
            AlignedBuf::with_align(size, align)
        };
        Ok(PyAlignedBuf { buf: kv(buf)? })
    }

    /// The address of the first byte.
    #[getter]
    fn addr(&self) -> u64 {
        self.buf.addr()
    }

    fn __len__(&self) -> usize {
        self.buf.len()
    }

    /// numpy's array interface: a writable 1-D uint8 view of the whole buffer.
    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("shape", (self.buf.len(),))?;
        d.set_item("typestr", "|u1")?;
        d.set_item("data", (self.buf.addr(), false))?;
        d.set_item("version", 3)?;
        Ok(d)
    }

    /// A registration list of the whole buffer (DRAM, dev 0).
    fn reg_descs(&self) -> PyRegDescList {
        PyRegDescList::wrap(self.buf.reg_list())
    }

    /// `count` transfer descriptors of `block` bytes each from `offset`.
    #[pyo3(signature = (offset = 0, block = None, count = 1))]
    fn xfer_descs(&self, offset: usize, block: Option<usize>, count: usize) -> PyResult<PyXferDescList> {
        let block = block.unwrap_or(self.buf.len().saturating_sub(offset));
        Ok(PyXferDescList::wrap(kv(self.buf.xfer_blocks(offset, block, count))?))
    }

    /// Copies `len` bytes from `offset` out.
    #[pyo3(signature = (offset = 0, len = None))]
    fn read<'py>(&self, py: Python<'py>, offset: usize, len: Option<usize>) -> PyResult<Bound<'py, PyBytes>> {
        let len = len.unwrap_or(self.buf.len().saturating_sub(offset));
        self.check(offset, len)?;
        Ok(PyBytes::new(py, &self.buf.as_slice()[offset..offset + len]))
    }

    /// Copies `data` in at `offset`.
    #[pyo3(signature = (data, offset = 0))]
    fn write(&self, data: &[u8], offset: usize) -> PyResult<()> {
        self.check(offset, data.len())?;
        // SAFETY: the range was checked to lie inside the allocation, which
        // lives as long as `self`; like numpy views of the buffer, writes
        // through the shared handle are the Python program's to order.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), (self.buf.addr() as usize + offset) as *mut u8, data.len())
        };
        Ok(())
    }

    /// Sets every byte of `offset..offset+len` (default: all) to `byte`.
    #[pyo3(signature = (byte, offset = 0, len = None))]
    fn fill(&self, byte: u8, offset: usize, len: Option<usize>) -> PyResult<()> {
        let len = len.unwrap_or(self.buf.len().saturating_sub(offset));
        self.check(offset, len)?;
        // SAFETY: as in `write`: a checked range of the live allocation.
        unsafe { std::ptr::write_bytes((self.buf.addr() as usize + offset) as *mut u8, byte, len) };
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("AlignedBuf({} bytes at {:#x})", self.buf.len(), self.buf.addr())
    }
}
