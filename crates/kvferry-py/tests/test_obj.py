"""The OBJ backend from Python, against moto's S3 server: kvferry.Agent and
the NIXL API (create_backend("OBJ"), register_memory(..., "OBJ"),
query_memory), byte for byte, with the errors a user meets."""

import numpy as np
import pytest

import kvferry
from conftest import unique
from kvferry.nixl._api import nixl_agent, nixl_agent_config
from kvferry.nixl._bindings import nixlNotFoundError


def obj_params(s3, **extra):
    p = {"bucket": s3["bucket"], "endpoint_override": s3["endpoint"], "access_key": s3["access_key"],
         "secret_key": s3["secret_key"], "part_size": "5M", "multipart_threshold": "5M"}
    p.update(extra)
    return p


def test_agent_writes_and_reads_objects(s3):
    a = kvferry.Agent(unique("po"), [("OBJ", obj_params(s3))])
    src = kvferry.AlignedBuf(6 << 20)
    src.fill(0)
    view = np.frombuffer(src.memoryview(), dtype=np.uint8)
    view[:] = np.arange(view.size, dtype=np.uint64).astype(np.uint8)
    dst = kvferry.AlignedBuf(6 << 20)
    with a.register(src), a.register(dst), a.register_object("py/agent/big", 6 << 20) as obj:
        dev = obj.descs[0][2]
        whole = a.descs([(0, 6 << 20, dev)], "OBJ")
        for op, mem in (("WRITE", src), ("READ", dst)):
            r = a.request(op, mem.xfer_descs(), whole, a.name)
            r.post()
            r.wait(30)
        assert bytes(dst.memoryview()) == bytes(src.memoryview())
        info = a.query([(0, 0, dev, b"py/agent/big"), (0, 0, dev + 1, b"py/agent/none")], "OBJ")
        assert info[0]["size"] == 6 << 20 and info[1] is None
    with pytest.raises(kvferry.NotFoundError, match="does not exist"):
        a.register_object("py/agent/missing")
    with pytest.raises(kvferry.InvalidParamError):
        a.register_object("")


def test_nixl_api_obj_round_trip(s3):
    a = nixl_agent(unique("nobj"), nixl_agent_config(backends=[]))
    assert "OBJ" in a.get_plugin_list() and "bucket" in a.get_plugin_params("OBJ")
    a.create_backend("OBJ", obj_params(s3))
    assert "OBJ_SEG" in a.get_plugin_mem_types("OBJ")
    buf = (np.arange(1 << 20) % 251).astype(np.uint8)
    out = np.zeros(1 << 20, dtype=np.uint8)
    a.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
    a.register_memory([(out.ctypes.data, out.nbytes, 0, "")], "DRAM")
    a.register_memory([(0, buf.nbytes, 5, "nixl/obj1")], "OBJ")
    od = a.get_xfer_descs([(0, buf.nbytes, 5)], "OBJ")
    for op, mem in (("WRITE", buf), ("READ", out)):
        h = a.initialize_xfer(op, a.get_xfer_descs([(mem.ctypes.data, mem.nbytes, 0)], "DRAM"), od, a.name)
        assert a.transfer(h) in ("PROC", "DONE")
        while (state := a.check_xfer_state(h)) == "PROC":
            pass
        assert state == "DONE"
        a.release_xfer_handle(h)
    assert (out == buf).all()
    q = a.query_memory([(0, 0, 5, "nixl/obj1"), (0, 0, 6, "nixl/none")], "OBJ", "OBJ")
    assert q[0]["size"] == str(buf.nbytes) and q[1] is None
    with pytest.raises(nixlNotFoundError):
        a.register_memory([(0, 0, 7, "nixl/never")], "OBJ")


def test_wrong_credentials_fail_the_transfer(s3):
    a = kvferry.Agent(unique("pbad"), [("OBJ", obj_params(s3, secret_key="wrong", retries="0"))])
    src = kvferry.AlignedBuf(4096)
    with a.register(src), a.register_object("py/bad", 4096) as obj:
        req = a.request("WRITE", src.xfer_descs(), a.descs([(0, 4096, obj.descs[0][2])], "OBJ"), a.name)
        req.post()
        with pytest.raises(kvferry.NotAllowedError, match="SignatureDoesNotMatch"):
            req.wait(30)
