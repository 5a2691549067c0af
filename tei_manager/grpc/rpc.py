"""Method descriptions shared by the server, the client channel and generated code."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from google.protobuf.message import Message

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


class Cardinality(enum.Enum):
    UNARY_UNARY = "unary_unary"
    UNARY_STREAM = "unary_stream"
    STREAM_UNARY = "stream_unary"
    STREAM_STREAM = "stream_stream"

    @property
    def client_streaming(self) -> bool:
        return self in (Cardinality.STREAM_UNARY, Cardinality.STREAM_STREAM)

    @property
    def server_streaming(self) -> bool:
        return self in (Cardinality.UNARY_STREAM, Cardinality.STREAM_STREAM)


@dataclass(frozen=True, slots=True)
class MethodSpec(Generic[Req, Resp]):
    """One RPC: where it lives, its shape and its message types."""

    service: str
    name: str
    cardinality: Cardinality
    request_type: type[Req]
    response_type: type[Resp]
    path: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", f"/{self.service}/{self.name}")


class Servicer:
    """Base of generated servicer classes: ``METHODS`` lists the service's RPCs.

    A subclass overrides the methods it implements; the rest answer UNIMPLEMENTED.
    Unary requests arrive as a message, streamed ones as an async iterator; the
    ``context`` gives the call's metadata, peer and deadline.
    """

    SERVICE: ClassVar[str]
    METHODS: ClassVar[tuple[MethodSpec[Any, Any], ...]]
    #: True for a servicer that works on message bytes: each handler is called as
    #: ``await handler(call, context)`` with a :class:`~tei_manager.grpc.calls.ServerCall`
    #: to receive and send serialized messages, whatever the method's shape.
    RAW: ClassVar[bool] = False

    def fast_unary(self, spec: MethodSpec[Any, Any]) -> Callable[[Any, bytes], bool] | None:
        """A raw servicer's task-free handler for the unary method ``spec``, or None.

        Called once per unary method when the servicer is added to a server. The handler
        gets a :class:`~tei_manager.grpc.calls.FastCall` and the request's bytes
        from the connection's reader and must not block: it either takes the call
        (True) and answers it later from callbacks, or declines (False) and the
        call goes to the method's ordinary handler.
        """
        return None


class StatusCode(enum.IntEnum):
    """gRPC status codes."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def status_code(value: int) -> StatusCode:
    """The status a wire value stands for; UNKNOWN for values gRPC does not define."""
    try:
        return StatusCode(value)
    except ValueError:
        return StatusCode.UNKNOWN


#: How much of a client's string a status message repeats (``client_text``).
CLIENT_TEXT_CHARS = 64


def client_text(value: str | None, limit: int = CLIENT_TEXT_CHARS) -> str:
    """A client-controlled string fit to repeat in a status message: quoted, with
    control and non-ASCII characters escaped, and cut to ``limit`` characters."""
    if value is None:
        return "(none)"
    shown = ascii(value[:limit])
    if len(value) > limit:
        shown += f"... ({len(value)} characters)"
    return shown


def over_limit(size: int, limit: int) -> str:
    """Why a message of ``size`` bytes is refused (RESOURCE_EXHAUSTED), sent or received."""
    return f"message of {size} bytes is over the limit of {limit} bytes"


class GrpcError(Exception):
    """A call that ends with a non-OK status: raised by handlers, and by the client."""

    def __init__(
        self, code: StatusCode, message: str = "", *, retry_pushback_ms: int | None = None
    ) -> None:
        super().__init__(f"{code.name}: {message}" if message else code.name)
        self.code = code
        self.message = message
        #: Raised by a handler before any response: sent as ``grpc-retry-pushback-ms``
        #: (when the client may retry: gRPC's retry throttling reads it).
        self.retry_pushback_ms = retry_pushback_ms


def pushback_ms(seconds: float) -> int:
    """A retry delay as ``grpc-retry-pushback-ms``: rounded up, at least 1 ms, so a
    client that waits exactly that long never retries before the delay is over."""
    return max(1, math.ceil(seconds * 1000))


def unimplemented(service: str, method: str) -> GrpcError:
    message = f"method {method} is not implemented in service {service}"
    return GrpcError(StatusCode.UNIMPLEMENTED, message)
