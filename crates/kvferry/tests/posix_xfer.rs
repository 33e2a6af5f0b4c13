//! POSIX backend: DRAM ↔ FILE and DRAM ↔ BLOCK round trips, verified byte for
//! byte, on both engines, buffered and O_DIRECT, path mode and fd mode.

mod posix_support;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use kvferry::{AlignedBuf, ErrorKind, MemType, RegDesc, RegDescList, XferOp};
use kvferry_test_support::fill;
use kvferry_test_support::fs::{skipped, LoopDev};
use kvferry_test_support::pattern::shuffled;
use posix_support::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Many 4 KiB descriptors, shuffled across several path-mode files: WRITE
/// them out, check the files with std, READ them back into another buffer.
fn many_descriptors_across_files(engine: &str, direct: bool, queue_bytes: &str, busy_poll_us: &str) {
    let test = format!("many-{engine}-{}-{queue_bytes}", if direct { "direct" } else { "buffered" });
    let dir = test_dir(&test);
    if direct {
        if let Err(why) = direct_support(&dir.0) {
            return skipped(&test, &format!("no O_DIRECT under {}: {why}", dir.0.display()));
        }
    }
    let params =
        [("queue_depth", "32"), ("threads", "4"), ("queue_bytes", queue_bytes), ("busy_poll_us", busy_poll_us)];
    let a = agent(&test, engine, &params);
    const FILES: u64 = 4;
    const BLOCK: u64 = 4 * KIB;
    const PER_FILE: u64 = 512;
    let total = FILES * PER_FILE * BLOCK;
    let mut src = AlignedBuf::new(total as usize).unwrap();
    fill(src.as_mut_slice(), 42);
    let dst = AlignedBuf::new(total as usize).unwrap();
    let _rs = a.register_buf(&src).unwrap();
    let _rd = a.register_buf(&dst).unwrap();
    let flags = if direct { "rw,direct,create,trunc" } else { "rw,create,trunc" };
    let mut files = RegDescList::new(MemType::File);
    for f in 0..FILES {
        let meta = format!("{flags}:{}", dir.path(&format!("f{f}")).display());
        files.push(RegDesc::with_meta(0, 0, 100 + f, meta));
    }
    let _rf = a.register_storage(&files, &[]).unwrap();

    // Block k of the buffer goes to file k % FILES at a shuffled slot.
    let order = shuffled((FILES * PER_FILE) as usize, 7);
    let mut dram = Vec::new();
    let mut file = Vec::new();
    for (k, &slot) in order.iter().enumerate() {
        let k = k as u64;
        let slot = slot as u64;
        dram.push((k * BLOCK, BLOCK));
        file.push(((slot / FILES) * BLOCK, BLOCK, 100 + slot % FILES));
    }
    let w = a
        .create_request(XferOp::Write, &dram_list(&src, &dram), &file_list(MemType::File, &file), &test, None)
        .unwrap();
    assert_eq!(a.chosen_backend(&w), "POSIX");
    run(&w).unwrap();
    for (k, &(off, len, dev)) in file.iter().enumerate() {
        let bytes = std::fs::read(dir.path(&format!("f{}", dev - 100))).unwrap();
        let got = &bytes[off as usize..(off + len) as usize];
        assert_eq!(got, &src.as_slice()[k * BLOCK as usize..(k + 1) * BLOCK as usize], "block {k} in the file");
    }
    let r =
        a.create_request(XferOp::Read, &dram_list(&dst, &dram), &file_list(MemType::File, &file), &test, None).unwrap();
    run(&r).unwrap();
    assert!(dst.as_slice() == src.as_slice(), "READ brought back every byte");
    // A request can be posted again.
    run(&r).unwrap();
    assert!(dst.as_slice() == src.as_slice());
}

#[test]
fn many_descriptors_buffered() {
    for e in engines("many_descriptors_buffered") {
        many_descriptors_across_files(e, false, "0", "1000");
    }
}

#[test]
fn many_descriptors_direct() {
    for e in engines("many_descriptors_direct") {
        many_descriptors_across_files(e, true, "0", "1000");
    }
}

/// With a byte budget of two and a half blocks, io_uring keeps at most three
/// 4 KiB I/Os in flight (the last one may overshoot), and still moves every
/// byte; waiters and the ring thread sleep at once (no polling).
#[test]
fn many_descriptors_with_a_byte_budget() {
    for e in engines("many_descriptors_with_a_byte_budget") {
        many_descriptors_across_files(e, true, "10K", "0");
    }
}

/// Large contiguous runs are merged by the agent and split again into
/// `max_io_size` I/Os; an odd tail and a 1-byte descriptor still arrive.
#[test]
fn large_and_odd_sized_runs() {
    for engine in engines("large_and_odd_sized_runs") {
        let test = format!("large-{engine}");
        let dir = test_dir(&test);
        let a = agent(&test, engine, &[("max_io_size", "64K")]);
        let n = 3 * MIB + 12345;
        let mut src = AlignedBuf::new(n as usize).unwrap();
        fill(src.as_mut_slice(), 3);
        let dst = AlignedBuf::new(n as usize).unwrap();
        let _r1 = a.register_buf(&src).unwrap();
        let _r2 = a.register_buf(&dst).unwrap();
        let meta = format!("rw,create:{}", dir.path("big").display());
        let _rf = a.register_storage(&reg(MemType::File, 0, 0, 1, &meta), &[]).unwrap();
        // 16 contiguous blocks (merged into one run), an odd tail, one byte.
        let mut dram: Vec<(u64, u64)> = (0..16).map(|i| (i * 192 * KIB, 192 * KIB)).collect();
        dram.push((3 * MIB, 12344));
        dram.push((3 * MIB + 12344, 1));
        let file: Vec<(u64, u64, u64)> = dram.iter().map(|&(o, l)| (o + 4096, l, 1)).collect();
        let fl = file_list(MemType::File, &file);
        run(&a.create_request(XferOp::Write, &dram_list(&src, &dram), &fl, &test, None).unwrap()).unwrap();
        let on_disk = std::fs::read(dir.path("big")).unwrap();
        assert_eq!(on_disk.len() as u64, n + 4096);
        assert!(on_disk[4096..] == *src.as_slice());
        run(&a.create_request(XferOp::Read, &dram_list(&dst, &dram), &fl, &test, None).unwrap()).unwrap();
        assert!(dst.as_slice() == src.as_slice());
    }
}

/// fd mode (NIXL's convention): dev_id is the caller's fd. The backend dups
/// it: the caller may close theirs, and deregistration never closes it.
#[test]
fn fd_mode_registration() {
    for engine in engines("fd_mode_registration") {
        let test = format!("fdmode-{engine}");
        let dir = test_dir(&test);
        let direct = direct_support(&dir.0).is_ok();
        let a = agent(&test, engine, &[]);
        let mut src = AlignedBuf::new(256 * KIB as usize).unwrap();
        fill(src.as_mut_slice(), 9);
        let dst = AlignedBuf::new(256 * KIB as usize).unwrap();
        let _r1 = a.register_buf(&src).unwrap();
        let _r2 = a.register_buf(&dst).unwrap();

        // A file the caller keeps open: registered as a 1 MiB range at offset 1 MiB.
        let mut kept = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(dir.path("kept"))
            .unwrap();
        let fd = kept.as_raw_fd() as u64;
        let rk = a.register_storage(&reg(MemType::File, MIB, MIB, fd, ""), &[]).unwrap();
        // A file whose fd the caller closes right after registering (len 0: whole file).
        let closed = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path("closed"))
            .unwrap();
        let cfd = closed.as_raw_fd() as u64;
        let _rc = a.register_storage(&reg(MemType::File, 0, 0, cfd, ""), &[]).unwrap();
        drop(closed);

        let half = 128 * KIB;
        let dram = dram_list(&src, &[(0, half), (half, half)]);
        let files = file_list(MemType::File, &[(MIB + 4096, half, fd), (8 * MIB, half, cfd)]);
        run(&a.create_request(XferOp::Write, &dram, &files, &test, None).unwrap()).unwrap();
        let back = dram_list(&dst, &[(0, half), (half, half)]);
        run(&a.create_request(XferOp::Read, &back, &files, &test, None).unwrap()).unwrap();
        assert!(dst.as_slice() == src.as_slice());
        let closed_bytes = std::fs::read(dir.path("closed")).unwrap();
        assert!(closed_bytes[8 * MIB as usize..] == src.as_slice()[half as usize..]);

        // Outside the registered 1 MiB range: refused before any byte moves.
        let e = a
            .create_request(
                XferOp::Write,
                &dram_list(&src, &[(0, 4096)]),
                &file_list(MemType::File, &[(0, 4096, fd)]),
                &test,
                None,
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotAllowed, "{e}");

        // Deregistering leaves the caller's fd open and usable.
        rk.deregister().unwrap();
        kept.seek(SeekFrom::Start(MIB + 4096)).unwrap();
        let mut first = AlignedBuf::new(4096).unwrap();
        kept.read_exact(first.as_mut_slice()).unwrap();
        assert_eq!(first.as_slice(), &src.as_slice()[..4096]);
        if !direct {
            kept.write_all(b"still mine").unwrap();
        }
    }
}

/// Path mode with a length-0 registration covers the whole file, at any offset.
#[test]
fn len0_registration_covers_whole_file() {
    for engine in engines("len0_registration") {
        let test = format!("len0-{engine}");
        let dir = test_dir(&test);
        let a = agent(&test, engine, &[]);
        let mut src = AlignedBuf::new(8192).unwrap();
        fill(src.as_mut_slice(), 5);
        let dst = AlignedBuf::new(8192).unwrap();
        let _r1 = a.register_buf(&src).unwrap();
        let _r2 = a.register_buf(&dst).unwrap();
        let meta = format!("rw,create:{}", dir.path("whole").display());
        let _rf = a.register_storage(&reg(MemType::File, 0, 0, 77, &meta), &[]).unwrap();
        let far = 40 * MIB + 7;
        let fl = file_list(MemType::File, &[(far, 8192, 77)]);
        run(&a.create_request(XferOp::Write, &dram_list(&src, &[(0, 8192)]), &fl, &test, None).unwrap()).unwrap();
        assert_eq!(std::fs::metadata(dir.path("whole")).unwrap().len(), far + 8192);
        run(&a.create_request(XferOp::Read, &dram_list(&dst, &[(0, 8192)]), &fl, &test, None).unwrap()).unwrap();
        assert!(dst.as_slice() == src.as_slice());
    }
}

/// DRAM ↔ BLOCK through a loop device, O_DIRECT, path mode and len 0.
#[test]
fn block_device_round_trip() {
    let test = "block_device_round_trip";
    let dir = test_dir("block");
    let img = dir.path("disk.img");
    std::fs::File::create(&img).unwrap().set_len(16 * MIB).unwrap();
    let lo = match LoopDev::attach(&img) {
        Ok(lo) => lo,
        Err(why) => return skipped(test, &format!("cannot attach a loop device (needs root and /dev/loop*): {why}")),
    };
    for engine in engines(test) {
        let name = format!("block-{engine}");
        let a = agent(&name, engine, &[]);
        let mut src = AlignedBuf::new(MIB as usize).unwrap();
        fill(src.as_mut_slice(), engine.len() as u64);
        let dst = AlignedBuf::new(MIB as usize).unwrap();
        let _r1 = a.register_buf(&src).unwrap();
        let _r2 = a.register_buf(&dst).unwrap();
        let _rb = a.register_storage(&reg(MemType::Block, 0, 0, 3, &format!("rw,direct:{}", lo.dev)), &[]).unwrap();
        let info = a.query_mem(&reg(MemType::Block, 0, 0, 3, &format!("r:{}", lo.dev))).unwrap();
        assert_eq!(info[0].unwrap().size, 16 * MIB, "a block device's size");
        let blocks: Vec<(u64, u64)> = (0..16).map(|i| (i * 64 * KIB, 64 * KIB)).collect();
        let dev: Vec<(u64, u64, u64)> = (0..16).rev().map(|i| (15 * MIB - i * 64 * KIB, 64 * KIB, 3)).collect();
        let bl = file_list(MemType::Block, &dev);
        run(&a.create_request(XferOp::Write, &dram_list(&src, &blocks), &bl, &name, None).unwrap()).unwrap();
        run(&a.create_request(XferOp::Read, &dram_list(&dst, &blocks), &bl, &name, None).unwrap()).unwrap();
        assert!(dst.as_slice() == src.as_slice());
        // Past the end of the device: refused when the request is made.
        let e = a
            .create_request(
                XferOp::Read,
                &dram_list(&dst, &[(0, 4096)]),
                &file_list(MemType::Block, &[(16 * MIB, 4096, 3)]),
                &name,
                None,
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotAllowed, "{e}");
        assert!(e.message().contains("device of"), "{e}");
    }
}

/// A notification attached to a local request reaches this agent after the data.
#[test]
fn attached_notification_follows_the_data() {
    let test = "posix-notif";
    let dir = test_dir(test);
    let a = agent(test, "auto", &[]);
    let src = AlignedBuf::new(4096).unwrap();
    let _r = a.register_buf(&src).unwrap();
    let meta = format!("rw,create:{}", dir.path("n").display());
    let _rf = a.register_storage(&reg(MemType::File, 0, 0, 1, &meta), &[]).unwrap();
    let req = a
        .create_request(
            XferOp::Write,
            &dram_list(&src, &[(0, 4096)]),
            &file_list(MemType::File, &[(0, 4096, 1)]),
            test,
            Some(b"flushed"),
        )
        .unwrap();
    run(&req).unwrap();
    assert_eq!(a.take_notifications()[test], vec![b"flushed".to_vec()]);
}

/// The io_uring engine with kernel submission-queue polling, and `auto`.
#[test]
fn sqpoll_and_auto_engines() {
    if engines("sqpoll").len() < 2 {
        return; // io_uring unavailable: already reported as skipped
    }
    for (name, extra) in [("posix-sqpoll", &[("sqpoll", "true")][..]), ("posix-auto", &[][..])] {
        let dir = test_dir(name);
        let engine = if extra.is_empty() { "auto" } else { "uring" };
        let a = agent(name, engine, extra);
        let mut src = AlignedBuf::new(256 * KIB as usize).unwrap();
        fill(src.as_mut_slice(), 11);
        let dst = AlignedBuf::new(256 * KIB as usize).unwrap();
        let _r1 = a.register_buf(&src).unwrap();
        let _r2 = a.register_buf(&dst).unwrap();
        let meta = format!("rw,create:{}", dir.path("s").display());
        let _rf = a.register_storage(&reg(MemType::File, 0, 0, 1, &meta), &[]).unwrap();
        let blocks: Vec<(u64, u64)> = (0..64).map(|i| (i * 4096, 4096)).collect();
        let file: Vec<(u64, u64, u64)> = (0..64).rev().map(|i| (i * 8192, 4096, 1)).collect();
        let fl = file_list(MemType::File, &file);
        run(&a.create_request(XferOp::Write, &dram_list(&src, &blocks), &fl, name, None).unwrap()).unwrap();
        run(&a.create_request(XferOp::Read, &dram_list(&dst, &blocks), &fl, name, None).unwrap()).unwrap();
        assert!(dst.as_slice() == src.as_slice());
    }
}
