//! The CUDA driver API (`libcuda.so.1`) and cuFile (`libcufile.so.0`),
//! loaded at run time with `dlopen`, so that one binary runs with and without
//! a GPU. Every symbol is resolved when the library is loaded; a missing one
//! makes the whole load fail with its name, never a later call.
//!
//! A minimal loader instead of `cudarc`: kvferry needs about thirty entry
//! points, and a table of function pointers behind one `dlopen` costs no
//! compile time, cannot panic when the library is absent, and keeps every
//! `unsafe` of the GPU boundary in this one file.

// Streams, events, pinned memory and IPC are loaded for the CUDA copy
// engine, not yet written (docs/GPU.md); the registration checks use the rest.
#![allow(dead_code)]

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};

/// `CUresult`: 0 is success.
pub(crate) type CuResult = c_int;
/// `CUdeviceptr`.
pub(crate) type DevPtr = u64;
/// `CUdevice`.
pub(crate) type Device = c_int;
/// `CUcontext`, `CUstream`, `CUevent`: opaque handles.
pub(crate) type Handle = *mut c_void;

/// `CUDA_ERROR_NOT_READY`: an event or stream has work left.
pub(crate) const NOT_READY: CuResult = 600;
/// `CU_POINTER_ATTRIBUTE_MEMORY_TYPE`.
pub(crate) const ATTR_MEMORY_TYPE: c_int = 2;
/// `CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL`.
pub(crate) const ATTR_DEVICE_ORDINAL: c_int = 9;
/// `CU_POINTER_ATTRIBUTE_RANGE_START_ADDR`.
pub(crate) const ATTR_RANGE_START: c_int = 11;
/// `CU_POINTER_ATTRIBUTE_RANGE_SIZE`.
pub(crate) const ATTR_RANGE_SIZE: c_int = 12;
/// `CU_MEMORYTYPE_DEVICE`.
pub(crate) const MEMORYTYPE_DEVICE: c_uint = 2;
/// `CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING`.
pub(crate) const DEV_ATTR_UNIFIED_ADDRESSING: c_int = 41;
/// `CU_DEVICE_ATTRIBUTE_PCI_BUS_ID`.
pub(crate) const DEV_ATTR_PCI_BUS_ID: c_int = 33;
/// `CU_STREAM_NON_BLOCKING`.
const STREAM_NON_BLOCKING: c_uint = 1;
/// `CU_EVENT_DISABLE_TIMING`.
const EVENT_DISABLE_TIMING: c_uint = 2;
/// `CU_MEMHOSTALLOC_PORTABLE`.
const MEMHOSTALLOC_PORTABLE: c_uint = 1;
/// `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`.
const IPC_LAZY_ENABLE_PEER_ACCESS: c_uint = 1;
/// `CU_IPC_HANDLE_SIZE`.
pub(crate) const IPC_HANDLE_SIZE: usize = 64;

/// `CUipcMemHandle`: 64 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IpcHandle(pub(crate) [u8; IPC_HANDLE_SIZE]);

/// Declares the table of driver entry points and its loader in one place.
macro_rules! driver_table {
    ($( $field:ident = $sym:literal : fn($($arg:ty),*) ;)*) => {
        /// The driver's entry points, resolved once.
        #[allow(non_snake_case)]
        struct Fns { $( $field: unsafe extern "C" fn($($arg),*) -> CuResult, )* }

        impl Fns {
            /// # Safety
            ///
            /// `lib` must be a live handle from `dlopen` of the CUDA driver.
            unsafe fn resolve(lib: *mut c_void) -> Result<Fns, String> {
                Ok(Fns { $( $field: {
                    // SAFETY: the caller passes a live handle; the symbol name is NUL-terminated.
                    let p = unsafe { libc::dlsym(lib, concat!($sym, "\0").as_ptr().cast()) };
                    if p.is_null() {
                        return Err(format!("symbol {} missing (driver too old?)", $sym));
                    }
                    // SAFETY: the driver exports this symbol with this C signature
                    // (cuda.h of CUDA 11 and later); a data pointer and a function
                    // pointer have the same size on every platform CUDA supports.
                    unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) -> CuResult>(p) }
                }, )* })
            }
        }
    };
}

driver_table! {
    init = "cuInit": fn(c_uint);
    driver_version = "cuDriverGetVersion": fn(*mut c_int);
    device_count = "cuDeviceGetCount": fn(*mut c_int);
    device_get = "cuDeviceGet": fn(*mut Device, c_int);
    device_name = "cuDeviceGetName": fn(*mut c_char, c_int, Device);
    device_total_mem = "cuDeviceTotalMem_v2": fn(*mut usize, Device);
    device_attr = "cuDeviceGetAttribute": fn(*mut c_int, c_int, Device);
    primary_retain = "cuDevicePrimaryCtxRetain": fn(*mut Handle, Device);
    ctx_set_current = "cuCtxSetCurrent": fn(Handle);
    pointer_attr = "cuPointerGetAttribute": fn(*mut c_void, c_int, DevPtr);
    mem_alloc = "cuMemAlloc_v2": fn(*mut DevPtr, usize);
    mem_free = "cuMemFree_v2": fn(DevPtr);
    memcpy_async = "cuMemcpyAsync": fn(DevPtr, DevPtr, usize, Handle);
    memcpy = "cuMemcpy": fn(DevPtr, DevPtr, usize);
    stream_create = "cuStreamCreate": fn(*mut Handle, c_uint);
    stream_destroy = "cuStreamDestroy_v2": fn(Handle);
    event_create = "cuEventCreate": fn(*mut Handle, c_uint);
    event_record = "cuEventRecord": fn(Handle, Handle);
    event_query = "cuEventQuery": fn(Handle);
    event_destroy = "cuEventDestroy_v2": fn(Handle);
    host_alloc = "cuMemHostAlloc": fn(*mut *mut c_void, usize, c_uint);
    host_free = "cuMemFreeHost": fn(*mut c_void);
    ipc_get = "cuIpcGetMemHandle": fn(*mut IpcHandle, DevPtr);
    ipc_open = "cuIpcOpenMemHandle_v2": fn(*mut DevPtr, IpcHandle, c_uint);
    ipc_close = "cuIpcCloseMemHandle": fn(DevPtr);
    error_string = "cuGetErrorString": fn(CuResult, *mut *const c_char);
}

/// A driver call failed: the call's name and the driver's code and text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CuError {
    /// The entry point, e.g. `cuMemAlloc_v2`.
    pub(crate) call: &'static str,
    /// The `CUresult`.
    pub(crate) code: CuResult,
    /// The driver's description of the code.
    pub(crate) text: String,
}

impl std::fmt::Display for CuError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: CUDA error {} ({})", self.call, self.code, self.text)
    }
}

/// The loaded CUDA driver. Never unloaded: it lives for the process.
pub(crate) struct Driver {
    fns: Fns,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Driver(libcuda.so.1)")
    }
}

// SAFETY: the table holds plain function pointers into a library that is
// never unloaded; the CUDA driver API is thread-safe.
unsafe impl Send for Driver {}
// SAFETY: as above.
unsafe impl Sync for Driver {}

/// `dlopen`s the first of `names` that loads; the `dlerror` text of the last otherwise.
fn open_lib(names: &[&str]) -> Result<*mut c_void, String> {
    let mut last = String::new();
    for n in names {
        let c = CString::new(*n).map_err(|_| "library name holds a NUL".to_string())?;
        // SAFETY: `c` is NUL-terminated; dlopen has no other precondition.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !h.is_null() {
            return Ok(h);
        }
        // SAFETY: dlerror returns null or a NUL-terminated thread-local string.
        let e = unsafe { libc::dlerror() };
        last = if e.is_null() {
            format!("{n}: not found")
        } else {
            // SAFETY: non-null, NUL-terminated (above); copied at once.
            unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
        };
    }
    Err(last)
}

impl Driver {
    /// Loads `libcuda.so.1` (or `$KVFERRY_LIBCUDA`) and runs `cuInit(0)`.
    /// Errors say what is missing: the library, a symbol, or a usable device.
    pub(crate) fn load() -> Result<Driver, String> {
        let own = std::env::var("KVFERRY_LIBCUDA").ok();
        let names: Vec<&str> = own.as_deref().into_iter().chain(["libcuda.so.1", "libcuda.so"]).collect();
        let lib = open_lib(&names).map_err(|e| format!("libcuda.so.1 could not be loaded ({e})"))?;
        // SAFETY: `lib` is the live handle just returned by dlopen; never closed.
        let fns = unsafe { Fns::resolve(lib) }.map_err(|e| format!("libcuda.so.1 loaded but {e}"))?;
        let d = Driver { fns };
        // SAFETY: cuInit takes flags only; 0 is the documented value.
        d.check("cuInit", unsafe { (d.fns.init)(0) }).map_err(|e| format!("{e}: the driver found no usable GPU"))?;
        Ok(d)
    }

    fn check(&self, call: &'static str, code: CuResult) -> Result<(), CuError> {
        if code == 0 {
            return Ok(());
        }
        let mut p: *const c_char = std::ptr::null();
        // SAFETY: p is a valid out-pointer; the driver stores a static string or leaves it null.
        let r = unsafe { (self.fns.error_string)(code, &mut p) };
        let text = if r == 0 && !p.is_null() {
            // SAFETY: a static NUL-terminated string of the driver.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        } else {
            "unknown error".into()
        };
        Err(CuError { call, code, text })
    }

    /// `cuDriverGetVersion`: e.g. 12080 for CUDA 12.8.
    pub(crate) fn version(&self) -> Result<i32, CuError> {
        let mut v = 0;
        // SAFETY: valid out-pointer.
        self.check("cuDriverGetVersion", unsafe { (self.fns.driver_version)(&mut v) })?;
        Ok(v)
    }

    /// `cuDeviceGetCount`.
    pub(crate) fn device_count(&self) -> Result<i32, CuError> {
        let mut n = 0;
        // SAFETY: valid out-pointer.
        self.check("cuDeviceGetCount", unsafe { (self.fns.device_count)(&mut n) })?;
        Ok(n)
    }

    /// `cuDeviceGet` of an ordinal.
    pub(crate) fn device(&self, ordinal: i32) -> Result<Device, CuError> {
        let mut d = 0;
        // SAFETY: valid out-pointer; the driver checks the ordinal.
        self.check("cuDeviceGet", unsafe { (self.fns.device_get)(&mut d, ordinal) })?;
        Ok(d)
    }

    /// The device's name, total memory and an integer attribute.
    pub(crate) fn device_name(&self, d: Device) -> Result<String, CuError> {
        let mut buf = [0 as c_char; 256];
        // SAFETY: the buffer holds 256 bytes and its length is passed.
        self.check("cuDeviceGetName", unsafe { (self.fns.device_name)(buf.as_mut_ptr(), 256, d) })?;
        // SAFETY: the driver NUL-terminates within the given length; the last byte stays 0.
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
    }

    /// `cuDeviceTotalMem_v2`.
    pub(crate) fn device_total_mem(&self, d: Device) -> Result<usize, CuError> {
        let mut n = 0;
        // SAFETY: valid out-pointer.
        self.check("cuDeviceTotalMem_v2", unsafe { (self.fns.device_total_mem)(&mut n, d) })?;
        Ok(n)
    }

    /// `cuDeviceGetAttribute`.
    pub(crate) fn device_attr(&self, d: Device, attr: c_int) -> Result<i32, CuError> {
        let mut v = 0;
        // SAFETY: valid out-pointer; the driver checks the attribute.
        self.check("cuDeviceGetAttribute", unsafe { (self.fns.device_attr)(&mut v, attr, d) })?;
        Ok(v)
    }

    /// Makes the primary context of `ordinal` current on the calling thread
    /// (retained once per call; primary contexts live for the process).
    pub(crate) fn make_current(&self, ordinal: i32) -> Result<(), CuError> {
        let d = self.device(ordinal)?;
        let mut ctx: Handle = std::ptr::null_mut();
        // SAFETY: valid out-pointer and a device from cuDeviceGet.
        self.check("cuDevicePrimaryCtxRetain", unsafe { (self.fns.primary_retain)(&mut ctx, d) })?;
        // SAFETY: a context the driver just returned.
        self.check("cuCtxSetCurrent", unsafe { (self.fns.ctx_set_current)(ctx) })
    }

    /// `cuPointerGetAttribute` of a 4-byte attribute.
    pub(crate) fn pointer_attr_u32(&self, ptr: DevPtr, attr: c_int) -> Result<u32, CuError> {
        let mut v: c_uint = 0;
        // SAFETY: the out-pointer holds 4 bytes, the size of these attributes.
        self.check("cuPointerGetAttribute", unsafe {
            (self.fns.pointer_attr)((&mut v as *mut c_uint).cast(), attr, ptr)
        })?;
        Ok(v)
    }

    /// `cuPointerGetAttribute` of an 8-byte attribute (range start and size).
    pub(crate) fn pointer_attr_u64(&self, ptr: DevPtr, attr: c_int) -> Result<u64, CuError> {
        let mut v: u64 = 0;
        // SAFETY: the out-pointer holds 8 bytes, the size of these attributes.
        self.check("cuPointerGetAttribute", unsafe {
            (self.fns.pointer_attr)((&mut v as *mut u64).cast(), attr, ptr)
        })?;
        Ok(v)
    }

    /// `cuMemAlloc_v2` in the current context.
    pub(crate) fn mem_alloc(&self, len: usize) -> Result<DevPtr, CuError> {
        let mut p = 0;
        // SAFETY: valid out-pointer.
        self.check("cuMemAlloc_v2", unsafe { (self.fns.mem_alloc)(&mut p, len) })?;
        Ok(p)
    }

    /// `cuMemFree_v2`.
    ///
    /// # Safety
    ///
    /// `p` came from [`Driver::mem_alloc`] and no copy still uses it.
    pub(crate) unsafe fn mem_free(&self, p: DevPtr) -> Result<(), CuError> {
        // SAFETY: the caller's contract.
        self.check("cuMemFree_v2", unsafe { (self.fns.mem_free)(p) })
    }

    /// `cuMemcpyAsync` on a stream (unified addressing: any direction).
    ///
    /// # Safety
    ///
    /// `dst` and `src` name `len` bytes of memory that stay valid, and that
    /// nothing else writes (`dst`) or frees, until the copy completes.
    pub(crate) unsafe fn memcpy_async(&self, dst: DevPtr, src: DevPtr, len: usize, s: Handle) -> Result<(), CuError> {
        // SAFETY: the caller's contract; `s` is a stream of ours.
        self.check("cuMemcpyAsync", unsafe { (self.fns.memcpy_async)(dst, src, len, s) })
    }

    /// `cuMemcpy`, synchronous.
    ///
    /// # Safety
    ///
    /// As [`Driver::memcpy_async`], for the duration of the call.
    pub(crate) unsafe fn memcpy(&self, dst: DevPtr, src: DevPtr, len: usize) -> Result<(), CuError> {
        // SAFETY: the caller's contract.
        self.check("cuMemcpy", unsafe { (self.fns.memcpy)(dst, src, len) })
    }

    /// A non-blocking stream in the current context.
    pub(crate) fn stream_create(&self) -> Result<Handle, CuError> {
        let mut s = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        self.check("cuStreamCreate", unsafe { (self.fns.stream_create)(&mut s, STREAM_NON_BLOCKING) })?;
        Ok(s)
    }

    /// # Safety
    ///
    /// `s` is a stream of ours with no pending work anyone waits for.
    pub(crate) unsafe fn stream_destroy(&self, s: Handle) {
        // SAFETY: the caller's contract.
        let _ = unsafe { (self.fns.stream_destroy)(s) };
    }

    /// An event without timing.
    pub(crate) fn event_create(&self) -> Result<Handle, CuError> {
        let mut e = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        self.check("cuEventCreate", unsafe { (self.fns.event_create)(&mut e, EVENT_DISABLE_TIMING) })?;
        Ok(e)
    }

    /// Records `e` on `s`.
    pub(crate) fn event_record(&self, e: Handle, s: Handle) -> Result<(), CuError> {
        // SAFETY: an event and a stream of ours, of one context.
        self.check("cuEventRecord", unsafe { (self.fns.event_record)(e, s) })
    }

    /// `Ok(true)` when the work before the event completed, `Ok(false)` while it runs.
    pub(crate) fn event_done(&self, e: Handle) -> Result<bool, CuError> {
        // SAFETY: an event of ours.
        match unsafe { (self.fns.event_query)(e) } {
            NOT_READY => Ok(false),
            r => self.check("cuEventQuery", r).map(|()| true),
        }
    }

    /// # Safety
    ///
    /// `e` is an event of ours, not used afterwards.
    pub(crate) unsafe fn event_destroy(&self, e: Handle) {
        // SAFETY: the caller's contract.
        let _ = unsafe { (self.fns.event_destroy)(e) };
    }

    /// Pinned, portable host memory.
    pub(crate) fn host_alloc(&self, len: usize) -> Result<*mut u8, CuError> {
        let mut p = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        self.check("cuMemHostAlloc", unsafe { (self.fns.host_alloc)(&mut p, len, MEMHOSTALLOC_PORTABLE) })?;
        Ok(p.cast())
    }

    /// # Safety
    ///
    /// `p` came from [`Driver::host_alloc`] and no copy still uses it.
    pub(crate) unsafe fn host_free(&self, p: *mut u8) {
        // SAFETY: the caller's contract.
        let _ = unsafe { (self.fns.host_free)(p.cast()) };
    }

    /// `cuIpcGetMemHandle` of an allocation's base.
    pub(crate) fn ipc_get(&self, p: DevPtr) -> Result<IpcHandle, CuError> {
        let mut h = IpcHandle([0; IPC_HANDLE_SIZE]);
        // SAFETY: valid out-pointer of the handle's size.
        self.check("cuIpcGetMemHandle", unsafe { (self.fns.ipc_get)(&mut h, p) })?;
        Ok(h)
    }

    /// `cuIpcOpenMemHandle_v2` in the current context.
    pub(crate) fn ipc_open(&self, h: IpcHandle) -> Result<DevPtr, CuError> {
        let mut p = 0;
        // SAFETY: valid out-pointer; the driver validates the handle.
        self.check("cuIpcOpenMemHandle_v2", unsafe { (self.fns.ipc_open)(&mut p, h, IPC_LAZY_ENABLE_PEER_ACCESS) })?;
        Ok(p)
    }

    /// # Safety
    ///
    /// `p` came from [`Driver::ipc_open`] and no copy still uses it.
    pub(crate) unsafe fn ipc_close(&self, p: DevPtr) -> Result<(), CuError> {
        // SAFETY: the caller's contract.
        self.check("cuIpcCloseMemHandle", unsafe { (self.fns.ipc_close)(p) })
    }
}

/// `CUfileError_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CuFileError {
    err: c_int,
    cu_err: CuResult,
}

/// Loads cuFile (`libcufile.so.0`, or `$KVFERRY_LIBCUFILE`) and opens its
/// driver (`cuFileDriverOpen`); the library stays loaded. `Err` says which
/// step failed. The CUDA driver must be initialized first.
pub(crate) fn cufile_open() -> Result<(), String> {
    let own = std::env::var("KVFERRY_LIBCUFILE").ok();
    let names: Vec<&str> = own.as_deref().into_iter().chain(["libcufile.so.0", "libcufile.so"]).collect();
    let lib = open_lib(&names).map_err(|e| format!("libcufile.so.0 could not be loaded ({e})"))?;
    // SAFETY: a live handle from dlopen; the name is NUL-terminated.
    let p = unsafe { libc::dlsym(lib, c"cuFileDriverOpen".as_ptr()) };
    if p.is_null() {
        return Err("libcufile.so.0 loaded but symbol cuFileDriverOpen is missing".into());
    }
    // SAFETY: cuFileDriverOpen is `CUfileError_t cuFileDriverOpen(void)` (cufile.h).
    let open = unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> CuFileError>(p) };
    // SAFETY: no arguments; the library is loaded.
    let r = unsafe { open() };
    if r.err != 0 {
        return Err(format!("cuFileDriverOpen failed: cuFile error {} (CUDA error {})", r.err, r.cu_err));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_an_error_naming_it() {
        let e = open_lib(&["libkvferry-does-not-exist.so.9"]).unwrap_err();
        assert!(e.contains("libkvferry-does-not-exist.so.9"), "{e}");
    }

    #[test]
    fn a_library_without_the_driver_symbols_names_the_first_missing() {
        // libc loads everywhere and exports none of the driver's symbols.
        let lib = open_lib(&["libc.so.6"]).unwrap();
        // SAFETY: a live handle from dlopen.
        let e = unsafe { Fns::resolve(lib) }.err().unwrap();
        assert!(e.contains("cuInit"), "{e}");
    }
}
