"""NIXL's ``_utils``: raw memory helpers used by NIXL's examples and tests."""

from __future__ import annotations

import ctypes
import ctypes.util

from .logging import get_logger

__all__ = ["malloc_passthru", "free_passthru", "ba_buf", "verify_transfer"]

_log = get_logger(__name__)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.free.restype = None
_libc.free.argtypes = [ctypes.c_void_p]


def malloc_passthru(size: int) -> int:
    """``malloc(size)``; returns the address (0 on failure)."""
    return _libc.malloc(int(size)) or 0


def free_passthru(addr: int) -> None:
    """``free(addr)`` of memory from :func:`malloc_passthru`."""
    _libc.free(ctypes.c_void_p(int(addr)))


def ba_buf(addr: int, size: int) -> None:
    """Fills ``size`` bytes at ``addr`` with ``0xba``."""
    ctypes.memset(int(addr), 0xBA, int(size))


def verify_transfer(addr1: int, addr2: int, size: int) -> None:
    """Compares ``size`` bytes at two addresses; logs an error where they differ."""
    a = ctypes.string_at(int(addr1), int(size))
    b = ctypes.string_at(int(addr2), int(size))
    if a != b:
        first = next(i for i in range(len(a)) if a[i] != b[i])
        _log.error("verify_transfer: buffers differ at byte %d of %d", first, size)
