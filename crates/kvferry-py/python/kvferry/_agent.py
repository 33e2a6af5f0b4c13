"""The Pythonic kvferry API: :class:`Agent`, :class:`Request`, :class:`AlignedBuf`."""

from __future__ import annotations

import asyncio
import enum
import itertools
import os
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

from . import _kvferry
from ._errors import InvalidParamError
from ._mem import region_of

__all__ = ["Agent", "Request", "AlignedBuf", "XferState", "XferTelemetry", "plugins", "plugin_params"]

XferDescList = _kvferry.XferDescList
RegDescList = _kvferry.RegDescList
Registration = _kvferry.Registration
PreparedList = _kvferry.PreparedList


class XferState(enum.Enum):
    """Where a posted request stands."""

    DONE = "DONE"
    IN_PROGRESS = "PROC"


class XferTelemetry(NamedTuple):
    """What a request's last posting took (NIXL's ``nixlXferTelemetry``):
    times in microseconds, ``start_us`` since the Unix epoch; all 0 but the
    sizes until a posting ended."""

    start_us: int
    post_us: int
    xfer_us: int
    total_bytes: int
    desc_count: int


class AlignedBuf(_kvferry.AlignedBuf):
    """Page-aligned, zeroed DRAM owned by kvferry.

    ``numpy.asarray(buf)`` is a writable uint8 view without a copy;
    ``buf.memoryview()`` is a writable ``memoryview`` that keeps the buffer
    alive (and on Python 3.12+ ``memoryview(buf)`` works directly).
    """

    def memoryview(self) -> memoryview:
        """A writable view of the whole buffer; it keeps the buffer alive."""
        import ctypes

        arr = (ctypes.c_char * len(self)).from_address(self.addr)
        arr._kvferry_owner = self  # type: ignore[attr-defined]
        return memoryview(arr).cast("B")

    def __buffer__(self, flags: int) -> memoryview:  # PEP 688, Python 3.12+
        return self.memoryview()


class Request:
    """A transfer request: created once, posted many times, released at the
    end of a ``with`` block (or by :meth:`release`). ``await request`` waits
    for the last posting without blocking the event loop."""

    __slots__ = ("_r",)

    def __init__(self, raw: _kvferry.Request):
        self._r = raw

    def post(self, notif: Union[bytes, str, None] = None) -> XferState:
        """Starts the transfer; ``notif`` replaces the stored notification."""
        return XferState.DONE if self._r.post(notif) else XferState.IN_PROGRESS

    def status(self) -> XferState:
        """Where the last posting stands; raises its error if it failed."""
        return XferState.DONE if self._r.status() else XferState.IN_PROGRESS

    def wait(self, timeout: float = 30.0) -> None:
        """Blocks (GIL released) until done; ``kvferry.TimeoutError`` after ``timeout`` s."""
        self._r.wait(timeout)

    def __await__(self):
        return self._wait_async().__await__()

    async def _wait_async(self, timeout: float = 30.0) -> None:
        if self._r.status():
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._r.wait, timeout)

    def release(self) -> None:
        """Cancels what is in flight and frees the request; safe twice."""
        self._r.release()

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self._r.released

    @property
    def backend(self) -> str:
        """The backend the agent chose."""
        return self._r.backend

    @property
    def total_bytes(self) -> int:
        """Bytes per posting."""
        return self._r.total_bytes

    @property
    def segments(self) -> int:
        """Descriptors after merging contiguous runs."""
        return self._r.segments

    def estimate_cost(self) -> tuple:
        """``(duration_us, error_margin_us, method)``."""
        return self._r.estimate_cost()

    @property
    def telemetry(self) -> Optional[XferTelemetry]:
        """What the last posting took; None while the agent's telemetry is
        off (``Agent(..., telemetry=True)`` or ``KVFERRY_TELEMETRY=1``)."""
        t = self._r.telemetry()
        return None if t is None else XferTelemetry(*t)

    def __enter__(self) -> "Request":
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.release()
        return False

    def __repr__(self) -> str:
        return repr(self._r)


def plugins() -> list:
    """Names of every backend plugin this build knows."""
    return _kvferry.Agent.plugins()


def plugin_params(name: str) -> tuple:
    """A plugin's memory types and ``{param: default}``."""
    return _kvferry.Agent.plugin_params(name)


_Descs = Union[XferDescList, Sequence[tuple], Any]

# Ids of path-mode files (their `dev`), far above any file descriptor.
_FILE_IDS = itertools.count(1 << 32)


class Agent:
    """One kvferry agent: backends, registered memory, peers, requests and
    notifications. Share one between threads freely; calls that wait release
    the GIL.

    ``backends`` lists names (``"TCP"``, ``"SHM"``, ``"LOCAL"``, ``"POSIX"``)
    or ``(name, {param: value})`` pairs; None reads ``KVFERRY_BACKENDS``.
    ``listener`` serves metadata to peers on ``listen_port`` (0: any free
    port). Other keywords: ``connect_timeout``, ``peer_timeout``,
    ``metadata_timeout`` (seconds), ``metadata_url``, ``etcd_endpoints``,
    ``namespace``, ``auth_token``, ``worker_threads``, ``from_env``,
    ``telemetry`` (per-request telemetry and metrics; None: from
    ``KVFERRY_TELEMETRY``/``NIXL_TELEMETRY_ENABLE``).
    """

    def __init__(self, name: str, backends: Optional[Iterable[Any]] = None, **config: Any):
        if isinstance(backends, str):
            backends = [backends]
        self._a = _kvferry.Agent(name, None if backends is None else list(backends), **config)

    # --- identity and backends -------------------------------------------
    @property
    def name(self) -> str:
        """The agent's name."""
        return self._a.name

    @property
    def raw(self) -> _kvferry.Agent:
        """The extension object underneath."""
        return self._a

    @property
    def backends(self) -> list:
        """Names of the created backends."""
        return self._a.backends()

    @property
    def listen_port(self) -> Optional[int]:
        """Port of the metadata listener, if it runs."""
        return self._a.listen_port

    def start_listener(self, port: int = 0) -> int:
        """Starts the metadata listener on ``port`` (0: any free one) for an
        agent made without ``listener``, once its backends exist, and returns
        the port. Raises if a listener is on already."""
        return self._a.start_listener(port)

    # --- telemetry ---------------------------------------------------------
    @property
    def telemetry(self) -> bool:
        """Whether requests record telemetry and the agent counts metrics."""
        return self._a.telemetry

    def metrics_text(self) -> str:
        """The agent's metrics in Prometheus' text format
        (``kvferry.NotSupportedError`` while telemetry is off)."""
        return self._a.metrics_text()

    def serve_metrics(self, addr: str = "127.0.0.1:0") -> str:
        """Serves :meth:`metrics_text` at ``http://addr/metrics`` while the
        agent lives; returns the URL (port 0 picks one)."""
        return self._a.serve_metrics(addr)

    def create_backend(self, name: str, params: Optional[Mapping[str, Any]] = None, **kw: Any) -> None:
        """Creates backend ``name`` with parameters over its defaults."""
        p = dict(params or {})
        p.update(kw)
        self._a.create_backend(name, {k: str(v) for k, v in p.items()})

    def backend_params(self, name: str) -> dict:
        """The effective parameters of a created backend."""
        return self._a.backend_params(name)

    def backend_mem_types(self, name: str) -> list:
        """Memory types a created backend serves."""
        return self._a.backend_mem_types(name)

    # --- memory -----------------------------------------------------------
    def register(self, obj: Any, mem_type: Optional[str] = None, hints: Sequence[str] = ()) -> Registration:
        """Registers memory: an :class:`AlignedBuf`, numpy array, torch tensor,
        writable buffer, ``(addr, nbytes, dev)``, a list of those, or a
        :class:`RegDescList`. Returns a :class:`Registration` (a context
        manager) that keeps the objects alive until it is deregistered."""
        hints = list(hints)
        if isinstance(obj, RegDescList):
            return self._a.register(obj, hints)
        if isinstance(obj, _kvferry.AlignedBuf) and not hints:
            return self._a.register_buf(obj)
        objs = obj if isinstance(obj, list) else [obj]
        regions = [region_of(o) for o in objs]
        mt = mem_type or regions[0].mem_type
        descs = RegDescList(mt, [(r.addr, r.nbytes, r.dev, b"") for r in regions])
        return self._a.register(descs, hints, [r.keep for r in regions])

    def register_file(
        self, path: Union[str, os.PathLike], size: int = 0, mode: str = "rw", direct: bool = False, create: bool = False
    ) -> Registration:
        """Registers a file by path (POSIX): FILE transfers then use
        ``(offset, len, dev)`` with ``dev = reg.descs[0][2]``."""
        flags = [mode] + (["direct"] if direct else []) + (["create"] if create else [])
        path = os.fspath(path)
        fd_id = next(_FILE_IDS)
        return self._a.register(RegDescList("FILE", [(0, size, fd_id, f"{','.join(flags)}:{path}")]), [])

    def register_object(self, key: str, size: int = 0, dev: Optional[int] = None) -> Registration:
        """Registers the object ``key`` of the OBJ backend's bucket: ``size``
        bytes (0: its current size; it must exist then). OBJ transfers then
        use ``(offset, len, dev)`` with ``dev = reg.descs[0][2]`` (``dev``
        picks it; default: a fresh number)."""
        if not isinstance(key, str) or not key:
            raise InvalidParamError("register_object: the object key must be a non-empty str")
        dev = next(_FILE_IDS) if dev is None else dev
        return self._a.register(RegDescList("OBJ", [(0, size, dev, key.encode())]), [])

    def export_file(self, path: Union[str, os.PathLike], size: int, direct: bool = False) -> int:
        """Exports a file to remote initiators; returns its file id (the
        ``dev`` of their FILE descriptors). Send metadata again afterwards."""
        return self._a.register_local_file(os.fspath(path), size, direct)

    def unexport_file(self, path: Union[str, os.PathLike]) -> None:
        """Stops exporting a file."""
        self._a.unregister_local_file(os.fspath(path))

    def exported_files(self) -> list:
        """``[{"id", "path", "size", "alignment"}]`` of this agent."""
        return self._a.exported_files()

    def remote_files(self, peer: str) -> list:
        """Files ``peer`` exports, from its loaded metadata."""
        return self._a.remote_files(peer)

    def query(self, descs: Any, mem_type: str = "FILE") -> list:
        """Size, mode and mtime of storage descriptors (None where missing)."""
        if not isinstance(descs, RegDescList):
            descs = RegDescList(mem_type, descs)
        return self._a.query_mem(descs)

    # --- requests ---------------------------------------------------------
    def descs(self, obj: _Descs, mem_type: Optional[str] = None) -> XferDescList:
        """Transfer descriptors from an :class:`XferDescList`, a list of
        ``(addr, len, dev)``, an Nx3 integer array, or memory objects (see
        :meth:`register`), one descriptor each."""
        if isinstance(obj, XferDescList):
            return obj
        if hasattr(obj, "__array_interface__") and len(getattr(obj, "shape", ())) == 2:
            return XferDescList(mem_type or "DRAM", obj)
        objs = obj if isinstance(obj, list) else [obj]
        if objs and isinstance(objs[0], tuple):
            return XferDescList(mem_type or "DRAM", objs)
        regions = [region_of(o) for o in objs]
        return XferDescList(mem_type or regions[0].mem_type, [(r.addr, r.nbytes, r.dev) for r in regions])

    def request(
        self,
        op: str,
        local: _Descs,
        remote: _Descs,
        peer: str,
        notif: Union[bytes, str, None] = None,
        hints: Sequence[str] = (),
    ) -> Request:
        """A READ or WRITE between ``local`` and ``peer``'s ``remote``
        descriptors (this agent's own name for loopback, such as DRAM ↔ FILE)."""
        return Request(self._a.request(op, self.descs(local), self.descs(remote), peer, notif, list(hints)))

    def prepare(self, descs: _Descs, peer: Optional[str] = None) -> PreparedList:
        """Resolves descriptors once (local side if ``peer`` is None)."""
        d = self.descs(descs)
        return self._a.prepare_local(d) if peer is None else self._a.prepare_remote(peer, d)

    def make_request(
        self,
        op: str,
        local: PreparedList,
        local_idx: Any,
        remote: PreparedList,
        remote_idx: Any,
        notif: Union[bytes, str, None] = None,
        hints: Sequence[str] = (),
    ) -> Request:
        """A request from prepared lists by index (lists or integer arrays)."""
        return Request(self._a.make_request(op, local, local_idx, remote, remote_idx, notif, list(hints)))

    # --- notifications ----------------------------------------------------
    def send_notification(self, peer: str, msg: Union[bytes, str], hints: Sequence[str] = ()) -> None:
        """Sends a standalone notification (bytes, NULs allowed)."""
        self._a.send_notification(peer, msg, list(hints))

    def notifications(self) -> dict:
        """Takes every notification received so far: ``{sender: [bytes]}``."""
        return self._a.take_notifications()

    def wait_notifications(self, timeout: float) -> bool:
        """Blocks (GIL released) until one is queued or ``timeout`` s pass."""
        return self._a.wait_notifications(timeout)

    # --- metadata ---------------------------------------------------------
    def metadata(self) -> bytes:
        """This agent's full metadata (way 1: in memory, send it yourself)."""
        return self._a.local_metadata()

    def partial_metadata(self, descs: Any, include_conn_info: bool = False, backends: Sequence[str] = ()) -> bytes:
        """Metadata of only these registered descriptors."""
        return self._a.partial_metadata(self._reg(descs), include_conn_info, list(backends))

    def load_metadata(self, blob: bytes) -> str:
        """Loads a peer's metadata; returns its name."""
        return self._a.load_remote_metadata(blob)

    def forget(self, peer: str) -> None:
        """Drops a loaded peer and disconnects from it."""
        self._a.invalidate_remote(peer)

    def check_remote(self, peer: str, descs: Optional[_Descs] = None) -> bool:
        """Whether ``peer``'s metadata is loaded (covering ``descs``)."""
        return self._a.check_remote(peer, None if descs is None else self.descs(descs))

    @property
    def peers(self) -> list:
        """Names of the loaded peers."""
        return self._a.remote_agents()

    def send_metadata(self, ip: Optional[str] = None, port: int = 0) -> None:
        """Publishes metadata: to a peer's listener at ``ip:port`` (way 2) or,
        without ``ip``, to the central store (way 3)."""
        self._a.send_local_metadata(ip or "", port)

    def send_partial_metadata(
        self, descs: Any, label: str, include_conn_info: bool = False, ip: Optional[str] = None, port: int = 0
    ) -> None:
        """Publishes partial metadata (labelled, in the central store)."""
        self._a.send_partial_metadata(self._reg(descs), include_conn_info, label, ip or "", port)

    def fetch_metadata(self, peer: str, ip: Optional[str] = None, port: int = 0, label: Optional[str] = None) -> None:
        """Fetches and loads ``peer``'s metadata from its listener at
        ``ip:port`` (asynchronous: poll :meth:`check_remote`) or, without
        ``ip``, from the central store (waits up to ``metadata_timeout``)."""
        self._a.fetch_remote_metadata(peer, label, ip or "", port)

    def invalidate_metadata(self, ip: Optional[str] = None, port: int = 0) -> None:
        """Withdraws this agent's metadata from a listener or the store."""
        self._a.invalidate_local_metadata(ip or "", port)

    def make_connection(self, peer: str) -> None:
        """Connects ahead of the first transfer."""
        self._a.make_connection(peer)

    def store(self) -> _kvferry.Store:
        """Application keys of the central store."""
        return self._a.store()

    def _reg(self, descs: Any) -> RegDescList:
        if isinstance(descs, RegDescList):
            return descs
        if isinstance(descs, Registration):
            return descs.descs
        return RegDescList("DRAM", descs)

    def __repr__(self) -> str:
        return repr(self._a)
