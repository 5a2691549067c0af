"""gRPC over HTTP/2, sans-IO: call headers, trailers and length-prefixed messages.

``Connection`` sits on our ``H2Connection`` (``h2_connection``, which the transport
also drives directly for data, flow control and resets) and turns its events into
gRPC events: a request or response starting, each complete message, the end of
the request, the response's status. Messages are cut from DATA by
``_grpc_messages.MessageReader``, which ``Connection`` extends with the header
blocks and what we send. What the spec leaves to an implementation:

- A message over ``max_message_bytes``, or a compressed one (we negotiate no
  compression), fails only its stream (``MessageRejected``); the stream's remaining
  bytes are discarded and their flow-control credit is returned at once.
- A malformed request (method, path, content type, ``grpc-timeout``) is answered
  by this layer; the application never sees it. A header block HTTP/2 calls
  malformed (RFC 9113 §8.2: an empty, uppercase or connection-specific field name,
  an unknown pseudo-header, ``te`` other than "trailers"; §8.3: a pseudo-header
  after a regular field, twice, of the other side, missing, or in trailers) resets
  its stream with PROTOCOL_ERROR (§8.1.1); in a response it fails the call.
- A response with an HTTP status other than 200 ends the call with the status gRPC
  maps it to; one without ``grpc-status`` ends UNKNOWN.
- Metadata: ``grpc-*``, pseudo-headers, ``te``, ``content-type`` and ``user-agent``
  are the protocol's; every other header is custom metadata, ``-bin`` values
  base64-decoded to bytes (and encoded on the way out).

Header blocks for constant headers are built once (see ``_hpack``), so a small
call's headers cost little more than the dictionary lookups.
"""

from __future__ import annotations

import binascii
import time
from collections.abc import Callable
from urllib.parse import unquote

from tei_manager.grpc._grpc_events import (
    Event,
    RequestEnded,
    RequestReceived,
    ResponseEnded,
    ResponseReceived,
)
from tei_manager.grpc._grpc_headers import (
    CONTENT_TYPE,
    HTTP_STATUS,
    RESPONSE_HEADERS,
    Metadata,
    format_timeout,
    incoming_metadata,
    invalid_field_name,
    outgoing_metadata,
    parse_timeout,
    status_headers,
)
from tei_manager.grpc._grpc_messages import CallState, MessageReader
from tei_manager.grpc._hpack import encode_header, encode_headers
from tei_manager.grpc._http2_frames import (
    DataReceived,
    ErrorCode,
    HeadersReceived,
    StreamReset,
)
from tei_manager.grpc.limits import DEFAULT_LIMITS, Limits
from tei_manager.grpc.rpc import StatusCode, client_text


class Connection(MessageReader):
    """One gRPC connection, client or server side."""

    def __init__(
        self,
        *,
        client_side: bool,
        max_message_bytes: int,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            client_side=client_side,
            max_message_bytes=max_message_bytes,
            limits=limits,
            clock=clock,
        )
        self._last_request_id = 0
        self._request_prefixes: dict[tuple[str, str, str], bytes] = {}

    def initiate_connection(self) -> None:
        self.h2_connection.initiate_connection()

    def data_to_send(self) -> bytearray:
        return self.h2_connection.data_to_send()

    # -- receiving ------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer. Raises ``ProtocolError`` (a GOAWAY is queued)."""
        out: list[Event] = []
        for event in self.h2_connection.receive_data(data):
            kind = type(event)
            if kind is DataReceived:
                self._data(event, out)  # type: ignore[arg-type]
            elif kind is HeadersReceived:
                self._headers(event, out)  # type: ignore[arg-type]
            else:
                if kind is StreamReset:
                    self._drop(event.stream_id)  # type: ignore[union-attr]
                out.append(event)  # type: ignore[arg-type]
        return out

    def _headers(self, event: HeadersReceived, out: list[Event]) -> None:
        stream_id = event.stream_id
        call = self._calls.get(stream_id)
        if self.client_side:
            if call is not None and not call.discarding:
                self._response_headers(call, stream_id, event, out)
            return
        if call is None:
            if stream_id > self._last_request_id:
                self._last_request_id = stream_id
                self._request(stream_id, event, out)
            return
        # Trailers from the client: HTTP allows them; they only end the request.
        if not event.end_stream:
            self._fail_stream(stream_id, StatusCode.INTERNAL, "headers inside the request", out)
        elif any(name[:1] == ":" for name, _ in event.headers):
            # RFC 9113 §8.1: trailers carry no pseudo-headers; malformed (§8.1.1).
            self._fail_stream(stream_id, StatusCode.INTERNAL, "pseudo-header in trailers", out)
        elif not call.discarding:
            out.append(RequestEnded(stream_id))

    def _request(self, stream_id: int, event: HeadersReceived, out: list[Event]) -> None:
        method = path = scheme = authority = content_type = user_agent = encoding = None
        timeout_text = None
        metadata = []
        malformed = True  # unless every header passes
        regular = False  # a regular field was seen: no pseudo-header may follow
        try:
            for name, value in event.headers:
                if name[:1] == ":":
                    # RFC 9113 §8.3: pseudo-headers come first, each at most once,
                    # and only the request ones (":status" or unknown: malformed).
                    if regular:
                        break
                    if name == ":path":
                        if path is not None:
                            break
                        path = value
                    elif name == ":method":
                        if method is not None:
                            break
                        method = value
                    elif name == ":scheme":
                        if scheme is not None:
                            break
                        scheme = value
                    elif name == ":authority":
                        if authority is not None:
                            break
                        authority = value
                    else:
                        break
                    continue
                regular = True
                if name == "content-type":
                    content_type = value
                elif name == "te":
                    if value != "trailers":
                        break
                elif name == "grpc-timeout":
                    timeout_text = value
                elif name == "user-agent":
                    user_agent = value
                elif name == "grpc-encoding":
                    encoding = value
                elif invalid_field_name(name):
                    break
                elif not name.startswith("grpc-"):
                    metadata.append(incoming_metadata(name, value))
            else:
                # RFC 9113 §8.3.1: every request but CONNECT has :method, :scheme and
                # a non-empty :path; CONNECT (§8.5) has :authority and neither.
                if method == "CONNECT":
                    malformed = authority is None or scheme is not None or path is not None
                else:
                    malformed = method is None or scheme is None or not path
        except (binascii.Error, ValueError):
            self._refuse(stream_id, StatusCode.INTERNAL, "malformed binary metadata")
            return
        if malformed:
            # A malformed request (RFC 9113 §8.1.1): a stream error, no answer.
            self.h2_connection.count_glitch()
            self.h2_connection.reset_stream(stream_id, ErrorCode.PROTOCOL_ERROR)
            self.h2_connection.release_stream(stream_id)
            return
        if content_type is None or not content_type.startswith("application/grpc"):
            # The gRPC spec's answer to a request that is not gRPC at all.
            self.h2_connection.send_headers(
                stream_id, encode_headers([(":status", "415")]), end_stream=True
            )
            self.h2_connection.reset_stream(stream_id, ErrorCode.NO_ERROR)
            self.h2_connection.release_stream(stream_id)
            return
        if method != "POST":
            message = f"method {client_text(method)} is not POST"
            self._refuse(stream_id, StatusCode.UNIMPLEMENTED, message)
            return
        if path is None or path.count("/") != 2 or path[0] != "/":
            self._refuse(stream_id, StatusCode.UNIMPLEMENTED, f"malformed path {client_text(path)}")
            return
        timeout = None
        if timeout_text is not None:
            timeout = parse_timeout(timeout_text)
            if timeout is None:
                message = f"malformed grpc-timeout {client_text(timeout_text)}"
                self._refuse(stream_id, StatusCode.INTERNAL, message)
                return
        call = CallState()
        call.encoding = encoding
        self._calls[stream_id] = call
        out.append(
            RequestReceived(
                stream_id,
                path,
                timeout,
                tuple(metadata),
                scheme=scheme,
                authority=authority,
                content_type=content_type,
                message_encoding=encoding,
                user_agent=user_agent,
            )
        )
        if event.end_stream:
            out.append(RequestEnded(stream_id))

    def _response_headers(
        self, call: CallState, stream_id: int, event: HeadersReceived, out: list[Event]
    ) -> None:
        http_status = content_type = encoding = grpc_status = None
        grpc_message = ""
        metadata = []
        malformed = True  # unless every header passes
        regular = False
        try:
            for name, value in event.headers:
                if name[:1] == ":":
                    # RFC 9113 §8.3: one :status, first, and never in trailers.
                    if regular or name != ":status" or http_status or call.headers_received:
                        break
                    http_status = value
                    continue
                regular = True
                if name == "grpc-status":
                    grpc_status = value
                elif name == "grpc-message":
                    grpc_message = unquote(value) if "%" in value else value
                elif name == "content-type":
                    content_type = value
                elif name == "grpc-encoding":
                    encoding = value
                elif invalid_field_name(name):
                    break
                elif not name.startswith("grpc-"):
                    metadata.append(incoming_metadata(name, value))
            else:
                malformed = False
        except (binascii.Error, ValueError):
            self._fail_stream(stream_id, StatusCode.INTERNAL, "malformed binary metadata", out)
            return
        if malformed:
            message = "malformed response headers (RFC 9113 §8.2)"
            self._fail_stream(
                stream_id, StatusCode.INTERNAL, message, out, ErrorCode.PROTOCOL_ERROR
            )
            return
        if not call.headers_received:
            if http_status is not None and http_status[:1] == "1" and not event.end_stream:
                return  # informational (1xx): the real headers follow
            if http_status != "200":
                code = HTTP_STATUS.get(http_status or "", StatusCode.UNKNOWN)
                self._fail_stream(stream_id, code, f"HTTP status {http_status}", out)
                return
            if content_type is not None and not content_type.startswith("application/grpc"):
                message = f"response content-type {content_type} is not gRPC"
                self._fail_stream(stream_id, StatusCode.UNKNOWN, message, out)
                return
            call.headers_received = True
            call.encoding = encoding
            if not event.end_stream:
                out.append(ResponseReceived(stream_id, tuple(metadata), content_type, encoding))
                return
            # Trailers-only: these headers are the trailers.
            out.append(ResponseReceived(stream_id, (), content_type, encoding))
        elif not event.end_stream:
            self._fail_stream(stream_id, StatusCode.INTERNAL, "trailers without END_STREAM", out)
            return
        if call.pending_size:
            self._fail_stream(
                stream_id, StatusCode.INTERNAL, "the call ended inside a message", out
            )
            return
        status: int
        if grpc_status is None or not grpc_status.isdigit():
            status, grpc_message = StatusCode.UNKNOWN, f"invalid grpc-status {grpc_status}"
        else:
            status = int(grpc_status)
        out.append(ResponseEnded(stream_id, status, grpc_message, tuple(metadata)))

    def _refuse(self, stream_id: int, status: StatusCode, message: str) -> None:
        """Server side: answer a request the application never sees."""
        self.respond_status(stream_id, status, message)
        self.h2_connection.reset_stream(stream_id, ErrorCode.NO_ERROR)
        self.h2_connection.release_stream(stream_id)

    # -- sending --------------------------------------------------------------------
    def start_request(
        self,
        stream_id: int,
        scheme: str,
        path: str,
        authority: str,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> None:
        """Client side: open a stream with the call's headers."""
        key = (scheme, path, authority)
        block = self._request_prefixes.get(key)
        if block is None:
            block = encode_headers(
                [
                    (":method", "POST"),
                    (":scheme", scheme),
                    (":path", path),
                    (":authority", authority),
                    ("te", "trailers"),
                    ("content-type", CONTENT_TYPE),
                ]
            )
            if len(self._request_prefixes) < 1024:
                self._request_prefixes[key] = block
        if timeout is not None:
            block += encode_header("grpc-timeout", format_timeout(timeout))
        if metadata:
            block += encode_headers(outgoing_metadata(metadata))
        self.h2_connection.send_headers(stream_id, block)
        self._calls[stream_id] = CallState()

    def end_request(self, stream_id: int) -> None:
        """Client side: no more request messages. Raises ``StreamClosedError``."""
        self.h2_connection.end_stream(stream_id)

    def start_response(self, stream_id: int, metadata: Metadata = ()) -> None:
        """Server side: send the response headers."""
        block = RESPONSE_HEADERS
        if metadata:
            block += encode_headers(outgoing_metadata(metadata))
        self.h2_connection.send_headers(stream_id, block)

    def end_response(
        self, stream_id: int, status: int, message: str = "", metadata: Metadata = ()
    ) -> None:
        """Server side: send the trailers, ending the call. Raises ``StreamClosedError``."""
        headers = status_headers(status, message)
        if metadata:
            headers += outgoing_metadata(metadata)
        self.h2_connection.send_headers(stream_id, encode_headers(headers), end_stream=True)

    def respond_status(
        self,
        stream_id: int,
        status: int,
        message: str = "",
        metadata: Metadata = (),
        *,
        retry_pushback_ms: int | None = None,
    ) -> None:
        """Server side: a trailers-only response (no headers were sent).

        ``retry_pushback_ms`` asks a retrying client to wait that long first
        (``grpc-retry-pushback-ms``, gRPC's retry design A6).
        """
        headers = status_headers(status, message)
        if retry_pushback_ms is not None:
            headers.append(("grpc-retry-pushback-ms", str(retry_pushback_ms)))
        if metadata:
            headers += outgoing_metadata(metadata)
        block = RESPONSE_HEADERS + encode_headers(headers)
        self.h2_connection.send_headers(stream_id, block, end_stream=True)

    def forget(self, stream_id: int) -> None:
        """The application is done with a stream: drop its state, reset it if still open."""
        self._drop(stream_id)
        self.h2_connection.release_stream(stream_id)
        stream = self.h2_connection.streams.get(stream_id)
        if stream is not None:
            # Our side finished first (the peer is still sending): NO_ERROR tells it
            # to stop; otherwise we are abandoning the call.
            code = ErrorCode.NO_ERROR if stream.local_closed else ErrorCode.CANCEL
            self.h2_connection.reset_stream(stream_id, code)
