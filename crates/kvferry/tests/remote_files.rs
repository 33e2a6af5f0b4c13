//! Remote file segments: a target exports files, an initiator moves bytes
//! between its DRAM and `(file_id, offset, len)` over TCP. Every error path:
//! unknown ids, ranges past the exported size, files that were never
//! exported, unexported files while others keep working, O_DIRECT alignment
//! at the target, and a full filesystem.
//! (Two processes and two network namespaces: see kvferry-cli's tests.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use kvferry::{
    Agent, AgentConfig, AlignedBuf, ErrorKind, MemType, Params, RegDesc, RegDescList, XferDesc, XferDescList, XferOp,
};
use kvferry_test_support::fs::{Mount, TestDir};
use kvferry_test_support::name;

const T: Duration = Duration::from_secs(10);

fn dir(tag: &str) -> PathBuf {
    // /var/tmp is on the real disk (O_DIRECT works there; /tmp may be tmpfs).
    let d = PathBuf::from(format!("/var/tmp/kvferry-rf-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pair() -> (Agent, Agent) {
    let target = Agent::new(
        &name("rf-target"),
        AgentConfig::default().with_backend("posix", Params::new()).with_backend("tcp", Params::new()),
    )
    .unwrap();
    let init = Agent::new(&name("rf-init"), AgentConfig::default().with_backend("tcp", Params::new())).unwrap();
    (target, init)
}

fn file(id: u64, off: u64, len: u64) -> XferDescList {
    XferDescList::from_descs(MemType::File, vec![XferDesc::new(off, len, id)])
}

fn run(init: &Agent, op: XferOp, local: &XferDescList, remote: &XferDescList, target: &str) -> kvferry::Result<()> {
    let r = init.create_request(op, local, remote, target, None)?;
    r.post(None)?;
    r.wait(T)
}

#[test]
fn write_read_and_every_error() {
    let d = dir("main");
    let (target, init) = pair();
    let f1 = target.register_local_file(d.join("f1"), 1 << 20, false).unwrap();
    let f2 = target.register_local_file(d.join("f2"), 1 << 20, false).unwrap();
    assert!(target
        .register_local_file(d.join("f1"), 1 << 20, false)
        .unwrap_err()
        .message()
        .contains("already exported"));
    init.load_remote_metadata(&target.local_metadata().unwrap()).unwrap();
    let files = init.remote_files(target.name()).unwrap();
    assert_eq!(files.len(), 2);
    assert!(files.iter().all(|f| f.size == 1 << 20 && f.alignment == 1));

    let mut buf = AlignedBuf::new(256 << 10).unwrap();
    for (i, b) in buf.as_mut_slice()[..64 << 10].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let _r = init.register_buf(&buf).unwrap();
    let src = buf.xfer_blocks(0, 64 << 10, 1).unwrap();
    let back = buf.xfer_blocks(64 << 10, 64 << 10, 1).unwrap();
    run(&init, XferOp::Write, &src, &file(f1, 4096, 64 << 10), target.name()).unwrap();
    let on_disk = std::fs::read(d.join("f1")).unwrap();
    assert_eq!(&on_disk[4096..4096 + (64 << 10)], &buf.as_slice()[..64 << 10], "the bytes are in the target's file");
    run(&init, XferOp::Read, &back, &file(f1, 4096, 64 << 10), target.name()).unwrap();
    assert_eq!(&buf.as_slice()[64 << 10..128 << 10], &buf.as_slice()[..64 << 10]);

    // Many descriptors across both files in one request.
    let mut local = XferDescList::new(MemType::Dram);
    let mut remote = XferDescList::new(MemType::File);
    for i in 0..32u64 {
        local.push(buf.xfer_desc((i * 4096) as usize, 4096).unwrap());
        remote.push(XferDesc::new((31 - i) * 8192, 4096, if i % 2 == 0 { f1 } else { f2 }));
    }
    run(&init, XferOp::Write, &local, &remote, target.name()).unwrap();
    let back32 = buf.xfer_blocks(128 << 10, 4096, 32).unwrap();
    run(&init, XferOp::Read, &back32, &remote, target.name()).unwrap();
    assert_eq!(&buf.as_slice()[128 << 10..256 << 10], &buf.as_slice()[..128 << 10]);

    // An unknown file id is NotFound; past the exported size is NotAllowed.
    let e = init.create_request(XferOp::Read, &back, &file(f2 + 1000, 0, 64 << 10), target.name(), None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let e = init
        .create_request(XferOp::Read, &back, &file(f1, (1 << 20) - 4096, 64 << 10), target.name(), None)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAllowed, "{e}");

    // A file registered for local use only is not served to remote initiators.
    let local_only = RegDescList::from_descs(
        MemType::File,
        vec![RegDesc::with_meta(0, 1 << 20, 77, format!("rw,create:{}", d.join("private").display()))],
    );
    let _p = target.register_storage(&local_only, &[]).unwrap();
    init.load_remote_metadata(&target.local_metadata().unwrap()).unwrap();
    let e = init.create_request(XferOp::Write, &src, &file(77, 0, 64 << 10), target.name(), None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported, "no remote backend holds the private file: {e}");

    // Unexporting one file: requests on it fail at the target; the other file is undisturbed.
    let on_f1 = init.create_request(XferOp::Read, &back, &file(f1, 0, 64 << 10), target.name(), None).unwrap();
    let on_f2 = init.create_request(XferOp::Read, &back, &file(f2, 0, 64 << 10), target.name(), None).unwrap();
    target.unregister_local_file(d.join("f1")).unwrap();
    on_f1.post(None).unwrap_or(kvferry::XferState::InProgress);
    assert_eq!(on_f1.wait(T).unwrap_err().kind(), ErrorKind::NotAllowed);
    on_f2.post(None).unwrap();
    on_f2.wait(T).unwrap();
    assert_eq!(target.unregister_local_file(d.join("f1")).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(target.exported_files().len(), 1);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn direct_alignment_is_checked_at_the_target() {
    let d = dir("direct");
    let (target, init) = pair();
    let id = target.register_local_file(d.join("direct"), 1 << 20, true).unwrap();
    init.load_remote_metadata(&target.local_metadata().unwrap()).unwrap();
    let align = init.remote_files(target.name()).unwrap()[0].alignment;
    assert!(align >= 512 && align.is_power_of_two(), "published alignment {align}");
    let buf = AlignedBuf::new(1 << 20).unwrap();
    let _r = init.register_buf(&buf).unwrap();
    run(&init, XferOp::Write, &buf.xfer_blocks(0, 64 << 10, 1).unwrap(), &file(id, 0, 64 << 10), target.name())
        .unwrap();
    let e = run(&init, XferOp::Write, &buf.xfer_blocks(0, 4096, 1).unwrap(), &file(id, 100, 4096), target.name())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidParam, "{e}");
    assert!(e.message().contains("offset"), "names the misaligned field: {e}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_full_filesystem_at_the_target_is_an_error() {
    let d = TestDir::new_in(Path::new("/var/tmp"), "kvferry-rf-full");
    let mnt = d.path("mnt");
    // Declared after `d`: unmounted before the directory is removed.
    let _mount = match Mount::tmpfs(&mnt, "1m") {
        Ok(m) => m,
        Err(why) => {
            eprintln!("\n*** SKIPPED: cannot mount a small tmpfs to fill: {why} ***\n");
            return;
        }
    };
    let (target, init) = pair();
    let id = target.register_local_file(mnt.join("big"), 4 << 20, false).unwrap();
    init.load_remote_metadata(&target.local_metadata().unwrap()).unwrap();
    let buf = AlignedBuf::new(4 << 20).unwrap();
    let _r = init.register_buf(&buf).unwrap();
    let e = run(&init, XferOp::Write, &buf.xfer_blocks(0, 4 << 20, 1).unwrap(), &file(id, 0, 4 << 20), target.name())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(e.message().contains("full") || e.message().contains("No space"), "{e}");
    drop(target);
}

/// A READ larger than what a target connection holds at once (many 4 MiB
/// frames over two lanes, started ahead and answered in order) arrives whole
/// and in place, with blocks in shuffled order; so does the WRITE back.
#[test]
fn large_reads_are_pipelined_in_order() {
    const BLOCK: usize = 1 << 20;
    const BLOCKS: usize = 72;
    let d = dir("large");
    let path = d.join("large");
    let pattern: Vec<u8> = (0..BLOCKS * BLOCK).map(|i| ((i / 4096) as u8) ^ (i as u8)).collect();
    std::fs::write(&path, &pattern).unwrap();
    let (target, init) = pair();
    let id = target.register_local_file(&path, (BLOCKS * BLOCK) as u64, true).unwrap();
    init.load_remote_metadata(&target.local_metadata().unwrap()).unwrap();
    let mut buf = AlignedBuf::huge(BLOCKS * BLOCK).unwrap();
    let _r = init.register_buf(&buf).unwrap();
    // Buffer block k takes file block order[k].
    let order: Vec<usize> = (0..BLOCKS).map(|k| (k * 29 + 5) % BLOCKS).collect();
    let local = buf.xfer_blocks(0, BLOCK, BLOCKS).unwrap();
    let remote = XferDescList::from_descs(
        MemType::File,
        order.iter().map(|&b| XferDesc::new((b * BLOCK) as u64, BLOCK as u64, id)).collect(),
    );
    run(&init, XferOp::Read, &local, &remote, target.name()).unwrap();
    for (k, &b) in order.iter().enumerate() {
        assert!(
            buf.as_slice()[k * BLOCK..(k + 1) * BLOCK] == pattern[b * BLOCK..(b + 1) * BLOCK],
            "buffer block {k} holds file block {b}"
        );
    }
    // Write it back in the same shuffled order after flipping every byte.
    buf.as_mut_slice().iter_mut().for_each(|x| *x = !*x);
    run(&init, XferOp::Write, &local, &remote, target.name()).unwrap();
    let back = std::fs::read(&path).unwrap();
    assert!(back.iter().zip(&pattern).all(|(a, b)| *a == !*b), "every byte written back");
    std::fs::remove_dir_all(&d).unwrap();
}

/// The seed's reliability claim: one exported device failing does not
/// affect the others. A loop device is exported beside a plain file; after
/// WRITEs to both succeed, the device is switched read-only (`blockdev
/// --setro`: this kernel has no device-mapper for an error target). From
/// then on WRITEs to it fail with a clear error naming it, while the file
/// keeps taking WRITEs, the device still serves READs, and the connection
/// stays up. Root only (loop devices).
#[test]
fn a_device_that_turns_read_only_fails_alone() {
    use kvferry_test_support::fs::{is_root, sh, skipped, LoopDev};
    if !is_root() {
        return skipped("a_device_that_turns_read_only_fails_alone", "needs root for a loop device");
    }
    let d = dir("ro");
    let img = d.join("dev.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let dev = match LoopDev::attach(&img) {
        Ok(l) => l,
        Err(e) => return skipped("a_device_that_turns_read_only_fails_alone", &e),
    };
    let (target, init) = pair();
    let fdev = target.register_local_file(&dev.dev, 4 << 20, false).unwrap();
    let ffile = target.register_local_file(d.join("ok"), 4 << 20, false).unwrap();
    init.load_remote_metadata(&target.local_metadata().unwrap()).unwrap();
    let mut buf = AlignedBuf::new(128 << 10).unwrap();
    buf.as_mut_slice()[..64 << 10].fill(0xA5);
    let _r = init.register_buf(&buf).unwrap();
    let src = buf.xfer_blocks(0, 64 << 10, 1).unwrap();
    let back = buf.xfer_blocks(64 << 10, 64 << 10, 1).unwrap();
    for i in 0..8u64 {
        run(&init, XferOp::Write, &src, &file(fdev, i << 16, 64 << 10), target.name()).unwrap();
        run(&init, XferOp::Write, &src, &file(ffile, i << 16, 64 << 10), target.name()).unwrap();
    }
    sh("blockdev", &["--setro", &dev.dev]).unwrap();
    let failed = run(&init, XferOp::Write, &src, &file(fdev, 8 << 16, 64 << 10), target.name());
    sh("blockdev", &["--setrw", &dev.dev]).unwrap();
    let e = failed.expect_err("a WRITE to the read-only device fails");
    eprintln!("the read-only device answered: {e}");
    assert!(e.to_string().contains("refused by the target"), "{e}");
    assert!(e.to_string().contains(&dev.dev) || e.to_string().contains(&fdev.to_string()), "names the device: {e}");
    // The others are untouched: the file takes WRITEs, the device READs, over the same peer.
    for i in 8..16u64 {
        run(&init, XferOp::Write, &src, &file(ffile, i << 16, 64 << 10), target.name()).unwrap();
    }
    run(&init, XferOp::Read, &back, &file(fdev, 0, 64 << 10), target.name()).unwrap();
    assert!(buf.as_slice()[64 << 10..].iter().all(|&b| b == 0xA5), "the device's earlier bytes read back");
    let on_disk = std::fs::read(d.join("ok")).unwrap();
    assert!(on_disk[..16 << 16].iter().all(|&b| b == 0xA5), "every WRITE to the file landed");
    drop((target, init));
    drop(dev);
    std::fs::remove_dir_all(&d).unwrap();
}
