//! CUDA, loaded at run time: whether a driver and devices are present
//! ([`cuda_status`]), the checks of a VRAM registration (pointer attributes
//! and ordinal), device allocations for tests and benches ([`DeviceBuf`]),
//! and the staging pipeline that moves VRAM through pinned host chunks
//! (`staging.rs`), written against a copy-engine trait so that it is tested
//! with host memory standing in for the device.
//!
//! Nothing here panics when CUDA is absent: the driver is loaded once, on
//! first use, and every entry point returns the reason it is unavailable.

use std::sync::OnceLock;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::sys::cuda::{self as cu, Driver};

pub(crate) mod staging;

/// The driver, loaded on first use; the reason it is not there otherwise.
fn loaded() -> &'static std::result::Result<Driver, String> {
    static DRIVER: OnceLock<std::result::Result<Driver, String>> = OnceLock::new();
    DRIVER.get_or_init(Driver::load)
}

/// The driver, or an error for `what` naming what is missing and what to do.
pub(crate) fn driver(what: &str) -> Result<&'static Driver> {
    loaded().as_ref().map_err(|e| {
        Error::not_supported(format!(
            "{what} needs CUDA, which is not available here: {e}; install the NVIDIA driver on a machine with a GPU, or use DRAM"
        ))
    })
}

/// One CUDA device as [`cuda_status`] reports it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CudaDevice {
    /// The CUDA ordinal (a VRAM descriptor's `dev_id`).
    pub ordinal: u32,
    /// The device's name.
    pub name: String,
    /// Total memory in bytes.
    pub total_mem: u64,
    /// Unified addressing (kvferry's copies need it).
    pub unified_addressing: bool,
}

/// What CUDA offers on this machine, with the reason for each "no".
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CudaStatus {
    /// The driver's version (e.g. 12080 for CUDA 12.8), when it loaded.
    pub driver_version: Option<i32>,
    /// Why the driver is unavailable, when it is.
    pub driver_error: Option<String>,
    /// The devices the driver sees.
    pub devices: Vec<CudaDevice>,
    /// Whether cuFile's driver opened (GPUDirect Storage).
    pub cufile: bool,
    /// Why cuFile is unavailable, when it is.
    pub cufile_error: Option<String>,
}

/// Probes the CUDA driver, its devices and cuFile. Never panics.
pub fn cuda_status() -> CudaStatus {
    let mut st =
        CudaStatus { driver_version: None, driver_error: None, devices: Vec::new(), cufile: false, cufile_error: None };
    let d = match loaded() {
        Ok(d) => d,
        Err(e) => {
            st.driver_error = Some(e.clone());
            st.cufile_error = Some("needs the CUDA driver".into());
            return st;
        }
    };
    st.driver_version = d.version().ok();
    match d.device_count() {
        Ok(n) => {
            for i in 0..n {
                match device_info(d, i) {
                    Ok(dev) => st.devices.push(dev),
                    Err(e) => st.driver_error = Some(format!("device {i}: {e}")),
                }
            }
        }
        Err(e) => st.driver_error = Some(e.to_string()),
    }
    match cu::cufile_open() {
        Ok(()) => st.cufile = true,
        Err(e) => st.cufile_error = Some(e),
    }
    st
}

fn device_info(d: &Driver, i: i32) -> std::result::Result<CudaDevice, cu::CuError> {
    let dev = d.device(i)?;
    Ok(CudaDevice {
        ordinal: i as u32,
        name: d.device_name(dev)?,
        total_mem: d.device_total_mem(dev)? as u64,
        unified_addressing: d.device_attr(dev, cu::DEV_ATTR_UNIFIED_ADDRESSING)? != 0,
    })
}

/// Checks that `[addr, addr + len)` is device memory of CUDA device `ordinal`
/// inside one allocation: what a VRAM registration must name.
pub(crate) fn check_vram(addr: u64, len: u64, ordinal: u64) -> Result<()> {
    let d = driver("registering VRAM")?;
    let ord =
        i32::try_from(ordinal).map_err(|_| Error::invalid(format!("VRAM dev_id {ordinal} is not a CUDA ordinal")))?;
    let n = d.device_count().map_err(|e| Error::not_supported(e.to_string()))?;
    if ord >= n {
        return Err(Error::invalid(format!(
            "VRAM dev_id {ordinal} names no CUDA device: this machine has {n} (ordinals 0..{n})"
        )));
    }
    d.make_current(ord).map_err(|e| Error::not_supported(format!("CUDA device {ord}: {e}")))?;
    let not_vram = |why: String| {
        Error::invalid(format!(
            "VRAM descriptor {addr:#x}+{len} (dev {ordinal}) is not CUDA device memory: {why}; register host memory as DRAM"
        ))
    };
    let mt = d.pointer_attr_u32(addr, cu::ATTR_MEMORY_TYPE).map_err(|e| not_vram(e.to_string()))?;
    if mt != cu::MEMORYTYPE_DEVICE {
        return Err(not_vram(format!("the driver reports memory type {mt}, not device (2)")));
    }
    let dev = d.pointer_attr_u32(addr, cu::ATTR_DEVICE_ORDINAL).map_err(|e| not_vram(e.to_string()))?;
    if u64::from(dev) != ordinal {
        return Err(Error::invalid(format!(
            "VRAM descriptor {addr:#x}+{len} lies on CUDA device {dev}, not on dev_id {ordinal}; pass the ordinal of the device that holds it"
        )));
    }
    let start = d.pointer_attr_u64(addr, cu::ATTR_RANGE_START).map_err(|e| not_vram(e.to_string()))?;
    let size = d.pointer_attr_u64(addr, cu::ATTR_RANGE_SIZE).map_err(|e| not_vram(e.to_string()))?;
    let end = addr.checked_add(len).ok_or_else(|| Error::invalid("VRAM descriptor: addr + len overflows"))?;
    if end > start.saturating_add(size) {
        return Err(Error::invalid(format!(
            "VRAM descriptor {addr:#x}+{len} runs past the end of its allocation ({start:#x}+{size})"
        )));
    }
    Ok(())
}

/// Device memory allocated with `cuMemAlloc` on one device, freed on drop:
/// for tests, benches and tools that need VRAM without a framework.
#[derive(Debug)]
pub struct DeviceBuf {
    ptr: u64,
    len: usize,
    ordinal: u32,
}

impl DeviceBuf {
    /// Allocates `len` bytes on CUDA device `ordinal`. Errors name what is
    /// missing when CUDA or the device is not there.
    pub fn new(ordinal: u32, len: usize) -> Result<DeviceBuf> {
        let d = driver("allocating VRAM")?;
        let ord = i32::try_from(ordinal).map_err(|_| Error::invalid("CUDA ordinal out of range"))?;
        d.make_current(ord).map_err(|e| Error::not_supported(format!("CUDA device {ordinal}: {e}")))?;
        let ptr = d.mem_alloc(len.max(1)).map_err(|e| Error::new(crate::ErrorKind::Backend, e.to_string()))?;
        Ok(DeviceBuf { ptr, len, ordinal })
    }

    /// The device address.
    pub fn addr(&self) -> u64 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The CUDA ordinal (the `dev_id` of its descriptors).
    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    /// Copies `src` into the buffer at `off` (synchronous).
    pub fn write(&self, off: usize, src: &[u8]) -> Result<()> {
        self.bounds(off, src.len())?;
        let d = driver("copying to VRAM")?;
        d.make_current(self.ordinal as i32).map_err(|e| Error::not_supported(e.to_string()))?;
        // SAFETY: the range lies inside our allocation (checked); `src` is a live slice.
        unsafe { d.memcpy(self.ptr + off as u64, src.as_ptr() as u64, src.len()) }
            .map_err(|e| Error::new(crate::ErrorKind::Backend, e.to_string()))
    }

    /// Copies from the buffer at `off` into `dst` (synchronous).
    pub fn read(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        self.bounds(off, dst.len())?;
        let d = driver("copying from VRAM")?;
        d.make_current(self.ordinal as i32).map_err(|e| Error::not_supported(e.to_string()))?;
        // SAFETY: the range lies inside our allocation (checked); `dst` is a live, exclusive slice.
        unsafe { d.memcpy(dst.as_mut_ptr() as u64, self.ptr + off as u64, dst.len()) }
            .map_err(|e| Error::new(crate::ErrorKind::Backend, e.to_string()))
    }

    fn bounds(&self, off: usize, n: usize) -> Result<()> {
        if off.checked_add(n).is_none_or(|e| e > self.len) {
            return Err(Error::invalid(format!("DeviceBuf: {off}+{n} is outside its {} bytes", self.len)));
        }
        Ok(())
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        if let Ok(d) = driver("freeing VRAM") {
            // SAFETY: our allocation; the synchronous copies above completed.
            if let Err(e) = unsafe { d.mem_free(self.ptr) } {
                tracing::warn!(error = %e, "freeing VRAM");
            }
        }
    }
}
