"""NIXL-shaped program: partial metadata with labels through the central
store (NIXL_ETCD_ENDPOINTS, or KVFERRY_METADATA_URL).

usage: partial_labels.py
"""

import sys
import time

import nixl._utils as nixl_utils
from nixl._api import nixl_agent, nixl_agent_config

cfg = nixl_agent_config(backends=["UCX"])
target = nixl_agent("pl-target", cfg)
init = nixl_agent("pl-initiator", cfg)
size = 4096
bufs = [nixl_utils.malloc_passthru(size) for _ in range(2)]
regs = [target.register_memory([(b, size, 0, "")], "DRAM") for b in bufs]
target.send_partial_agent_metadata(target.get_reg_descs([], "DRAM"), True, ["UCX"], label="conn")
target.send_partial_agent_metadata(regs[0], False, label="block0")
init.fetch_remote_metadata("pl-target", label="conn")
deadline = time.time() + 10
while not init.check_remote_metadata("pl-target"):
    assert time.time() < deadline, "no conn metadata"
    time.sleep(0.01)
first = init.get_xfer_descs([(bufs[0], size, 0)], "DRAM")
second = init.get_xfer_descs([(bufs[1], size, 0)], "DRAM")
init.fetch_remote_metadata("pl-target", label="block0")
while not init.check_remote_metadata("pl-target", first):
    assert time.time() < deadline, "no block0 metadata"
    time.sleep(0.01)
print("partial: block0", init.check_remote_metadata("pl-target", first),
      "block1", init.check_remote_metadata("pl-target", second))
target.invalidate_local_metadata()
sys.exit(0 if not init.check_remote_metadata("pl-target", second) else 1)
