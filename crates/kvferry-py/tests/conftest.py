"""Shared helpers of kvferry's Python tests."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
PROGRAMS = HERE / "programs"
_names = itertools.count()


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique(prefix: str) -> str:
    """An agent name unique in this test process."""
    return f"{prefix}-{os.getpid()}-{next(_names)}"


def nixl_program(name: str, *args: object, env: dict | None = None) -> subprocess.Popen:
    """Starts ``tests/programs/NAME`` unmodified through ``python -m kvferry.nixl``."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "kvferry.nixl", str(PROGRAMS / name), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=e,
    )


def finish(p: subprocess.Popen, timeout: float = 60) -> str:
    """Waits for ``p``; fails the test with its output unless it exited 0.

    Returns its stdout, then its stderr, each whole: the two streams are
    read apart because a log line written to stderr while ``print`` writes
    its pieces (``PYTHONUNBUFFERED`` makes each piece a write) would land in
    the middle of a printed line."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"{p.args} timed out:\n{out}\n{err}")
    assert p.returncode == 0, f"{p.args} exited {p.returncode}:\n{out}\n{err}"
    return f"{out}\n{err}"


@pytest.fixture
def meta_server(monkeypatch):
    """A kvferry metadata server, set as the central store of new agents."""
    import kvferry

    s = kvferry.MetaServer()
    monkeypatch.setenv("KVFERRY_METADATA_URL", s.url)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server (scripts/s3_test_server.py) on a free loopback port,
    authentication on: yields its JSON (endpoint, bucket, access_key,
    secret_key); stopped afterwards."""
    import json

    script = HERE.parents[2] / "scripts" / "s3_test_server.py"
    p = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    try:
        line = p.stdout.readline()
        if not line:
            pytest.fail(f"{script} did not start: pip install 'moto[server]' boto3 (./scripts/test.sh does)")
        yield json.loads(line)
    finally:
        p.kill()
        p.wait()


class _StandInTensor:
    """A CPU tensor with just what kvferry reads of a torch tensor
    (``data_ptr``, ``numel``, ``element_size``, ``is_contiguous``,
    ``get_device``, ``device``), over a numpy array."""

    device = "cpu"

    def __init__(self, array):
        self._a = array

    def data_ptr(self) -> int:
        return self._a.ctypes.data

    def numel(self) -> int:
        return self._a.size

    def element_size(self) -> int:
        return self._a.itemsize

    def is_contiguous(self) -> bool:
        return self._a.flags.c_contiguous

    def get_device(self) -> int:
        return -1

    def t(self) -> "_StandInTensor":
        return _StandInTensor(self._a.T)


@pytest.fixture
def torch_module(monkeypatch):
    """torch when it is installed; else a stand-in module whose tensors
    carry the methods kvferry reads, backed by numpy, so that the tensor
    paths run on every machine. (PyPI's Linux torch wheels need several GB
    of CUDA libraries; the CPU-only wheels are not on PyPI.)"""
    try:
        import torch

        return torch
    except ImportError:
        pass
    import types

    import numpy as np

    mod = types.ModuleType("torch")
    mod.Tensor = _StandInTensor
    mod.float32 = np.float32
    mod.full = lambda shape, value, dtype=np.float32: _StandInTensor(np.full(shape, value, dtype=dtype))
    mod.zeros = lambda *shape, dtype=np.float32: _StandInTensor(np.zeros(shape, dtype=dtype))
    mod.ones = lambda *shape, dtype=np.float32: _StandInTensor(np.ones(shape, dtype=dtype))
    mod.equal = lambda x, y: bool(np.array_equal(x._a, y._a))
    monkeypatch.setitem(sys.modules, "torch", mod)
    return mod
