"""``python -m kvferry.verify``: the setup check of the multi-node guide
(NIXL's ``verify_nixl_setup.py``): version, plugins, torch and CUDA, then
``kvferry info``'s probes when the ``kvferry`` CLI is on ``PATH``
(or named by ``KVFERRY_BIN``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def main() -> int:
    """Prints the check; returns 0 when kvferry and at least one plugin load."""
    import kvferry
    from kvferry.nixl._api import nixl_agent, nixl_agent_config

    print(f"✓ kvferry version: {kvferry.__version__} (NIXL 1.5 Python API)")
    agent = nixl_agent("kvferry-verify", nixl_agent_config(backends=[]))
    plugins = agent.get_plugin_list()
    print(f"{_mark(bool(plugins))} Available plugins: {plugins}")
    try:
        import torch  # noqa: F401  (only this check imports it)

        print(f"✓ PyTorch version: {torch.__version__}")
        cuda = bool(torch.cuda.is_available())
        print(f"{_mark(cuda)} CUDA available: {cuda}")
        print(f"{_mark(cuda)} GPU count: {torch.cuda.device_count() if cuda else 0}")
    except ImportError:
        print("✗ PyTorch not installed (only needed for tensors; DRAM, FILE and BLOCK work without it)")
        gpu = os.path.exists("/dev/nvidia0")
        print(f"{_mark(gpu)} NVIDIA GPU visible: {gpu}")
    cli = os.environ.get("KVFERRY_BIN") or shutil.which("kvferry")
    if cli:
        try:
            info = json.loads(subprocess.run([cli, "info", "--json"], capture_output=True, text=True,
                                             timeout=30).stdout)
            for c in info.get("checks", []):
                print(f"{_mark(c['ok'])} {c['what']}: {c['detail']}")
                if c.get("hint"):
                    print(f"    hint: {c['hint']}")
        except (OSError, ValueError, subprocess.TimeoutExpired) as e:
            print(f"✗ `{cli} info --json` did not answer: {e}")
    else:
        print("✗ kvferry CLI not on PATH: `cargo install --path crates/kvferry-cli` (or set KVFERRY_BIN) "
              "for the io_uring, SHM, etcd and namespace probes")
    return 0 if plugins else 1


if __name__ == "__main__":
    sys.exit(main())
