"""NIXL-shaped program: two peers over the metadata listener; the target
sends its serialised descriptors as a notification, the initiator WRITEs
(then READs back) and tags completion. Runs unmodified on NIXL or, through
`python -m kvferry.nixl`, on kvferry.

usage: listener_pair.py target|initiator MY_PORT PEER_PORT BACKEND [SIZE]
"""

import ctypes
import sys
import time

import nixl._utils as nixl_utils
from nixl._api import nixl_agent, nixl_agent_config
from nixl.logging import get_logger

logger = get_logger(__name__)

role, my_port, peer_port, backend = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
size = int(sys.argv[5]) if len(sys.argv) > 5 else 1 << 20
deadline = time.time() + 20

config = nixl_agent_config(True, True, my_port, backends=[backend])
agent = nixl_agent(role, config)
addr = nixl_utils.malloc_passthru(size * 2)
agent.register_memory([(addr, size * 2, 0, "")], "DRAM")
descs = agent.get_xfer_descs([(addr, size, 0), (addr + size, size, 0)], "DRAM")


def wait(cond, what):
    while not cond():
        if time.time() > deadline:
            print(f"{role}: timed out waiting for {what}", flush=True)
            sys.exit(3)
        time.sleep(0.001)


if role == "target":
    ctypes.memset(addr, 0, size * 2)
    wait(lambda: agent.check_remote_metadata("initiator"), "the initiator's metadata")
    agent.send_notif("initiator", agent.get_serialized_descs(descs))
    wait(lambda: agent.check_remote_xfer_done("initiator", b"DONE"), "DONE")
    data = ctypes.string_at(addr, size * 2)
    ok = data == bytes([0xBA]) * size + bytes([0x5A]) * size
    print("target: data", "OK" if ok else "BAD", flush=True)
    sys.exit(0 if ok else 1)
else:
    nixl_utils.ba_buf(addr, size)
    ctypes.memset(addr + size, 0x5A, size)
    agent.fetch_remote_metadata("target", "127.0.0.1", peer_port)
    agent.send_local_metadata("127.0.0.1", peer_port)
    wait(lambda: agent.check_remote_metadata("target"), "the target's metadata")
    notifs = {}

    def got_descs():
        notifs.update(agent.get_new_notifs())
        return "target" in notifs

    wait(got_descs, "the target's descriptors")
    remote = agent.deserialize_descs(notifs["target"][0])
    h = agent.initialize_xfer("WRITE", descs, remote, "target", b"DONE\0with NUL")
    state = agent.transfer(h)
    while state != "DONE":
        state = agent.check_xfer_state(h)
    print("initiator: backend", agent.query_xfer_backend(h), getattr(getattr(h, "_req", None), "backend", "?"),
          flush=True)
    agent.release_xfer_handle(h)
    # READ it back into a fresh buffer.
    back = nixl_utils.malloc_passthru(size * 2)
    reg = agent.register_memory([(back, size * 2, 0, "")], "DRAM")
    local = agent.get_xfer_descs([(back, size, 0), (back + size, size, 0)], "DRAM")
    h = agent.initialize_xfer("READ", local, remote, "target")
    state = agent.transfer(h)
    while state != "DONE":
        state = agent.check_xfer_state(h)
    nixl_utils.verify_transfer(addr, back, size * 2)
    same = ctypes.string_at(addr, size * 2) == ctypes.string_at(back, size * 2)
    print("initiator: read back", "OK" if same else "BAD", flush=True)
    h.release()
    agent.deregister_memory(reg)
    agent.remove_remote_agent("target")
    sys.exit(0 if same else 1)
