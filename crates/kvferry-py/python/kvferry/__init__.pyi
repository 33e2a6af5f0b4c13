"""Type stubs of the kvferry package."""

from . import _kvferry
from ._agent import Agent as Agent
from ._agent import AlignedBuf as AlignedBuf
from ._agent import Request as Request
from ._agent import XferState as XferState
from ._agent import XferTelemetry as XferTelemetry
from ._agent import plugin_params as plugin_params
from ._agent import plugins as plugins
from ._errors import BackendError as BackendError
from ._errors import CanceledError as CanceledError
from ._errors import Error as Error
from ._errors import InternalError as InternalError
from ._errors import InvalidParamError as InvalidParamError
from ._errors import MalformedError as MalformedError
from ._errors import MismatchError as MismatchError
from ._errors import NotAllowedError as NotAllowedError
from ._errors import NotFoundError as NotFoundError
from ._errors import NotSupportedError as NotSupportedError
from ._errors import RemoteDisconnectError as RemoteDisconnectError
from ._errors import RepostActiveError as RepostActiveError
from ._errors import TimeoutError as TimeoutError

XferDescList = _kvferry.XferDescList
RegDescList = _kvferry.RegDescList
Registration = _kvferry.Registration
PreparedList = _kvferry.PreparedList
MetaServer = _kvferry.MetaServer
Store = _kvferry.Store
MEM_TYPES: tuple[str, ...]
__version__: str
