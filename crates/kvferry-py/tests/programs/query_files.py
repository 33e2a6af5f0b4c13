"""NIXL-shaped program: query_memory on files, then DRAM -> FILE -> DRAM
through POSIX.

usage: query_files.py DIR
"""

import ctypes
import os
import sys

import nixl._utils as nixl_utils
from nixl._api import nixl_agent, nixl_agent_config

d = sys.argv[1]
path = os.path.join(d, "kv.bin")
with open(path, "wb") as f:
    f.write(b"\0" * 8192)
agent = nixl_agent("qf-agent", nixl_agent_config(backends=["POSIX"]))
info = agent.query_memory([(0, 0, 0, path), (0, 0, 0, os.path.join(d, "missing"))], "POSIX", "FILE")
print("query:", info)
assert info[0] is not None and info[0]["size"] == "8192" and info[1] is None
fd = os.open(path, os.O_RDWR)
buf = nixl_utils.malloc_passthru(8192)
ctypes.memset(buf, 0x42, 8192)
agent.register_memory([(buf, 8192, 0, "")], "DRAM")
agent.register_memory([(0, 8192, fd, "")], "FILE")
mem = agent.get_xfer_descs([(buf, 8192, 0)], "DRAM")
file = agent.get_xfer_descs([(0, 8192, fd)], "FILE")
h = agent.initialize_xfer("WRITE", mem, file, "qf-agent")
s = agent.transfer(h)
while s != "DONE":
    s = agent.check_xfer_state(h)
ctypes.memset(buf, 0, 8192)
h2 = agent.initialize_xfer("READ", mem, file, "qf-agent")
s = agent.transfer(h2)
while s != "DONE":
    s = agent.check_xfer_state(h2)
ok = ctypes.string_at(buf, 8192) == b"\x42" * 8192 and open(path, "rb").read() == b"\x42" * 8192
print("files:", agent.query_xfer_backend(h), "OK" if ok else "BAD")
sys.exit(0 if ok else 1)
