"""Streaming with notification backpressure, on NIXL's Python API.

A receiver owns a ring of NUM_BUFFERS slots laid out ``[seq u64][data]``; a
sender WRITEs slots through prepared handles made once per slot. The receiver
polls each slot's sequence number, counts any it finds ahead of what it
expects (an overrun) and sends ``P:<n>`` progress notifications every
PROGRESS interval; the sender waits while ``sent - progress >= THRESHOLD``.
Metadata goes through kvferry's metadata server (``KVFERRY_METADATA_URL``,
or ``--metadata_url``) or etcd (``NIXL_ETCD_ENDPOINTS``).

Both roles on one host (starts an embedded metadata server)::

    python nixl_sender_receiver.py
Two hosts::

    kvferry meta-server --addr 0.0.0.0:9998                        # anywhere
    python nixl_sender_receiver.py --mode receiver --metadata_url http://HOST:9998
    python nixl_sender_receiver.py --mode sender --metadata_url http://HOST:9998
"""

import argparse
import ctypes
import os
import subprocess
import sys
import time

try:
    import nixl._utils as nixl_utils
    from nixl._api import nixl_agent, nixl_agent_config
except ImportError:  # kvferry's NIXL API under its own name
    import kvferry.nixl._utils as nixl_utils
    from kvferry.nixl._api import nixl_agent, nixl_agent_config

EMPTY = (1 << 64) - 1


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["both", "sender", "receiver"], default="both")
    p.add_argument("--num_buffers", type=int, default=64)
    p.add_argument("--buffer_size", type=int, default=16 << 20)
    p.add_argument("--transfers", type=int, default=700)
    p.add_argument("--threshold", type=int, default=60)
    p.add_argument("--progress", type=int, default=16)
    p.add_argument("--backend", default="UCX", help="UCX (SHM/TCP chosen per peer) or TCP")
    p.add_argument("--metadata_url", default=None, help="kvferry meta-server URL (else the environment's store)")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--consume_us", type=float, default=0.0,
                   help="time the receiver spends on each slot before freeing it (a slow consumer)")
    a = p.parse_args()
    if a.num_buffers < 1 or a.buffer_size < 1 or a.transfers < 1 or a.progress < 1:
        p.error("--num_buffers, --buffer_size, --transfers and --progress must be positive")
    if a.consume_us < 0:
        p.error("--consume_us must not be negative")
    if not 0 < a.threshold <= a.num_buffers:
        p.error(f"--threshold must be in 1..{a.num_buffers} (--num_buffers), or the sender overruns the ring")
    return a


def u64(addr):
    return ctypes.c_uint64.from_address(addr)


class Deadline:
    def __init__(self, seconds, role):
        self.end, self.role = time.time() + seconds, role

    def check(self, what):
        if time.time() > self.end:
            print(f"[{self.role}] timed out waiting for {what}", flush=True)
            sys.exit(3)


def setup(role, a):
    slot = 8 + a.buffer_size
    agent = nixl_agent(role, nixl_agent_config(backends=[a.backend]))
    addr = nixl_utils.malloc_passthru(slot * a.num_buffers)
    ctypes.memset(addr, 0, slot * a.num_buffers)
    agent.register_memory(agent.get_reg_descs([(addr, slot * a.num_buffers, 0, "")], "DRAM"))
    descs = agent.get_xfer_descs([(addr + i * slot, slot, 0) for i in range(a.num_buffers)], "DRAM")
    return agent, addr, slot, descs


def connect(agent, role, peer, dl):
    agent.send_local_metadata()
    agent.fetch_remote_metadata(peer)
    while not agent.check_remote_metadata(peer):
        dl.check(f"{peer}'s metadata")
        time.sleep(0.005)


def landing(value, expected):
    """Whether ``value`` is ``expected`` partly written over ``EMPTY``: each
    byte is the byte of one or the other."""
    v, e, m = value.to_bytes(8, "little"), expected.to_bytes(8, "little"), EMPTY.to_bytes(8, "little")
    return all(b in (x, y) for b, x, y in zip(v, e, m))


def receiver(a):
    dl = Deadline(a.timeout, "receiver")
    print("[receiver] Starting", flush=True)
    t0 = time.perf_counter()
    agent, addr, slot, descs = setup("receiver", a)
    for i in range(a.num_buffers):
        u64(addr + i * slot).value = EMPTY
    connect(agent, "receiver", "sender", dl)
    agent.send_notif("sender", b"D:" + agent.get_serialized_descs(descs))
    t_setup = time.perf_counter() - t0
    got, mismatches, t_first = 0, 0, None
    while got < a.transfers:
        seq = u64(addr + (got % a.num_buffers) * slot)
        while seq.value == EMPTY:
            dl.check(f"transfer {got}")
        if t_first is None:
            t_first = time.perf_counter()
        if seq.value != got:
            # Over TCP the header can land a few bytes at a time, so a value
            # whose every byte is either EMPTY's or the expected one's is
            # still arriving: wait for it (bounded by the deadline). Any other
            # value is an overrun (it leaves seq + k * NUM_BUFFERS there).
            while seq.value != got and landing(seq.value, got):
                dl.check(f"the header of transfer {got}")
            if seq.value != got:
                print(f"[receiver] slot {got % a.num_buffers}: sequence {seq.value:#x}, expected {got}",
                      file=sys.stderr, flush=True)
                mismatches += 1
        if a.consume_us:
            consume_until = time.perf_counter() + a.consume_us / 1e6
            while time.perf_counter() < consume_until:
                pass
        seq.value = EMPTY
        got += 1
        if got % a.progress == 0 or got == a.transfers:
            agent.send_notif("sender", f"P:{got}".encode())
    t_end = time.perf_counter()
    while not agent.check_remote_xfer_done("sender", b"BYE"):
        dl.check("the sender's BYE")
        time.sleep(0.001)
    gbps = a.transfers * a.buffer_size / max(t_end - t_first, 1e-9)
    print(f"[receiver] Setup + metadata: {t_setup * 1e3:.1f} ms; receive loop: {(t_end - t_first) * 1e3:.1f} ms",
          flush=True)
    print(f"[receiver] Bandwidth: {gbps / 1e6:.1f} MB/s", flush=True)
    mark = "✓" if mismatches == 0 else "✗"
    print(f"[receiver] {mark} {'No buffer overrun' if mismatches == 0 else 'Buffer overrun'} "
          f"({mismatches} mismatches)", flush=True)
    return 0 if mismatches == 0 else 1


def sender(a):
    dl = Deadline(a.timeout, "sender")
    print("[sender] Starting", flush=True)
    t0 = time.perf_counter()
    agent, addr, slot, descs = setup("sender", a)
    connect(agent, "sender", "receiver", dl)
    remote = None
    while remote is None:
        for m in agent.get_new_notifs().get("receiver", []):
            if m.startswith(b"D:"):
                remote = agent.deserialize_descs(m[2:])
        dl.check("the receiver's descriptors")
    local_prep = agent.prep_xfer_dlist("NIXL_INIT_AGENT", descs, "DRAM")
    remote_prep = agent.prep_xfer_dlist("receiver", remote, "DRAM")
    handles = [agent.make_prepped_xfer("WRITE", local_prep, [i], remote_prep, [i], f"BUF_{i}".encode())
               for i in range(a.num_buffers)]
    posted = [False] * a.num_buffers
    t_setup = time.perf_counter() - t0
    progress, sent, checks, wait_s, max_ahead, reuse_s = 0, 0, 0, 0.0, 0, 0.0

    def drain():
        nonlocal progress
        for m in agent.get_new_notifs().get("receiver", []):
            if m.startswith(b"P:"):
                progress = max(progress, int(m[2:]))

    t_loop = time.perf_counter()
    while sent < a.transfers:
        drain()
        if sent - progress >= a.threshold:
            checks += 1
            w = time.perf_counter()
            while sent - progress >= a.threshold:
                dl.check("receiver progress")
                drain()
            wait_s += time.perf_counter() - w
        max_ahead = max(max_ahead, sent - progress)
        i = sent % a.num_buffers
        if posted[i]:  # the slot's previous WRITE must be done before its memory is reused
            w = time.perf_counter()
            while agent.check_xfer_state(handles[i]) != "DONE":
                dl.check(f"slot {i}'s previous WRITE")
            reuse_s += time.perf_counter() - w
        u64(addr + i * slot).value = sent
        agent.transfer(handles[i])
        posted[i] = True
        sent += 1
    for i, h in enumerate(handles):
        while posted[i] and agent.check_xfer_state(h) != "DONE":
            dl.check("the last WRITEs")
    t_sent = time.perf_counter()
    while progress < a.transfers:
        dl.check("the receiver's last progress")
        drain()
    agent.send_notif("receiver", b"BYE")
    gbps = a.transfers * a.buffer_size / max(t_sent - t_loop, 1e-9)
    print(f"[sender] Setup + metadata + {a.num_buffers} handles: {t_setup * 1e3:.1f} ms; send loop: "
          f"{(t_sent - t_loop) * 1e3:.1f} ms (slot reuse wait {reuse_s * 1e3:.1f} ms)", flush=True)
    print(f"[sender] Bandwidth: {gbps / 1e6:.1f} MB/s", flush=True)
    print(f"[sender] Backpressure: {checks} checks, {wait_s * 1e3:.0f}ms wait, max ahead: "
          f"{max_ahead}/{a.num_buffers}", flush=True)
    time.sleep(0.2)  # let BYE leave before the agent goes
    return 0


def main():
    a = parse()
    if a.metadata_url:
        os.environ["KVFERRY_METADATA_URL"] = a.metadata_url
    if a.mode == "receiver":
        return receiver(a)
    if a.mode == "sender":
        return sender(a)
    print("[main] Starting sender-receiver test...", flush=True)
    server = None
    if not (os.environ.get("KVFERRY_METADATA_URL") or os.environ.get("NIXL_ETCD_ENDPOINTS")
            or os.environ.get("KVFERRY_ETCD_ENDPOINTS")):
        import kvferry
        server = kvferry.MetaServer()
        os.environ["KVFERRY_METADATA_URL"] = server.url
    args = [a for a in sys.argv[1:] if not a.startswith("--mode")]
    procs = [subprocess.Popen([sys.executable, __file__, "--mode", m, *args]) for m in ("receiver", "sender")]
    rcs = [p.wait() for p in procs]
    if server:
        server.stop()
    ok = rcs == [0, 0]
    print(f"[main] {'✓ Success!' if ok else f'✗ Failed (exit codes {rcs})'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
