#!/usr/bin/env python3
"""Compares two kvferry binaries on the main job, in one run.

    python3 scripts/bench_ab.py BEFORE_BIN AFTER_BIN [--rounds 5] [--env K=V ...]

Runs `BIN bench --json` alternately (before, after, before, ...) so both see
the same machine noise, then prints per row the median GB/s and the median
average latency of each binary and their ratio (after / before; the ratio is
the median of the per-round ratios). `--env-after K=V` sets a variable for
the second binary only (e.g. KVFERRY_TELEMETRY=1 against the same binary).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys


def run(binary, env):
    e = dict(os.environ)
    e.update(env)
    out = subprocess.run([binary, "bench", "--json"], env=e, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        sys.exit(f"{binary} bench failed ({out.returncode}):\n{out.stderr[-2000:]}")
    rows = {}
    for line in out.stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        if "backend" not in r:
            continue
        key = (r["backend"], r["op"], r["block_size"], r["batch_size"])
        rows[key] = r
    return rows


def size(n):
    for unit, s in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= s and n % s == 0:
            return f"{n // s}{unit}"
    return str(n)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--env-after", action="append", default=[], help="K=V for the second binary only")
    a = ap.parse_args()
    env_after = dict(kv.split("=", 1) for kv in a.env_after)
    runs = {"before": [], "after": []}
    for i in range(a.rounds):
        for name, binary, env in (("before", a.before, {}), ("after", a.after, env_after)):
            print(f"round {i + 1}/{a.rounds}: {name}", file=sys.stderr, flush=True)
            runs[name].append(run(binary, env))
    keys = [k for k in runs["before"][0] if all(k in r for r in runs["before"] + runs["after"])]
    print(f"{'backend':7} {'op':5} {'block':>5} {'batch':>5} | {'GB/s before':>11} {'after':>8} {'ratio':>6} |"
          f" {'avg us before':>13} {'after':>9} {'ratio':>6}")
    for k in keys:
        gb = [(b[k]["gbps"], f[k]["gbps"]) for b, f in zip(runs["before"], runs["after"])]
        lat = [(b[k]["lat_us_avg"], f[k]["lat_us_avg"]) for b, f in zip(runs["before"], runs["after"])]
        med = statistics.median
        print(f"{k[0]:7} {k[1]:5} {size(k[2]):>5} {k[3]:>5} | {med(x for x, _ in gb):11.3f} {med(y for _, y in gb):8.3f}"
              f" {med(y / x for x, y in gb if x):6.3f} | {med(x for x, _ in lat):13.1f} {med(y for _, y in lat):9.1f}"
              f" {med(y / x for x, y in lat if x):6.3f}")


if __name__ == "__main__":
    main()
