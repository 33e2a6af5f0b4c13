#!/usr/bin/env python3
"""Measures kvferry against the physical references and NIXL in one session,
alternating them round by round, and prints medians and paired ratios.

Usage: scripts/perf.py [--rounds 5] [--only all|storage] [--nixl .venv-nixl/bin/python] [--skip-nixl]
Needs: target/release/kvferry (cargo build --release), iperf3, fio, gcc
(for the memcpy anchor); NIXL optional. See docs/PERFORMANCE.md."""
import argparse, json, os, re, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = os.path.join(ROOT, "target/release/kvferry")
ANCHORS = os.path.join(os.path.dirname(ROOT), "shared/anchors")
DIR = "/var/tmp/kvferry-perf"

def sh(cmd, timeout=600, check=True):
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd}\n{r.stdout}\n{r.stderr}")
    return r.stdout

def kv_json(args):
    return [json.loads(l) for l in sh(f"{K} {args} --json").splitlines() if l.startswith("{")]

def memcpy():
    out = sh("/tmp/kvferry_memcpy_bw")
    return float(re.search(r"^67108864 bytes: ([\d.]+)", out, re.M).group(1))

def iperf():
    j = json.loads(sh("iperf3 -c 127.0.0.1 -t 3 -J"))
    return j["end"]["sum_received"]["bits_per_second"] / 8e9

def fio(rw, bs, depth, runtime=None):
    f = os.path.join(DIR, "fio.dat")
    extra = f"--time_based --runtime={runtime}" if runtime else ""
    j = json.loads(sh(f"fio --name=a --filename={f} --rw={rw} --bs={bs} --iodepth={depth} --direct=1 "
                      f"--ioengine=io_uring --size=1G {extra} --output-format=json"))
    job = j["jobs"][0]["read" if "read" in rw else "write"]
    return job["bw_bytes"] / 1e9, job["iops"]

def nixl_p2p(py, tls, op, sizes, batch=1):
    # The anchor's target sometimes exits non-zero after the initiator printed its figures.
    out = sh(f"{py} {ANCHORS}/nixl_p2p.py --tls {tls} --op {op} --sizes {sizes} --batch {batch}", timeout=300, check=False)
    res = {}
    for l in out.splitlines():
        m = re.match(r"(\d+)x(\d+)\s+([\d.]+) GB/s\s+([\d.]+) us/req", l)
        if m:
            res[int(m.group(1))] = (float(m.group(3)), float(m.group(4)))
    return res

def nixl_storage(py, huge=True):
    args = f"--block 1M --batch 256 --engine uring --direct --dir {DIR}"
    if huge:
        cmd = f"{py} {ANCHORS}/nixl_storage.py {args}"
    else:
        # numpy madvises transparent huge pages for arrays of 4 MiB and more;
        # this runs the same anchor with that off (4 KiB pages, as fio has).
        cmd = (f"{py} -c \"import sys, runpy, numpy; numpy.core.multiarray._set_madvise_hugepage(False); "
               f"sys.argv = ['nixl_storage.py'] + sys.argv[1:]; runpy.run_path('{ANCHORS}/nixl_storage.py', run_name='__main__')\" {args}")
    out = sh(cmd, timeout=300, check=False)
    w = float(re.search(r"^WRITE.*median ([\d.]+) GB/s", out, re.M).group(1))
    r = float(re.search(r"^READ.*median ([\d.]+) GB/s", out, re.M).group(1))
    return w, r

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--nixl", default=os.path.join(os.path.dirname(ROOT), ".venv-nixl/bin/python"))
    ap.add_argument("--skip-nixl", action="store_true")
    ap.add_argument("--only", choices=["all", "storage"], default="all")
    a = ap.parse_args()
    os.makedirs(DIR, exist_ok=True)
    sh(f"gcc -O2 {ANCHORS}/memcpy_bw.c -o /tmp/kvferry_memcpy_bw")
    use_nixl = not a.skip_nixl and os.path.exists(a.nixl)
    iperf_srv = subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    rows = {}
    def put(k, v):
        rows.setdefault(k, []).append(v)
    try:
        for r in range(a.rounds):
            print(f"round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
            put("memcpy 64M", memcpy())
            put("iperf3", iperf())
            p = kv_json("bench p2p --backend tcp --block-sizes 64M --op read")[0]
            put("tcp READ 67108864", (p["gbps"], p["lat_us_avg"]))
            for be in ([] if a.only == "storage" else ["local", "shm", "tcp"]):
                for p in kv_json(f"bench p2p --backend {be} --block-sizes 4K,64M"):
                    put(f"{be} WRITE {p['block_size']}", (p["gbps"], p["lat_us_avg"]))
                for p in kv_json(f"bench p2p --backend {be} --block-sizes 4K{'' if be == 'tcp' else ',64M'} --op read"):
                    put(f"{be} READ {p['block_size']}", (p["gbps"], p["lat_us_avg"]))
                for op in ["write", "read"]:
                    p = kv_json(f"bench p2p --backend {be} --block-sizes 16K --batch-sizes 4096 --op {op}")[0]
                    put(f"{be} {op.upper()} 16Kx4096", (p["gbps"], p["prep_us_avg"]))
            if use_nixl and a.only == "all":
                for tls, name in [("tcp", "nixl-tcp"), ("default", "nixl-shm")]:
                    for op in ["WRITE", "READ"]:
                        for size, v in nixl_p2p(a.nixl, tls, op, "4K,64M").items():
                            put(f"{name} {op} {size}", v)
                    v = nixl_p2p(a.nixl, tls, "WRITE", "16K", 4096)
                    put(f"{name} WRITE 16Kx4096", next(iter(v.values())))
            put("fio write 1M qd256", fio("write", "1M", 256)[0])
            put("fio read 1M qd256", fio("read", "1M", 256)[0])
            put("fio randread 4K qd64 iops", fio("randread", "4k", 64, runtime=3)[1])
            st = f"bench storage --dir {DIR} --file-size 1G --direct"
            put("posix WRITE 1M x256", kv_json(f"{st} --block-size 1M --batch-size 256 --op write --iters 8")[0]["gbps"])
            put("posix READ 1M x256", kv_json(f"{st} --block-size 1M --batch-size 256 --op read --iters 8")[0]["gbps"])
            # NIXL's anchor workload exactly: one 256 MiB file, one request of 256 x 1 MiB reposted.
            st256 = f"bench storage --dir {DIR} --file-size 256M --direct --block-size 1M --batch-size 256 --iters 8"
            put("posix WRITE 1M x256 (256M file)", kv_json(f"{st256} --op write")[0]["gbps"])
            put("posix READ 1M x256 (256M file)", kv_json(f"{st256} --op read")[0]["gbps"])
            put("posix WRITE 1M x256 (256M file, 4K pages)", kv_json(f"{st256} --op write --buffer shared")[0]["gbps"])
            put("posix READ 1M x256 (256M file, 4K pages)", kv_json(f"{st256} --op read --buffer shared")[0]["gbps"])
            put("posix randread 4K x64 iops",
                kv_json(f"{st} --block-size 4K --batch-size 64 --op read --pattern rand --duration 3")[0]["iops"])
            put("remote READ 1M x256", kv_json(f"bench storage --mode loopback --dir {DIR} --file-size 1G --direct "
                                              f"--block-size 1M --batch-size 256 --op read --iters 8")[0]["gbps"])
            if use_nixl:
                w, rd = nixl_storage(a.nixl)
                put("nixl-posix WRITE 1M x256", w)
                put("nixl-posix READ 1M x256", rd)
                w, rd = nixl_storage(a.nixl, huge=False)
                put("nixl-posix WRITE 1M x256 (4K pages)", w)
                put("nixl-posix READ 1M x256 (4K pages)", rd)
    finally:
        iperf_srv.kill()
        shutil.rmtree(DIR, ignore_errors=True)
    print(json.dumps(rows))
    med = lambda k, i=None: statistics.median([x[i] if i is not None else x for x in rows[k]])
    print("\n| measure | median | per round |")
    print("|---|---|---|")
    for k in rows:
        vals = rows[k]
        if isinstance(vals[0], (tuple, list)):
            print(f"| {k} | {med(k, 0):.3f} GB/s, {med(k, 1):.1f} µs | " + ", ".join(f"{v[0]:.2f}" for v in vals) + " |")
        else:
            print(f"| {k} | {med(k):.3f} | " + ", ".join(f"{v:.2f}" for v in vals) + " |")
    # Paired ratios: each round's figure over the reference measured in the same round.
    def ratio(k, ref, i=0, j=None):
        xs = [ (x[i] if isinstance(x, (tuple, list)) else x) / (y[j] if j is not None else y) for x, y in zip(rows[k], rows[ref])]
        return statistics.median(xs)
    print("\nPaired ratios (median over rounds):")
    for k, ref in [("local WRITE 67108864", "memcpy 64M"), ("shm WRITE 67108864", "memcpy 64M"), ("shm READ 67108864", "memcpy 64M"),
                   ("shm WRITE 16Kx4096", "memcpy 64M"), ("tcp WRITE 67108864", "iperf3"), ("tcp READ 67108864", "iperf3"),
                   ("posix WRITE 1M x256", "fio write 1M qd256"), ("posix READ 1M x256", "fio read 1M qd256"),
                   ("posix randread 4K x64 iops", "fio randread 4K qd64 iops"),
                   ("posix WRITE 1M x256 (256M file)", "nixl-posix WRITE 1M x256"),
                   ("posix READ 1M x256 (256M file)", "nixl-posix READ 1M x256"),
                   ("posix WRITE 1M x256 (256M file, 4K pages)", "nixl-posix WRITE 1M x256 (4K pages)"),
                   ("posix READ 1M x256 (256M file, 4K pages)", "nixl-posix READ 1M x256 (4K pages)")]:
        if k in rows and ref in rows:
            print(f"  {k} / {ref}: {ratio(k, ref):.2f}")
    for be in ["tcp", "shm"]:
        for op in ["WRITE", "READ"]:
            k, ref = f"{be} {op} 16Kx4096", f"{be} {op} 67108864"
            if k in rows and ref in rows:
                print(f"  {k} / {ref}: {ratio(k, ref, 0, 0):.2f}")
    if "remote READ 1M x256" in rows:
        lower = [min(t[0], p) for t, p in zip(rows["tcp READ 67108864"], rows["posix READ 1M x256"])]
        xs = [r / l for r, l in zip(rows["remote READ 1M x256"], lower)]
        print(f"  remote READ / min(tcp READ, posix READ): {statistics.median(xs):.2f}")

if __name__ == "__main__":
    main()
