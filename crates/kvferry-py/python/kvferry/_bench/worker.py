"""The body of ``python -m kvferry.bench``: a NIXL program (it imports only
``nixl``), run on kvferry through ``python -m kvferry.nixl`` and on real NIXL
by a Python that has it, so that both are measured by the same code.

usage:
  worker.py target PORT BACKEND SIZE
  worker.py initiator PORT PEER_PORT BACKEND SIZE ITERS OP REMOTE_ADDR
  worker.py descs ROUNDS
Each prints one JSON line of results (the target prints "ready ADDR" first).
"""

import json
import os
import statistics
import sys
import time

import numpy as np

import nixl._utils as nixl_utils
from nixl._api import nixl_agent, nixl_agent_config


def log_quiet():
    import logging

    logging.getLogger("nixl").setLevel(logging.WARNING)


def wait(cond, what, timeout=30.0):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.0005)


def alloc(size):
    """malloc'd memory, as NIXL programs use; with KVFERRY_BENCH_ALIGNED=1
    a kvferry.AlignedBuf (memfd pages, which same-host peers map), as the
    Rust bench uses."""
    if os.environ.get("KVFERRY_BENCH_ALIGNED") == "1":
        import kvferry

        keep = kvferry.AlignedBuf(size)
        _KEEP.append(keep)
        return keep
    return nixl_utils.malloc_passthru(size)


def register(agent, buf, size):
    """Registers ``buf`` (an address, or an AlignedBuf with its memfd); its address."""
    if isinstance(buf, int):
        agent.register_memory([(buf, size, 0, "")], "DRAM")
        return buf
    agent.register_memory(buf)
    return buf.addr


_KEEP = []


def target(port, backend, size):
    a = nixl_agent("bench-target", nixl_agent_config(True, True, port, backends=[backend]))
    log_quiet()
    buf = register(a, alloc(size), size)
    nixl_utils.ba_buf(buf, size)
    print("ready", buf, flush=True)
    if hasattr(a.agent, "wait_notifications"):  # kvferry: sleep until a notification (no polling)
        deadline = time.time() + 600
        while not a.check_remote_xfer_done("bench-initiator", b"bye") and time.time() < deadline:
            a.agent.wait_notifications(1.0)
    else:
        wait(lambda: a.check_remote_xfer_done("bench-initiator", b"bye"), "bye", timeout=600)
    print(json.dumps({"role": "target"}), flush=True)


def initiator(port, peer_port, backend, size, iters, op, remote_addr):
    a = nixl_agent("bench-initiator", nixl_agent_config(True, True, port, backends=[backend]))
    log_quiet()
    buf = register(a, alloc(size), size)
    nixl_utils.ba_buf(buf, size)
    a.fetch_remote_metadata("bench-target", "127.0.0.1", peer_port)
    a.send_local_metadata("127.0.0.1", peer_port)
    wait(lambda: a.check_remote_metadata("bench-target"), "the target's metadata")
    local = a.get_xfer_descs([(buf, size, 0)], "DRAM")
    remote = a.get_xfer_descs([(remote_addr, size, 0)], "DRAM")
    h = a.initialize_xfer(op, local, remote, "bench-target")
    for _ in range(max(iters // 10, 3)):  # warm up (connections, caches)
        s = a.transfer(h)
        while s != "DONE":
            s = a.check_xfer_state(h)
    samples = []
    block = os.environ.get("KVFERRY_BENCH_WAIT") == "1" and hasattr(h, "_req")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iters):
            s = a.transfer(h)
            if block and s != "DONE":
                h._req.wait(60)  # kvferry: block (GIL released) instead of spinning
                continue
            while s != "DONE":
                s = a.check_xfer_state(h)
        samples.append((time.perf_counter() - t0) / iters)
    per = statistics.median(samples)
    req = getattr(h, "_req", None)
    backend_used = getattr(req, "backend", backend)
    h.release()
    a.send_notif("bench-target", b"bye")
    time.sleep(0.2)
    print(json.dumps({"role": "initiator", "op": op, "size": size, "us": per * 1e6, "gbps": size / per / 1e9,
                      "backend": backend_used}), flush=True)


def timed(fn, rounds):
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        r = fn()
        out.append(time.perf_counter() - t0)
        if hasattr(r, "release"):
            r.release()
    return statistics.median(out)


def descs(rounds):
    a = nixl_agent("bench-descs", nixl_agent_config(backends=["UCX"]))
    log_quiet()
    n = 1 << 20
    arr = np.zeros((n, 3), dtype=np.uint64)
    arr[:, 0] = np.arange(n, dtype=np.uint64) * 64 + 0x10000
    arr[:, 1] = 64
    res = {"get_xfer_descs_1M_ms": timed(lambda: a.get_xfer_descs(arr, "DRAM"), rounds) * 1e3}
    block, count = 4096, 100_000
    buf = nixl_utils.malloc_passthru(block * count)
    a.register_memory([(buf, block * count, 0, "")], "DRAM")
    rows = np.zeros((count, 3), dtype=np.uint64)
    rows[:, 0] = buf + np.arange(count, dtype=np.uint64) * block
    rows[:, 1] = block
    dl = a.get_xfer_descs(rows, "DRAM")
    res["prep_xfer_dlist_100k_ms"] = timed(lambda: a.prep_xfer_dlist("", dl), rounds) * 1e3
    lp = a.prep_xfer_dlist("", dl)
    rp = a.prep_xfer_dlist("bench-descs", dl)
    idx = np.arange(4096, dtype=np.int64) * 2
    ridx = idx + 1
    res["make_prepped_xfer_4096_us"] = timed(lambda: a.make_prepped_xfer("WRITE", lp, idx, rp, ridx), rounds * 5) * 1e6
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "target":
        target(int(args[0]), args[1], int(args[2]))
    elif cmd == "initiator":
        initiator(int(args[0]), int(args[1]), args[2], int(args[3]), int(args[4]), args[5], int(args[6]))
    else:
        descs(int(args[0]))
