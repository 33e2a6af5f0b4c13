"""Two-node point-to-point benchmark on NIXL's Python API (the seed's
simple_ucx_p2p.py): the target listens for metadata and exposes a DRAM
buffer; the initiator WRITEs each buffer size to it and reports bandwidth and
mean latency.

    python p2p_bench.py --mode target --ip 192.168.1.100 --port 5555
    python p2p_bench.py --mode initiator --ip 192.168.1.100 --port 5555 --buffer_sizes 1MB,16MB,64MB
"""

import argparse
import statistics
import sys
import time

try:
    import nixl._utils as nixl_utils
    from nixl._api import nixl_agent, nixl_agent_config
except ImportError:
    import kvferry.nixl._utils as nixl_utils
    from kvferry.nixl._api import nixl_agent, nixl_agent_config

UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
RULE = "=" * 80


def size(text):
    t = text.strip().upper()
    for u in ("GB", "MB", "KB", "B"):
        if t.endswith(u) and t[: -len(u)].replace(".", "", 1).isdigit():
            return int(float(t[: -len(u)]) * UNITS[u])
    if t.isdigit():
        return int(t)
    raise argparse.ArgumentTypeError(f"bad size {text!r}: write e.g. 64KB, 16MB, 1GB")


def human(n):
    for u in ("GB", "MB", "KB"):
        if n >= UNITS[u]:
            return f"{n / UNITS[u]:.1f} {u}"
    return f"{n} B"


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["target", "initiator"], required=True)
    p.add_argument("--ip", required=True, help="the target's address (the target listens there)")
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--buffer_sizes", default="1MB,16MB,64MB")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--backend", default="UCX")
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--gpu_id", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args()
    a.sizes = [size(s) for s in a.buffer_sizes.split(",") if s.strip()]
    if not a.sizes or a.iterations < 1 or a.warmup < 0:
        p.error("need at least one buffer size, --iterations >= 1 and --warmup >= 0")
    if a.cuda:
        p.error("--cuda: kvferry has no VRAM backend yet; run without --cuda (CPU DRAM)")
    return a


def wait(cond, what, deadline):
    while not cond():
        if time.time() > deadline:
            print(f"timed out waiting for {what}", flush=True)
            sys.exit(3)
        time.sleep(0.001)


def target(a):
    print(f"{RULE}\nUCX P2P Benchmark - TARGET MODE\n{RULE}\nListening on: {a.ip}:{a.port}\nMemory: CPU (DRAM)",
          flush=True)
    n = max(a.sizes)
    agent = nixl_agent("p2p_target", nixl_agent_config(True, True, a.port, backends=[a.backend]))
    addr = nixl_utils.malloc_passthru(n)
    agent.register_memory([(addr, n, 0, "")], "DRAM")
    print("Waiting for initiator connection...", flush=True)
    deadline = time.time() + a.timeout
    wait(lambda: agent.check_remote_metadata("p2p_initiator"), "the initiator", deadline)
    print("Connected to initiator!", flush=True)
    agent.send_notif("p2p_initiator", agent.get_serialized_descs(agent.get_xfer_descs([(addr, n, 0)], "DRAM")))
    print("Ready to receive transfers...", flush=True)
    wait(lambda: agent.check_remote_xfer_done("p2p_initiator", b"DONE"), "the initiator's DONE", 1e18)
    print("Initiator done.", flush=True)
    return 0


def initiator(a):
    print(f"{RULE}\nUCX P2P Benchmark - INITIATOR MODE\n{RULE}\nTarget: {a.ip}:{a.port}\nMemory: CPU (DRAM)")
    print(f"Buffer sizes: {', '.join(human(s) for s in a.sizes)}\nIterations: {a.iterations} "
          f"(warmup: {a.warmup})\n{RULE}\n", flush=True)
    n = max(a.sizes)
    # A listener on any port: NIXL completes a metadata fetch only in an
    # agent whose listener thread runs.
    agent = nixl_agent("p2p_initiator", nixl_agent_config(True, True, 0, backends=[a.backend]))
    addr = nixl_utils.malloc_passthru(n)
    nixl_utils.ba_buf(addr, n)
    agent.register_memory([(addr, n, 0, "")], "DRAM")
    deadline = time.time() + a.timeout
    while not agent.check_remote_metadata("p2p_target"):  # the target may not be listening yet: ask again
        if time.time() > deadline:
            print(f"Connection refused or timed out: no target answered at {a.ip}:{a.port} (is it running "
                  "there, and is the port open?)", flush=True)
            return 3
        agent.fetch_remote_metadata("p2p_target", a.ip, a.port)
        agent.send_local_metadata(a.ip, a.port)
        time.sleep(0.5)
    notes = {}
    wait(lambda: bool(notes.update(agent.get_new_notifs())) or "p2p_target" in notes, "the target's buffer",
         deadline)
    remote = agent.deserialize_descs(notes["p2p_target"][0])
    raddr, rlen = remote[0][0], remote[0][1]
    if rlen < n:
        print(f"the target's buffer is {human(rlen)}; start it with --buffer_sizes covering {human(n)}")
        return 2
    for s in a.sizes:
        print(f"Testing {human(s)}...", flush=True)
        h = agent.initialize_xfer("WRITE", agent.get_xfer_descs([(addr, s, 0)], "DRAM"),
                                  agent.get_xfer_descs([(raddr, s, 0)], "DRAM"), "p2p_target")
        lat = []
        for i in range(a.warmup + a.iterations):
            t = time.perf_counter()
            state = agent.transfer(h)
            while state != "DONE":
                state = agent.check_xfer_state(h)
            if i >= a.warmup:
                lat.append(time.perf_counter() - t)
        agent.release_xfer_handle(h)
        print(f"  Bandwidth: {s * len(lat) / sum(lat) / 1e9:.2f} GB/s, "
              f"Latency: {statistics.mean(lat) * 1e6:.1f} μs (mean)\n", flush=True)
    agent.send_notif("p2p_target", b"DONE")
    time.sleep(0.2)
    return 0


if __name__ == "__main__":
    args = parse()
    sys.exit(target(args) if args.mode == "target" else initiator(args))
