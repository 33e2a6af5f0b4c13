"""kvferry.nixl: NIXL 1.5's Python API, in one process."""

import logging
import os
import pickle
import threading
import time

import pytest

import kvferry
from kvferry.nixl import _bindings as nb
from kvferry.nixl import _utils as nu
from kvferry.nixl._api import nixl_agent, nixl_agent_config, nixl_prepped_dlist_handle, nixl_xfer_handle
from conftest import unique


def agent(backends=("UCX",), **kw):
    return nixl_agent(unique("nx"), nixl_agent_config(backends=list(backends), **kw))


def wait_done(a, h, timeout=10):
    deadline = time.time() + timeout
    s = a.transfer(h)
    while s != "DONE":
        assert time.time() < deadline
        s = a.check_xfer_state(h)


class Mem:
    """malloc'd memory registered with an agent."""

    def __init__(self, a, size, fill=None):
        self.addr, self.size = nu.malloc_passthru(size), size
        if fill is not None:
            import ctypes

            ctypes.memset(self.addr, fill, size)
        self.reg = a.register_memory([(self.addr, size, 0, "")], "DRAM")

    def bytes(self):
        import ctypes

        return ctypes.string_at(self.addr, self.size)


def test_config_positional_order_and_defaults():
    c = nixl_agent_config(True, True, 1234)
    assert (c.enable_pthread, c.enable_listen, c.port, c.capture_telemetry, c.num_threads, c.backends) == (
        True, True, 1234, False, 0, ["UCX"])
    d = nixl_agent_config()
    assert (d.enable_listen, d.port, d.sync_mode) == (False, 8888, None)
    with pytest.raises(TypeError):
        nixl_agent_config(sync_mode=1)


def test_agent_name_rules():
    with pytest.raises(ValueError):
        nixl_agent("")
    a = nixl_agent(unique("bytes").encode())
    assert isinstance(a.name, str)
    a2 = nixl_agent(unique("all"), instantiate_all=True)
    assert "UCX" in a2.backends and "POSIX" in a2.backends


def test_plugins_and_backends():
    a = agent(["UCX", "POSIX", "NOT_A_PLUGIN"])
    plugins = a.get_plugin_list()
    assert "UCX" in plugins and "POSIX" in plugins and "TCP" in plugins
    assert "GDS" not in plugins and "GDS_MT" not in plugins  # no GPU and cuFile here
    assert set(a.backends) == {"UCX", "POSIX"}
    assert "DRAM_SEG" in a.get_plugin_mem_types("UCX") and "FILE_SEG" in a.get_plugin_mem_types("POSIX")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in a.get_plugin_params("TCP").items())
    assert all(isinstance(v, str) for v in a.get_backend_params("UCX").values())
    assert "DRAM_SEG" in a.get_backend_mem_types("UCX")
    assert a.get_plugin_params("NOPE") == {} and a.get_backend_params("NOPE") == {}
    with pytest.raises(nb.nixlNotFoundError):
        a.create_backend("NOPE")
    a.create_backend("TCP", {"lanes": "2"})
    assert "TCP" in a.backends


def test_descriptor_inputs():
    np = pytest.importorskip("numpy")
    a = agent()
    x = a.get_xfer_descs([(1, 2, 3), (4, 5, 6)], "DRAM")
    assert isinstance(x, nb.nixlXferDList) and x.descCount() == 2 and x[1] == (4, 5, 6)
    assert x.getType() == nb.DRAM_SEG and not x.isEmpty()
    assert a.get_xfer_descs(x) is x
    for dt in (np.uint64, np.int64, np.int32):
        arr = np.array([[1, 2, 3], [4, 5, 6]], dtype=dt)
        assert a.get_xfer_descs(arr, "DRAM") == x
    assert a.get_xfer_descs([(1, 2)], "DRAM") is None
    assert a.get_xfer_descs([(1, 2, 3)]) is None
    assert a.get_xfer_descs(np.ones((2, 4), dtype=np.int64), "DRAM") is None
    with pytest.raises(KeyError):
        a.get_xfer_descs([(1, 2, 3)], "HBM")
    r = a.get_reg_descs([(1, 2, 3, "meta")], "cpu")
    assert isinstance(r, nb.nixlRegDList) and r[0] == (1, 2, 3, b"meta") and r.getType() == nb.DRAM_SEG
    assert a.get_reg_descs([(1, 2, 3)], "DRAM") is None
    assert a.get_reg_descs(x) is None and a.get_xfer_descs(r) is None
    assert isinstance(r.trim(), nb.nixlXferDList) and r.trim()[0] == (1, 2, 3)
    for mt, seg in (("VRAM", nb.VRAM_SEG), ("FILE", nb.FILE_SEG), ("BLOCK", nb.BLK_SEG), ("OBJ", nb.OBJ_SEG),
                    ("cuda", nb.VRAM_SEG)):
        assert a.get_xfer_descs([(0, 1, 0)], mt).getType() == seg
    assert a.get_xfer_descs([(1, 2, 3)], "DRAM", is_sorted=True) == a.get_xfer_descs([(1, 2, 3)], "DRAM", True)
    assert a.get_reg_descs([(1, 2, 3, "")], "DRAM", is_sorted=False)[0] == (1, 2, 3, b"")
    legacy = nb.nixlXferDList(nb.DRAM_SEG, [(1, 2, 3)], is_sorted=True)
    assert legacy.descCount() == 1
    assert nb.nixlXferDList(nb.DRAM_SEG, [(1, 2, 3)], False) == legacy


def test_descriptor_list_methods_and_pickling():
    a = agent()
    x = nb.nixlXferDList(nb.DRAM_SEG, [(1, 2, 3), (4, 5, 6), (7, 8, 9)])
    x.remDesc(0)
    assert x.descCount() == 2 and x[0] == (4, 5, 6)
    x.addDesc((10, 11, 12))
    assert x.index((10, 11, 12)) == 2
    y = pickle.loads(pickle.dumps(x))
    assert type(y) is nb.nixlXferDList and y == x
    assert a.deserialize_descs(a.get_serialized_descs(x)) == x
    r = nb.nixlRegDList(nb.FILE_SEG, [(0, 10, 3, "p")])
    r2 = a.deserialize_descs(a.get_serialized_descs(r))
    assert type(r2) is nb.nixlRegDList and r2 == r and r2.getType() == nb.FILE_SEG
    x.clear()
    assert x.isEmpty() and x != y
    assert nb.nixlXferDList(nb.DRAM_SEG, 3).descCount() == 3


def test_loopback_transfer_notifications_and_states():
    a = agent()
    src, dst = Mem(a, 8192, 0x11), Mem(a, 8192, 0)
    local = a.get_xfer_descs([(src.addr, 8192, 0)], "DRAM")
    remote = a.get_xfer_descs([(dst.addr, 8192, 0)], "DRAM")
    h = a.initialize_xfer(operation="WRITE", local_descs=local, remote_descs=remote, remote_agent=a.name,
                          notif_msg=b"tag-1\0x", backends=["UCX"])
    assert isinstance(h, nixl_xfer_handle) and hash(h) == hash(h)
    wait_done(a, h)
    assert dst.bytes() == b"\x11" * 8192
    assert a.query_xfer_backend(h) == "UCX"
    d, m, method = a.estimate_xfer_cost(h)
    assert isinstance(d, int) and method in ("ANALYTICAL_BACKEND", "UNKNOWN")
    deadline = time.time() + 5
    while not a.check_remote_xfer_done(a.name.encode(), b"tag-"):
        assert time.time() < deadline
    assert a.notifs[a.name] == []
    a.send_notif(a.name, b"one\0")
    a.send_notif(a.name.encode(), "two")
    time.sleep(0.05)
    n = a.get_new_notifs()
    assert n == {a.name: [b"one\0", b"two"]}
    a.send_notif(a.name, b"three")
    a.send_notif(a.name, b"four")
    time.sleep(0.05)
    a.update_notifs()
    assert a.update_notifs()[a.name] == [b"three", b"four"]
    assert not a.check_remote_xfer_done(a.name, b"our", tag_is_prefix=True)
    assert a.check_remote_xfer_done(a.name, b"our", tag_is_prefix=False)
    assert a.notifs[a.name] == [b"three"]
    assert a.check_remote_xfer_done(a.name, b"")
    assert not a.check_remote_xfer_done(a.name, b"")
    assert not a.check_remote_xfer_done("nobody", b"")
    with pytest.raises(KeyError):
        a.initialize_xfer("COPY", local, remote, a.name)
    with pytest.raises(KeyError):
        a.initialize_xfer("WRITE", local, remote, a.name, backends=["GDS"])
    with pytest.raises(nb.nixlNotFoundError):
        a.initialize_xfer("WRITE", local, remote, "nobody")
    with pytest.raises(nb.nixlMismatchError):
        a.initialize_xfer("WRITE", local, a.get_xfer_descs([(dst.addr, 4096, 0)], "DRAM"), a.name)
    with pytest.raises(nb.nixlNotAllowedError):
        a.initialize_xfer("WRITE", a.get_xfer_descs([(0x1000, 8192, 0)], "DRAM"), remote, a.name)
    fresh = a.initialize_xfer("READ", local, remote, a.name)
    with pytest.raises(nb.nixlNotPostedError):
        a.check_xfer_state(fresh)
    a.release_xfer_handle(h)
    a.release_xfer_handle(h)
    h.release()
    with pytest.raises(kvferry.Error):
        a.transfer(h)


def test_prepped_xfer_with_numpy_indices():
    np = pytest.importorskip("numpy")
    a = agent()
    src, dst = Mem(a, 16 * 1024, 0x22), Mem(a, 16 * 1024, 0)
    rows = lambda base: [(base + i * 1024, 1024, 0) for i in range(16)]  # noqa: E731
    lp = a.prep_xfer_dlist("NIXL_INIT_AGENT", rows(src.addr), "DRAM")
    lp2 = a.prep_xfer_dlist("", rows(src.addr), "DRAM")
    rp = a.prep_xfer_dlist(a.name, rows(dst.addr), "DRAM")
    assert isinstance(lp, nixl_prepped_dlist_handle)
    for idx in ([0, 1], np.array([2, 3], dtype=np.int64), np.array([4, 5], dtype=np.int32),
                np.array([6, 7], dtype=np.uint64)):
        h = a.make_prepped_xfer("WRITE", lp, idx, rp, idx, b"p")
        wait_done(a, h)
        h.release()
    h = a.make_prepped_xfer("WRITE", lp2, [8], rp, [8])
    wait_done(a, h)
    assert dst.bytes()[: 9 * 1024] == b"\x22" * 9 * 1024 and dst.bytes()[9 * 1024:] == b"\0" * 7 * 1024
    with pytest.raises(nb.nixlInvalidParamError):
        a.make_prepped_xfer("WRITE", lp, [0, 99], rp, [0, 1])
    with pytest.raises(nb.nixlInvalidParamError):
        a.make_prepped_xfer("WRITE", lp, [0], rp, [0, 1])
    with pytest.raises(KeyError):
        a.make_prepped_xfer("MOVE", lp, [0], rp, [0])
    strided = np.array([[src.addr, 1024, 0, 2048, 4]], dtype=np.uint64)
    sp = a.prep_xfer_dlist("", strided, "DRAM")
    with pytest.raises(ValueError):
        a.prep_xfer_dlist("", strided)
    a.release_dlist_handle(lp)
    lp.release()
    sp.release()
    with pytest.raises(kvferry.Error):
        a.make_prepped_xfer("WRITE", lp, [0], rp, [0])


def test_telemetry_off_on_and_env_override(monkeypatch):
    monkeypatch.delenv("NIXL_TELEMETRY_ENABLE", raising=False)
    off = agent()
    src, dst = Mem(off, 4096, 1), Mem(off, 4096, 0)
    h = off.initialize_xfer("WRITE", off.get_xfer_descs([(src.addr, 4096, 0)], "DRAM"),
                            off.get_xfer_descs([(dst.addr, 4096, 0)], "DRAM"), off.name)
    wait_done(off, h)
    with pytest.raises(nb.nixlNoTelemetryError):
        off.get_xfer_telemetry(h)
    on = agent(capture_telemetry=True)
    s2, d2 = Mem(on, 4096, 1), Mem(on, 4096, 0)
    h2 = on.initialize_xfer("WRITE", on.get_xfer_descs([(s2.addr, 4096, 0)], "DRAM"),
                            on.get_xfer_descs([(d2.addr, 4096, 0)], "DRAM"), on.name)
    wait_done(on, h2)
    t = on.get_xfer_telemetry(h2)
    assert t.totalBytes == 4096 and t.descCount == 1 and t.startTime > 0 and t.postDuration >= 0
    monkeypatch.setenv("NIXL_TELEMETRY_ENABLE", "y")
    assert agent()._telemetry
    monkeypatch.setenv("NIXL_TELEMETRY_ENABLE", "n")
    assert not agent(capture_telemetry=True)._telemetry


def test_query_memory_and_files(tmp_path):
    a = agent(["POSIX"])
    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * 100)
    info = a.query_memory([(0, 0, 0, str(p)), (0, 0, 0, str(tmp_path / "none"))], "POSIX", "FILE")
    assert info[0]["size"] == "100" and set(info[0]) == {"size", "mode", "mtime"} and info[1] is None
    with pytest.raises(ValueError):
        a.query_memory([(0, 0, 0, str(p))], "UCX", "FILE")


def test_file_meta_info_is_the_callers_label_and_the_fd_decides(tmp_path):
    """As in NIXL, a FILE registration names its file by the descriptor in
    dev_id; meta_info is a label (a name, even another file's path) and the
    descriptor's O_DIRECT holds."""
    a = agent(["POSIX"])
    target, decoy = tmp_path / "target.bin", tmp_path / "decoy.bin"
    decoy.write_bytes(b"d" * 8192)
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 8192)
    src = Mem(a, 8192, fill=0x5A)
    for label in ("my kv file", str(decoy), ""):
        reg = a.register_memory([(0, 8192, fd, label)], "FILE")
        h = a.initialize_xfer("WRITE", a.get_xfer_descs([(src.addr, 8192, 0)], "DRAM"),
                              a.get_xfer_descs([(0, 8192, fd)], "FILE"), a.name)
        wait_done(a, h)
        a.release_xfer_handle(h)
        a.deregister_memory(reg)
    os.close(fd)
    assert target.read_bytes() == b"\x5a" * 8192 and decoy.read_bytes() == b"d" * 8192
    # kvferry's own path spec ("<flags>:<path>") still opens the path itself.
    reg = a.register_memory([(0, 0, 77, f"r:{decoy}")], "FILE")
    a.deregister_memory(reg)
    # The descriptor's O_DIRECT is kept: a misaligned range is refused, not buffered.
    dfd = os.open(target, os.O_RDWR | getattr(os, "O_DIRECT", 0))
    try:
        reg = a.register_memory([(0, 8192, dfd, str(target))], "FILE")
        with pytest.raises(kvferry.Error, match="(?i)align"):
            h = a.initialize_xfer("WRITE", a.get_xfer_descs([(src.addr + 1, 100, 0)], "DRAM"),
                                  a.get_xfer_descs([(1, 100, dfd)], "FILE"), a.name)
            wait_done(a, h)
        a.deregister_memory(reg)
    finally:
        os.close(dfd)


def test_metadata_calls(caplog):
    a, b = agent(), agent()
    m = Mem(b, 4096)
    md = b.get_agent_metadata()
    assert isinstance(md, bytes)
    assert a.add_remote_agent(md) == b.name.encode()
    assert a.check_remote_metadata(b.name) and a.check_remote_metadata(b.name.encode())
    assert a.check_remote_metadata(b.name, a.get_xfer_descs([(m.addr, 4096, 0)], "DRAM"))
    assert not a.check_remote_metadata(b.name, a.get_xfer_descs([(m.addr + 8192, 4096, 0)], "DRAM"))
    partial = b.get_partial_agent_metadata(m.reg, True, ["UCX"])
    a.remove_remote_agent(b.name)
    assert not a.check_remote_metadata(b.name)
    assert a.add_remote_agent(partial) == b.name.encode()
    with caplog.at_level(logging.DEBUG, logger="nixl"):
        a.remove_remote_agent("nobody")  # quiet, as NIXL: debug, no warning
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
    assert any("nobody" in r.getMessage() for r in caplog.records), caplog.records
    with pytest.raises(nb.nixlMismatchError):
        a.add_remote_agent(b"garbage")
    a.make_connection(b.name)
    with pytest.raises(nb.nixlInvalidParamError):
        a.fetch_remote_metadata("x")  # no central store configured
    b.deregister_memory(m.reg)
    with pytest.raises(nb.nixlNotSupportedError):
        a.prep_mem_view(None)


def test_store_metadata_with_labels(meta_server):
    t, i = agent(), agent()
    m = Mem(t, 4096)
    t.send_local_metadata()
    i.fetch_remote_metadata(t.name)
    deadline = time.time() + 10
    while not i.check_remote_metadata(t.name):
        assert time.time() < deadline
        time.sleep(0.01)
    t.send_partial_agent_metadata(m.reg, True, label="L1")
    i.remove_remote_agent(t.name)
    i.fetch_remote_metadata(t.name, label="L1")
    while not i.check_remote_metadata(t.name, i.get_xfer_descs([(m.addr, 4096, 0)], "DRAM")):
        assert time.time() < deadline
        time.sleep(0.01)
    t.invalidate_local_metadata()


def test_three_threads_on_one_agent():
    a = agent()
    src, dst = Mem(a, 3 << 20, 0x33), Mem(a, 3 << 20, 0)
    errors = []

    def worker(k):
        try:
            off = k << 20
            h = a.initialize_xfer("WRITE", a.get_xfer_descs([(src.addr + off, 1 << 20, 0)], "DRAM"),
                                  a.get_xfer_descs([(dst.addr + off, 1 << 20, 0)], "DRAM"), a.name, f"t{k}-")
            for _ in range(10):
                wait_done(a, h)
            while not a.check_remote_xfer_done(a.name, f"t{k}-".encode()):
                pass
            h.release()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors
    assert dst.bytes() == b"\x33" * (3 << 20)


def test_handles_released_after_the_agent():
    a = agent()
    src, dst = Mem(a, 4096, 1), Mem(a, 4096, 0)
    h = a.initialize_xfer("WRITE", a.get_xfer_descs([(src.addr, 4096, 0)], "DRAM"),
                          a.get_xfer_descs([(dst.addr, 4096, 0)], "DRAM"), a.name)
    p = a.prep_xfer_dlist("", [(src.addr, 4096, 0)], "DRAM")
    wait_done(a, h)
    del a
    import gc

    gc.collect()
    h.release()
    p.release()
    h.release()
    h2 = nixl_agent(unique("gone"), nixl_agent_config(backends=["UCX"]))
    m = Mem(h2, 4096)
    x = h2.initialize_xfer("READ", h2.get_xfer_descs([(m.addr, 4096, 0)], "DRAM"),
                           h2.get_xfer_descs([(m.addr, 4096, 0)], "DRAM"), h2.name)
    del h2
    gc.collect()
    del x  # __del__ after the agent is gone
    gc.collect()


def test_utils():
    a = nu.malloc_passthru(64)
    b = nu.malloc_passthru(64)
    nu.ba_buf(a, 64)
    import ctypes

    assert ctypes.string_at(a, 64) == b"\xba" * 64
    ctypes.memmove(b, a, 64)
    nu.verify_transfer(a, b, 64)
    nu.free_passthru(a)
    nu.free_passthru(b)


def test_torch_tensors(torch_module):
    torch = torch_module
    a = agent()
    t = torch.ones(1024, dtype=torch.float32)
    x = a.get_xfer_descs(t)
    assert x[0] == (t.data_ptr(), 4096, 0)
    assert a.get_xfer_descs([t, torch.zeros(8)]).descCount() == 2
    assert a.get_xfer_descs(torch.ones(4, 4).t()) is None
    reg = a.register_memory(t)
    a.deregister_memory(reg)


def test_env_name_of_telemetry_is_read_at_creation(monkeypatch):
    monkeypatch.setenv("NIXL_TELEMETRY_ENABLE", "1")
    assert agent()._telemetry
    assert os.environ["NIXL_TELEMETRY_ENABLE"] == "1"


def test_register_memory_takes_an_aligned_buf():
    a = agent()
    buf, dst = kvferry.AlignedBuf(8192), kvferry.AlignedBuf(8192)
    buf.fill(0x44)
    r1, r2 = a.register_memory(buf), a.register_memory(dst)
    assert r1[0] == (buf.addr, 8192, 0, b"")
    h = a.initialize_xfer("WRITE", a.get_xfer_descs([(buf.addr, 8192, 0)], "DRAM"),
                          a.get_xfer_descs([(dst.addr, 8192, 0)], "DRAM"), a.name)
    wait_done(a, h)
    assert dst.read(0, 2) == b"DD"
    h.release()
    a.deregister_memory(r1)
    a.deregister_memory(r2)
    with pytest.raises(nb.nixlNotAllowedError):
        a.initialize_xfer("WRITE", a.get_xfer_descs([(buf.addr, 8192, 0)], "DRAM"),
                          a.get_xfer_descs([(dst.addr, 8192, 0)], "DRAM"), a.name)


def test_release_xfer_handle_cancels_an_active_transfer():
    a, b = agent(["TCP"]), agent(["TCP"])
    size = 64 << 20
    src, dst = Mem(a, size, 0x55), Mem(b, size, 0)
    a.add_remote_agent(b.get_agent_metadata())
    local = a.get_xfer_descs([(src.addr, size, 0)], "DRAM")
    remote = a.get_xfer_descs([(dst.addr, size, 0)], "DRAM")
    h = a.initialize_xfer("WRITE", local, remote, b.name)
    state = a.transfer(h)
    t0 = time.time()
    a.release_xfer_handle(h)  # cancels if still in flight; returns once no backend touches the memory
    assert time.time() - t0 < 5 and state in ("DONE", "PROC")
    with pytest.raises(kvferry.Error):
        a.check_xfer_state(h)
    h2 = a.initialize_xfer("WRITE", local, remote, b.name)
    wait_done(a, h2)  # the agent and the peer still work
    assert dst.bytes()[:4] == b"UUUU"


def test_low_level_nixl_agent_binding():
    lo = nb.nixlAgent(unique("lo"), nb.nixlAgentConfig())
    assert "UCX" in lo.getAvailPlugins()
    params, mems = lo.getPluginParams("UCX")
    assert "DRAM_SEG" in mems and isinstance(params, dict)
    bh = lo.createBackend("UCX", {})
    assert lo.getBackendParams(bh)[1]
    src, dst = nu.malloc_passthru(4096), nu.malloc_passthru(4096)
    nu.ba_buf(src, 4096)
    reg = nb.nixlRegDList(nb.DRAM_SEG, [(src, 4096, 0, ""), (dst, 4096, 0, "")])
    assert lo.registerMem(reg, [bh]) == nb.NIXL_SUCCESS
    name = lo._a.name
    h = lo.createXferReq(nb.NIXL_WRITE, nb.nixlXferDList(nb.DRAM_SEG, [(src, 4096, 0)]),
                         nb.nixlXferDList(nb.DRAM_SEG, [(dst, 4096, 0)]), name, b"n", [bh])
    s = lo.postXferReq(h)
    while s != nb.NIXL_SUCCESS:
        s = lo.getXferStatus(h)
    nu.verify_transfer(src, dst, 4096)
    assert lo.queryXferBackend(h) == bh
    assert lo.releaseXferReq(h) == nb.NIXL_SUCCESS and lo.releaseXferReq(h) == nb.NIXL_SUCCESS
    assert lo.checkRemoteMD("nobody", nb.nixlXferDList(nb.DRAM_SEG)) == nb.NIXL_ERR_NOT_FOUND
    lo.deregisterMem(reg, [bh])
