"""kvferry's exceptions: one class per Rust ``ErrorKind``, all under
:class:`Error`. Each carries the Rust message (``str(e)``), the kind's name
(``e.kind``, for example ``"NotFound"``) and NIXL's status name
(``e.status``, for example ``"NIXL_ERR_NOT_FOUND"``)."""

from __future__ import annotations

import builtins

__all__ = [
    "Error",
    "InvalidParamError",
    "BackendError",
    "NotFoundError",
    "MismatchError",
    "NotAllowedError",
    "RepostActiveError",
    "NotSupportedError",
    "RemoteDisconnectError",
    "CanceledError",
    "TimeoutError",
    "MalformedError",
    "InternalError",
]


class Error(Exception):
    """Base of every kvferry error: ``str(e)`` is the message, ``e.kind`` the
    kind's name and ``e.status`` NIXL's status name."""

    kind = "Internal"
    status = "NIXL_ERR_UNKNOWN"

    def __init__(self, message: str = "", kind: str | None = None, status: str | None = None):
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind
        if status is not None:
            self.status = status


class InvalidParamError(Error, ValueError):
    """A parameter is out of range or inconsistent (``NIXL_ERR_INVALID_PARAM``)."""

    kind, status = "InvalidParam", "NIXL_ERR_INVALID_PARAM"


class BackendError(Error):
    """A backend failed (``NIXL_ERR_BACKEND``)."""

    kind, status = "Backend", "NIXL_ERR_BACKEND"


class NotFoundError(Error, LookupError):
    """A backend, agent, region or file does not exist (``NIXL_ERR_NOT_FOUND``)."""

    kind, status = "NotFound", "NIXL_ERR_NOT_FOUND"


class MismatchError(Error):
    """Lists or lengths that must agree do not (``NIXL_ERR_MISMATCH``)."""

    kind, status = "Mismatch", "NIXL_ERR_MISMATCH"


class NotAllowedError(Error):
    """Memory that is not registered, or a refused access (``NIXL_ERR_NOT_ALLOWED``)."""

    kind, status = "NotAllowed", "NIXL_ERR_NOT_ALLOWED"


class RepostActiveError(Error):
    """A request was posted again while still in flight (``NIXL_ERR_REPOST_ACTIVE``)."""

    kind, status = "RepostActive", "NIXL_ERR_REPOST_ACTIVE"


class NotSupportedError(Error):
    """No backend can do this here (``NIXL_ERR_NOT_SUPPORTED``)."""

    kind, status = "NotSupported", "NIXL_ERR_NOT_SUPPORTED"


class RemoteDisconnectError(Error, ConnectionError):
    """The peer went away (``NIXL_ERR_REMOTE_DISCONNECT``)."""

    kind, status = "RemoteDisconnect", "NIXL_ERR_REMOTE_DISCONNECT"


class CanceledError(Error):
    """The transfer was canceled (``NIXL_ERR_CANCELED``)."""

    kind, status = "Canceled", "NIXL_ERR_CANCELED"


class TimeoutError(Error, builtins.TimeoutError):  # noqa: A001 - mirrors ErrorKind::Timeout
    """A bounded wait ran out (``NIXL_ERR_TIMEOUT``); also a builtin ``TimeoutError``."""

    kind, status = "Timeout", "NIXL_ERR_TIMEOUT"


class MalformedError(Error, ValueError):
    """Bytes from a peer or the caller do not decode (NIXL: ``NIXL_ERR_INVALID_PARAM``)."""

    kind, status = "Malformed", "NIXL_ERR_INVALID_PARAM"


class InternalError(Error):
    """A bug in kvferry: please report it (``NIXL_ERR_UNKNOWN``)."""

    kind, status = "Internal", "NIXL_ERR_UNKNOWN"


_BY_KIND = {
    c.kind: c
    for c in (
        InvalidParamError,
        BackendError,
        NotFoundError,
        MismatchError,
        NotAllowedError,
        RepostActiveError,
        NotSupportedError,
        RemoteDisconnectError,
        CanceledError,
        TimeoutError,
        MalformedError,
        InternalError,
    )
}
