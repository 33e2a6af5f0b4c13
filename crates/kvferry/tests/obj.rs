//! The OBJ backend against a real S3 server (moto's, started by the test on
//! a free loopback port with authentication on): round trips byte for byte
//! below and above the multipart threshold, ranged reads, missing objects
//! and buckets, wrong credentials, a server that dies mid-upload, many
//! requests from several threads, writes into objects, queries and bad
//! parameters.

use std::time::{Duration, Instant};

use kvferry::{
    Agent, AgentConfig, AlignedBuf, ErrorKind, MemType, Params, RegDesc, RegDescList, Registration, XferDesc,
    XferDescList, XferOp,
};
use kvferry_test_support::name;
use kvferry_test_support::net::CutProxy;
use kvferry_test_support::servers::S3;

const T: Duration = Duration::from_secs(60);
const MIB: usize = 1 << 20;

fn params(s3: &S3, extra: &[(&str, &str)]) -> Params {
    let mut p = Params::new();
    for (k, v) in s3.params() {
        p.set(k, v);
    }
    // Small parts, so that a few MiB make a multipart upload.
    p.set("part_size", "5M");
    p.set("multipart_threshold", "5M");
    for (k, v) in extra {
        p.set(k, v);
    }
    p
}

fn agent(p: Params) -> Agent {
    Agent::new(&name("obj"), AgentConfig::default().with_backend("OBJ", p)).unwrap()
}

fn filled(len: usize, seed: u8) -> AlignedBuf {
    let mut b = AlignedBuf::new(len).unwrap();
    for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(151).wrapping_add(seed).wrapping_add((i >> 12) as u8);
    }
    b
}

/// Registers `key` as object `dev` of `len` bytes (0: its current size).
fn object(a: &Agent, key: &str, len: u64, dev: u64) -> kvferry::Result<Registration> {
    a.register_storage(&RegDescList::from_descs(MemType::Obj, vec![RegDesc::with_meta(0, len, dev, key)]), &[])
}

fn obj_descs(parts: &[(u64, u64, u64)]) -> XferDescList {
    XferDescList::from_descs(MemType::Obj, parts.iter().map(|&(off, len, dev)| XferDesc::new(off, len, dev)).collect())
}

/// Runs one request of `op` between `mem` and `obj` to its end.
fn run(a: &Agent, op: XferOp, mem: &XferDescList, obj: &XferDescList) -> kvferry::Result<()> {
    let req = a.create_request(op, mem, obj, a.name(), None)?;
    req.post(None)?;
    req.wait(T).map(drop)
}

#[test]
fn round_trips_below_and_above_the_multipart_threshold() {
    let s3 = S3::start();
    let a = agent(params(&s3, &[]));
    for (i, len) in [4096usize, 3 * MIB, 12 * MIB + 4096].into_iter().enumerate() {
        let src = filled(len, i as u8);
        let dst = AlignedBuf::new(len).unwrap();
        let (_s, _d) = (a.register_buf(&src).unwrap(), a.register_buf(&dst).unwrap());
        let dev = 10 + i as u64;
        let _o = object(&a, &format!("rt/{len}"), len as u64, dev).unwrap();
        let whole = obj_descs(&[(0, len as u64, dev)]);
        run(&a, XferOp::Write, &src.xfer_blocks(0, len, 1).unwrap(), &whole).unwrap();
        run(&a, XferOp::Read, &dst.xfer_blocks(0, len, 1).unwrap(), &whole).unwrap();
        assert!(src.as_slice() == dst.as_slice(), "{len} bytes came back different");
        let info = a.query_mem(&RegDescList::from_descs(
            MemType::Obj,
            vec![RegDesc::with_meta(0, 0, dev, format!("rt/{len}"))],
        ));
        assert_eq!(info.unwrap()[0].as_ref().map(|f| f.size), Some(len as u64), "query_mem reports the size");
    }
}

#[test]
fn an_upload_of_more_parts_than_permits_completes() {
    // One S3 request at a time, four 5 MiB parts: each part must finish
    // (and give its permit back) while the upload waits for the next.
    let s3 = S3::start();
    let a = agent(params(&s3, &[("max_in_flight", "1")]));
    let len = 20 * MIB;
    let src = filled(len, 42);
    let dst = AlignedBuf::new(len).unwrap();
    let (_s, _d) = (a.register_buf(&src).unwrap(), a.register_buf(&dst).unwrap());
    let _o = object(&a, "permits/a", len as u64, 1).unwrap();
    let whole = obj_descs(&[(0, len as u64, 1)]);
    run(&a, XferOp::Write, &src.xfer_blocks(0, len, 1).unwrap(), &whole).unwrap();
    run(&a, XferOp::Read, &dst.xfer_blocks(0, len, 1).unwrap(), &whole).unwrap();
    assert!(src.as_slice() == dst.as_slice());
}

#[test]
fn ranged_reads_land_at_their_offsets_and_stop_at_the_end() {
    let s3 = S3::start();
    let a = agent(params(&s3, &[]));
    let len = 11 * MIB;
    let src = filled(len, 7);
    let dst = AlignedBuf::new(len).unwrap();
    let (_s, _d) = (a.register_buf(&src).unwrap(), a.register_buf(&dst).unwrap());
    let _o = object(&a, "ranges/a", len as u64, 1).unwrap();
    run(&a, XferOp::Write, &src.xfer_blocks(0, len, 1).unwrap(), &obj_descs(&[(0, len as u64, 1)])).unwrap();
    // Three ranges, one of them longer than a part (two GETs), into other places.
    let (r1, r2, r3) = ((4096u64, 100u64), (MIB as u64 + 17, 6 * MIB as u64), (len as u64 - 10, 10));
    let mem = XferDescList::from_descs(
        MemType::Dram,
        vec![
            XferDesc::new(dst.addr() + 9 * MIB as u64, r1.1, 0),
            XferDesc::new(dst.addr(), r2.1, 0),
            XferDesc::new(dst.addr() + 8 * MIB as u64, r3.1, 0),
        ],
    );
    run(&a, XferOp::Read, &mem, &obj_descs(&[(r1.0, r1.1, 1), (r2.0, r2.1, 1), (r3.0, r3.1, 1)])).unwrap();
    let s = src.as_slice();
    let d = dst.as_slice();
    assert!(d[9 * MIB..9 * MIB + 100] == s[4096..4196]);
    assert!(d[..6 * MIB] == s[MIB + 17..7 * MIB + 17]);
    assert!(d[8 * MIB..8 * MIB + 10] == s[len - 10..]);
    // Registered by its current size (len 0): a READ past its end fails.
    let _whole = object(&a, "ranges/a", 0, 2).unwrap();
    let e = run(&a, XferOp::Read, &dst.xfer_blocks(0, 4096, 1).unwrap(), &obj_descs(&[(len as u64 - 100, 4096, 2)]))
        .unwrap_err();
    assert!(e.message().contains("ends at byte"), "{e}");
    // Starting past the end: the store answers 416.
    let e = run(&a, XferOp::Read, &dst.xfer_blocks(0, 4096, 1).unwrap(), &obj_descs(&[(len as u64 + 4096, 4096, 2)]))
        .unwrap_err();
    assert!(e.message().contains("starts at or past the object's end"), "{e}");
}

#[test]
fn missing_objects_buckets_and_wrong_keys_are_clear_errors() {
    let s3 = S3::start();
    let a = agent(params(&s3, &[]));
    let buf = AlignedBuf::new(4096).unwrap();
    let _b = a.register_buf(&buf).unwrap();
    let e = object(&a, "never/written", 0, 1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.message().contains("does not exist") && e.message().contains("len > 0"), "{e}");
    let _o = object(&a, "never/written", 4096, 1).unwrap();
    let e = run(&a, XferOp::Read, &buf.xfer_blocks(0, 4096, 1).unwrap(), &obj_descs(&[(0, 4096, 1)])).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let info = a.query_mem(&RegDescList::from_descs(MemType::Obj, vec![RegDesc::with_meta(0, 0, 1, "never/written")]));
    assert_eq!(info.unwrap()[0], None);

    let nb = agent(params(&s3, &[("bucket", "no-such-bucket")]));
    let _nbb = nb.register_buf(&buf).unwrap();
    let _nbo = object(&nb, "x", 4096, 1).unwrap();
    let e = run(&nb, XferOp::Write, &buf.xfer_blocks(0, 4096, 1).unwrap(), &obj_descs(&[(0, 4096, 1)])).unwrap_err();
    assert!(e.message().contains("no-such-bucket"), "{e}");

    let bad = agent(params(&s3, &[("secret_key", "not-the-secret"), ("retries", "0")]));
    let _bb = bad.register_buf(&buf).unwrap();
    let _bo = object(&bad, "x", 4096, 1).unwrap();
    let e = run(&bad, XferOp::Write, &buf.xfer_blocks(0, 4096, 1).unwrap(), &obj_descs(&[(0, 4096, 1)])).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAllowed, "a wrong secret is refused: {e}");
    assert!(e.message().contains("SignatureDoesNotMatch") && e.message().contains("secret_key"), "{e}");
}

#[test]
fn a_server_dying_mid_upload_fails_the_request_in_time_and_leaves_no_object() {
    let s3 = S3::start();
    // Dies after 8 MiB of the client's bytes: inside the second 5 MiB part.
    let proxy = CutProxy::start(format!("127.0.0.1:{}", s3.port).parse().unwrap(), 8 << 20);
    let endpoint = format!("http://127.0.0.1:{}", proxy.port);
    let a = agent(params(&s3, &[("endpoint_override", &endpoint), ("retries", "1"), ("timeout", "5")]));
    let len = 20 * MIB;
    let src = filled(len, 3);
    let _s = a.register_buf(&src).unwrap();
    let _o = object(&a, "dies/mid-upload", len as u64, 1).unwrap();
    let t = Instant::now();
    let e =
        run(&a, XferOp::Write, &src.xfer_blocks(0, len, 1).unwrap(), &obj_descs(&[(0, len as u64, 1)])).unwrap_err();
    assert!(proxy.is_dead(), "the proxy cut the upload");
    assert!(t.elapsed() < Duration::from_secs(30), "failed after {:?}, past the timeout and retries", t.elapsed());
    assert!(e.message().contains("multipart"), "{e}");
    // Straight to the server: no object, not even a partial one.
    let direct = agent(params(&s3, &[]));
    let info =
        direct.query_mem(&RegDescList::from_descs(MemType::Obj, vec![RegDesc::with_meta(0, 0, 1, "dies/mid-upload")]));
    assert_eq!(info.unwrap()[0], None, "a failed upload is not visible");
}

#[test]
fn many_requests_from_several_threads() {
    let s3 = S3::start();
    let a = agent(params(&s3, &[("max_in_flight", "8")]));
    let per = 256 << 10;
    std::thread::scope(|sc| {
        for t in 0..4u64 {
            let a = &a;
            sc.spawn(move || {
                let src = filled(8 * per, t as u8);
                let dst = AlignedBuf::new(8 * per).unwrap();
                let (_s, _d) = (a.register_buf(&src).unwrap(), a.register_buf(&dst).unwrap());
                let objs: Vec<_> =
                    (0..8).map(|i| object(a, &format!("mt/{t}/{i}"), per as u64, 100 * t + i).unwrap()).collect();
                let descs = obj_descs(&(0..8).map(|i| (0, per as u64, 100 * t + i)).collect::<Vec<_>>());
                let reqs: Vec<_> = (0..2)
                    .map(|_| {
                        a.create_request(XferOp::Write, &src.xfer_blocks(0, per, 8).unwrap(), &descs, a.name(), None)
                    })
                    .collect::<kvferry::Result<_>>()
                    .unwrap();
                for r in &reqs {
                    r.post(None).unwrap();
                    r.wait(T).unwrap();
                }
                run(a, XferOp::Read, &dst.xfer_blocks(0, per, 8).unwrap(), &descs).unwrap();
                assert!(src.as_slice() == dst.as_slice(), "thread {t}: bytes differ");
                drop(objs);
            });
        }
    });
}

#[test]
fn writes_into_an_object_need_allow_rmw() {
    let s3 = S3::start();
    let a = agent(params(&s3, &[]));
    let src = filled(8192, 1);
    let _s = a.register_buf(&src).unwrap();
    let _o = object(&a, "rmw/a", 8192, 1).unwrap();
    run(&a, XferOp::Write, &src.xfer_blocks(0, 8192, 1).unwrap(), &obj_descs(&[(0, 8192, 1)])).unwrap();
    let patch = filled(100, 99);
    let _p = a.register_buf(&patch).unwrap();
    let e = a
        .create_request(
            XferOp::Write,
            &patch.xfer_blocks(0, 100, 1).unwrap(),
            &obj_descs(&[(1000, 100, 1)]),
            a.name(),
            None,
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported, "{e}");
    assert!(e.message().contains("allow_rmw"), "{e}");
    // The first bytes of an object registered with its size would truncate it.
    let e = a
        .create_request(
            XferOp::Write,
            &patch.xfer_blocks(0, 100, 1).unwrap(),
            &obj_descs(&[(0, 100, 1)]),
            a.name(),
            None,
        )
        .unwrap_err();
    assert!(e.message().contains("ends at byte 100 of its 8192"), "{e}");
    // Two registrations of one key are one object: two halves make it whole.
    let (_h1, _h2) = (object(&a, "rmw/halves", 8192, 5).unwrap(), object(&a, "rmw/halves", 8192, 6).unwrap());
    run(&a, XferOp::Write, &src.xfer_blocks(0, 4096, 2).unwrap(), &obj_descs(&[(0, 4096, 5), (4096, 4096, 6)]))
        .unwrap();
    let halves = AlignedBuf::new(8192).unwrap();
    let _hb = a.register_buf(&halves).unwrap();
    run(&a, XferOp::Read, &halves.xfer_blocks(0, 8192, 1).unwrap(), &obj_descs(&[(0, 8192, 5)])).unwrap();
    assert!(halves.as_slice() == src.as_slice(), "one PUT of both halves");
    let e = a
        .create_request(
            XferOp::Write,
            &src.xfer_blocks(0, 4096, 2).unwrap(),
            &obj_descs(&[(0, 4096, 5), (0, 4096, 6)]),
            a.name(),
            None,
        )
        .unwrap_err();
    assert!(e.message().contains("written twice"), "{e}");

    let b = agent(params(&s3, &[("allow_rmw", "true")]));
    let (_bs, _bp) = (b.register_buf(&src).unwrap(), b.register_buf(&patch).unwrap());
    let _bo = object(&b, "rmw/a", 8192, 1).unwrap();
    run(&b, XferOp::Write, &patch.xfer_blocks(0, 100, 1).unwrap(), &obj_descs(&[(1000, 100, 1)])).unwrap();
    let back = AlignedBuf::new(8192).unwrap();
    let _bb = b.register_buf(&back).unwrap();
    run(&b, XferOp::Read, &back.xfer_blocks(0, 8192, 1).unwrap(), &obj_descs(&[(0, 8192, 1)])).unwrap();
    let mut want = src.as_slice().to_vec();
    want[1000..1100].copy_from_slice(patch.as_slice());
    assert!(back.as_slice() == &want[..], "only the patched bytes changed");
}

#[test]
fn bad_parameters_and_keys_are_refused_clearly() {
    let s3 = S3::start();
    let make = |extra: &[(&str, &str)]| {
        Agent::new(&name("objbad"), AgentConfig::default().with_backend("OBJ", params(&s3, extra))).map(drop)
    };
    for (extra, want) in [
        (&[("bucket", "")][..], "no bucket"),
        (&[("part_size", "1M")][..], "part_size"),
        (&[("max_in_flight", "0")][..], "max_in_flight"),
        (&[("scheme", "ftp")][..], "scheme"),
        (&[("req_checksum", "sometimes")][..], "req_checksum"),
        (&[("timeout", "0")][..], "timeout"),
        (&[("ca_bundle", "/nonexistent/ca.pem")][..], "ca_bundle"),
        (&[("no_such_param", "1")][..], "no_such_param"),
    ] {
        let e = make(extra).unwrap_err();
        assert!(e.message().contains(want), "{extra:?}: {e}");
    }
    let a = agent(params(&s3, &[("req_checksum", "required")]));
    for key in ["", "a//b", "../up"] {
        let e = object(&a, key, 4096, 1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidParam, "{key:?}: {e}");
    }
    let e = a
        .register_storage(
            &RegDescList::from_descs(MemType::Obj, vec![RegDesc::with_meta(0, 4096, 1, vec![0xff, 0xfe])]),
            &[],
        )
        .unwrap_err();
    assert!(e.message().contains("UTF-8"), "{e}");
    let e = a
        .register_storage(
            &RegDescList::from_descs(MemType::Obj, vec![RegDesc::with_meta(4096, 4096, 1, "at/offset")]),
            &[],
        )
        .unwrap_err();
    assert!(e.message().contains("addr must be 0"), "{e}");
    let e = make(&[("multipart_threshold", "6G")]).unwrap_err();
    assert!(e.message().contains("multipart_threshold"), "{e}");
    // With req_checksum=required every upload carries a SHA-256 the server checks.
    let src = filled(4096, 0);
    let _s = a.register_buf(&src).unwrap();
    let _o = object(&a, "ok/key", 4096, 1).unwrap();
    run(&a, XferOp::Write, &src.xfer_blocks(0, 4096, 1).unwrap(), &obj_descs(&[(0, 4096, 1)])).unwrap();
}

/// A hostile "S3 server" on loopback: answers every request it reads with
/// `respond` (the raw bytes, written as the closure likes).
fn hostile_store(respond: fn(&mut std::net::TcpStream)) -> String {
    use std::io::Read;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut c in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).is_ok_and(|n| n == 1) {
                    head.push(b[0]);
                }
                respond(&mut c);
            });
        }
    });
    url
}

/// READ of 4096 bytes in the middle of a guarded buffer from a store at
/// `url`; returns the error and checks that no byte outside the range moved.
fn guarded_read(url: &str, extra: &[(&str, &str)]) -> kvferry::Error {
    let mut p = Params::new().with("bucket", "b").with("endpoint_override", url);
    p.set("access_key", "k");
    p.set("secret_key", "s");
    for (k, v) in extra {
        p.set(k, v);
    }
    let a = agent(p);
    let mut buf = AlignedBuf::new(3 * 4096).unwrap();
    buf.as_mut_slice().fill(0x5A);
    let _b = a.register_buf(&buf).unwrap();
    let _o = object(&a, "x", 100_000, 1).unwrap();
    let e = run(&a, XferOp::Read, &buf.xfer_blocks(4096, 4096, 1).unwrap(), &obj_descs(&[(0, 4096, 1)])).unwrap_err();
    let s = buf.as_slice();
    assert!(s[..4096].iter().chain(&s[8192..]).all(|&x| x == 0x5A), "bytes outside the range were written");
    e
}

#[test]
fn a_store_that_sends_more_than_the_range_fails_the_read_without_overrun() {
    let url = hostile_store(|c| {
        use std::io::Write;
        let body = vec![0xEEu8; 3 * 4096];
        let head = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4095/100000\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = c.write_all(head.as_bytes()).and_then(|()| c.write_all(&body));
    });
    let e = guarded_read(&url, &[("retries", "0")]);
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(e.message().contains("more bytes than the range"), "{e}");
}

#[test]
fn a_store_that_trickles_bytes_fails_the_read_within_the_timeout() {
    let url = hostile_store(|c| {
        use std::io::Write;
        let head = "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4095/100000\r\nContent-Length: 4096\r\n\r\n";
        let _ = c.write_all(head.as_bytes());
        for _ in 0..4096 {
            if c.write_all(&[0xEE]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let t = Instant::now();
    let e = guarded_read(&url, &[("retries", "0"), ("timeout", "2")]);
    assert!(t.elapsed() < Duration::from_secs(15), "a slow store held the request {:?}", t.elapsed());
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(e.message().contains("timed out"), "{e}");
}
