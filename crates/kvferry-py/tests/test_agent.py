"""The Pythonic API: kvferry.Agent and friends, in one process."""

import asyncio
import os
import threading

import pytest

import kvferry
from conftest import unique


def pair(backends=("LOCAL",)):
    a = kvferry.Agent(unique("a"), list(backends))
    b = kvferry.Agent(unique("b"), list(backends))
    return a, b


def link(a, b):
    """Loads each agent's metadata into the other (after registering)."""
    a.load_metadata(b.metadata())
    b.load_metadata(a.metadata())


def test_write_bytearray_to_aligned_buf_with_notification():
    a, b = pair()
    src = bytearray(b"k" * 4096)
    dst = kvferry.AlignedBuf(4096)
    with a.register(src), b.register(dst):
        link(a, b)
        with a.request("WRITE", src, dst, b.name, notif=b"layer\0zero") as req:
            assert req.post() in (kvferry.XferState.DONE, kvferry.XferState.IN_PROGRESS)
            req.wait(5)
            assert req.status() is kvferry.XferState.DONE
            assert req.total_bytes == 4096 and req.backend == "LOCAL"
        assert req.released
        assert dst.read(0, 4) == b"kkkk"
        assert b.notifications() == {a.name: [b"layer\0zero"]}


def test_numpy_registration_and_zero_copy_view():
    np = pytest.importorskip("numpy")
    a, b = pair()
    src = np.arange(1024, dtype=np.uint32)
    buf = kvferry.AlignedBuf(4096)
    view = np.asarray(buf)
    assert view.ctypes.data == buf.addr and view.flags.writeable
    with a.register(src), b.register(buf):
        link(a, b)
        req = a.request("WRITE", src, buf, b.name)
        req.post()
        req.wait(5)
        assert (view.view(np.uint32) == src).all()
        view[:4] = 9
        assert buf.read(0, 4) == b"\x09" * 4
        mv = buf.memoryview()
        mv[0] = 1
        assert view[0] == 1


def test_raw_tuple_and_desc_list_registration():
    a, b = pair()
    src, dst = kvferry.AlignedBuf(8192), kvferry.AlignedBuf(8192)
    src.fill(3)
    ra = a.register((src.addr, 8192, 0))
    rb = b.register(kvferry.RegDescList("DRAM", [(dst.addr, 8192, 0, "")]))
    link(a, b)
    local = kvferry.XferDescList("DRAM", [(src.addr, 4096, 0), (src.addr + 4096, 4096, 0)])
    remote = dst.xfer_descs(0, 4096, 2)
    req = a.request("WRITE", local, remote, b.name)
    req.post()
    req.wait(5)
    assert dst.read() == b"\x03" * 8192 and req.segments == 1
    ra.deregister()
    ra.deregister()
    rb.deregister()
    with pytest.raises(kvferry.NotAllowedError):
        a.request("WRITE", local, remote, b.name)


def test_await_request():
    a, b = pair()
    src, dst = kvferry.AlignedBuf(1 << 20), kvferry.AlignedBuf(1 << 20)
    src.fill(5)
    with a.register(src), b.register(dst):
        link(a, b)
        req = a.request("WRITE", src.xfer_descs(), dst.xfer_descs(), b.name)

        async def go():
            req.post()
            await req
            return dst.read(0, 3)

        assert asyncio.run(go()) == b"\x05\x05\x05"


def test_prepared_lists_and_indices():
    a, b = pair()
    src, dst = kvferry.AlignedBuf(16 * 4096), kvferry.AlignedBuf(16 * 4096)
    src.fill(1)
    with a.register(src), b.register(dst):
        link(a, b)
        lp = a.prepare(src.xfer_descs(0, 4096, 16))
        rp = a.prepare(dst.xfer_descs(0, 4096, 16), peer=b.name)
        req = a.make_request("WRITE", lp, [0, 2, 4], rp, [1, 3, 5], notif="s")
        req.post()
        req.wait(5)
        assert dst.read(4096, 4096) == b"\x01" * 4096 and dst.read(0, 1) == b"\x00"
        with pytest.raises(kvferry.InvalidParamError, match="out of range"):
            a.make_request("WRITE", lp, [99], rp, [0])
        with pytest.raises(kvferry.MismatchError):
            a.make_request("WRITE", lp, [0, 1], rp, [0])
        lp.release()
        lp.release()
        with pytest.raises(kvferry.InvalidParamError, match="released"):
            a.make_request("WRITE", lp, [0], rp, [0])


def test_errors_carry_the_rust_message():
    a, _ = pair()
    d = kvferry.XferDescList("DRAM", [(0x1000, 64, 0)])
    with pytest.raises(kvferry.NotFoundError) as e:
        a.request("READ", d, d, "nobody-here")
    assert "nobody-here" in str(e.value)
    with pytest.raises(kvferry.InvalidParamError):
        a.request("COPY", d, d, a.name)
    with pytest.raises(kvferry.MalformedError):
        a.load_metadata(b"garbage")
    with pytest.raises(kvferry.MalformedError):
        kvferry.XferDescList.from_bytes(b"\x00\x01")


def test_request_repost_and_timeout_on_never_posted():
    a, b = pair()
    src, dst = kvferry.AlignedBuf(4096), kvferry.AlignedBuf(4096)
    with a.register(src), b.register(dst):
        link(a, b)
        req = a.request("WRITE", src, dst, b.name)
        with pytest.raises(kvferry.InvalidParamError, match="never posted"):
            req.status()
        for _ in range(3):
            req.post()
            req.wait(1)


def test_descriptor_lists():
    x = kvferry.XferDescList("DRAM", [(1, 2, 3), (4, 5, 6)])
    assert len(x) == 2 and x[1] == (4, 5, 6) and x[-1] == (4, 5, 6) and list(x) == [(1, 2, 3), (4, 5, 6)]
    with pytest.raises(IndexError):
        x[2]
    x.append((7, 8, 9))
    assert x.remove(0) == (1, 2, 3) and x.index((7, 8, 9)) == 1
    y = kvferry.XferDescList.from_bytes(x.to_bytes())
    assert y == x and y.mem_type == "DRAM"
    r = kvferry.RegDescList("FILE", [(0, 10, 3, "rw:/tmp/x")])
    assert r[0] == (0, 10, 3, b"rw:/tmp/x") and r.trim() == kvferry.XferDescList("FILE", [(0, 10, 3)])
    with pytest.raises(ValueError, match="exactly 3"):
        kvferry.XferDescList("DRAM", [(1, 2)])
    with pytest.raises(kvferry.InvalidParamError):
        kvferry.XferDescList("HBM", [])
    assert len(kvferry.XferDescList("cpu", 4)) == 4


def test_numpy_descriptor_arrays():
    np = pytest.importorskip("numpy")
    a = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    assert list(kvferry.XferDescList("DRAM", a)) == [(1, 2, 3), (4, 5, 6)]
    assert list(kvferry.XferDescList("DRAM", a.astype(np.uint64))) == [(1, 2, 3), (4, 5, 6)]
    with pytest.raises(ValueError, match="negative"):
        kvferry.XferDescList("DRAM", -a)
    with pytest.raises(ValueError, match="contiguous"):
        kvferry.XferDescList("DRAM", np.asfortranarray(np.ones((4, 3), dtype=np.int64)))
    with pytest.raises(TypeError, match="dtype"):
        kvferry.XferDescList("DRAM", a.astype(np.float64))
    with pytest.raises(ValueError, match="shape"):
        kvferry.XferDescList("DRAM", np.ones((2, 4), dtype=np.int64))


def test_files_through_posix(tmp_path):
    a = kvferry.Agent(unique("f"), ["POSIX"])
    path = tmp_path / "kv.bin"
    buf = kvferry.AlignedBuf(8192)
    buf.fill(0x61)
    with a.register(buf), a.register_file(path, 8192, create=True) as freg:
        dev = freg.descs[0][2]
        req = a.request("WRITE", buf.xfer_descs(), kvferry.XferDescList("FILE", [(0, 8192, dev)]), a.name)
        req.post()
        req.wait(5)
        assert path.read_bytes() == b"a" * 8192
        info = a.query([(0, 0, 0, f"r:{path}"), (0, 0, 0, f"r:{tmp_path}/missing")])
        assert info[0]["size"] == 8192 and info[1] is None
        fd = os.open(path, os.O_RDWR)
        try:
            with a.register(kvferry.RegDescList("FILE", [(0, 8192, fd, b"")])):
                buf.fill(0)
                back = a.request("READ", buf.xfer_descs(), kvferry.XferDescList("FILE", [(0, 8192, fd)]), a.name)
                back.post()
                back.wait(5)
                assert buf.read(0, 2) == b"aa"
        finally:
            os.close(fd)


def test_exported_files(tmp_path):
    a = kvferry.Agent(unique("ex"), ["TCP", "POSIX"])
    fid = a.export_file(tmp_path / "e.bin", 4096)
    assert a.exported_files()[0]["id"] == fid
    b = kvferry.Agent(unique("ey"), ["TCP"])
    b.load_metadata(a.metadata())
    assert b.remote_files(a.name)[0]["size"] == 4096
    buf = kvferry.AlignedBuf(4096)
    buf.fill(0x7A)
    with b.register(buf):
        req = b.request("WRITE", buf.xfer_descs(), kvferry.XferDescList("FILE", [(0, 4096, fid)]), a.name)
        req.post()
        req.wait(10)
    assert (tmp_path / "e.bin").read_bytes() == b"z" * 4096
    a.unexport_file(tmp_path / "e.bin")
    with pytest.raises(kvferry.NotFoundError):
        a.unexport_file(tmp_path / "e.bin")


def test_metadata_listener_and_store(meta_server):
    t = kvferry.Agent(unique("lt"), ["TCP"], listener=True, listen_port=0)
    i = kvferry.Agent(unique("li"), ["TCP"], listener=True, listen_port=0)
    assert t.listen_port
    buf = kvferry.AlignedBuf(4096)
    with t.register(buf) as reg:
        i.fetch_metadata(t.name, "127.0.0.1", t.listen_port)
        for _ in range(500):
            if i.check_remote(t.name):
                break
            threading.Event().wait(0.01)
        assert i.check_remote(t.name) and i.check_remote(t.name, buf.xfer_descs())
        t.send_metadata()
        s = kvferry.Agent(unique("ls"), ["TCP"])
        s.fetch_metadata(t.name)
        assert t.name in s.peers
        t.send_partial_metadata(reg, "blk")
        s.forget(t.name)
        # Without connection info a partial blob cannot introduce a peer
        # (NIXL: "no common backend"); it merges into a loaded one.
        with pytest.raises(kvferry.BackendError, match="no backend in common"):
            s.fetch_metadata(t.name, label="blk")
        assert t.name not in s.peers
        t.send_partial_metadata(reg, "conn", include_conn_info=True)
        s.fetch_metadata(t.name, label="conn")
        s.fetch_metadata(t.name, label="blk")
        assert s.check_remote(t.name, buf.xfer_descs())
        t.store().put("app/key", b"v\0")
        assert s.store().get("app/key") == b"v\0" and "app/key" in s.store().list("app/")
        t.invalidate_metadata()
        partial = t.partial_metadata(reg, include_conn_info=True)
        assert s.load_metadata(partial) == t.name


def test_three_threads_share_one_agent():
    a, b = pair()
    src, dst = kvferry.AlignedBuf(3 << 20), kvferry.AlignedBuf(3 << 20)
    src.fill(9)
    errors = []
    with a.register(src), b.register(dst):
        link(a, b)

        def worker(k):
            try:
                off = k << 20
                req = a.request("WRITE", src.xfer_descs(off, 1 << 20), dst.xfer_descs(off, 1 << 20), b.name,
                                notif=f"t{k}")
                for _ in range(20):
                    req.post()
                    req.wait(10)
                a.send_notification(b.name, f"done{k}")
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert dst.read() == b"\x09" * (3 << 20)
        n = b.notifications()[a.name]
        assert sorted(m for m in n if m.startswith(b"done")) == [b"done0", b"done1", b"done2"]


def test_handles_outlive_the_agent():
    a, b = pair()
    src, dst = kvferry.AlignedBuf(4096), kvferry.AlignedBuf(4096)
    ra, rb = a.register(src), b.register(dst)
    link(a, b)
    req = a.request("WRITE", src, dst, b.name)
    prep = a.prepare(src.xfer_descs())
    del a
    req.post()
    req.wait(5)
    req.release()
    prep.release()
    ra.deregister()
    rb.deregister()


def test_torch_tensor_registration(torch_module):
    torch = torch_module
    a, b = pair()
    src = torch.full((1024,), 3.0)
    dst = torch.zeros(1024)
    with a.register(src), b.register(dst):
        link(a, b)
        req = a.request("WRITE", src, dst, b.name)
        req.post()
        req.wait(5)
        assert torch.equal(src, dst)
    with pytest.raises(kvferry.InvalidParamError, match="contiguous"):
        a.register(torch.ones(4, 4).t())


def test_telemetry_and_prometheus_metrics(monkeypatch):
    import urllib.request

    monkeypatch.delenv("KVFERRY_TELEMETRY", raising=False)
    monkeypatch.delenv("NIXL_TELEMETRY_ENABLE", raising=False)
    a = kvferry.Agent(unique("ta"), ["TCP"], telemetry=True)
    b = kvferry.Agent(unique("tb"), ["TCP"], telemetry=True)
    src, dst = kvferry.AlignedBuf(8192), kvferry.AlignedBuf(8192)
    with a.register(src), b.register(dst):
        link(a, b)
        with a.request("WRITE", src, dst, b.name) as req:
            assert req.telemetry == kvferry.XferTelemetry(0, 0, 0, 8192, 1)
            for _ in range(2):
                req.post()
                req.wait(10)
            t = req.telemetry
            assert t.total_bytes == 8192 and t.desc_count == 1 and t.start_us > 0 and t.xfer_us >= t.post_us
        text = a.metrics_text()
        assert f'kvferry_tx_bytes_total{{backend="TCP",peer="{b.name}",agent="{a.name}"}} 16384' in text, text
        assert f'kvferry_served_bytes_total{{backend="TCP",op="WRITE",peer="{a.name}",agent="{b.name}"}} 16384' in b.metrics_text()
        url = a.serve_metrics()
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200 and b"kvferry_tx_requests_total" in r.read()
    off = kvferry.Agent(unique("toff"), ["LOCAL"])
    assert not off.telemetry
    with pytest.raises(kvferry.NotSupportedError, match="KVFERRY_TELEMETRY=1"):
        off.metrics_text()
    monkeypatch.setenv("KVFERRY_TELEMETRY", "1")
    assert kvferry.Agent(unique("tenv"), ["LOCAL"]).telemetry
