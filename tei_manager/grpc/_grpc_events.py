"""The events of a gRPC connection (``_protocol.Connection.receive_data``)."""

from __future__ import annotations

from typing import Any

from tei_manager.grpc._grpc_headers import CONTENT_TYPE
from tei_manager.grpc._http2_frames import ConnectionTerminated, StreamReset, WindowUpdated
from tei_manager.grpc.rpc import StatusCode

__all__ = [
    "ConnectionTerminated",
    "Event",
    "MessageReceived",
    "MessageRejected",
    "RequestEnded",
    "RequestReceived",
    "ResponseEnded",
    "ResponseReceived",
    "StreamReset",
    "WindowUpdated",
]


class RequestReceived:
    """Server side: a call started."""

    __slots__ = (
        "authority",
        "content_type",
        "custom_metadata",
        "message_encoding",
        "method_name",
        "path",
        "scheme",
        "service_name",
        "stream_id",
        "timeout",
        "user_agent",
    )

    def __init__(
        self,
        stream_id: int,
        path: str,
        timeout: float | None,
        custom_metadata: tuple[tuple[str, Any], ...],
        *,
        scheme: str | None = None,
        authority: str | None = None,
        content_type: str = CONTENT_TYPE,
        message_encoding: str | None = None,
        user_agent: str | None = None,
    ) -> None:
        self.stream_id = stream_id
        #: ``/package.Service/Method``.
        self.path = path
        _, self.service_name, self.method_name = path.split("/", 2)
        #: Seconds from the ``grpc-timeout`` header, or None.
        self.timeout = timeout
        self.custom_metadata = custom_metadata
        self.scheme = scheme
        self.authority = authority
        self.content_type = content_type
        self.message_encoding = message_encoding
        self.user_agent = user_agent


class RequestEnded:
    """Server side: the client finished sending (END_STREAM)."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class ResponseReceived:
    """Client side: the response headers arrived."""

    __slots__ = ("content_type", "custom_metadata", "message_encoding", "stream_id")

    def __init__(
        self,
        stream_id: int,
        custom_metadata: tuple[tuple[str, Any], ...],
        content_type: str | None,
        message_encoding: str | None,
    ) -> None:
        self.stream_id = stream_id
        self.custom_metadata = custom_metadata
        self.content_type = content_type
        self.message_encoding = message_encoding


class ResponseEnded:
    """Client side: the call's status arrived (trailers, or a trailers-only response)."""

    __slots__ = ("custom_metadata", "status", "status_message", "stream_id")

    def __init__(
        self,
        stream_id: int,
        status: int,
        status_message: str,
        custom_metadata: tuple[tuple[str, Any], ...] = (),
    ) -> None:
        self.stream_id = stream_id
        self.status = status
        self.status_message = status_message
        self.custom_metadata = custom_metadata


class MessageReceived:
    """One complete message; acknowledge ``flow_controlled_length`` once consumed."""

    __slots__ = ("data", "flow_controlled_length", "stream_id")

    def __init__(self, stream_id: int, data: bytes, flow_controlled_length: int) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flow_controlled_length = flow_controlled_length


class MessageRejected:
    """A message on this stream cannot be read (too large, compressed): the call fails."""

    __slots__ = ("message", "status", "stream_id")

    def __init__(self, stream_id: int, status: StatusCode, message: str) -> None:
        self.stream_id = stream_id
        self.status = status
        self.message = message


Event = (
    RequestReceived
    | RequestEnded
    | ResponseReceived
    | ResponseEnded
    | MessageReceived
    | MessageRejected
    | StreamReset
    | WindowUpdated
    | ConnectionTerminated
)
