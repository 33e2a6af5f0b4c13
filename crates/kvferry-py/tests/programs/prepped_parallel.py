"""NIXL-shaped program: parallel prepped READs and WRITEs with reposting
and prefix-tagged notifications, descriptors as Nx3 numpy arrays and int64
index arrays. One process, two agents over the UCX plugin.

usage: prepped_parallel.py [ROUNDS]
"""

import sys

import numpy as np

from nixl._api import nixl_agent, nixl_agent_config

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
blocks, bs = 64, 4096
a = nixl_agent("pp-initiator", nixl_agent_config(backends=["UCX"]))
b = nixl_agent("pp-target", nixl_agent_config(backends=["UCX"]))
src = np.arange(blocks * bs, dtype=np.uint8).reshape(blocks, bs) ^ 0x33
dst = np.zeros_like(src)
a.register_memory(a.get_reg_descs(np.array([[src.ctypes.data, src.nbytes, 0]], dtype=np.uint64), "DRAM"))
b.register_memory([(dst.ctypes.data, dst.nbytes, 0, "")], "DRAM")
assert a.add_remote_agent(b.get_agent_metadata()) == b"pp-target"
assert b.add_remote_agent(a.get_agent_metadata()) == b"pp-initiator"

rows = lambda base: np.array([[base + i * bs, bs, 0] for i in range(blocks)], dtype=np.int64)  # noqa: E731
local = a.prep_xfer_dlist("NIXL_INIT_AGENT", rows(src.ctypes.data), "DRAM")
remote = a.prep_xfer_dlist("pp-target", rows(dst.ctypes.data), "DRAM")
half = np.arange(blocks // 2, dtype=np.int64)
writes = a.make_prepped_xfer("WRITE", local, half, remote, half, b"W-")
reads = a.make_prepped_xfer("READ", local, half + blocks // 2, remote, half + blocks // 2, b"R-")
dst[blocks // 2:] = 0x77
for r in range(rounds):
    sw = a.transfer(writes, f"W-{r}".encode())
    sr = a.transfer(reads, f"R-{r}".encode())
    while sw != "DONE" or sr != "DONE":
        sw = a.check_xfer_state(writes) if sw != "DONE" else sw
        sr = a.check_xfer_state(reads) if sr != "DONE" else sr
    while not b.check_remote_xfer_done("pp-initiator", f"W-{r}".encode()):
        pass
    while not b.check_remote_xfer_done("pp-initiator", f"R-{r}".encode(), tag_is_prefix=True):
        pass
ok = (dst[: blocks // 2] == src[: blocks // 2]).all() and (src[blocks // 2:] == 0x77).all()
print("prepped: rounds", rounds, "OK" if ok else "BAD")
for h in (writes, reads, local, remote):
    h.release()
sys.exit(0 if ok else 1)
