"""NIXL's ``_bindings``, on kvferry: enums, status codes, the ``nixl*Error``
exceptions and the descriptor-list classes. Each ``nixl*Error`` is also the
matching :mod:`kvferry` exception (``nixlNotFoundError`` is a
``kvferry.NotFoundError``)."""

from __future__ import annotations

import enum

from .. import _errors as _e
from .. import _kvferry

DEFAULT_COMM_PORT = 8888
NIXL_INIT_AGENT = ""
HAVE_UCX_GPU_DEVICE_API = False


class nixl_mem_t(enum.IntEnum):
    """Memory types, numbered as in NIXL."""

    DRAM_SEG = 0
    VRAM_SEG = 1
    BLK_SEG = 2
    OBJ_SEG = 3
    FILE_SEG = 4


class nixl_xfer_op_t(enum.IntEnum):
    """Transfer operations."""

    NIXL_READ = 0
    NIXL_WRITE = 1


class nixl_status_t(enum.IntEnum):
    """NIXL status codes."""

    NIXL_IN_PROG = 1
    NIXL_SUCCESS = 0
    NIXL_ERR_NOT_POSTED = -1
    NIXL_ERR_INVALID_PARAM = -2
    NIXL_ERR_BACKEND = -3
    NIXL_ERR_NOT_FOUND = -4
    NIXL_ERR_MISMATCH = -5
    NIXL_ERR_NOT_ALLOWED = -6
    NIXL_ERR_REPOST_ACTIVE = -7
    NIXL_ERR_UNKNOWN = -8
    NIXL_ERR_NOT_SUPPORTED = -9
    NIXL_ERR_REMOTE_DISCONNECT = -10
    NIXL_ERR_CANCELED = -11
    NIXL_ERR_NO_TELEMETRY = -12


class nixl_thread_sync_t(enum.IntEnum):
    """Thread synchronisation modes (kvferry agents are always thread-safe)."""

    NIXL_THREAD_SYNC_NONE = 0
    NIXL_THREAD_SYNC_STRICT = 1
    NIXL_THREAD_SYNC_RW = 2
    NIXL_THREAD_SYNC_DEFAULT = 0


class nixl_cost_t(enum.IntEnum):
    """How a cost estimate was made."""

    NIXL_COST_ANALYTICAL_BACKEND = 0


globals().update(nixl_mem_t.__members__)
globals().update(nixl_xfer_op_t.__members__)
globals().update(nixl_status_t.__members__)
globals().update(nixl_cost_t.__members__)
NIXL_THREAD_SYNC_NONE = nixl_thread_sync_t.NIXL_THREAD_SYNC_NONE
NIXL_THREAD_SYNC_STRICT = nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
NIXL_THREAD_SYNC_RW = nixl_thread_sync_t.NIXL_THREAD_SYNC_RW
NIXL_THREAD_SYNC_DEFAULT = nixl_thread_sync_t.NIXL_THREAD_SYNC_DEFAULT

_SEG_OF = {"DRAM": 0, "VRAM": 1, "BLOCK": 2, "OBJ": 3, "FILE": 4}


class nixlInvalidParamError(_e.InvalidParamError):
    """NIXL_ERR_INVALID_PARAM."""

    status = "NIXL_ERR_INVALID_PARAM"


class nixlBackendError(_e.BackendError):
    """NIXL_ERR_BACKEND."""

    status = "NIXL_ERR_BACKEND"


class nixlNotFoundError(_e.NotFoundError):
    """NIXL_ERR_NOT_FOUND."""

    status = "NIXL_ERR_NOT_FOUND"


class nixlMismatchError(_e.MismatchError):
    """NIXL_ERR_MISMATCH."""

    status = "NIXL_ERR_MISMATCH"


class nixlNotAllowedError(_e.NotAllowedError):
    """NIXL_ERR_NOT_ALLOWED."""

    status = "NIXL_ERR_NOT_ALLOWED"


class nixlRepostActiveError(_e.RepostActiveError):
    """NIXL_ERR_REPOST_ACTIVE."""

    status = "NIXL_ERR_REPOST_ACTIVE"


class nixlNotSupportedError(_e.NotSupportedError):
    """NIXL_ERR_NOT_SUPPORTED."""

    status = "NIXL_ERR_NOT_SUPPORTED"


class nixlRemoteDisconnectError(_e.RemoteDisconnectError):
    """NIXL_ERR_REMOTE_DISCONNECT: the peer went away."""

    status = "NIXL_ERR_REMOTE_DISCONNECT"


class nixlCancelledError(_e.CanceledError):
    """NIXL_ERR_CANCELED."""

    status = "NIXL_ERR_CANCELED"


class nixlNotPostedError(_e.InvalidParamError):
    """NIXL_ERR_NOT_POSTED: the request was never posted."""

    kind, status = "InvalidParam", "NIXL_ERR_NOT_POSTED"


class nixlUnknownError(_e.InternalError):
    """NIXL_ERR_UNKNOWN."""

    status = "NIXL_ERR_UNKNOWN"


class nixlNoTelemetryError(_e.Error):
    """NIXL_ERR_NO_TELEMETRY: telemetry is off (``capture_telemetry`` or ``NIXL_TELEMETRY_ENABLE``)."""

    kind, status = "NotSupported", "NIXL_ERR_NO_TELEMETRY"


_NIXL_ERRORS = {
    "InvalidParam": nixlInvalidParamError,
    "Malformed": nixlInvalidParamError,
    "Backend": nixlBackendError,
    "NotFound": nixlNotFoundError,
    "Mismatch": nixlMismatchError,
    "NotAllowed": nixlNotAllowedError,
    "RepostActive": nixlRepostActiveError,
    "NotSupported": nixlNotSupportedError,
    "RemoteDisconnect": nixlRemoteDisconnectError,
    "Canceled": nixlCancelledError,
    "Timeout": nixlBackendError,
    "Internal": nixlUnknownError,
}


def _nixl_error(e: _e.Error, override: type | None = None) -> _e.Error:
    """The ``nixl*Error`` for a kvferry error: its status, then kvferry's message."""
    cls = override or _NIXL_ERRORS.get(e.kind, nixlUnknownError)
    if cls is nixlInvalidParamError and "never posted" in e.message:
        cls = nixlNotPostedError
    return cls(f"{cls.status}: {e.message}", e.kind, cls.status)


class _NixlList:
    """NIXL's descriptor-list methods, over kvferry's lists."""

    def descCount(self) -> int:
        """Number of descriptors."""
        return len(self)

    def isEmpty(self) -> bool:
        """Whether the list is empty."""
        return len(self) == 0

    def getType(self) -> nixl_mem_t:
        """The memory type as ``nixl_mem_t``."""
        return nixl_mem_t(_SEG_OF[self.mem_type])

    def addDesc(self, desc: tuple) -> None:
        """Appends a descriptor."""
        self.append(desc)

    def remDesc(self, index: int) -> None:
        """Removes the descriptor at ``index``."""
        self.remove(index)

    def print(self) -> None:
        """Prints the list."""
        print(repr(self))

    def __str__(self) -> str:
        return repr(self)

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value


class nixlXferDList(_NixlList, _kvferry.XferDescList):
    """``nixlXferDList(nixl_mem_t, descs)``: transfer descriptors
    ``(addr, len, dev_id)`` from a list of 3-tuples, an Nx3 array or a count."""

    def __eq__(self, other: object) -> bool:
        return _kvferry.XferDescList.__eq__(self, other)


class nixlRegDList(_NixlList, _kvferry.RegDescList):
    """``nixlRegDList(nixl_mem_t, descs)``: registration descriptors
    ``(addr, len, dev_id, meta_info)`` from 4-tuples, an Nx3 array or a count."""

    def trim(self, cls: type | None = None) -> nixlXferDList:  # type: ignore[override]
        """The transfer descriptors of the same ranges."""
        return _kvferry.RegDescList.trim(self, cls or nixlXferDList)

    def __eq__(self, other: object) -> bool:
        return _kvferry.RegDescList.__eq__(self, other)


class nixlRemoteDList(_NixlList):
    """``nixlRemoteDList(nixl_mem_t, [(addr, len, dev_id, agent), ...])``:
    descriptors of remote agents, for NIXL's GPU memory views (which kvferry
    does not support yet)."""

    def __init__(self, type: int, descs: list | None = None):  # noqa: A002 - NIXL's keyword
        self.mem_type = [k for k, v in _SEG_OF.items() if v == int(type)][0]
        self._descs = [tuple(d) for d in (descs or [])]
        for d in self._descs:
            if len(d) != 4:
                raise ValueError("Each descriptor tuple must have exactly 4 elements")

    def __len__(self) -> int:
        return len(self._descs)

    def __getitem__(self, i: int) -> tuple:
        return self._descs[i]

    def __setitem__(self, i: int, d: tuple) -> None:
        self._descs[i] = tuple(d)

    def append(self, d: tuple) -> None:
        """Appends a descriptor."""
        self._descs.append(tuple(d))

    def remove(self, i: int) -> tuple:
        """Removes the descriptor at ``i``."""
        return self._descs.pop(i)

    def clear(self) -> None:
        """Removes every descriptor."""
        self._descs.clear()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, nixlRemoteDList) and (self.mem_type, self._descs) == (other.mem_type, other._descs)

    def __repr__(self) -> str:
        return f"nixlRemoteDList({self.mem_type}, {self._descs!r})"


class nixlXferTelemetry:
    """Telemetry of a request's last posting: ``startTime`` (µs since the
    epoch), ``postDuration`` and ``xferDuration`` (µs), ``totalBytes``, ``descCount``."""

    __slots__ = ("startTime", "postDuration", "xferDuration", "totalBytes", "descCount")

    def __init__(self, startTime=0, postDuration=0, xferDuration=0, totalBytes=0, descCount=0):  # noqa: N803
        self.startTime = startTime
        self.postDuration = postDuration
        self.xferDuration = xferDuration
        self.totalBytes = totalBytes
        self.descCount = descCount

    def __eq__(self, other: object) -> bool:
        return isinstance(other, nixlXferTelemetry) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__
        )

    def __repr__(self) -> str:
        return "nixlXferTelemetry(" + ", ".join(f"{k}={getattr(self, k)}" for k in self.__slots__) + ")"


class nixlAgentConfig:
    """The low-level agent configuration NIXL's ``nixl_agent`` fills in."""

    def __init__(self, useProgThread=True, useListenThread=False, listenPort=DEFAULT_COMM_PORT,  # noqa: N803
                 syncMode=nixl_thread_sync_t.NIXL_THREAD_SYNC_DEFAULT, captureTelemetry=False,
                 pthrDelay=0, lthrDelay=100000, etcdWatchTimeout=5000000):
        self.useProgThread = useProgThread
        self.useListenThread = useListenThread
        self.listenPort = listenPort
        self.syncMode = syncMode
        self.captureTelemetry = captureTelemetry
        self.pthrDelay = pthrDelay
        self.lthrDelay = lthrDelay
        self.etcdWatchTimeout = etcdWatchTimeout


class nixlAgent:
    """NIXL's low-level agent binding (``nixl._bindings.nixlAgent``), for
    programs that call it directly: integer handles, status returns, camelCase
    names. It is a thin layer over :class:`kvferry.nixl._api.nixl_agent`."""

    def __init__(self, name: str, config: nixlAgentConfig | None = None):
        from . import _api

        cfg = config or nixlAgentConfig()
        conf = _api.nixl_agent_config(bool(cfg.useProgThread), bool(cfg.useListenThread), int(cfg.listenPort),
                                      bool(cfg.captureTelemetry), backends=[])
        self._a = _api.nixl_agent(name, conf)
        self._handles: dict = {}
        self._backend_ids: dict = {}

    def _keep(self, obj: object) -> int:
        self._handles[id(obj)] = obj
        return id(obj)

    def _get(self, h: int) -> object:
        try:
            return self._handles[int(h)]
        except KeyError:
            raise nixlNotFoundError(f"NIXL_ERR_NOT_FOUND: no handle 0x{int(h):x} on this agent") from None

    def _names(self, handles: list) -> list:
        ids = {v: k for k, v in self._backend_ids.items()}
        return [ids[h] for h in handles or []]

    def getAvailPlugins(self) -> list:
        """Available plugin names."""
        return self._a.get_plugin_list()

    def getPluginParams(self, plugin: str) -> tuple:
        """``(params, mem types)`` of a plugin."""
        if plugin not in self._a.plugin_list:
            raise nixlNotFoundError(f"NIXL_ERR_NOT_FOUND: no plugin '{plugin}'")
        return self._a.get_plugin_params(plugin), self._a.get_plugin_mem_types(plugin)

    def createBackend(self, name: str, params: dict) -> int:
        """Creates a backend; returns its handle."""
        self._a.create_backend(name, params)
        return self._backend_ids.setdefault(name, len(self._backend_ids) + 1)

    def getBackendParams(self, handle: int) -> tuple:
        """``(params, mem types)`` of a created backend."""
        name = self._names([handle])[0]
        return self._a.get_backend_params(name), self._a.get_backend_mem_types(name)

    def registerMem(self, descs: nixlRegDList, handles: list = []) -> int:  # noqa: B006
        self._a.register_memory(descs, backends=self._names(handles))
        return NIXL_SUCCESS

    def deregisterMem(self, descs: nixlRegDList, handles: list = []) -> int:  # noqa: B006
        self._a.deregister_memory(descs)
        return NIXL_SUCCESS

    def queryMem(self, descs: nixlRegDList, handle: int) -> list:
        return self._a.query_memory(descs, self._names([handle])[0])

    def makeConnection(self, agent: str, handles: list = []) -> int:  # noqa: B006
        self._a.make_connection(agent)
        return NIXL_SUCCESS

    def prepXferDlist(self, agent: str, descs: nixlXferDList, handles: list = []) -> int:  # noqa: B006
        return self._keep(self._a.prep_xfer_dlist(agent, descs, backends=self._names(handles)))

    def makeXferReq(self, op: int, lh: int, li, rh: int, ri, notif: bytes = b"", handles: list = [],  # noqa: B006
                    skip_desc_merge: bool = False) -> int:
        name = "READ" if int(op) == NIXL_READ else "WRITE"
        return self._keep(self._a.make_prepped_xfer(name, self._get(lh), li, self._get(rh), ri, notif,
                                                    self._names(handles)))

    def createXferReq(self, op: int, local: nixlXferDList, remote: nixlXferDList, agent: str, notif: bytes = b"",
                      handles: list = []) -> int:  # noqa: B006
        name = "READ" if int(op) == NIXL_READ else "WRITE"
        return self._keep(self._a.initialize_xfer(name, local, remote, agent, notif, self._names(handles)))

    def postXferReq(self, h: int, notif: bytes = b"") -> int:
        return NIXL_SUCCESS if self._a.transfer(self._get(h), notif) == "DONE" else NIXL_IN_PROG

    def getXferStatus(self, h: int) -> int:
        return NIXL_SUCCESS if self._a.check_xfer_state(self._get(h)) == "DONE" else NIXL_IN_PROG

    def getXferTelemetry(self, h: int) -> nixlXferTelemetry:
        return self._a.get_xfer_telemetry(self._get(h))

    def queryXferBackend(self, h: int) -> int:
        return self._backend_ids.get(self._a.query_xfer_backend(self._get(h)), 0)

    def estimateXferCost(self, h: int) -> tuple:
        d, m, method = self._a.estimate_xfer_cost(self._get(h))
        return d, m, NIXL_COST_ANALYTICAL_BACKEND if method == "ANALYTICAL_BACKEND" else -1

    def releaseXferReq(self, h: int) -> int:
        """Releases a request or prepared-list handle (unknown handles: a no-op)."""
        obj = self._handles.pop(int(h), None)
        if obj is not None:
            obj.release()
        return NIXL_SUCCESS

    def releasedDlistH(self, h: int) -> int:
        return self.releaseXferReq(h)

    def getNotifs(self, notifs: dict, handles: list = []) -> dict:  # noqa: B006
        for k, v in self._a.get_new_notifs().items():
            notifs.setdefault(k, []).extend(v)
        return notifs

    def genNotif(self, agent: str, msg: bytes, handle: int | None = None) -> int:
        self._a.send_notif(agent, msg, None if handle is None else self._names([handle])[0])
        return NIXL_SUCCESS

    def getLocalMD(self) -> bytes:
        return self._a.get_agent_metadata()

    def getLocalPartialMD(self, descs: nixlRegDList, inc_conn_info: bool, handles: list = []) -> bytes:  # noqa: B006
        return self._a.get_partial_agent_metadata(descs, inc_conn_info, self._names(handles))

    def loadRemoteMD(self, md: bytes) -> bytes:
        return self._a.add_remote_agent(md)

    def invalidateRemoteMD(self, agent: str) -> int:
        self._a.remove_remote_agent(agent)
        return NIXL_SUCCESS

    def sendLocalMD(self, ip: str = "", port: int = DEFAULT_COMM_PORT) -> int:
        self._a.send_local_metadata(ip, port)
        return NIXL_SUCCESS

    def sendLocalPartialMD(self, descs: nixlRegDList, inc_conn_info: bool, handles: list = [], ip: str = "",  # noqa: B006
                           port: int = DEFAULT_COMM_PORT, label: str = "") -> int:
        self._a.send_partial_agent_metadata(descs, inc_conn_info, self._names(handles), ip, port, label)
        return NIXL_SUCCESS

    def fetchRemoteMD(self, agent: str, ip: str = "", port: int = DEFAULT_COMM_PORT, label: str = "") -> int:
        self._a.fetch_remote_metadata(agent, ip, port, label)
        return NIXL_SUCCESS

    def invalidateLocalMD(self, ip: str = "", port: int = DEFAULT_COMM_PORT) -> int:
        self._a.invalidate_local_metadata(ip, port)
        return NIXL_SUCCESS

    def checkRemoteMD(self, agent: str, descs: nixlXferDList | None = None) -> int:
        return NIXL_SUCCESS if self._a.check_remote_metadata(agent, descs) else NIXL_ERR_NOT_FOUND
