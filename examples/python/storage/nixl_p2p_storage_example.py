"""NIXL storage transfer sample (client/server) on NIXL's Python API.

The client runs a local DRAM->FILE WRITE and FILE->DRAM READ loop, then, for
each server in --agents_file (lines "<agent name> <ip> <port>"), exchanges
metadata over the server's listener and sends its memory descriptors in a
notification; the server moves client memory -> its DRAM -> its files
(WRITE) and back (READ), pipelined: a descriptor's storage I/O starts as soon
as its network transfer lands, while the others are still in flight.
Storage backend: GDS when present, else POSIX; none is an error.

    python nixl_p2p_storage_example.py --role server --fileprefix /data/kv --name srv0 --port 5555
    python nixl_p2p_storage_example.py --role client --agents_file agents.txt --fileprefix /tmp/kv --name cli
"""

import argparse
import ctypes
import os
import random
import sys
import time

try:
    from nixl._api import nixl_agent, nixl_agent_config
except ImportError:
    from kvferry.nixl._api import nixl_agent, nixl_agent_config

libc = ctypes.CDLL(None, use_errno=True)


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--role", choices=["client", "server"], required=True)
    p.add_argument("--agents_file", help="client: lines '<agent name> <ip> <port>'")
    p.add_argument("--fileprefix", required=True)
    p.add_argument("--name", "--agent_name", dest="name", required=True)
    p.add_argument("--port", type=int, default=5555, help="server: metadata listener port")
    p.add_argument("--buf_size", type=int, default=1 << 20)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--iterations", type=int, default=1)
    p.add_argument("--storage_backend", default="auto", help="auto (GDS, else POSIX), GDS or POSIX")
    p.add_argument("--direct", action="store_true", help="O_DIRECT files (4 KiB-aligned sizes)")
    p.add_argument("--timeout", type=float, default=120.0)
    a = p.parse_args()
    if a.buf_size < 1 or a.batch_size < 1 or a.iterations < 1:
        p.error("--buf_size, --batch_size and --iterations must be positive")
    if a.direct and a.buf_size % 4096:
        p.error("--direct needs --buf_size a multiple of 4096")
    if a.role == "client" and not a.agents_file:
        p.error("--role client needs --agents_file")
    return a


def pattern(i, n):
    block = random.Random(i * 7919 + n).randbytes(4096)
    return (block * (n // 4096 + 1))[:n]


def alloc(n):
    p = ctypes.c_void_p()
    if libc.posix_memalign(ctypes.byref(p), 4096, n) != 0:
        raise MemoryError(f"posix_memalign({n}) failed")
    return p.value


def make_agent(a, listen):
    # The client listens too (on any port): NIXL completes a fetch of a
    # peer's metadata only in an agent whose listener thread runs.
    agent = nixl_agent(a.name, nixl_agent_config(True, True, a.port if listen else 0, backends=["UCX"]))
    plugins = agent.get_plugin_list()
    want = ["GDS", "POSIX"] if a.storage_backend == "auto" else [a.storage_backend.upper()]
    found = [b for b in want if b in plugins]
    if not found:
        print(f"[{a.name}] error: no storage backend: wanted {want}, this NIXL has {plugins}; a storage "
              "backend (GDS or POSIX) is required", flush=True)
        sys.exit(2)
    agent.create_backend(found[0])
    print(f"[{a.name}] storage backend: {found[0]}", flush=True)
    return agent


def setup(agent, a, tag):
    n, k = a.buf_size, a.batch_size
    mem = alloc(n * k)
    ctypes.memset(mem, 0, n * k)
    agent.register_memory([(mem, n * k, 0, "")], "DRAM")
    flags = os.O_RDWR | os.O_CREAT | (os.O_DIRECT if a.direct else 0)
    paths = [f"{a.fileprefix}{tag}_{i}.bin" for i in range(k)]
    fds = []
    for p in paths:
        fd = os.open(p, flags, 0o644)
        os.ftruncate(fd, n)
        fds.append(fd)
    agent.register_memory([(0, n, fd, p) for fd, p in zip(fds, paths)], "FILE")
    dram = agent.get_xfer_descs([(mem + i * n, n, 0) for i in range(k)], "DRAM")
    files = agent.get_xfer_descs([(0, n, fd) for fd in fds], "FILE")
    return mem, dram, files, paths


def done(agent, h, deadline, what):
    """Whether ``h`` finished: raises when it failed or ``deadline`` passed."""
    state = agent.check_xfer_state(h)
    if state == "ERR":
        raise RuntimeError(f"{what} failed (see the log above for why)")
    if state != "DONE" and time.time() > deadline:
        raise TimeoutError(f"{what} did not finish in time (--timeout)")
    return state == "DONE"


def run_all(agent, handles, deadline, what):
    for h in handles:
        agent.transfer(h)
    for h in handles:
        wait(agent, h, deadline, what)


def wait(agent, h, deadline, what):
    while not done(agent, h, deadline, what):
        pass


def pipelined(agent, first, second, iterations, deadline, what):
    """``iterations`` rounds of ``first[i]`` then ``second[i]`` per slot,
    pipelined: ``second[i]`` is posted as soon as ``first[i]`` is done, with
    half the slots' first steps in flight, the next posted as each lands (in
    the next round once the slot's ``second`` is done). 64 storage reads
    posted at once all land together, leaving the network idle meanwhile."""
    k = len(first)
    total, window, posted = k * iterations, max(k // 2, 1), 0
    for step in range(total):
        while posted < total and posted < step + window:
            slot = posted % k
            if posted >= k:  # the slot's memory is reused: its last round must be done
                wait(agent, second[slot], deadline, what)
            agent.transfer(first[slot])
            posted += 1
        wait(agent, first[step % k], deadline, what)
        agent.transfer(second[step % k])
    for h in second:
        wait(agent, h, deadline, what)


def report(role, what, seconds, nbytes):
    print(f"[{role}] {what}: {seconds * 1e3:.1f} ms, {nbytes / max(seconds, 1e-9) / 1e9:.3f} GB/s", flush=True)


def verify(mem, a, who):
    bad = [i for i in range(a.batch_size)
           if ctypes.string_at(mem + i * a.buf_size, a.buf_size) != pattern(i, a.buf_size)]
    print(f"[{a.name}] {who}: {'verified OK' if not bad else f'MISMATCH in descriptors {bad[:8]}'}", flush=True)
    return not bad


def split(agent, dlist, mem_type):
    return [agent.get_xfer_descs([dlist[i]], mem_type) for i in range(dlist.descCount())]


def client(a):
    agent = make_agent(a, False)
    deadline = time.time() + a.timeout
    mem, dram, files, _ = setup(agent, a, a.name)
    total = a.buf_size * a.batch_size * a.iterations
    for i in range(a.batch_size):
        ctypes.memmove(mem + i * a.buf_size, pattern(i, a.buf_size), a.buf_size)
    w = agent.initialize_xfer("WRITE", dram, files, a.name)
    t = time.perf_counter()
    for _ in range(a.iterations):
        run_all(agent, [w], deadline, "local WRITE")
    report(a.name, "local WRITE (DRAM->FILE)", time.perf_counter() - t, total)
    ctypes.memset(mem, 0, a.buf_size * a.batch_size)
    r = agent.initialize_xfer("READ", dram, files, a.name)
    t = time.perf_counter()
    for _ in range(a.iterations):
        run_all(agent, [r], deadline, "local READ")
    report(a.name, "local READ (FILE->DRAM)", time.perf_counter() - t, total)
    ok = verify(mem, a, "local read-back")
    servers = [ln.split() for ln in open(a.agents_file) if ln.strip()]
    for srv in servers:
        if len(srv) != 3 or not srv[2].isdigit():
            print(f"[{a.name}] bad agents file line {' '.join(srv)!r}: want '<agent name> <ip> <port>'")
            return 2
        name, ip, port = srv[0], srv[1], int(srv[2])
        while not agent.check_remote_metadata(name):
            if time.time() > deadline:
                print(f"[{a.name}] no answer from {name} at {ip}:{port} (connection refused or timed out)")
                return 3
            agent.fetch_remote_metadata(name, ip, port)
            agent.send_local_metadata(ip, port)
            time.sleep(0.3)
        for op in ("WRITE", "READ"):
            if op == "READ":
                ctypes.memset(mem, 0, a.buf_size * a.batch_size)
            t = time.perf_counter()
            agent.send_notif(name, op.encode() + b":" + agent.get_serialized_descs(dram))
            while not agent.check_remote_xfer_done(name, f"DONE_{op}".encode()):
                if time.time() > deadline:
                    print(f"[{a.name}] {name} did not finish the remote {op}")
                    return 3
            report(a.name, f"remote {op} via {name}", time.perf_counter() - t, total)
        ok &= verify(mem, a, f"remote read-back from {name}")
        agent.send_notif(name, b"BYE")
    time.sleep(0.2)
    return 0 if ok else 1


def server(a):
    agent = make_agent(a, True)
    mem, dram, files, paths = setup(agent, a, a.name)
    dram_h, file_h = split(agent, dram, "DRAM"), split(agent, files, "FILE")
    print(f"[{a.name}] serving on port {a.port}", flush=True)
    ok = True
    while True:
        notes = {}
        quiet_until = time.time() + a.timeout
        while not notes:
            notes = {k: v for k, v in agent.get_new_notifs().items() if v}
            if not notes and time.time() > quiet_until:
                print(f"[{a.name}] no request from any client in {a.timeout:.0f} s (--timeout); giving up",
                      flush=True)
                return 3
            time.sleep(0.0005)
        for peer, msgs in notes.items():
            for m in msgs:
                if m == b"BYE":
                    print(f"[{a.name}] {peer} done; files {'verified OK' if ok else 'MISMATCH'}", flush=True)
                    return 0 if ok else 1
                op, _, blob = m.partition(b":")
                remote = split(agent, agent.deserialize_descs(blob), "DRAM")
                deadline = time.time() + a.timeout
                t = time.perf_counter()
                net = [agent.initialize_xfer("READ" if op == b"WRITE" else "WRITE", d, r, peer)
                       for d, r in zip(dram_h, remote)]
                sto = [agent.initialize_xfer("WRITE" if op == b"WRITE" else "READ", d, f, a.name)
                       for d, f in zip(dram_h, file_h)]
                if op == b"WRITE":
                    pipelined(agent, net, sto, a.iterations, deadline, "remote WRITE")
                else:
                    pipelined(agent, sto, net, a.iterations, deadline, "remote READ")
                report(a.name, f"{op.decode()} for {peer}", time.perf_counter() - t,
                       a.buf_size * a.batch_size * a.iterations)
                if op == b"WRITE":
                    ok &= all(open(p, "rb").read() == pattern(i, a.buf_size) for i, p in enumerate(paths))
                agent.send_notif(peer, f"DONE_{op.decode()}".encode())


if __name__ == "__main__":
    args = parse()
    sys.exit(client(args) if args.role == "client" else server(args))
