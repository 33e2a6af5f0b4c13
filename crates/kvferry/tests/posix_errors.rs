//! POSIX backend: every error path gets a clear error, and a request that
//! lost bytes is never reported done.

mod posix_support;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvferry::{Agent, AgentConfig, AlignedBuf, ErrorKind, MemType, Params, XferOp};
use kvferry_test_support::fill;
use kvferry_test_support::fs::{skipped, Mount};
use posix_support::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// A misaligned O_DIRECT request fails at create_request, naming the field.
#[test]
fn misaligned_direct_names_the_field() {
    for engine in engines("misaligned_direct") {
        let test = format!("misaligned-{engine}");
        let dir = test_dir(&test);
        if let Err(why) = direct_support(&dir.0) {
            return skipped(&test, &format!("no O_DIRECT under {}: {why}", dir.0.display()));
        }
        let a = agent(&test, engine, &[]);
        let buf = AlignedBuf::new(64 * KIB as usize).unwrap();
        let _r = a.register_buf(&buf).unwrap();
        let meta = format!("rw,direct,create:{}", dir.path("d").display());
        let _rf = a.register_storage(&reg(MemType::File, 0, 0, 1, &meta), &[]).unwrap();
        for (field, mem_off, file_off, len) in
            [("address", 1, 0, 4096), ("offset", 0, 1, 4096), ("length", 0, 0, 4095), ("offset", 4096, 4097, 8192)]
        {
            let e = a
                .create_request(
                    XferOp::Write,
                    &dram_list(&buf, &[(mem_off, len)]),
                    &file_list(MemType::File, &[(file_off, len, 1)]),
                    &test,
                    None,
                )
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidParam, "{e}");
            assert!(e.message().contains(&format!("O_DIRECT {field} misaligned")), "{field}: {e}");
            assert!(e.message().contains("not a multiple of"), "the required alignment is named: {e}");
        }
        // The same request aligned works.
        let ok = a
            .create_request(
                XferOp::Write,
                &dram_list(&buf, &[(0, 4096)]),
                &file_list(MemType::File, &[(0, 4096, 1)]),
                &test,
                None,
            )
            .unwrap();
        run(&ok).unwrap();
    }
}

/// A full filesystem: the short write is retried, ENOSPC follows, and the
/// request fails instead of reporting done.
#[test]
fn enospc_is_an_error() {
    let test = "enospc_is_an_error";
    let dir = test_dir("enospc");
    let mnt = match Mount::tmpfs(&dir.path("mnt"), "1M") {
        Ok(m) => m,
        Err(why) => return skipped(test, &format!("cannot mount a 1 MiB tmpfs (needs root): {why}")),
    };
    for engine in engines(test) {
        let name = format!("enospc-{engine}");
        let a = agent(&name, engine, &[("max_io_size", "256K")]);
        let mut src = AlignedBuf::new(4 * MIB as usize).unwrap();
        fill(src.as_mut_slice(), 1);
        let _r = a.register_buf(&src).unwrap();
        let file = mnt.dir.join(format!("full-{engine}"));
        let _rf =
            a.register_storage(&reg(MemType::File, 0, 0, 1, &format!("rw,create:{}", file.display())), &[]).unwrap();
        let req = a
            .create_request(
                XferOp::Write,
                &dram_list(&src, &[(0, 4 * MIB)]),
                &file_list(MemType::File, &[(0, 4 * MIB, 1)]),
                &name,
                None,
            )
            .unwrap();
        req.post(None).unwrap();
        let e = req.wait(WAIT).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
        assert_eq!(e.io_error().and_then(|e| e.raw_os_error()), Some(libc::ENOSPC), "{e}");
        assert!(e.message().contains("filesystem is full"), "{e}");
        assert!(req.status().is_err(), "the error stays until the next post");
        drop(req);
        std::fs::remove_file(&file).unwrap();
    }
}

/// Reading past the end of a file is an error, never a short success.
#[test]
fn read_past_eof_is_an_error() {
    for engine in engines("read_past_eof") {
        for direct in [false, true] {
            let test = format!("eof-{engine}-{direct}");
            let dir = test_dir(&test);
            if direct && direct_support(&dir.0).is_err() {
                skipped(&test, "no O_DIRECT here");
                continue;
            }
            let p = dir.path("short");
            std::fs::write(&p, vec![7u8; 6144]).unwrap();
            let a = agent(&test, engine, &[]);
            let buf = AlignedBuf::new(16 * KIB as usize).unwrap();
            let _r = a.register_buf(&buf).unwrap();
            let flags = if direct { "r,direct" } else { "r" };
            let _rf =
                a.register_storage(&reg(MemType::File, 0, 0, 1, &format!("{flags}:{}", p.display())), &[]).unwrap();
            let req = a
                .create_request(
                    XferOp::Read,
                    &dram_list(&buf, &[(0, 8192), (8192, 8192)]),
                    &file_list(MemType::File, &[(0, 8192, 1), (8192, 8192, 1)]),
                    &test,
                    None,
                )
                .unwrap();
            req.post(None).unwrap();
            let e = req.wait(WAIT).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
            if !direct {
                assert!(e.message().contains("end of file"), "{e}");
            }
        }
    }
}

/// A file deregistered after a request was made: posting fails, nothing moves.
#[test]
fn deregistered_file_fails_the_post() {
    for engine in engines("deregistered_file") {
        let test = format!("dereg-{engine}");
        let dir = test_dir(&test);
        let a = agent(&test, engine, &[]);
        let buf = AlignedBuf::new(4096).unwrap();
        let _r = a.register_buf(&buf).unwrap();
        let meta = format!("rw,create:{}", dir.path("gone").display());
        let rf = a.register_storage(&reg(MemType::File, 0, 0, 1, &meta), &[]).unwrap();
        let fl = file_list(MemType::File, &[(0, 4096, 1)]);
        let req = a.create_request(XferOp::Write, &dram_list(&buf, &[(0, 4096)]), &fl, &test, None).unwrap();
        run(&req).unwrap();
        rf.deregister().unwrap();
        let e = req.post(None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        assert!(e.message().contains("deregistered"), "{e}");
        // A new request is refused by the agent at once.
        let e = a.create_request(XferOp::Write, &dram_list(&buf, &[(0, 4096)]), &fl, &test, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotAllowed, "{e}");
    }
}

/// Registration errors: bad meta_info, missing files, read-only files,
/// one dev_id for two files, not a file descriptor.
#[test]
fn registration_errors_are_clear() {
    let test = "posix-reg-errors";
    let dir = test_dir(test);
    let a = agent(test, "threads", &[]);
    let buf = AlignedBuf::new(4096).unwrap();
    let _r = a.register_buf(&buf).unwrap();
    let e = a.register_storage(&reg(MemType::File, 0, 0, 1, "rw,fast:/x"), &[]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidParam, "{e}");
    assert!(e.message().contains("unknown flag 'fast'"), "{e}");
    let missing = dir.path("missing");
    let e = a.register_storage(&reg(MemType::File, 0, 0, 1, &format!("rw:{}", missing.display())), &[]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.message().contains("add 'create'"), "{e}");
    let e = a.register_storage(&reg(MemType::File, 0, 0, 999_999, ""), &[]).unwrap_err();
    assert!(e.message().contains("not an open file descriptor"), "{e}");
    let dir_fd = std::fs::File::open(&dir.0).unwrap();
    let e = a.register_storage(&reg(MemType::File, 0, 0, dir_fd.as_raw_fd() as u64, ""), &[]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidParam, "{e}");

    // Read-only: READ works, WRITE is refused when the request is made.
    let ro = dir.path("ro");
    std::fs::write(&ro, [1u8; 4096]).unwrap();
    let _rf = a.register_storage(&reg(MemType::File, 0, 4096, 5, &format!("r:{}", ro.display())), &[]).unwrap();
    let fl = file_list(MemType::File, &[(0, 4096, 5)]);
    run(&a.create_request(XferOp::Read, &dram_list(&buf, &[(0, 4096)]), &fl, test, None).unwrap()).unwrap();
    assert!(buf.as_slice().iter().all(|&b| b == 1));
    let e = a.create_request(XferOp::Write, &dram_list(&buf, &[(0, 4096)]), &fl, test, None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAllowed, "{e}");
    assert!(e.message().contains("read-only"), "{e}");

    // dev 5 names 'ro'; another path under dev 5 is refused, the same one shares it.
    let other = format!("rw,create:{}", dir.path("other").display());
    let e = a.register_storage(&reg(MemType::File, 8192, 4096, 5, &other), &[]).unwrap_err();
    assert!(e.message().contains("one dev_id names one file"), "{e}");
    let _again = a.register_storage(&reg(MemType::File, 8192, 4096, 5, &format!("r:{}", ro.display())), &[]).unwrap();
}

/// Bad parameters are refused when the backend is created.
#[test]
fn bad_parameters_are_refused() {
    for (k, v, says) in [
        ("engine", "spdk", "auto, uring, threads"),
        ("threads", "0", "outside"),
        ("queue_depth", "100000", "outside"),
        ("max_io_size", "1000", "multiple of 4096"),
        ("sqpoll", "maybe", "boolean"),
        ("queue_bytes", "lots", "queue_bytes"),
        ("busy_poll_us", "2000000", "outside"),
    ] {
        let cfg = AgentConfig { backends: vec![("POSIX".into(), Params::new().with(k, v))], ..AgentConfig::default() };
        let e = Agent::new(&format!("posix-bad-{k}"), cfg).unwrap_err();
        assert!(e.message().contains(says), "{k}={v}: {e}");
    }
}

/// query_mem: size, mode and mtime, or None for what does not exist.
#[test]
fn query_mem_reports_files() {
    let test = "posix-query";
    let dir = test_dir(test);
    let a = agent(test, "threads", &[]);
    let p = dir.path("q");
    std::fs::write(&p, vec![0u8; 12345]).unwrap();
    let f = std::fs::File::open(&p).unwrap();
    let mut list = kvferry::RegDescList::new(MemType::File);
    list.push(kvferry::RegDesc::with_meta(0, 0, 0, format!("r:{}", p.display())));
    list.push(kvferry::RegDesc::with_meta(0, 0, 0, format!("r:{}", dir.path("nope").display())));
    list.push(kvferry::RegDesc::new(0, 0, f.as_raw_fd() as u64));
    list.push(kvferry::RegDesc::new(0, 0, 999_999));
    let info = a.query_mem(&list).unwrap();
    let q = info[0].expect("the file exists");
    assert_eq!(q.size, 12345);
    assert_eq!(q.mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(q.mtime, std::fs::metadata(&p).unwrap().modified().unwrap());
    assert!(info[1].is_none(), "a missing path is None");
    assert_eq!(info[2].expect("an open fd").size, 12345);
    assert!(info[3].is_none(), "a closed fd is None");
    // Nothing answers for DRAM.
    let dram = kvferry::RegDescList::from_descs(MemType::Dram, vec![kvferry::RegDesc::new(4096, 4096, 0)]);
    assert_eq!(a.query_mem(&dram).unwrap_err().kind(), ErrorKind::NotSupported);
}

/// Dropping a request in flight returns once no I/O touches its memory;
/// several threads post on one agent at once.
#[test]
fn drop_in_flight_and_concurrent_posts() {
    for engine in engines("drop_in_flight") {
        let test = format!("inflight-{engine}");
        let dir = test_dir(&test);
        let a = Arc::new(agent(&test, engine, &[("max_io_size", "64K"), ("queue_depth", "8"), ("threads", "2")]));
        let meta = format!("rw,create:{}", dir.path("f").display());
        let _rf = a.register_storage(&reg(MemType::File, 0, 0, 1, &meta), &[]).unwrap();
        {
            let buf = AlignedBuf::new(16 * MIB as usize).unwrap();
            let r = a.register_buf(&buf).unwrap();
            let req = a
                .create_request(
                    XferOp::Write,
                    &dram_list(&buf, &[(0, 16 * MIB)]),
                    &file_list(MemType::File, &[(0, 16 * MIB, 1)]),
                    &test,
                    None,
                )
                .unwrap();
            req.post(None).unwrap();
            drop(req);
            drop(r);
        }
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let a = a.clone();
                let test = test.clone();
                std::thread::spawn(move || {
                    let mut src = AlignedBuf::new(MIB as usize).unwrap();
                    fill(src.as_mut_slice(), t);
                    let dst = AlignedBuf::new(MIB as usize).unwrap();
                    let _r1 = a.register_buf(&src).unwrap();
                    let _r2 = a.register_buf(&dst).unwrap();
                    let fl = file_list(MemType::File, &[(32 * MIB + t * MIB, MIB, 1)]);
                    for _ in 0..3 {
                        let w =
                            a.create_request(XferOp::Write, &dram_list(&src, &[(0, MIB)]), &fl, &test, None).unwrap();
                        run(&w).unwrap();
                        let r =
                            a.create_request(XferOp::Read, &dram_list(&dst, &[(0, MIB)]), &fl, &test, None).unwrap();
                        run(&r).unwrap();
                        assert!(dst.as_slice() == src.as_slice());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
