"""Turning Python objects into memory regions ``(addr, nbytes, dev, mem_type)``
without importing numpy or torch: numpy arrays are read through
``__array_interface__``, torch tensors only when torch is already imported,
other buffers through ``ctypes`` (which also pins them: a registered
``bytearray`` cannot be resized)."""

from __future__ import annotations

import ctypes
import sys
from typing import Any, NamedTuple, Optional

from . import _kvferry

__all__ = ["Region", "region_of", "is_tensor"]


class Region(NamedTuple):
    """One contiguous memory region and the object that keeps it alive."""

    addr: int
    nbytes: int
    dev: int
    mem_type: str
    keep: Any


def is_tensor(obj: object) -> bool:
    """True if ``obj`` is a torch tensor (never imports torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _array_region(obj: Any, iface: dict) -> Region:
    shape = tuple(iface["shape"])
    typestr = iface["typestr"]
    itemsize = int(typestr[2:])
    nbytes = itemsize
    for d in shape:
        nbytes *= d
    strides = iface.get("strides")
    if strides is not None:
        want = itemsize
        for dim, s in reversed(list(zip(shape, strides))):
            if dim > 1 and s != want:
                raise _kvferry_error("InvalidParam", "the array is not C-contiguous; register numpy.ascontiguousarray(arr)")
            want *= dim
    addr, readonly = iface["data"]
    if readonly:
        raise _kvferry_error("InvalidParam", "the array is read-only; peers may write registered memory, so register a writable array")
    return Region(int(addr), int(nbytes), 0, "DRAM", obj)


def _kvferry_error(kind: str, msg: str) -> Exception:
    from ._errors import _BY_KIND

    return _BY_KIND[kind](msg)


def region_of(obj: Any) -> Region:
    """The region behind ``obj``: an ``AlignedBuf``, a contiguous numpy array
    or torch tensor, a writable buffer (``bytearray``, ``memoryview``, ``mmap``)
    or a raw ``(addr, nbytes, dev)`` tuple (DRAM)."""
    if isinstance(obj, _kvferry.AlignedBuf):
        return Region(obj.addr, len(obj), 0, "DRAM", obj)
    if is_tensor(obj):
        if not obj.is_contiguous():
            raise _kvferry_error("InvalidParam", "the tensor is not contiguous; register tensor.contiguous()")
        dev = obj.get_device()
        return Region(obj.data_ptr(), obj.numel() * obj.element_size(), max(dev, 0), "DRAM" if dev < 0 else "VRAM", obj)
    if isinstance(obj, tuple) and len(obj) == 3 and all(isinstance(x, int) for x in obj):
        return Region(obj[0], obj[1], obj[2], "DRAM", None)
    iface = getattr(obj, "__array_interface__", None)
    if iface is not None:
        return _array_region(obj, iface)
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError(
            f"cannot take memory from {type(obj).__name__}: pass an AlignedBuf, a numpy array, a torch tensor, "
            "a writable buffer or (addr, nbytes, dev)"
        ) from None
    if mv.readonly:
        raise _kvferry_error("InvalidParam", "the buffer is read-only; register a writable one (bytearray, not bytes)")
    if not mv.c_contiguous:
        raise _kvferry_error("InvalidParam", "the buffer is not contiguous")
    if mv.nbytes == 0:
        raise _kvferry_error("InvalidParam", "the buffer is empty")
    pin = (ctypes.c_char * mv.nbytes).from_buffer(mv.cast("B"))
    return Region(ctypes.addressof(pin), mv.nbytes, 0, "DRAM", (obj, pin))


def mem_type_of(obj: Any) -> Optional[str]:
    """The memory type of a tensor (``DRAM``/``VRAM``), else None."""
    if is_tensor(obj):
        return "DRAM" if obj.get_device() < 0 else "VRAM"
    return None
