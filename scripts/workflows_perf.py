#!/usr/bin/env python3
"""The seeds' workflows beside their references, alternated round by round
in one session (docs/PERFORMANCE.md, issue "the seeds' workflows").

Usage: scripts/workflows_perf.py [--rounds 3] [--only streaming,storage,p2p]
       [--nixl /tmp/.venv-nixl/bin/python] [--python .venv-test/bin/python]

Each round runs, in this order:
  streaming  memcpy anchor (16 MiB and 256 MiB lines); the Rust streaming
             example over SHM and TCP (64 x 16 MiB, 700 transfers, threshold
             60, progress 16); `kvferry bench p2p --backend tcp` 16 MiB WRITE;
             the Python example on kvferry.nixl and, with --nixl, unmodified
             on real NIXL (metadata through an etcd this script starts).
  storage    the Rust storage example, server and client on loopback (64 x
             1 MiB, O_DIRECT, 20 iterations); `kvferry bench storage` with one
             64 MiB file and with 64 files of 1 MiB (the sample's layout);
             `kvferry bench p2p --backend tcp` 64 MiB WRITE; the Python storage
             example on kvferry.nixl and, with --nixl, unmodified on NIXL.
  p2p        examples/python/p2p_bench.py over TCP (1, 16, 64 MiB) beside
             `kvferry bench p2p --backend tcp` of the same sizes and, with
             --nixl, the same program on NIXL (UCX_TLS=tcp).
Needs: cargo build --release -p kvferry-cli -p kvferry --example streaming
--example storage; gcc; the Python package built into --python (maturin
develop --release); etcd for the NIXL streaming run. Prints Markdown.
"""
import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = os.path.join(ROOT, "target/release/kvferry")
EX = os.path.join(ROOT, "target/release/examples")
MEMCPY = "/tmp/kvferry_memcpy_bw"
DIR = "/var/tmp/kvferry-workflows"


def sh(cmd, timeout=600, env=None, cwd=None, check=True):
    """Runs ``cmd``; its output. ``check=False`` for NIXL programs, which
    often crash at exit (SIGSEGV) after finishing their work: the caller
    checks their output instead."""
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd}\nrc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout + r.stderr


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memcpy():
    out = sh(MEMCPY)
    line = lambda n: float(re.search(rf"^{n} bytes: ([\d.]+)", out, re.M).group(1))
    return {"memcpy_16M": line(16777216), "memcpy_256M": line(268435456)}


def bench_p2p(size, iters):
    out = sh(f"{K} bench p2p --backend tcp --op write --block-sizes {size} --batch-sizes 1 --iters {iters} --json")
    return json.loads([l for l in out.splitlines() if l.startswith("{")][-1])["gbps"]


def streaming_rust(backend):
    out = sh(f"{EX}/streaming {backend} 64 16777216 700 60 16")
    return float(re.search(r"over \w+: ([\d.]+) GB/s", out).group(1))


def streaming_py(python, etcd, nixl=False):
    env = dict(os.environ, NIXL_ETCD_ENDPOINTS=etcd, NIXL_ETCD_NAMESPACE=f"/wf-{time.time_ns()}")
    if nixl:
        env["NIXL_PLUGIN_DIR"] = nixl_plugins(python)
    out = sh(f"{python} nixl_sender_receiver.py", env=env, cwd=os.path.join(ROOT, "examples/python/streaming"),
             check=not nixl)
    return float(re.search(r"\[receiver\] Bandwidth: ([\d.]+) MB/s", out).group(1)) / 1e3


def storage_run(prog, extra="", env=None, check=True, settle=0.3):
    """One server and one client of the storage sample ``prog`` (a command
    line) on loopback, 64 x 1 MiB, O_DIRECT, 20 iterations; the phases' GB/s
    (remote phases as the server timed them). Every byte must verify."""
    settle_dir()
    p = port()
    with open(f"{DIR}/agents", "w") as f:
        f.write(f"srv 127.0.0.1 {p}\n")
    common = f"--buf_size 1048576 --batch_size 64 --iterations 20 --direct --timeout 60 {extra}"
    srv = subprocess.Popen(f"{prog} --role server --fileprefix {DIR}/s --name srv --port {p} {common}",
                           shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    # The client starts once the server is set up (its files created, its
    # buffer touched), so that the client's local phase runs alone, as the
    # bench it is compared with does.
    head = []
    for line in srv.stdout:
        head.append(line)
        if "serving on port" in line:
            break
    time.sleep(settle)
    cli = sh(f"{prog} --role client --agents_file {DIR}/agents --fileprefix {DIR}/c --name cli {common}",
             env=env, check=check)
    srv_out = "".join(head) + srv.communicate(timeout=120)[0]
    if "verified OK" not in srv_out or cli.count("verified OK") != 2:
        raise RuntimeError(f"{prog}: the storage sample did not verify:\n{cli}\n{srv_out}")
    g = lambda pat, text: float(re.search(pat + r".*?([\d.]+) GB/s", text).group(1))
    return {"local WRITE": g(r"local WRITE", cli), "local READ": g(r"local READ", cli),
            "remote WRITE": g(r"\[srv\] WRITE for cli", srv_out), "remote READ": g(r"\[srv\] READ for cli", srv_out)}


def storage_sample():
    """The Rust storage example."""
    return storage_run(f"{EX}/storage")


def storage_py(python, nixl=False):
    """examples/python/storage on kvferry.nixl or, with ``nixl``, unmodified
    on NIXL (POSIX backend named, so NIXL never tries GDS without a GPU)."""
    env = dict(os.environ)
    if nixl:
        env["NIXL_PLUGIN_DIR"] = nixl_plugins(python)
    ex = os.path.join(ROOT, "examples/python/storage/nixl_p2p_storage_example.py")
    return storage_run(f"{python} {ex}", "--storage_backend POSIX", env=env, check=not nixl, settle=1.0)


def nixl_plugins(python):
    site = sh(f"{python} -c 'import nixl, os; print(os.path.dirname(os.path.dirname(nixl.__file__)))'").strip()
    return os.path.join(site, ".nixl_cu13.mesonpy.libs/plugins")


def settle_dir():
    """An empty DIR on a settled file system, before every storage run, the
    sample's and the bench's alike. The benches used to start right after
    the run before them while the sample started after a sync and a pause,
    and that alone moved the 64-file WRITE bench by a quarter (medians of 11
    rounds here: 5.8 GB/s right after another run, 4.4-4.6 after a settle;
    the sample read 4.4-4.5 both ways). The cause is not pinned down; the
    root file system here is mounted with `discard`, so deleting a run's
    files sends the device TRIMs. Both now start from the same state."""
    shutil.rmtree(DIR, ignore_errors=True)
    os.makedirs(DIR)
    os.sync()
    time.sleep(0.5)


def bench_storage(op, files):
    settle_dir()
    layout = "--file-size 64M" if files == 1 else f"--num-files {files} --file-size 1M"
    out = sh(f"{K} bench storage --op {op} --block-size 1M --batch-size 64 --direct {layout} --iters 20 "
             f"--warmup 1 --dir {DIR} --json")
    return json.loads([l for l in out.splitlines() if l.startswith("{")][-1])["gbps"]


def p2p_py(python, nixl=False):
    """examples/python/p2p_bench.py over TCP: kvferry's TCP backend, or with
    ``nixl`` NIXL's UCX limited to TCP (UCX_TLS=tcp)."""
    p = port()
    ex = os.path.join(ROOT, "examples/python/p2p_bench.py")
    backend, env = ("UCX", dict(os.environ, UCX_TLS="tcp")) if nixl else ("TCP", None)
    t = subprocess.Popen([python, ex, "--mode", "target", "--ip", "127.0.0.1", "--port", str(p), "--backend", backend],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        time.sleep(1.0)
        out = sh(f"{python} {ex} --mode initiator --ip 127.0.0.1 --port {p} --backend {backend} "
                 f"--buffer_sizes 1MB,16MB,64MB --iterations 50 --warmup 5", env=env, check=not nixl)
    finally:
        t.wait(timeout=60)
    bw = [float(x) for x in re.findall(r"Bandwidth: ([\d.]+) GB/s", out)]
    return dict(zip(["1M", "16M", "64M"], bw))


def start_etcd():
    d = tempfile.mkdtemp(prefix="kvferry-wf-etcd-")
    c, pe = port(), port()
    proc = subprocess.Popen(["etcd", "--data-dir", d, "--listen-client-urls", f"http://127.0.0.1:{c}",
                             "--advertise-client-urls", f"http://127.0.0.1:{c}",
                             "--listen-peer-urls", f"http://127.0.0.1:{pe}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", c), timeout=0.1).close()
            return proc, d, f"http://127.0.0.1:{c}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("etcd did not start")


def rows(rounds, pairs):
    """Markdown rows: each value per round, the median, and the median of
    per-round ratios against its reference."""
    out = []
    for name, ref in pairs:
        vals = [r[name] for r in rounds if name in r]
        refs = [r[ref] for r in rounds if ref in r and name in r]
        if not vals or not refs:
            continue
        ratio = statistics.median(v / w for v, w in zip(vals, refs))
        out.append(f"| {name} | {' / '.join(f'{v:.2f}' for v in vals)} | {ref}: "
                   f"{' / '.join(f'{v:.2f}' for v in refs)} | {ratio:.2f} |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="streaming,storage,p2p")
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv-test/bin/python"))
    ap.add_argument("--nixl", help="a Python with nixl==1.5.1 installed")
    a = ap.parse_args()
    only = set(a.only.split(","))
    if not os.path.exists(MEMCPY):
        sh(f"gcc -O2 {os.path.join(os.path.dirname(ROOT), 'shared/anchors/memcpy_bw.c')} -o {MEMCPY}")
    etcd = start_etcd() if "streaming" in only else None
    results = []
    try:
        for i in range(a.rounds):
            r = {}
            if "streaming" in only:
                r.update(memcpy())
                r["stream SHM (Rust)"] = streaming_rust("SHM")
                r["stream TCP (Rust)"] = streaming_rust("TCP")
                r["bench p2p TCP 16M"] = bench_p2p("16M", 200)
                r["stream UCX (Python, kvferry)"] = streaming_py(a.python, etcd[2])
                if a.nixl:
                    r["stream UCX (Python, NIXL)"] = streaming_py(a.nixl, etcd[2], nixl=True)
            if "storage" in only:
                r.update({f"sample {k}": v for k, v in storage_sample().items()})
                for op in ("write", "read"):
                    r[f"bench {op.upper()} 1 file"] = bench_storage(op, 1)
                    r[f"bench {op.upper()} 64 files"] = bench_storage(op, 64)
                r["bench p2p TCP 64M"] = bench_p2p("64M", 20)
                r.update({f"py sample {k} (kvferry)": v for k, v in storage_py(a.python).items()})
                if a.nixl:
                    r.update({f"py sample {k} (NIXL)": v for k, v in storage_py(a.nixl, nixl=True).items()})
                for op in ("WRITE", "READ"):
                    r[f"min(TCP 64M, POSIX {op})"] = min(r["bench p2p TCP 64M"], r[f"bench {op} 1 file"])
            if "p2p" in only:
                for k, v in p2p_py(a.python).items():
                    r[f"p2p_bench.py TCP {k}"] = v
                    r[f"bench p2p TCP {k} "] = bench_p2p(k, 50)
                if a.nixl:
                    for k, v in p2p_py(a.nixl, nixl=True).items():
                        r[f"p2p_bench.py TCP {k} (NIXL)"] = v
            print(f"round {i + 1}: {json.dumps(r)}", file=sys.stderr, flush=True)
            results.append(r)
    finally:
        if etcd:
            etcd[0].kill()
            etcd[0].wait()
            shutil.rmtree(etcd[1], ignore_errors=True)
        shutil.rmtree(DIR, ignore_errors=True)
    pairs = [("stream SHM (Rust)", "memcpy_16M"), ("stream SHM (Rust)", "memcpy_256M"),
             ("stream TCP (Rust)", "bench p2p TCP 16M"), ("stream UCX (Python, kvferry)", "memcpy_256M"),
             ("stream UCX (Python, kvferry)", "stream UCX (Python, NIXL)"),
             ("sample local WRITE", "bench WRITE 1 file"), ("sample local WRITE", "bench WRITE 64 files"),
             ("sample local READ", "bench READ 1 file"), ("sample local READ", "bench READ 64 files"),
             ("sample remote WRITE", "min(TCP 64M, POSIX WRITE)"), ("sample remote READ", "min(TCP 64M, POSIX READ)")]
    pairs += [(f"py sample {k} (kvferry)", f"py sample {k} (NIXL)")
              for k in ("local WRITE", "local READ", "remote WRITE", "remote READ")]
    pairs += [(f"p2p_bench.py TCP {k}", f"bench p2p TCP {k} ") for k in ("1M", "16M", "64M")]
    pairs += [(f"p2p_bench.py TCP {k}", f"p2p_bench.py TCP {k} (NIXL)") for k in ("1M", "16M", "64M")]
    print("| workload | GB/s per round | reference, same rounds | median ratio |")
    print("|---|---|---|---|")
    print("\n".join(rows(results, pairs)))


if __name__ == "__main__":
    main()
