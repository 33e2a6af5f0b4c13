"""kvferry: moves bytes between the memories and storage of AI inference
workers (KV-cache blocks, weights), peer to peer over TCP or shared memory
and to files through POSIX.

Two APIs over one Rust core:

* :class:`kvferry.Agent` — Pythonic (context managers, ``await request``,
  exceptions per error kind).
* :mod:`kvferry.nixl` — NIXL's Python API, behaviour for behaviour; run an
  unmodified NIXL program with ``python -m kvferry.nixl script.py`` or call
  :func:`kvferry.nixl.install` before it imports ``nixl``.

``import kvferry`` imports neither numpy nor torch.
"""

from . import _kvferry
from ._agent import Agent, AlignedBuf, Request, XferState, XferTelemetry, plugin_params, plugins
from . import _errors
from ._errors import *  # noqa: F401,F403  (the exception classes, listed in _errors.__all__)

XferDescList = _kvferry.XferDescList
RegDescList = _kvferry.RegDescList
Registration = _kvferry.Registration
PreparedList = _kvferry.PreparedList
MetaServer = _kvferry.MetaServer
Store = _kvferry.Store
MEM_TYPES = tuple(_kvferry.MEM_TYPES)
__version__ = _kvferry.__version__

__all__ = [
    "Agent",
    "AlignedBuf",
    "Request",
    "XferState",
    "XferTelemetry",
    "XferDescList",
    "RegDescList",
    "Registration",
    "PreparedList",
    "MetaServer",
    "Store",
    "MEM_TYPES",
    "plugins",
    "plugin_params",
    *_errors.__all__,
]
