//! VRAM registration: without CUDA a clear error naming what is missing;
//! with a GPU the pointer-attribute checks (host memory as VRAM, a wrong
//! ordinal, a range past its allocation). GPU cases skip, saying why, where
//! no device is present; scripts/gpu-check.sh runs them on a GPU machine.

use kvferry::{cuda_status, Agent, DeviceBuf, ErrorKind, MemType, RegDesc, RegDescList};

fn vram(addr: u64, len: u64, dev: u64) -> RegDescList {
    RegDescList::from_descs(MemType::Vram, vec![RegDesc::new(addr, len, dev)])
}

#[test]
fn without_cuda_vram_registration_and_allocation_fail_clearly() {
    let st = cuda_status();
    if st.driver_error.is_none() && !st.devices.is_empty() {
        eprintln!("skipped: CUDA is present here ({} devices); the GPU cases below cover it", st.devices.len());
        return;
    }
    let a = Agent::with_backends("gpu-none", &["local"]).unwrap();
    let buf = vec![0u8; 4096];
    // SAFETY: the registration is refused before any backend sees the memory.
    let e = unsafe { a.register_mem(&vram(buf.as_ptr() as u64, 4096, 0), &[]) }.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported, "{e}");
    assert!(e.to_string().contains("needs CUDA") && e.to_string().contains("libcuda"), "{e}");
    let e = DeviceBuf::new(0, 1 << 20).unwrap_err();
    assert!(e.to_string().contains("needs CUDA"), "{e}");
    assert!(st.driver_error.unwrap().contains("libcuda"));
    assert!(!st.cufile);
}

#[test]
fn gpu_vram_registration_checks_pointer_attributes() {
    let st = cuda_status();
    if st.devices.is_empty() {
        eprintln!("skipped: no CUDA device ({})", st.driver_error.unwrap_or_default());
        return;
    }
    let a = Agent::with_backends("gpu-reg", &["local"]).unwrap();
    let d = DeviceBuf::new(0, 1 << 20).unwrap();
    let host = vec![0u8; 4096];
    // SAFETY: refused registrations touch nothing.
    let e = unsafe { a.register_mem(&vram(host.as_ptr() as u64, 4096, 0), &[]) }.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidParam, "{e}");
    let n = st.devices.len() as u64;
    // SAFETY: as above.
    let e = unsafe { a.register_mem(&vram(d.addr(), 4096, n), &[]) }.unwrap_err();
    assert!(e.to_string().contains("names no CUDA device"), "{e}");
    // SAFETY: as above.
    let e = unsafe { a.register_mem(&vram(d.addr(), 2 << 20, 0), &[]) }.unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
    d.write(0, &[9u8; 4096]).unwrap();
    let mut back = vec![0u8; 4096];
    d.read(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 9));
}
