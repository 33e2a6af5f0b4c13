"""``python -m kvferry.bench``: what Python costs on top of kvferry's Rust
core, and the descriptor-heavy calls, beside real NIXL when a Python with
``nixl`` installed is given. A benchmark, never a test.

  python -m kvferry.bench [--nixl-python PATH] [--rounds N] [--kvferry-cli PATH]

It runs ``kvferry/_bench/worker.py`` (a NIXL program) through
``python -m kvferry.nixl`` and, with ``--nixl-python``, unmodified on NIXL;
with ``--kvferry-cli`` it also runs ``kvferry bench p2p`` for the Rust
figures of the same shapes. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = str(Path(__file__).with_name("_bench") / "worker.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(python: str | None) -> list:
    return [sys.executable, "-m", "kvferry.nixl", WORKER] if python is None else [python, WORKER]


def _json(out: str) -> dict:
    for line in reversed(out.splitlines()):
        if line.startswith("{") and '"role": "target"' not in line:
            return json.loads(line)
    raise RuntimeError(f"no result in:\n{out}")


def pair(python: str | None, backend: str, size: int, iters: int, op: str, env: dict | None = None) -> dict:
    """One target and one initiator process; the initiator's result."""
    e = dict(os.environ, **(env or {}))
    tp, ip = _port(), _port()
    t = subprocess.Popen(_cmd(python) + ["target", str(tp), backend, str(size)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=e)
    try:
        addr = None
        for line in t.stdout:
            if line.startswith("ready"):
                addr = int(line.split()[1])
                break
        if addr is None:
            raise RuntimeError("the target did not start")
        i = subprocess.run(_cmd(python) + ["initiator", str(ip), str(tp), backend, str(size), str(iters), op,
                                           str(addr)], capture_output=True, text=True, env=e, timeout=600)
        return _json(i.stdout + "\n" + i.stderr)
    finally:
        try:
            t.wait(timeout=10)
        except subprocess.TimeoutExpired:
            t.kill()


def descs(python: str | None, rounds: int) -> dict:
    """The descriptor-heavy calls in one process."""
    r = subprocess.run(_cmd(python) + ["descs", str(rounds)], capture_output=True, text=True, timeout=600)
    return _json(r.stdout + "\n" + r.stderr)  # NIXL may exit non-zero after printing (teardown)


def rust_p2p(cli: str, backend: str, size: int, op: str) -> dict | None:
    """``kvferry bench p2p`` for one shape: ``{"us": average latency, "gbps"}``."""
    r = subprocess.run([cli, "bench", "p2p", "--backend", backend, "--block-sizes", str(size), "--op", op, "--json"],
                       capture_output=True, text=True, timeout=600)
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            return {"us": float(row["lat_us_avg"]), "gbps": float(row["gbps"])}
    return None


def python_vs_rust(cli: str, rounds: int, small_iters: int, big_iters: int) -> list:
    """Python (kvferry.nixl, AlignedBuf memory) against ``kvferry bench p2p``
    for the same shapes, alternating round by round; medians of the figures
    and of the per-round ratios. 4 KiB: NIXL's transfer()+check_xfer_state()
    spin; 64 MiB: transfer() then a blocking wait (GIL released), as the
    Rust bench waits, so that a spinning Python thread does not take one of
    the two cores from the backend's threads."""
    import statistics

    aligned = {"KVFERRY_BENCH_ALIGNED": "1"}
    shapes = [("SHM", "UCX", "shm"), ("TCP", "TCP", "tcp")]
    out = []
    for label, nixl_backend, cli_backend in shapes:
        for size, op in ((4096, "WRITE"), (64 << 20, "WRITE"), (64 << 20, "READ")):
            py, ru = [], []
            for _ in range(rounds):
                iters = small_iters if size == 4096 else big_iters
                env = dict(aligned, **({} if size == 4096 else {"KVFERRY_BENCH_WAIT": "1"}))
                p = pair(None, nixl_backend, size, iters, op, env)
                r = rust_p2p(cli, cli_backend, size, op.lower())
                if r is None:
                    break
                py.append(p["us"] if size == 4096 else p["gbps"])
                ru.append(r["us"] if size == 4096 else r["gbps"])
            if not ru:
                continue
            what = f"{label}: {'4 KiB' if size == 4096 else '64 MiB'} {op}"
            if size == 4096:
                diffs = [x - y for x, y in zip(py, ru)]
                out.append(("Python vs Rust", what, f"{statistics.median(py):.2f} µs vs {statistics.median(ru):.2f} µs: "
                                                     f"{statistics.median(diffs):+.2f} µs"))
            else:
                ratios = [x / y for x, y in zip(py, ru)]
                out.append(("Python vs Rust", what, f"{statistics.median(py):.2f} vs {statistics.median(ru):.2f} GB/s: "
                                                     f"{statistics.median(ratios):.2f}×"))
    return out


def main() -> None:
    """Runs the benchmark and prints the table."""
    ap = argparse.ArgumentParser(prog="python -m kvferry.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nixl-python", help="a Python interpreter with NIXL installed (pip install nixl)")
    ap.add_argument("--kvferry-cli", help="the kvferry CLI, for the Rust figures")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--small-iters", type=int, default=20000)
    ap.add_argument("--big-iters", type=int, default=20)
    a = ap.parse_args()
    impls = [("kvferry", None)] + ([("NIXL", a.nixl_python)] if a.nixl_python else [])
    rows = []
    for name, py in impls:
        d = descs(py, a.rounds)
        rows.append((name, "get_xfer_descs, 1M×3 numpy", f"{d['get_xfer_descs_1M_ms']:.2f} ms"))
        rows.append((name, "prep_xfer_dlist, 100k descriptors", f"{d['prep_xfer_dlist_100k_ms']:.2f} ms"))
        rows.append((name, "make_prepped_xfer, 4096 int64 indices", f"{d['make_prepped_xfer_4096_us']:.1f} µs"))
    shapes = [("same host (UCX→SHM)", "UCX"), ("TCP", "TCP")]
    runs = [("kvferry", None, {}), ("kvferry, AlignedBuf", None, {"KVFERRY_BENCH_ALIGNED": "1"})]
    runs += [("NIXL", a.nixl_python, {})] if a.nixl_python else []
    for label, backend in shapes:
        for name, py, env0 in runs:
            b, env = backend, dict(env0)
            if name == "NIXL":
                b = "UCX"
                env.update({"UCX_TLS": "tcp"} if backend == "TCP" else {})
            small = pair(py, b, 4096, a.small_iters, "WRITE", env)
            rows.append((name, f"{label}: 4 KiB WRITE transfer()+check_xfer_state()", f"{small['us']:.2f} µs"))
            for op in ("WRITE", "READ"):
                big = pair(py, b, 64 << 20, a.big_iters, op, env)
                rows.append((name, f"{label}: 64 MiB {op}", f"{big['gbps']:.2f} GB/s"))
    if a.kvferry_cli:
        rows += python_vs_rust(a.kvferry_cli, a.rounds, a.small_iters, a.big_iters)
    print("| library | workload | figure |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
