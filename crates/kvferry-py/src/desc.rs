//! Descriptor lists for Python: `XferDescList` and `RegDescList`, built from
//! lists of tuples, Nx3 integer arrays (anything with `__array_interface__`,
//! read in place without numpy) or a count; indexable, comparable, picklable.

use parking_lot::RwLock;
use pyo3::exceptions::{PyIndexError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple, PyType};

use kvferry::{MemType, RegDesc, RegDescList, XferDesc, XferDescList};

use crate::errors::kv;

/// NIXL's `nixl_mem_t` numbering: DRAM_SEG 0, VRAM_SEG 1, BLK_SEG 2, OBJ_SEG 3, FILE_SEG 4.
pub const NIXL_SEGS: [MemType; 5] = [MemType::Dram, MemType::Vram, MemType::Block, MemType::Obj, MemType::File];

/// Reads a memory type: a name (`"DRAM"`, `"cpu"`, ...) or NIXL's `nixl_mem_t` number.
pub fn mem_type(obj: &Bound<'_, PyAny>) -> PyResult<MemType> {
    if let Ok(s) = obj.cast::<PyString>() {
        let s = s.to_cow()?;
        return kv(s.parse::<MemType>());
    }
    if let Ok(i) = obj.extract::<i64>() {
        return usize::try_from(i).ok().and_then(|i| NIXL_SEGS.get(i).copied()).ok_or_else(|| {
            PyValueError::new_err(format!("memory type number {i} is not one of 0 (DRAM) .. 4 (FILE)"))
        });
    }
    Err(PyTypeError::new_err(format!(
        "memory type must be a name such as 'DRAM' or a nixl_mem_t, not {}",
        obj.get_type().name()?
    )))
}

/// An integer array exposed through `__array_interface__`: where its
/// elements are, how many, and how to read one.
struct ArrayView {
    ptr: usize,
    shape: Vec<usize>,
    itemsize: usize,
    signed: bool,
}

/// Reads `__array_interface__` of `obj`, if it has one. Only C-contiguous
/// little-endian integer arrays are taken; others get an error saying how
/// to convert them.
fn array_view(obj: &Bound<'_, PyAny>) -> PyResult<Option<ArrayView>> {
    let Ok(iface) = obj.getattr(pyo3::intern!(obj.py(), "__array_interface__")) else {
        return Ok(None);
    };
    let iface = iface.cast_into::<PyDict>()?;
    let get = |k: &str| -> PyResult<Bound<'_, PyAny>> {
        iface.get_item(k)?.ok_or_else(|| PyValueError::new_err(format!("__array_interface__ has no '{k}'")))
    };
    let typestr: String = get("typestr")?.extract()?;
    let (signed, itemsize) = match typestr.as_str() {
        "<i8" => (true, 8),
        "<u8" => (false, 8),
        "<i4" => (true, 4),
        "<u4" => (false, 4),
        other => {
            return Err(PyTypeError::new_err(format!(
                "integer array of dtype '{other}' is not supported: use int64, uint64, int32 or uint32 (arr.astype(numpy.uint64))"
            )))
        }
    };
    let shape: Vec<usize> = get("shape")?.extract()?;
    if let Some(strides) = iface.get_item("strides")? {
        if !strides.is_none() {
            let strides: Vec<isize> = strides.extract()?;
            let mut want = itemsize as isize;
            for (dim, s) in shape.iter().zip(strides.iter()).rev() {
                if *dim > 1 && *s != want {
                    return Err(PyValueError::new_err(
                        "the array is not C-contiguous: pass numpy.ascontiguousarray(arr)",
                    ));
                }
                want *= *dim as isize;
            }
        }
    }
    let (ptr, _readonly): (usize, bool) = get("data")?.extract()?;
    Ok(Some(ArrayView { ptr, shape, itemsize, signed }))
}

impl ArrayView {
    fn count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Element `i` as u64 (negative values are an error).
    ///
    /// # Safety
    ///
    /// The exporting object must be alive and `i < self.count()`.
    unsafe fn get(&self, i: usize) -> PyResult<u64> {
        let at = self.ptr + i * self.itemsize;
        // SAFETY: the caller holds the exporter alive and bounds `i`; the
        // interface promises `count()` elements of `itemsize` bytes at `ptr`;
        // unaligned reads are allowed for views at odd offsets.
        let v: i128 = unsafe {
            match (self.itemsize, self.signed) {
                (8, true) => std::ptr::read_unaligned(at as *const i64) as i128,
                (8, false) => std::ptr::read_unaligned(at as *const u64) as i128,
                (4, true) => std::ptr::read_unaligned(at as *const i32) as i128,
                _ => std::ptr::read_unaligned(at as *const u32) as i128,
            }
        };
        u64::try_from(v).map_err(|_| PyValueError::new_err(format!("element {i} of the array is negative ({v})")))
    }
}

/// Reads an index vector: a list of ints or a 1-D integer array.
pub fn indices(obj: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    if let Some(a) = array_view(obj)? {
        if a.shape.len() != 1 {
            return Err(PyValueError::new_err(format!("indices must be 1-D, not of shape {:?}", a.shape)));
        }
        let n = a.count();
        if a.itemsize == 8 && a.ptr % std::mem::align_of::<u64>() == 0 {
            // SAFETY: the caller borrows the exporter for this call; the
            // interface promises `n` aligned 8-byte elements at `ptr`.
            let words: &[u64] = unsafe { std::slice::from_raw_parts(a.ptr as *const u64, n) };
            if a.signed && words.iter().any(|w| w >> 63 != 0) {
                return Err(PyValueError::new_err("an index in the array is negative"));
            }
            return Ok(words.iter().map(|&w| w as usize).collect());
        }
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: `obj` (the exporter) is borrowed for this call and `i < n`.
            out.push(unsafe { a.get(i)? } as usize);
        }
        return Ok(out);
    }
    if let Ok(list) = obj.cast::<PyList>() {
        let mut out = Vec::with_capacity(list.len());
        for item in list.iter() {
            out.push(item.extract::<usize>()?);
        }
        return Ok(out);
    }
    obj.try_iter()?.map(|i| i?.extract::<usize>()).collect()
}

/// Rows of an Nx3 array as `(addr, len, dev)` triples.
fn rows(a: &ArrayView) -> PyResult<Vec<XferDesc>> {
    if a.shape.len() != 2 || a.shape[1] != 3 {
        return Err(PyValueError::new_err(format!(
            "a descriptor array must have shape (N, 3) of (address, length, device), not {:?}",
            a.shape
        )));
    }
    let n = a.shape[0];
    if a.itemsize == 8 && a.ptr % std::mem::align_of::<u64>() == 0 {
        // The common case (uint64 or int64, aligned): one pass over the rows.
        // SAFETY: the caller borrows the exporter for this call; the
        // interface promises `3 * n` aligned 8-byte elements at `ptr`.
        let words: &[u64] = unsafe { std::slice::from_raw_parts(a.ptr as *const u64, 3 * n) };
        if a.signed {
            let sign = words.iter().fold(0u64, |acc, w| acc | w);
            if sign >> 63 != 0 {
                let i = words.iter().position(|w| w >> 63 != 0).unwrap_or(0);
                return Err(PyValueError::new_err(format!(
                    "element {i} of the array is negative ({})",
                    words[i] as i64
                )));
            }
        }
        // A million rows is 24 MB of fresh memory: huge pages spare its page faults.
        let mut out: Vec<XferDesc> = Vec::new();
        kvferry::os::reserve_huge(&mut out, n);
        const _: () = assert!(std::mem::size_of::<XferDesc>() == 3 * std::mem::size_of::<u64>());
        // SAFETY: `XferDesc` is `repr(C)` of three `u64`s (asserted above), so
        // `n` rows of `words` are exactly `n` descriptors; `out` has room for
        // `n` (reserved above) and does not overlap the exporter's memory.
        unsafe {
            std::ptr::copy_nonoverlapping(words.as_ptr(), out.as_mut_ptr().cast::<u64>(), 3 * n);
            out.set_len(n);
        }
        return Ok(out);
    }
    let mut out = Vec::with_capacity(n);
    for r in 0..n {
        // SAFETY: the exporter is borrowed by the caller for this call and
        // `3 * r + 2 < 3 * n = count()`.
        let (addr, len, dev) = unsafe { (a.get(3 * r)?, a.get(3 * r + 1)?, a.get(3 * r + 2)?) };
        out.push(XferDesc::new(addr, len, dev));
    }
    Ok(out)
}

fn tuple_items<'py>(item: &Bound<'py, PyAny>, arity: usize, i: usize) -> PyResult<Bound<'py, PyTuple>> {
    let t = item.cast::<PyTuple>().map_err(|_| {
        let ty = item.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!("descriptor {i} must be a tuple, not {ty}"))
    })?;
    if t.len() != arity {
        return Err(PyValueError::new_err(format!("Each descriptor tuple must have exactly {arity} elements")));
    }
    Ok(t.clone())
}

fn meta_bytes(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(s.to_cow()?.as_bytes().to_vec());
    }
    if obj.is_none() {
        return Ok(Vec::new());
    }
    obj.extract::<Vec<u8>>()
}

/// Parses transfer descriptors from a count, an array or an iterable of 3-tuples.
pub fn parse_xfer(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<XferDesc>> {
    let Some(obj) = obj else { return Ok(Vec::new()) };
    if let Ok(n) = obj.extract::<usize>() {
        return Ok(vec![XferDesc::new(0, 0, 0); n]);
    }
    if let Some(a) = array_view(obj)? {
        return rows(&a);
    }
    let mut out = Vec::new();
    for (i, item) in obj.try_iter()?.enumerate() {
        let t = tuple_items(&item?, 3, i)?;
        out.push(XferDesc::new(t.get_item(0)?.extract()?, t.get_item(1)?.extract()?, t.get_item(2)?.extract()?));
    }
    Ok(out)
}

/// Parses registration descriptors from a count, an array (empty meta info)
/// or an iterable of 4-tuples (meta info as `str` or `bytes`).
pub fn parse_reg(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<RegDesc>> {
    let Some(obj) = obj else { return Ok(Vec::new()) };
    if let Ok(n) = obj.extract::<usize>() {
        return Ok(vec![RegDesc::new(0, 0, 0); n]);
    }
    if let Some(a) = array_view(obj)? {
        return Ok(rows(&a)?.into_iter().map(|d| RegDesc::new(d.addr, d.len, d.dev_id)).collect());
    }
    let mut out = Vec::new();
    for (i, item) in obj.try_iter()?.enumerate() {
        let t = tuple_items(&item?, 4, i)?;
        out.push(RegDesc::with_meta(
            t.get_item(0)?.extract()?,
            t.get_item(1)?.extract()?,
            t.get_item(2)?.extract()?,
            meta_bytes(&t.get_item(3)?)?,
        ));
    }
    Ok(out)
}

fn index(i: isize, len: usize) -> PyResult<usize> {
    let j = if i < 0 { i + len as isize } else { i };
    if j < 0 || j as usize >= len {
        return Err(PyIndexError::new_err(format!("descriptor index {i} is out of range for a list of {len}")));
    }
    Ok(j as usize)
}

/// A list of transfer descriptors `(addr, len, dev_id)` of one memory type.
///
/// `XferDescList("DRAM", [(addr, len, dev), ...])`, or with an Nx3 integer
/// array, or a count of zeroed descriptors.
#[pyclass(subclass, frozen, module = "kvferry._kvferry", name = "XferDescList")]
#[derive(Debug)]
pub struct PyXferDescList {
    pub(crate) list: RwLock<XferDescList>,
}

impl PyXferDescList {
    /// Wraps a Rust list.
    pub fn wrap(list: XferDescList) -> Self {
        PyXferDescList { list: RwLock::new(list) }
    }

    /// A copy of the Rust list.
    pub fn get(&self) -> XferDescList {
        self.list.read().clone()
    }
}

#[pymethods]
impl PyXferDescList {
    #[new]
    #[pyo3(signature = (mem_type, descs = None, is_sorted = None))]
    fn new(
        mem_type: &Bound<'_, PyAny>,
        descs: Option<&Bound<'_, PyAny>>,
        is_sorted: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let _ = is_sorted; // NIXL's legacy keyword, accepted and ignored.
        let mt = self::mem_type(mem_type)?;
        Ok(Self::wrap(XferDescList::from_descs(mt, parse_xfer(descs)?)))
    }

    /// The memory type's name (`"DRAM"`, ...).
    #[getter]
    fn mem_type(&self) -> &'static str {
        self.list.read().mem_type().as_str()
    }

    fn __len__(&self) -> usize {
        self.list.read().len()
    }

    fn __getitem__(&self, i: isize) -> PyResult<(u64, u64, u64)> {
        let l = self.list.read();
        let d = l[index(i, l.len())?];
        Ok((d.addr, d.len, d.dev_id))
    }

    fn __setitem__(&self, i: isize, d: (u64, u64, u64)) -> PyResult<()> {
        let mut l = self.list.write();
        let j = index(i, l.len())?;
        let mt = l.mem_type();
        let mut v: Vec<XferDesc> = l.as_slice().to_vec();
        v[j] = XferDesc::new(d.0, d.1, d.2);
        *l = XferDescList::from_descs(mt, v);
        Ok(())
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let items: Vec<(u64, u64, u64)> = self.list.read().iter().map(|d| (d.addr, d.len, d.dev_id)).collect();
        Ok(PyList::new(py, items)?.into_any().try_iter()?.into_any())
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        match other.cast::<PyXferDescList>() {
            Ok(o) => std::ptr::eq(self, o.get()) || *self.list.read() == *o.get().list.read(),
            Err(_) => false,
        }
    }

    fn __repr__(&self) -> String {
        let l = self.list.read();
        let shown: Vec<String> =
            l.iter().take(8).map(|d| format!("({:#x}, {}, {})", d.addr, d.len, d.dev_id)).collect();
        let more = if l.len() > 8 { format!(", ... {} more", l.len() - 8) } else { String::new() };
        format!("XferDescList({}, [{}{more}])", l.mem_type(), shown.join(", "))
    }

    /// Appends one `(addr, len, dev_id)` descriptor.
    fn append(&self, d: (u64, u64, u64)) {
        self.list.write().push(XferDesc::new(d.0, d.1, d.2));
    }

    /// Removes and returns the descriptor at `i`.
    fn remove(&self, i: isize) -> PyResult<(u64, u64, u64)> {
        let mut l = self.list.write();
        let j = index(i, l.len())?;
        let d = kv(l.remove(j))?;
        Ok((d.addr, d.len, d.dev_id))
    }

    /// The position of the first descriptor equal to `d`, or -1.
    fn index(&self, d: (u64, u64, u64)) -> i64 {
        let want = XferDesc::new(d.0, d.1, d.2);
        self.list.read().iter().position(|x| *x == want).map(|p| p as i64).unwrap_or(-1)
    }

    /// Removes every descriptor.
    fn clear(&self) {
        let mt = self.list.read().mem_type();
        *self.list.write() = XferDescList::new(mt);
    }

    /// Sum of the descriptors' lengths.
    fn total_len(&self) -> u64 {
        self.list.read().total_len()
    }

    /// The list as compact bytes (see `from_bytes`).
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.list.read().to_bytes())
    }

    /// A list from `to_bytes` output (checked: malformed bytes raise).
    #[classmethod]
    fn from_bytes<'py>(cls: &Bound<'py, PyType>, data: &[u8]) -> PyResult<Bound<'py, PyAny>> {
        let list = kv(XferDescList::from_bytes(data))?;
        let obj = cls.call1((list.mem_type().as_str(),))?;
        *obj.cast::<PyXferDescList>()?.get().list.write() = list;
        Ok(obj)
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (&'static str,), Bound<'py, PyBytes>)> {
        let me = slf.get();
        let mt = me.list.read().mem_type().as_str();
        Ok((slf.get_type().into_any(), (mt,), me.to_bytes(slf.py())))
    }

    fn __setstate__(&self, state: &[u8]) -> PyResult<()> {
        *self.list.write() = kv(XferDescList::from_bytes(state))?;
        Ok(())
    }
}

/// A list of registration descriptors `(addr, len, dev_id, meta_info)` of one
/// memory type. `RegDescList("FILE", [(0, 0, fd, b""), ...])`, or with an
/// Nx3 integer array (empty meta info), or a count.
#[pyclass(subclass, frozen, module = "kvferry._kvferry", name = "RegDescList")]
#[derive(Debug)]
pub struct PyRegDescList {
    pub(crate) list: RwLock<RegDescList>,
}

impl PyRegDescList {
    /// Wraps a Rust list.
    pub fn wrap(list: RegDescList) -> Self {
        PyRegDescList { list: RwLock::new(list) }
    }

    /// A copy of the Rust list.
    pub fn get(&self) -> RegDescList {
        self.list.read().clone()
    }
}

fn reg_tuple<'py>(py: Python<'py>, d: &RegDesc) -> (u64, u64, u64, Bound<'py, PyBytes>) {
    (d.addr, d.len, d.dev_id, PyBytes::new(py, &d.meta_info))
}

#[pymethods]
impl PyRegDescList {
    #[new]
    #[pyo3(signature = (mem_type, descs = None, is_sorted = None))]
    fn new(
        mem_type: &Bound<'_, PyAny>,
        descs: Option<&Bound<'_, PyAny>>,
        is_sorted: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let _ = is_sorted; // NIXL's legacy keyword, accepted and ignored.
        let mt = self::mem_type(mem_type)?;
        Ok(Self::wrap(RegDescList::from_descs(mt, parse_reg(descs)?)))
    }

    /// The memory type's name (`"DRAM"`, ...).
    #[getter]
    fn mem_type(&self) -> &'static str {
        self.list.read().mem_type().as_str()
    }

    fn __len__(&self) -> usize {
        self.list.read().len()
    }

    fn __getitem__<'py>(&self, py: Python<'py>, i: isize) -> PyResult<(u64, u64, u64, Bound<'py, PyBytes>)> {
        let l = self.list.read();
        Ok(reg_tuple(py, &l[index(i, l.len())?]))
    }

    fn __setitem__(&self, i: isize, d: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut one = parse_reg(Some(&PyList::new(d.py(), [d])?.into_any()))?;
        let mut l = self.list.write();
        let j = index(i, l.len())?;
        let mt = l.mem_type();
        let mut v: Vec<RegDesc> = l.as_slice().to_vec();
        v[j] = one.remove(0);
        *l = RegDescList::from_descs(mt, v);
        Ok(())
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let items: Vec<_> = self.list.read().iter().map(|d| reg_tuple(py, d)).collect();
        Ok(PyList::new(py, items)?.into_any().try_iter()?.into_any())
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        match other.cast::<PyRegDescList>() {
            Ok(o) => std::ptr::eq(self, o.get()) || *self.list.read() == *o.get().list.read(),
            Err(_) => false,
        }
    }

    fn __repr__(&self) -> String {
        let l = self.list.read();
        let shown: Vec<String> = l
            .iter()
            .take(8)
            .map(|d| format!("({:#x}, {}, {}, {:?})", d.addr, d.len, d.dev_id, String::from_utf8_lossy(&d.meta_info)))
            .collect();
        let more = if l.len() > 8 { format!(", ... {} more", l.len() - 8) } else { String::new() };
        format!("RegDescList({}, [{}{more}])", l.mem_type(), shown.join(", "))
    }

    /// Appends one `(addr, len, dev_id, meta_info)` descriptor.
    fn append(&self, d: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut one = parse_reg(Some(&PyList::new(d.py(), [d])?.into_any()))?;
        self.list.write().push(one.remove(0));
        Ok(())
    }

    /// Removes and returns the descriptor at `i`.
    fn remove<'py>(&self, py: Python<'py>, i: isize) -> PyResult<(u64, u64, u64, Bound<'py, PyBytes>)> {
        let mut l = self.list.write();
        let j = index(i, l.len())?;
        let d = kv(l.remove(j))?;
        Ok(reg_tuple(py, &d))
    }

    /// The position of the first descriptor equal to `d`, or -1.
    fn index(&self, d: &Bound<'_, PyAny>) -> PyResult<i64> {
        let want = parse_reg(Some(&PyList::new(d.py(), [d])?.into_any()))?.remove(0);
        Ok(self.list.read().iter().position(|x| *x == want).map(|p| p as i64).unwrap_or(-1))
    }

    /// Removes every descriptor.
    fn clear(&self) {
        let mt = self.list.read().mem_type();
        *self.list.write() = RegDescList::new(mt);
    }

    /// The transfer descriptors of the same ranges (meta info dropped), as
    /// an `XferDescList` or, with `cls`, that subclass of it.
    #[pyo3(signature = (cls = None))]
    fn trim<'py>(&self, py: Python<'py>, cls: Option<&Bound<'py, PyType>>) -> PyResult<Bound<'py, PyAny>> {
        let list = self.list.read().trim();
        match cls {
            None => Ok(Bound::new(py, PyXferDescList::wrap(list))?.into_any()),
            Some(cls) => {
                let obj = cls.call1((list.mem_type().as_str(),))?;
                *obj.cast::<PyXferDescList>()?.get().list.write() = list;
                Ok(obj)
            }
        }
    }

    /// Sum of the descriptors' lengths.
    fn total_len(&self) -> u64 {
        self.list.read().total_len()
    }

    /// The list as compact bytes (see `from_bytes`).
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.list.read().to_bytes())
    }

    /// A list from `to_bytes` output (checked: malformed bytes raise).
    #[classmethod]
    fn from_bytes<'py>(cls: &Bound<'py, PyType>, data: &[u8]) -> PyResult<Bound<'py, PyAny>> {
        let list = kv(RegDescList::from_bytes(data))?;
        let obj = cls.call1((list.mem_type().as_str(),))?;
        *obj.cast::<PyRegDescList>()?.get().list.write() = list;
        Ok(obj)
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (&'static str,), Bound<'py, PyBytes>)> {
        let me = slf.get();
        let mt = me.list.read().mem_type().as_str();
        Ok((slf.get_type().into_any(), (mt,), me.to_bytes(slf.py())))
    }

    fn __setstate__(&self, state: &[u8]) -> PyResult<()> {
        *self.list.write() = kv(RegDescList::from_bytes(state))?;
        Ok(())
    }
}
