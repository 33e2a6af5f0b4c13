"""Two processes: TCP and SHM transfers, the listener, NIXL-shaped programs
run unmodified, and a dead peer."""

import subprocess
import sys
import time

import pytest

from conftest import PROGRAMS, finish, free_port, nixl_program


@pytest.mark.parametrize("backend,expect", [("TCP", "TCP"), ("UCX", "SHM")])
def test_listener_pair(backend, expect):
    tp, ip = free_port(), free_port()
    target = nixl_program("listener_pair.py", "target", tp, ip, backend)
    time.sleep(0.3)
    init = nixl_program("listener_pair.py", "initiator", ip, tp, backend)
    out_i = finish(init)
    out_t = finish(target)
    assert "read back OK" in out_i and "data OK" in out_t
    assert f"backend {backend} {expect}" in out_i


def test_prepped_parallel_program():
    pytest.importorskip("numpy")
    assert "OK" in finish(nixl_program("prepped_parallel.py", 5))


def test_partial_labels_program(meta_server):
    assert "block0 True block1 False" in finish(nixl_program("partial_labels.py"))


def test_query_files_program(tmp_path):
    out = finish(nixl_program("query_files.py", tmp_path))
    assert "files: POSIX OK" in out


DEAD_PEER = r"""
import sys, time
import kvferry.nixl as nx
from kvferry.nixl import _utils as u
a = nx.nixl_agent("victim", nx.nixl_agent_config(True, True, int(sys.argv[1]), backends=["TCP"]))
buf = u.malloc_passthru(64 << 20)
a.register_memory([(buf, 64 << 20, 0, "")], "DRAM")
print("ready", buf, flush=True)
time.sleep(60)
"""


def test_dead_peer_is_remote_disconnect_within_2s():
    from kvferry.nixl import _bindings as nb
    from kvferry.nixl import _utils as u
    from kvferry.nixl._api import nixl_agent, nixl_agent_config

    port = free_port()
    peer = subprocess.Popen([sys.executable, "-c", DEAD_PEER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        line = [""]
        while line and line[0] != "ready":
            line = peer.stdout.readline().split()
        assert line and line[0] == "ready", line
        remote_addr = int(line[1])
        a = nixl_agent("survivor", nixl_agent_config(backends=["TCP"]))
        a.fetch_remote_metadata("victim", "127.0.0.1", port)
        deadline = time.time() + 10
        while not a.check_remote_metadata("victim"):
            assert time.time() < deadline
            time.sleep(0.01)
        size = 64 << 20
        buf = u.malloc_passthru(size)
        a.register_memory([(buf, size, 0, "")], "DRAM")
        h = a.initialize_xfer("WRITE", a.get_xfer_descs([(buf, size, 0)], "DRAM"),
                              a.get_xfer_descs([(remote_addr, size, 0)], "DRAM"), "victim")
        assert a.transfer(h) in ("DONE", "PROC")
        while a.check_xfer_state(h) == "PROC":
            pass
        peer.kill()
        peer.wait()
        killed = time.time()
        with pytest.raises(nb.nixlRemoteDisconnectError):
            while True:
                assert time.time() - killed < 2.0, "no nixlRemoteDisconnectError within 2 s"
                if a.transfer(h) == "DONE":
                    continue
                while a.check_xfer_state(h) == "PROC":
                    assert time.time() - killed < 2.0, "no nixlRemoteDisconnectError within 2 s"
        assert time.time() - killed < 2.0
        h.release()
    finally:
        peer.kill()
        peer.wait()


def test_programs_also_exist_for_real_nixl():
    # The programs import only `nixl`; they are what NIXL's own examples look like.
    for p in PROGRAMS.glob("*.py"):
        text = p.read_text()
        assert "import kvferry" not in text and "from kvferry" not in text, p


@pytest.fixture
def etcd(tmp_path):
    """etcd (Debian's etcd-server) on free loopback ports with a temp data dir."""
    import shutil

    exe = shutil.which("etcd")
    if exe is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    client, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{client}"
    p = subprocess.Popen(
        [exe, "--data-dir", str(tmp_path / "etcd"), "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls",
         f"http://127.0.0.1:{peer}", "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import socket

    deadline = time.time() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", client), timeout=0.2).close()
            break
        except OSError:
            assert time.time() < deadline, "etcd did not start"
            time.sleep(0.05)
    yield url
    p.kill()
    p.wait()


def test_partial_labels_program_over_etcd(etcd, monkeypatch):
    import kvferry

    monkeypatch.delenv("KVFERRY_METADATA_URL", raising=False)
    probe = kvferry.Agent(f"etcd-probe-{time.time_ns()}", [], from_env=False, etcd_endpoints=[etcd])
    try:
        probe.store()
    except kvferry.NotSupportedError as e:
        if "without the `etcd` feature" in str(e):
            pytest.skip("this build of kvferry has no etcd support")
        raise
    env = {"NIXL_ETCD_ENDPOINTS": etcd, "NIXL_ETCD_NAMESPACE": f"/nixl/test-{time.time_ns()}/"}
    assert "block0 True block1 False" in finish(nixl_program("partial_labels.py", env=env))
