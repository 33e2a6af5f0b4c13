"""NIXL 1.5's Python API on kvferry, with NIXL's module layout
(``kvferry.nixl._api``, ``._bindings``, ``._utils``, ``.logging``).

Run an unmodified NIXL program on kvferry::

    python -m kvferry.nixl program.py args...

or, in code, before anything imports ``nixl``::

    import kvferry.nixl; kvferry.nixl.install()
"""

from __future__ import annotations

import sys

from . import _api, _bindings, _utils, logging
from ._api import *  # noqa: F401,F403  (NIXL's names, listed in _api.__all__)

__all__ = [*_api.__all__, "install", "uninstall"]

_ALIASED = ("nixl", "nixl_cu12", "nixl_cu13")


def install() -> None:
    """Makes ``import nixl`` (and ``nixl._api``, ``nixl._bindings``,
    ``nixl._utils``, ``nixl.logging``, and the ``nixl_cu12``/``nixl_cu13``
    wheels' names) load kvferry's NIXL API. Call it before the program
    imports ``nixl``; calling it again is harmless."""
    me = sys.modules[__name__]
    for top in _ALIASED:
        sys.modules[top] = me
        for sub in ("_api", "_bindings", "_utils", "logging"):
            sys.modules[f"{top}.{sub}"] = getattr(me, sub)


def uninstall() -> None:
    """Removes the aliases :func:`install` made."""
    me = sys.modules[__name__]
    for top in _ALIASED:
        if sys.modules.get(top) is me:
            del sys.modules[top]
            for sub in ("_api", "_bindings", "_utils", "logging"):
                sys.modules.pop(f"{top}.{sub}", None)
