"""The seeds' workflows shipped as examples (examples/python), run end to
end at small sizes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "python"


def run(args, timeout=60):
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{args} exited {p.returncode}:\n{out}"
    return out


def whole(out: str, err: str) -> str:
    """A program's stdout, then its stderr. They are read apart: a log line
    on stderr can land inside a printed line when both share one pipe."""
    return f"{out}\n{err}"


def served(server_cmd, client_cmd, timeout=60):
    """Runs ``server_cmd`` in the background and ``client_cmd`` to its end,
    then waits for the server; returns (client rc, client output, server rc,
    server output). A side that hangs is killed and both outputs are kept,
    so a failure shows what each side said."""
    server = subprocess.Popen([*map(str, server_cmd)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        try:
            c = subprocess.run([*map(str, client_cmd)], capture_output=True, text=True, timeout=timeout)
            c_rc, c_out = c.returncode, c.stdout + c.stderr
        except subprocess.TimeoutExpired as e:
            # Its partial output comes as bytes even with text=True.
            parts = (x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
            c_rc, c_out = "hung", "".join(parts) + "\n[test: the client hung and was killed]"
        try:
            s_out = whole(*server.communicate(timeout=timeout / 2))
        except subprocess.TimeoutExpired:
            server.kill()
            s_out = whole(*server.communicate()) + "\n[test: the server hung and was killed]"
    finally:
        server.kill()
    return c_rc, c_out, server.returncode, s_out


def test_streaming_backpressure_engages_without_overruns():
    # A receiver that spends 300 µs on each slot is slower than any sender
    # here, so the sender must wait on progress (a fast receiver would let it
    # run free and the check below would depend on scheduling).
    out = run([EXAMPLES / "streaming" / "nixl_sender_receiver.py", "--num_buffers", "8", "--buffer_size",
               "65536", "--transfers", "300", "--threshold", "6", "--progress", "2", "--timeout", "40",
               "--consume_us", "300"])
    assert "✓ No buffer overrun (0 mismatches)" in out and "[main] ✓ Success!" in out, out
    checks = int(re.search(r"Backpressure: (\d+) checks", out).group(1))
    ahead = int(re.search(r"max ahead: (\d+)/8", out).group(1))
    assert checks >= 1 and ahead < 6, out


@pytest.mark.parametrize("buffer_size", [65536, 65480])
def test_streaming_over_tcp_never_sees_a_consumed_header_again(buffer_size):
    # Each size puts one slot's header on a 64-byte boundary: the slot a copy
    # that stores its first bytes twice (glibc memcpy) brought back stale.
    out = run([EXAMPLES / "streaming" / "nixl_sender_receiver.py", "--backend", "TCP", "--num_buffers", "8",
               "--buffer_size", buffer_size, "--transfers", "400", "--threshold", "6", "--progress", "2",
               "--timeout", "40"])
    assert "✓ No buffer overrun (0 mismatches)" in out and "[main] ✓ Success!" in out, out


def test_streaming_bad_threshold_is_a_clear_error():
    p = subprocess.run([sys.executable, EXAMPLES / "streaming" / "nixl_sender_receiver.py", "--num_buffers", "4",
                        "--threshold", "9"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "--threshold must be in 1..4" in p.stderr, p.stderr


def test_p2p_bench_target_and_initiator():
    port = free_port()
    bench = EXAMPLES / "p2p_bench.py"
    target = subprocess.Popen([sys.executable, bench, "--mode", "target", "--ip", "127.0.0.1", "--port", str(port),
                               "--buffer_sizes", "64KB,1MB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        out = run([bench, "--mode", "initiator", "--ip", "127.0.0.1", "--port", port, "--buffer_sizes",
                   "64KB,1MB", "--iterations", "20", "--warmup", "2"])
        t_out = whole(*target.communicate(timeout=30))
    finally:
        target.kill()
    assert target.returncode == 0, t_out
    assert "Testing 64.0 KB..." in out and "Testing 1.0 MB..." in out, out
    assert len(re.findall(r"Bandwidth: [\d.]+ GB/s, Latency: [\d.]+ μs \(mean\)", out)) == 2, out
    assert "Connected to initiator!" in t_out, t_out


def test_verify_prints_the_setup_check():
    out = run(["-m", "kvferry.verify"])
    assert "✓ kvferry version:" in out and "Available plugins: ['UCX'" in out and "POSIX" in out, out
    assert "PyTorch" in out, out


STORAGE = EXAMPLES / "storage" / "nixl_p2p_storage_example.py"
# 12 descriptors against the server's window of 6, over 3 rounds: its pipeline wraps.
SMALL = ["--buf_size", "65536", "--batch_size", "12", "--iterations", "3", "--timeout", "30"]


def test_storage_client_and_server_verify_every_byte(tmp_path):
    port = free_port()
    (tmp_path / "agents.txt").write_text(f"srv0 127.0.0.1 {port}\n")
    c_rc, out, s_rc, s_out = served(
        [sys.executable, STORAGE, "--role", "server", "--fileprefix", tmp_path / "s", "--name", "srv0", "--port",
         port, *SMALL],
        [sys.executable, STORAGE, "--role", "client", "--agents_file", tmp_path / "agents.txt", "--fileprefix",
         tmp_path / "c", "--name", "cli", *SMALL])
    both = f"client ({c_rc}):\n{out}\nserver ({s_rc}):\n{s_out}"
    assert c_rc == 0 and s_rc == 0 and "cli done; files verified OK" in s_out, both
    for line in ("local read-back: verified OK", "remote read-back from srv0: verified OK",
                 "remote WRITE via srv0:", "remote READ via srv0:", "GB/s"):
        assert line in out, both
    assert (tmp_path / "ssrv0_7.bin").stat().st_size == 65536


def test_storage_server_gives_up_without_clients(tmp_path):
    p = subprocess.run([sys.executable, STORAGE, "--role", "server", "--fileprefix", tmp_path / "s", "--name",
                        "lonely", "--port", str(free_port()), "--buf_size", "4096", "--batch_size", "1",
                        "--timeout", "1"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 3 and "no request from any client" in p.stdout, p.stdout + p.stderr


def test_storage_without_a_storage_backend_is_a_clear_error(tmp_path):
    p = subprocess.run([sys.executable, STORAGE, "--role", "server", "--fileprefix", tmp_path / "s", "--name",
                        "x", "--port", str(free_port()), "--storage_backend", "GDS"], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 2 and "no storage backend" in p.stdout and "is required" in p.stdout, p.stdout


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair (kvferry-test-support's
    netns helper, in Python): yields (ns_a, ip_a, ns_b, ip_b)."""
    tag = f"kvpy{os.getpid() % 100000}"
    net = f"10.77.{os.getpid() % 250 + 1}"
    a, b, va, vb = f"{tag}-a", f"{tag}-b", f"{tag}va", f"{tag}vb"
    cmds = [["netns", "add", a], ["netns", "add", b], ["link", "add", va, "type", "veth", "peer", "name", vb],
            ["link", "set", va, "netns", a], ["link", "set", vb, "netns", b],
            ["-n", a, "addr", "add", f"{net}.1/24", "dev", va], ["-n", b, "addr", "add", f"{net}.2/24", "dev", vb],
            ["-n", a, "link", "set", va, "up"], ["-n", b, "link", "set", vb, "up"],
            ["-n", a, "link", "set", "lo", "up"], ["-n", b, "link", "set", "lo", "up"]]
    try:
        for c in cmds:
            r = subprocess.run(["ip", *c], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot create network namespaces: ip {' '.join(c)}: {r.stderr.strip()}")
        yield a, f"{net}.1", b, f"{net}.2"
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_p2p_bench_across_two_namespaces(two_hosts):
    ns_a, ip_a, ns_b, _ = two_hosts
    bench = EXAMPLES / "p2p_bench.py"
    c_rc, out, s_rc, t_out = served(
        ["ip", "netns", "exec", ns_a, sys.executable, bench, "--mode", "target", "--ip", ip_a, "--port", "5555",
         "--buffer_sizes", "1MB", "--timeout", "30"],
        ["ip", "netns", "exec", ns_b, sys.executable, bench, "--mode", "initiator", "--ip", ip_a, "--port", "5555",
         "--buffer_sizes", "1MB", "--iterations", "10", "--warmup", "1", "--timeout", "30"])
    both = f"initiator ({c_rc}):\n{out}\ntarget ({s_rc}):\n{t_out}"
    assert c_rc == 0 and "Testing 1.0 MB..." in out and "GB/s" in out, both
    assert s_rc == 0 and "Connected to initiator!" in t_out, both


def test_storage_across_two_namespaces(two_hosts, tmp_path):
    ns_a, ip_a, ns_b, _ = two_hosts
    (tmp_path / "agents.txt").write_text(f"srv0 {ip_a} 5556\n")
    c_rc, out, s_rc, s_out = served(
        ["ip", "netns", "exec", ns_a, sys.executable, STORAGE, "--role", "server", "--fileprefix", tmp_path / "s",
         "--name", "srv0", "--port", "5556", *SMALL],
        ["ip", "netns", "exec", ns_b, sys.executable, STORAGE, "--role", "client", "--agents_file",
         tmp_path / "agents.txt", "--fileprefix", tmp_path / "c", "--name", "cli", *SMALL])
    both = f"client ({c_rc}):\n{out}\nserver ({s_rc}):\n{s_out}"
    assert c_rc == 0 and "remote read-back from srv0: verified OK" in out, both
    assert "local read-back: verified OK" in out, both
    assert s_rc == 0 and "files verified OK" in s_out, both


# This test found, on 2026-12-02, a slot header coming back after the
# receiver consumed it over TCP: glibc's memcpy, copying a frame into a
# 64-byte-aligned slot, stored its first bytes a second time at the end.
# The target now copies with sys::copy_once (each byte written once).
def test_streaming_across_two_namespaces(two_hosts):
    ns_a, ip_a, ns_b, _ = two_hosts
    meta = subprocess.Popen(["ip", "netns", "exec", ns_a, sys.executable, "-c",
                             f"import kvferry, time; s = kvferry.MetaServer('{ip_a}:9998'); print(s.url, "
                             "flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    stream = EXAMPLES / "streaming" / "nixl_sender_receiver.py"
    small = ["--num_buffers", "8", "--buffer_size", "65536", "--transfers", "200", "--threshold", "6",
             "--progress", "2", "--timeout", "40"]
    try:
        url = meta.stdout.readline().strip()
        assert url.startswith("http://"), url
        rx = subprocess.Popen(["ip", "netns", "exec", ns_a, sys.executable, stream, "--mode", "receiver",
                               "--metadata_url", url, *small], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
        tx = subprocess.run(["ip", "netns", "exec", ns_b, sys.executable, stream, "--mode", "sender",
                             "--metadata_url", url, *small], capture_output=True, text=True, timeout=60)
        r_out = whole(*rx.communicate(timeout=30))
    finally:
        meta.kill()
    assert tx.returncode == 0 and "Backpressure:" in tx.stdout, tx.stdout + tx.stderr
    assert rx.returncode == 0 and "✓ No buffer overrun (0 mismatches)" in r_out, r_out
