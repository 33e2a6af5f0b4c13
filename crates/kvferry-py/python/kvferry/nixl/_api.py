"""NIXL 1.5's Python API (``nixl._api``) on kvferry, behaviour for behaviour.

Plugin names as NIXL programs use them: ``UCX`` is kvferry's network and
same-host transport (LOCAL within the process, SHM for another process on
this host, TCP otherwise, chosen per peer); ``POSIX`` is POSIX. kvferry's own
names (``TCP``, ``SHM``, ``LOCAL``) work too. See docs/PYTHON.md for the
mapping of every call and the few differences.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
from enum import Enum
from typing import Any, Optional, Union

from .. import _errors as _e
from .. import _kvferry
from . import _bindings as nixlBind
from ._bindings import _nixl_error, nixlRegDList, nixlXferDList
from .logging import get_logger

__all__ = [
    "DEFAULT_COMM_PORT",
    "nixl_agent",
    "nixl_agent_config",
    "nixl_backend_handle",
    "nixl_prepped_dlist_handle",
    "nixl_thread_sync_t",
    "nixl_xfer_handle",
]

logger = get_logger(__name__)

DEFAULT_COMM_PORT = nixlBind.DEFAULT_COMM_PORT

#: NIXL plugin names that stand for several kvferry backends, in preference order.
ALIASES = {"UCX": ("LOCAL", "SHM", "TCP")}

_OPS = {"WRITE": "WRITE", "READ": "READ"}


def _is_torch_tensor(obj: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _name(n: Union[str, bytes]) -> str:
    return n.decode() if isinstance(n, (bytes, bytearray)) else n


def _msg(m: Union[bytes, str, None]) -> Optional[bytes]:
    if m is None:
        return None
    if isinstance(m, str):
        m = m.encode()
    return bytes(m) if m else None


def _telemetry_on(configured: bool) -> bool:
    env = os.getenv("NIXL_TELEMETRY_ENABLE")
    if env is None or env.strip() == "":
        return configured
    return env.strip().lower() not in ("0", "n", "no", "false", "off")


class nixl_prepped_dlist_handle:
    """Handle of a prepared descriptor list. ``release()`` frees it (safe
    twice, and after the agent is gone); ``__del__`` does the same."""

    __slots__ = ("_handle", "_agent", "_released", "_list", "__weakref__")

    def __init__(self, agent: Any, value: Any):
        self._list = value
        self._handle = id(value)
        self._agent = agent
        self._released = False

    def __repr__(self) -> str:
        return f"nixl_prepped_dlist_handle(0x{self._handle:x}, released={self._released})"

    def release(self) -> None:
        """Frees the prepared list."""
        if not self._released:
            self._released = True
            self._list.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass


class nixl_xfer_handle:
    """Handle of a transfer request. ``release()`` cancels it if still in
    flight and frees it (safe twice, and after the agent is gone)."""

    __slots__ = ("_handle", "_agent", "_released", "_req", "__weakref__")

    def __init__(self, agent: Any, value: Any):
        self._req = value
        self._handle = id(value)
        self._agent = agent
        self._released = False

    def __repr__(self) -> str:
        return f"nixl_xfer_handle(0x{self._handle:x}, released={self._released})"

    def release(self) -> None:
        """Cancels what is in flight and frees the request."""
        if not self._released:
            self._released = True
            self._req.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass


nixl_backend_handle = int


class nixl_thread_sync_t(Enum):
    """Thread synchronisation modes; kvferry agents are thread-safe in all."""

    NIXL_THREAD_SYNC_NONE = nixlBind.NIXL_THREAD_SYNC_NONE
    NIXL_THREAD_SYNC_STRICT = nixlBind.NIXL_THREAD_SYNC_STRICT
    NIXL_THREAD_SYNC_RW = nixlBind.NIXL_THREAD_SYNC_RW
    NIXL_THREAD_SYNC_DEFAULT = nixlBind.NIXL_THREAD_SYNC_DEFAULT


_PATH_FLAGS = {b"r", b"ro", b"w", b"wo", b"rw", b"direct", b"create", b"trunc"}


def _is_path_spec(meta: bytes) -> bool:
    """Whether ``meta`` is kvferry's POSIX path spec, ``<flags>:<path>``
    with known flags (``rw,direct:/data/kv.bin``): kvferry's extension."""
    flags, colon, path = meta.partition(b":")
    return bool(colon and path and flags) and all(f in _PATH_FLAGS for f in flags.split(b",") if f)


def _fd_mode(descs: Any) -> Any:
    """NIXL's FILE and BLOCK registrations name an open descriptor in
    ``dev_id``; ``meta_info`` is the caller's own label (a file name, say),
    which NIXL's POSIX and GDS plugins never read. kvferry's POSIX would read
    a bare absolute path as a file to open itself (dropping the descriptor's
    ``O_DIRECT``) and refuse any other label, so such rows go to kvferry
    with empty ``meta_info`` (fd mode). A ``<flags>:<path>`` spec stays."""
    if descs.mem_type not in ("FILE", "BLOCK"):
        return descs
    rows = list(descs)
    if all(not meta or _is_path_spec(meta) for _, _, _, meta in rows):
        return descs
    return type(descs)(descs.getType(), [(a, n, d, meta if _is_path_spec(meta) else b"") for a, n, d, meta in rows])


class nixl_agent_config:
    """Configuration of a :class:`nixl_agent` (NIXL's positional order).

    ``enable_prog_thread`` is accepted (kvferry's backends always progress on
    their own threads); ``enable_listen_thread`` starts the metadata listener
    on ``listen_port``; ``capture_telemetry`` turns on
    ``get_xfer_telemetry``; ``num_threads`` is kvferry's ``worker_threads``;
    ``backends`` are created with the agent; ``sync_mode`` is checked and kept.
    """

    def __init__(
        self,
        enable_prog_thread: bool = True,
        enable_listen_thread: bool = False,
        listen_port: int = DEFAULT_COMM_PORT,
        capture_telemetry: bool = False,
        num_threads: int = 0,
        backends: list = ["UCX"],  # noqa: B006 - NIXL's signature
        sync_mode: Optional[nixl_thread_sync_t] = None,
    ):
        self.backends = backends
        self.enable_pthread = enable_prog_thread
        self.enable_listen = enable_listen_thread
        self.port = listen_port
        self.capture_telemetry = capture_telemetry
        self.num_threads = num_threads
        if sync_mode is not None and not isinstance(sync_mode, nixl_thread_sync_t):
            raise TypeError(f"sync_mode must be a nixl_thread_sync_t (got {type(sync_mode).__name__!r})")
        self.sync_mode = sync_mode


def _translate(fn):
    """Raises kvferry errors as NIXL's ``nixl*Error``."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _e.Error as e:
            if isinstance(e, nixlBind.nixlNoTelemetryError) or type(e).__module__ == nixlBind.__name__:
                raise
            raise _nixl_error(e) from None

    wrapper.__name__ = fn.__name__
    wrapper.__qualname__ = fn.__qualname__
    wrapper.__doc__ = fn.__doc__
    wrapper.__wrapped__ = fn
    return wrapper


class nixl_agent:
    """A NIXL agent on kvferry: backends, registration, descriptor lists,
    transfers, notifications and metadata, as in NIXL 1.5.

    Args:
        agent_name: Unique, non-empty name (``str`` or ``bytes``).
        nixl_conf: A :class:`nixl_agent_config` (defaults if None).
        instantiate_all: Create every available plugin (ignored with a config).
    """

    def __init__(self, agent_name: Union[str, bytes], nixl_conf: Optional[nixl_agent_config] = None,
                 instantiate_all: bool = False):
        agent_name = _name(agent_name)
        if not agent_name:
            raise ValueError("Agent needs a non-empty name")
        if nixl_conf and instantiate_all:
            instantiate_all = False
            logger.warning("Ignoring instantiate_all based on the provided config in agent creation.")
        if not nixl_conf:
            nixl_conf = nixl_agent_config()
        self._telemetry = _telemetry_on(bool(nixl_conf.capture_telemetry))
        try:
            self.agent = _kvferry.Agent(
                agent_name,
                [],
                # The listener starts below, once the backends exist: a peer
                # fetching earlier would load metadata that lists none.
                listener=False,
                worker_threads=max(int(nixl_conf.num_threads), 0),
                telemetry=self._telemetry,
            )
        except _e.Error as e:
            raise _nixl_error(e) from None
        self.name = agent_name
        self._lock = threading.Lock()
        self._buf_regs: dict = {}
        self._leaked_xfer_handles: list = []
        self.notifs: dict = {}
        self.backends: dict = {}
        self.backend_mems: dict = {}
        self.backend_options: dict = {}
        self._real: dict = {}
        self.plugin_list = self._plugins()
        self.plugin_b_options: dict = {}
        self.plugin_mem_types: dict = {}
        backends = self.plugin_list if instantiate_all else nixl_conf.backends
        for bknd in backends:
            if bknd not in self.plugin_list:
                logger.warning("Skipping backend registration %s due to the missing plugin.", bknd)
                continue
            if not instantiate_all:
                self.create_backend(bknd, {})
                continue
            try:
                self.create_backend(bknd, {})
            except _e.Error as e:
                # Every plugin with default parameters: one that needs some
                # (OBJ's bucket) is skipped, as a missing plugin is.
                logger.warning("Skipping backend %s: it does not start with default parameters: %s", bknd, e)
        if nixl_conf.enable_listen:
            try:
                self.agent.start_listener(int(nixl_conf.port))
            except _e.Error as e:
                raise _nixl_error(e) from None
        self.nixl_mems = {
            "DRAM": nixlBind.DRAM_SEG,
            "VRAM": nixlBind.VRAM_SEG,
            "FILE": nixlBind.FILE_SEG,
            "BLOCK": nixlBind.BLK_SEG,
            "OBJ": nixlBind.OBJ_SEG,
            "cpu": nixlBind.DRAM_SEG,
            "cuda": nixlBind.VRAM_SEG,
        }
        self.nixl_ops = {"WRITE": nixlBind.NIXL_WRITE, "READ": nixlBind.NIXL_READ}
        logger.info("Initialized NIXL agent: %s", agent_name)

    # --- plugins and backends ---------------------------------------------
    @staticmethod
    def _plugins() -> list:
        real = _kvferry.Agent.plugins()
        upper = [p.upper() for p in real]
        out = []
        for alias, parts in ALIASES.items():
            if all(p in upper for p in parts if p != "SHM"):
                out.append(alias)
        out += [p for p in upper if p not in out]
        return out

    def _parts(self, plugin: str) -> tuple:
        return ALIASES.get(plugin, (plugin,))

    def _load_plugin_params(self, plugin: str) -> None:
        if plugin not in self.plugin_list:
            return
        opts: dict = {}
        mems: list = []
        for p in self._parts(plugin):
            try:
                m, d = _kvferry.Agent.plugin_params(p)
            except _e.Error:
                continue
            opts.update({k: str(v) for k, v in d.items()})
            mems += [f"{t if t != 'BLOCK' else 'BLK'}_SEG" for t in m if f"{t}_SEG" not in mems]
        self.plugin_b_options[plugin] = opts
        self.plugin_mem_types[plugin] = list(dict.fromkeys(mems))

    def get_plugin_list(self) -> list:
        """Names of the available plugins (NIXL's and kvferry's)."""
        return self.plugin_list

    def get_plugin_mem_types(self, backend: str) -> list:
        """Memory types of a plugin, as ``"DRAM_SEG"``-style strings."""
        if backend not in self.plugin_mem_types:
            self._load_plugin_params(backend)
        if backend not in self.plugin_mem_types:
            logger.warning("Plugin %s is not available to get its supported mem types.", backend)
            return []
        return self.plugin_mem_types[backend]

    def get_plugin_params(self, backend: str) -> dict:
        """A plugin's parameters and their defaults, as strings."""
        if backend not in self.plugin_b_options:
            self._load_plugin_params(backend)
        if backend not in self.plugin_b_options:
            logger.warning("Plugin %s is not available to get its parameters.", backend)
            return {}
        return self.plugin_b_options[backend]

    def get_backend_mem_types(self, backend: str) -> list:
        """Memory types of a created backend."""
        if backend in self.backend_mems:
            return self.backend_mems[backend]
        logger.warning("Backend %s not instantiated to get its supported mem types.", backend)
        return []

    def get_backend_params(self, backend: str) -> dict:
        """Effective parameters of a created backend, as strings."""
        if backend in self.backend_options:
            return self.backend_options[backend]
        logger.warning("Backend %s not instantiated to get its parameters.", backend)
        return {}

    @_translate
    def create_backend(self, backend: str, initParams: dict = {}) -> None:  # noqa: B006,N803
        """Creates a backend (``UCX``: LOCAL, SHM where it runs, and TCP).
        Parameters a part does not know are left out; an unknown plugin
        raises ``nixlNotFoundError``."""
        if backend not in self.plugin_list:
            raise _e.NotFoundError(
                f"createBackend: unsupported backend '{backend}'; available: {', '.join(self.plugin_list)}"
            )
        created = []
        for part in self._parts(backend):
            try:
                _, known = _kvferry.Agent.plugin_params(part)
            except _e.Error:
                continue
            params = {k: str(v) for k, v in (initParams or {}).items() if k in known}
            if "num_threads" in (initParams or {}) and "threads" in known:
                params.setdefault("threads", str(initParams["num_threads"]))
            try:
                self.agent.create_backend(part, params)
                created.append(part)
            except _e.Error:
                if backend in ALIASES and part == "SHM":
                    logger.info("SHM cannot run here; UCX uses TCP for same-host peers")
                    continue
                raise
        self._real[backend] = tuple(created)
        self.backends[backend] = len(self.backends) + 1 if backend not in self.backends else self.backends[backend]
        opts: dict = {}
        mems: list = []
        for part in created:
            opts.update(self.agent.backend_params(part))
            mems += [f"{t if t != 'BLOCK' else 'BLK'}_SEG" for t in self.agent.backend_mem_types(part)]
        self.backend_options[backend] = opts
        self.backend_mems[backend] = list(dict.fromkeys(mems))
        logger.info("Backend %s was instantiated", backend)

    def _hints(self, backends: list) -> list:
        out: list = []
        for b in backends or []:
            self.backends[b]  # KeyError for an unknown backend, as in NIXL
            out += self._real.get(b, (b,))
        return out

    def _nixl_backend(self, real: str) -> str:
        for name, parts in self._real.items():
            if real.upper() in parts:
                return name
        return real

    # --- memory -----------------------------------------------------------
    @_translate
    def register_memory(self, reg_list: Any, mem_type: Optional[str] = None, backends: list = [],  # noqa: B006
                        is_sorted: bool = False) -> nixlRegDList:
        """Registers memory regions (tuples, tensors, Nx3 array, a
        ``nixlRegDList``, or a ``kvferry.AlignedBuf``); returns the
        ``nixlRegDList`` to deregister later."""
        if isinstance(reg_list, _kvferry.AlignedBuf):
            # kvferry's extension: an AlignedBuf registers with its memfd, so
            # that SHM peers on this host map it (memcpy instead of CMA).
            descs = nixlRegDList(nixlBind.DRAM_SEG, [(reg_list.addr, len(reg_list), 0, "")])
            with self._lock:
                self._buf_regs[(reg_list.addr, len(reg_list))] = self.agent.register_buf(reg_list)
            return descs
        descs = self.get_reg_descs(reg_list, mem_type)
        if descs is None:
            raise TypeError("register_memory: no valid descriptors (see the error logged above)")
        self.agent.register_kept(_fd_mode(descs), self._hints(backends))
        return descs

    @_translate
    def deregister_memory(self, dereg_list: nixlRegDList, backends: list = []) -> None:  # noqa: B006
        """Deregisters what :meth:`register_memory` registered."""
        if len(dereg_list) == 1 and dereg_list.mem_type == "DRAM":
            with self._lock:
                reg = self._buf_regs.pop(dereg_list[0][:2], None)
            if reg is not None:
                reg.deregister()
                return
        self.agent.deregister(_fd_mode(dereg_list))

    @_translate
    def query_memory(self, reg_list: Any, backend: str, mem_type: Optional[str] = None) -> list:
        """Size, mode and mtime (strings) of storage descriptors; None where
        missing. For FILE, ``meta_info`` may be a plain path, as in NIXL;
        for OBJ it is the object key."""
        descs = self.get_reg_descs(reg_list, mem_type)
        if backend not in self.backends:
            raise ValueError(f"Backend '{backend}' not found. Available backends: {list(self.backends.keys())}")
        if descs is None:
            raise TypeError("query_memory: no valid descriptors (see the error logged above)")
        rows = []
        plain_paths = descs.mem_type in ("FILE", "BLOCK")
        for d in descs:
            meta = d[3]
            if plain_paths and (meta.startswith(b"/") or (meta and b":" not in meta)):
                meta = b"r:" + meta
            rows.append((d[0], d[1], d[2], meta))
        out = self.agent.query_mem(_kvferry.RegDescList(descs.mem_type, rows))
        return [None if i is None else {"mtime": str(int(i["mtime"])), "mode": str(i["mode"]), "size": str(i["size"])}
                for i in out]

    @_translate
    def make_connection(self, remote_agent: Union[str, bytes], backends: list = []) -> None:  # noqa: B006
        """Connects to ``remote_agent`` ahead of the first transfer."""
        self.agent.make_connection(_name(remote_agent))

    # --- transfers --------------------------------------------------------
    @_translate
    def prep_xfer_dlist(self, agent_name: Union[str, bytes], xfer_list: Any, mem_type: Optional[str] = None,
                        backends: list = [], is_sorted: bool = False) -> nixl_prepped_dlist_handle:  # noqa: B006
        """Prepares descriptors once: ``"NIXL_INIT_AGENT"`` or ``""`` for the
        local side, a peer's name for its side, this agent's name for loopback.
        An Nx5 array ``(addr, len, dev, stride, count)`` is a strided list."""
        agent_name = _name(agent_name)
        self._hints(backends)
        if getattr(xfer_list, "ndim", 0) == 2 and getattr(xfer_list, "shape", (0, 0))[1] == 5:
            if mem_type is None:
                raise ValueError("Please specify a mem type for strided descriptors")
            xfer_list = _expand_strided(xfer_list)
        descs = self.get_xfer_descs(xfer_list, mem_type)
        if agent_name in ("NIXL_INIT_AGENT", ""):
            return nixl_prepped_dlist_handle(self, self.agent.prepare_local(descs))
        return nixl_prepped_dlist_handle(self, self.agent.prepare_remote(agent_name, descs))

    def make_prepped_xfer(self, operation: str, local_xfer_side: nixl_prepped_dlist_handle, local_indices: Any,
                          remote_xfer_side: nixl_prepped_dlist_handle, remote_indices: Any, notif_msg: bytes = b"",
                          backends: list = [], skip_desc_merge: bool = False) -> nixl_xfer_handle:  # noqa: B006
        """A request from prepared lists by index (lists, or integer numpy
        arrays of any width, int64 included)."""
        op = _OPS[operation]
        try:
            req = self.agent.make_request(op, local_xfer_side._list, local_indices, remote_xfer_side._list,
                                          remote_indices, _msg(notif_msg), self._hints(backends))
        except _e.MismatchError as e:  # NIXL: different index counts are NIXL_ERR_INVALID_PARAM
            raise _nixl_error(e, nixlBind.nixlInvalidParamError) from None
        except _e.Error as e:
            raise _nixl_error(e) from None
        return nixl_xfer_handle(self, req)

    def initialize_xfer(self, operation: str, local_descs: Any, remote_descs: Any, remote_agent: Union[str, bytes],
                        notif_msg: bytes = b"", backends: list = []) -> nixl_xfer_handle:  # noqa: B006
        """A request between two descriptor lists (prepared on the fly)."""
        op = _OPS[operation]
        if not isinstance(local_descs, _kvferry.XferDescList):
            local_descs = self.get_xfer_descs(local_descs)
        if not isinstance(remote_descs, _kvferry.XferDescList):
            remote_descs = self.get_xfer_descs(remote_descs)
        try:
            req = self.agent.request(op, local_descs, remote_descs, _name(remote_agent), _msg(notif_msg),
                                     self._hints(backends))
        except _e.Error as e:
            raise _nixl_error(e) from None
        return nixl_xfer_handle(self, req)

    def transfer(self, handle: nixl_xfer_handle, notif_msg: bytes = b"") -> str:
        """Posts the request: ``"DONE"`` if it finished at once, else ``"PROC"``;
        failures raise ``nixl*Error``."""
        try:
            return "DONE" if handle._req.post(_msg(notif_msg)) else "PROC"
        except _e.Error as e:
            raise _nixl_error(e) from None

    def check_xfer_state(self, handle: nixl_xfer_handle) -> str:
        """``"DONE"`` or ``"PROC"``; a failed transfer raises its ``nixl*Error``
        (a dead peer: ``nixlRemoteDisconnectError``)."""
        try:
            return "DONE" if handle._req.status() else "PROC"
        except _e.Error as e:
            raise _nixl_error(e) from None

    def get_xfer_telemetry(self, handle: nixl_xfer_handle) -> nixlBind.nixlXferTelemetry:
        """Telemetry of the last posting (µs); ``nixlNoTelemetryError`` when
        telemetry is off (``capture_telemetry``, ``NIXL_TELEMETRY_ENABLE``)."""
        if not self._telemetry:
            raise nixlBind.nixlNoTelemetryError("NIXL_ERR_NO_TELEMETRY: telemetry is not enabled; set "
                                               "capture_telemetry=True or NIXL_TELEMETRY_ENABLE=y")
        t = handle._req.telemetry()
        if t is None:
            raise nixlBind.nixlNoTelemetryError("NIXL_ERR_NO_TELEMETRY: telemetry is not enabled for this request")
        return nixlBind.nixlXferTelemetry(*t)

    @_translate
    def estimate_xfer_cost(self, req_handle: nixl_xfer_handle) -> tuple:
        """``(duration_us, error_margin_us, method)``."""
        d, m, method = req_handle._req.estimate_cost()
        return d, m, "ANALYTICAL_BACKEND" if "analytic" in method.lower() else "UNKNOWN"

    def query_xfer_backend(self, handle: nixl_xfer_handle) -> str:
        """The (NIXL) name of the backend chosen for the request."""
        return self._nixl_backend(handle._req.backend)

    def release_xfer_handle(self, handle: nixl_xfer_handle) -> None:
        """Releases a request, cancelling it if still in flight."""
        handle.release()

    def release_dlist_handle(self, handle: nixl_prepped_dlist_handle) -> None:
        """Releases a prepared list."""
        handle.release()

    def prep_mem_view(self, dlist: Any, *, backends: Optional[list] = None) -> int:
        """NIXL's GPU device memory views: not supported by kvferry yet."""
        raise nixlBind.nixlNotSupportedError("NIXL_ERR_NOT_SUPPORTED: memory views need NIXL's UCX GPU device API")

    def release_mem_view(self, mvh: int) -> None:
        """See :meth:`prep_mem_view`."""
        raise nixlBind.nixlNotSupportedError("NIXL_ERR_NOT_SUPPORTED: memory views need NIXL's UCX GPU device API")

    # --- notifications ----------------------------------------------------
    def _merge(self, into: dict) -> dict:
        for k, v in self.agent.take_notifications().items():
            into.setdefault(k, []).extend(v)
        return into

    def get_new_notifs(self, backends: list = []) -> dict:  # noqa: B006
        """New notifications: ``{agent: [bytes, ...]}`` (kept notifications of
        :meth:`update_notifs` are not included)."""
        return self.agent.take_notifications()

    def update_notifs(self, backends: list = []) -> dict:  # noqa: B006
        """Adds new notifications to ``self.notifs`` and returns it."""
        with self._lock:
            return self._merge(self.notifs)

    def check_remote_xfer_done(self, remote_agent_name: Union[str, bytes], lookup_tag: Union[bytes, str],
                               backends: list = [], tag_is_prefix: bool = True) -> bool:  # noqa: B006
        """Whether a notification from ``remote_agent_name`` starts with
        (``tag_is_prefix``) or contains ``lookup_tag``; consumes only the
        matched one. An empty tag matches any."""
        name = _name(remote_agent_name)
        tag = lookup_tag.encode() if isinstance(lookup_tag, str) else bytes(lookup_tag)
        with self._lock:
            self._merge(self.notifs)
            msgs = self.notifs.get(name)
            if not msgs:
                return False
            for i, m in enumerate(msgs):
                if (m.startswith(tag) if tag_is_prefix else tag in m):
                    del msgs[i]
                    return True
        return False

    @_translate
    def send_notif(self, remote_agent_name: Union[str, bytes], notif_msg: Union[bytes, str],
                   backend: Optional[str] = None) -> None:
        """Sends a standalone notification (bytes; NULs allowed)."""
        hints = self._hints([backend]) if backend is not None else []
        msg = notif_msg.encode() if isinstance(notif_msg, str) else bytes(notif_msg)
        self.agent.send_notification(_name(remote_agent_name), msg, hints)

    # --- metadata ---------------------------------------------------------
    @_translate
    def get_agent_metadata(self) -> bytes:
        """This agent's full metadata."""
        return self.agent.local_metadata()

    @_translate
    def get_partial_agent_metadata(self, descs: nixlRegDList, inc_conn_info: bool = False,
                                   backends: list = []) -> bytes:  # noqa: B006
        """Metadata of only ``descs`` (empty: connection info alone)."""
        return self.agent.partial_metadata(self._as_reg(descs), inc_conn_info, self._hints(backends))

    def add_remote_agent(self, metadata: bytes) -> bytes:
        """Loads a peer's metadata; returns its name as bytes."""
        try:
            return self.agent.load_remote_metadata(bytes(metadata)).encode()
        except _e.MalformedError as e:
            raise _nixl_error(e, nixlBind.nixlMismatchError) from None
        except _e.Error as e:
            raise _nixl_error(e) from None

    def remove_remote_agent(self, agent: Union[str, bytes]) -> None:
        """Forgets a peer and disconnects from it. A name that is not loaded
        returns quietly, as in NIXL (logged at debug): it is also the usual
        case at a program's end, when the peer's exit closed its connection
        and kvferry unloaded it then."""
        try:
            self.agent.invalidate_remote(_name(agent))
        except _e.NotFoundError as e:
            logger.debug("remove_remote_agent: %s (already unloaded if its connection closed)", e)
        except _e.Error as e:
            raise _nixl_error(e) from None

    def _meta(self, fn, *args):
        try:
            return fn(*args)
        except _e.NotSupportedError as e:
            raise _nixl_error(e, nixlBind.nixlInvalidParamError) from None
        except _e.Error as e:
            raise _nixl_error(e) from None

    def send_local_metadata(self, ip_addr: str = "", port: int = DEFAULT_COMM_PORT) -> None:
        """Sends metadata to a peer's listener (``ip_addr``) or, without it,
        publishes it in the central store (``NIXL_ETCD_ENDPOINTS``, ...)."""
        self._meta(self.agent.send_local_metadata, ip_addr or "", int(port))

    def send_partial_agent_metadata(self, descs: nixlRegDList, inc_conn_info: bool = False, backends: list = [],  # noqa: B006
                                    ip_addr: str = "", port: int = DEFAULT_COMM_PORT, label: str = "") -> None:
        """Sends partial metadata to a peer, or publishes it under ``label``."""
        self._hints(backends)
        self._meta(self.agent.send_partial_metadata, self._as_reg(descs), inc_conn_info,
                   label or ("p2p" if ip_addr else ""), ip_addr or "", int(port))

    def fetch_remote_metadata(self, remote_agent: Union[str, bytes], ip_addr: str = "",
                              port: int = DEFAULT_COMM_PORT, label: str = "") -> None:
        """Asks for ``remote_agent``'s metadata, asynchronously: from its
        listener (``ip_addr``) or the central store. Poll
        :meth:`check_remote_metadata`."""
        self._meta(self.agent.fetch_remote_metadata, _name(remote_agent), label or None, ip_addr or "",
                   int(port), True)

    def invalidate_local_metadata(self, ip_addr: str = "", port: int = DEFAULT_COMM_PORT) -> None:
        """Withdraws this agent's metadata from a peer or the central store."""
        self._meta(self.agent.invalidate_local_metadata, ip_addr or "", int(port))

    def check_remote_metadata(self, agent: Union[str, bytes], descs: Any = None) -> bool:
        """Whether ``agent``'s metadata is loaded (covering ``descs``)."""
        name = _name(agent)
        err = self.agent.fetch_error(name)
        if err:
            logger.error("fetch_remote_metadata(%s): %s", name, err)
        if descs is not None and not isinstance(descs, _kvferry.XferDescList):
            descs = self.get_xfer_descs(descs)
        if descs is not None and len(descs) == 0:
            descs = None
        return self.agent.check_remote(name, descs)

    # --- descriptors ------------------------------------------------------
    @staticmethod
    def _tensor_mem_type(tensor: Any) -> str:
        return "DRAM" if tensor.get_device() == -1 else "VRAM"

    def _as_reg(self, descs: Any) -> nixlRegDList:
        if isinstance(descs, _kvferry.RegDescList):
            return descs
        return self.get_reg_descs(descs, "DRAM")

    def _tensor_rows(self, tensors: list) -> Optional[list]:
        dev0 = tensors[0].device
        rows = []
        for t in tensors:
            if t.device != dev0:
                logger.error("Please use a list of Tensors on one device")
                return None
            if not t.is_contiguous():
                logger.error("Please use a list of contiguous Tensors")
                return None
            gpu = t.get_device()
            rows.append((t.data_ptr(), t.numel() * t.element_size(), 0 if gpu == -1 else gpu))
        return rows

    def get_xfer_descs(self, descs: Any, mem_type: Optional[str] = None,
                       is_sorted: bool = False) -> Optional[nixlXferDList]:
        """A ``nixlXferDList`` from 3-tuples (with ``mem_type``), a tensor or
        a list of tensors, an Nx3 integer array (with ``mem_type``), or a
        list as is. Bad shapes log an error and return None; an unknown
        ``mem_type`` raises ``KeyError``. The legacy ``is_sorted`` is ignored."""
        if isinstance(descs, _kvferry.XferDescList):
            return descs
        if isinstance(descs, _kvferry.RegDescList):
            logger.error("RegList type detected for transfer, please use XferList")
            return None
        return self._build_dlist(descs, mem_type, nixlXferDList, 3, "3-tuple list needed for transfer", ())

    def _seg(self, mem_type: Optional[str]) -> Any:
        """NIXL's memory segment for ``mem_type`` (``KeyError`` if unknown), or
        None with NIXL's logged error when it is missing."""
        if mem_type is None:
            logger.error("Please specify a mem type if not using Tensors")
            return None
        return self.nixl_mems[mem_type]

    def _build_dlist(self, descs: Any, mem_type: Optional[str], cls: Any, arity: int, arity_error: str,
                     tensor_pad: tuple) -> Any:
        """The shared part of ``get_xfer_descs`` and ``get_reg_descs``: a
        ``cls`` list from a tensor or a list of them (rows padded with
        ``tensor_pad``), an Nx3 integer array, or ``arity``-tuples; None with
        NIXL's logged error for a bad shape or a missing ``mem_type``."""
        def pad(rows):
            return [r + tensor_pad for r in rows] if tensor_pad else rows

        if _is_torch_tensor(descs):
            rows = self._tensor_rows([descs])
            return None if rows is None else cls(self.nixl_mems[self._tensor_mem_type(descs)], pad(rows))
        if not hasattr(descs, "__array_interface__") and len(descs) > 0 and _is_torch_tensor(descs[0]):
            rows = self._tensor_rows(descs)
            return None if rows is None else cls(self.nixl_mems[self._tensor_mem_type(descs[0])], pad(rows))
        if hasattr(descs, "__array_interface__"):
            seg = self._seg(mem_type)
            if seg is None:
                return None
            if getattr(descs, "ndim", 0) != 2 or descs.shape[1] != 3:
                logger.error("Nx3 shape required for transfer descriptor list from numpy array")
                return None
            return cls(seg, _int_array(descs))
        if len(descs) == 0 or isinstance(descs[0], tuple):
            seg = self._seg(mem_type)
            if seg is None:
                return None
            if len(descs) == 0:
                return cls(seg)
            if len(descs[0]) != arity:
                logger.error(arity_error)
                return None
            return cls(seg, descs)
        return None

    def get_remote_descs(self, descs: Any, mem_type: Optional[str] = None) -> Optional[nixlBind.nixlRemoteDList]:
        """A ``nixlRemoteDList`` from 4-tuples ``(addr, len, dev, agent)``."""
        if isinstance(descs, nixlBind.nixlRemoteDList):
            return descs
        if descs and isinstance(descs[0], tuple):
            if mem_type is None:
                logger.error("Please specify a mem type")
                return None
            seg = self.nixl_mems[mem_type]
            if len(descs[0]) != 4:
                logger.error("4-tuple list (addr, len, dev_id, agent_name) needed for remote descriptors")
                return None
            return nixlBind.nixlRemoteDList(seg, descs)
        return None

    def get_reg_descs(self, descs: Any, mem_type: Optional[str] = None,
                      is_sorted: bool = False) -> Optional[nixlRegDList]:
        """A ``nixlRegDList`` from 4-tuples (meta info ``str``), a tensor or a
        list of tensors, an Nx3 integer array (empty meta info), or a list
        as is; the same error rules as :meth:`get_xfer_descs`."""
        if isinstance(descs, _kvferry.RegDescList):
            return descs
        if isinstance(descs, _kvferry.XferDescList):
            logger.error("XferList type detected for registration, please use RegList")
            return None
        return self._build_dlist(descs, mem_type, nixlRegDList, 4, "4-tuple list needed for registration", ("",))

    def get_serialized_descs(self, descs: Any) -> bytes:
        """Serialises a descriptor list (pickle, as NIXL)."""
        return pickle.dumps(descs)

    def deserialize_descs(self, serialized_descs: bytes) -> Any:
        """Inverse of :meth:`get_serialized_descs`."""
        return pickle.loads(serialized_descs)

    def __del__(self) -> None:
        self._leaked_xfer_handles.clear() if hasattr(self, "_leaked_xfer_handles") else None


def _int_array(a: Any) -> Any:
    """An integer array kvferry reads in place (C-contiguous int64/uint64)."""
    t = a.__array_interface__["typestr"]
    if t in ("<i8", "<u8") and a.flags["C_CONTIGUOUS"]:
        return a
    import numpy as np

    return np.ascontiguousarray(a, dtype=np.uint64)


def _expand_strided(a: Any) -> Any:
    """Rows ``(addr, len, dev, stride, count)`` as ``count`` rows ``(addr + i*stride, len, dev)``."""
    import numpy as np

    a = np.asarray(a, dtype=np.uint64)
    counts = a[:, 4].astype(np.int64)
    rep = np.repeat(a, counts, axis=0)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    k = np.arange(len(rep), dtype=np.uint64) - starts.astype(np.uint64)
    out = np.empty((len(rep), 3), dtype=np.uint64)
    out[:, 0] = rep[:, 0] + k * rep[:, 3]
    out[:, 1] = rep[:, 1]
    out[:, 2] = rep[:, 2]
    return out
