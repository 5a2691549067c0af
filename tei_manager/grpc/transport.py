"""Trio I/O for one HTTP/2 gRPC connection, client or server side.

A ``Transport`` owns the socket, a reader task feeding bytes to the sans-IO
``Connection`` and a writer task sending what it produces. Each gRPC call is a
``Stream`` with its own event queue; flow control, resets and connection loss
are delivered to the call that owns the stream.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import h2.errors
import h2.exceptions
import trio
from purerpc.grpclib.events import (
    MessageReceived,
    RequestEnded,
    RequestReceived,
    ResponseEnded,
    ResponseReceived,
    WindowUpdated,
)
from purerpc.grpclib.exceptions import ProtocolError
from purerpc.grpclib.status import Status

from tei_manager.grpc._protocol import (
    Connection,
    ConnectionTerminated,
    MessageTooLarge,
    StreamReset,
)
from tei_manager.grpc.rpc import GrpcError, StatusCode

log = logging.getLogger(__name__)

RECEIVE_SIZE = 256 * 1024
_PREFIX = struct.Struct(">?I")

# How gRPC maps an RST_STREAM error code to a status (gRPC's http-grpc-status mapping).
_RESET_STATUS = {
    h2.errors.ErrorCodes.NO_ERROR: StatusCode.INTERNAL,
    h2.errors.ErrorCodes.REFUSED_STREAM: StatusCode.UNAVAILABLE,
    h2.errors.ErrorCodes.CANCEL: StatusCode.CANCELLED,
    h2.errors.ErrorCodes.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
    h2.errors.ErrorCodes.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED,
}


class Stream:
    """One gRPC call on a transport: queued inbound events and outbound helpers."""

    __slots__ = (
        "_events",
        "_lot",
        "error",
        "handler_scope",
        "local_closed",
        "request",
        "reset",
        "response_headers",
        "stream_id",
        "trailers",
        "transport",
    )

    def __init__(self, transport: Transport, stream_id: int) -> None:
        self.transport = transport
        self.stream_id = stream_id
        self._events: deque[Any] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self.request: RequestReceived | None = None
        self.response_headers: ResponseReceived | None = None
        self.trailers: ResponseEnded | None = None
        self.error: GrpcError | None = None
        self.reset = False
        self.local_closed = False
        self.handler_scope: trio.CancelScope | None = None

    # -- inbound -------------------------------------------------------------
    def _push(self, event: Any) -> None:
        self._events.append(event)
        self._lot.unpark_all()

    def _fail(self, error: GrpcError) -> None:
        if self.error is None:
            self.error = error
        self._lot.unpark_all()

    async def receive_message(self) -> bytes | None:
        """The next message's bytes, or None once the peer ended its side.

        Raises ``GrpcError`` when the stream failed (reset, too large, connection
        lost) and, on the client side, when the call ended with a non-OK status.
        """
        while True:
            while not self._events:
                if self.error is not None:
                    raise self.error
                await self._lot.park()
            event = self._events.popleft()
            if isinstance(event, MessageReceived):
                self.transport.acknowledge(self.stream_id, event.flow_controlled_length)
                return event.data  # type: ignore[no-any-return]
            if isinstance(event, RequestEnded):
                return None
            if isinstance(event, ResponseReceived):
                self.response_headers = event
                continue
            if isinstance(event, ResponseEnded):
                self.trailers = event
                status = event.status
                if status.int_value != StatusCode.OK:
                    raise GrpcError(_status_code(status.int_value), status.status_message)
                return None

    # -- outbound ------------------------------------------------------------
    async def send_message(self, data: bytes) -> None:
        """Send one length-prefixed message, waiting for flow-control credit."""
        transport = self.transport
        limit = transport.max_message_bytes
        if len(data) > limit:
            raise GrpcError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"message of {len(data)} bytes is over the limit of {limit} bytes",
            )
        payload = memoryview(_PREFIX.pack(False, len(data)) + data)
        conn = transport.conn
        while payload:
            if self.error is not None:
                raise self.error
            window = conn.flow_control_window(self.stream_id)
            if window <= 0:
                await transport.wait_window()
                continue
            chunk, payload = payload[:window], payload[window:]
            conn.send_data(self.stream_id, chunk.tobytes())
            transport.flush()

    def start_response(self, custom_metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.transport.conn.start_response(self.stream_id, "+proto", custom_metadata)
        self.transport.flush()

    def send_status(self, code: StatusCode, message: str = "", *, headers_sent: bool) -> None:
        """Server side: end the call with trailers carrying ``code``."""
        if self.local_closed or self.reset:
            return
        self.local_closed = True
        status = Status(int(code), message)
        conn = self.transport.conn
        try:
            if headers_sent:
                conn.end_response(self.stream_id, status)
            else:
                conn.respond_status(self.stream_id, status, "+proto")
        except h2.exceptions.H2Error:
            return
        self.transport.flush()

    def end_request(self) -> None:
        """Client side: half-close (no more requests)."""
        if self.local_closed or self.reset:
            return
        self.local_closed = True
        try:
            self.transport.conn.end_request(self.stream_id)
        except Exception:  # the peer already closed its side; nothing to end
            return
        self.transport.flush()

    def cancel(self, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Reset the stream (RST_STREAM) unless it already finished."""
        if self.reset:
            return
        self.reset = True
        try:
            self.transport.conn.reset_stream(self.stream_id, code)
        except h2.exceptions.H2Error:
            return
        self.transport.flush()


def _status_code(value: int) -> StatusCode:
    try:
        return StatusCode(value)
    except ValueError:
        return StatusCode.UNKNOWN


class Transport:
    """One HTTP/2 connection. ``run`` drives it until the peer or we close it."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        client_side: bool,
        max_message_bytes: int,
        max_concurrent_streams: int | None = None,
        on_request: Callable[[Stream], None] | None = None,
    ) -> None:
        self.socket = stream
        self.conn = Connection(
            client_side=client_side,
            max_message_bytes=max_message_bytes,
            max_concurrent_streams=max_concurrent_streams,
        )
        self.max_message_bytes = max_message_bytes
        self.streams: dict[int, Stream] = {}
        self._on_request = on_request
        self._send_needed = trio.Event()
        self._window_lot = trio.lowlevel.ParkingLot()
        self.closed = False
        self.goaway = False
        self._closing = False
        self._writer_done = trio.Event()

    # -- driving -------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run reader and writer until the connection ends; then fail open streams."""
        self.conn.initiate_connection()
        self.flush()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                task_status.started()
                await self._reader()
                nursery.cancel_scope.cancel()
        finally:
            self._mark_closed("connection closed")
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.socket.aclose()

    async def _reader(self) -> None:
        socket = self.socket
        conn = self.conn
        while True:
            try:
                data = await socket.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not data:
                return
            try:
                events = conn.receive_data(data)
            except (ProtocolError, h2.exceptions.ProtocolError) as error:
                log.debug("closing gRPC connection after protocol error: %s", error)
                with contextlib.suppress(h2.exceptions.H2Error):
                    conn.h2_connection.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
                self.flush()
                return
            self.flush()
            for event in events:
                self._dispatch(event)

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, WindowUpdated):
            self._window_lot.unpark_all()
            return
        if isinstance(event, RequestReceived):
            stream = Stream(self, event.stream_id)
            stream.request = event
            self.streams[event.stream_id] = stream
            if self.goaway or self._on_request is None:
                stream.send_status(
                    StatusCode.UNAVAILABLE, "server is shutting down", headers_sent=False
                )
                self.release(stream)
                return
            self._on_request(stream)
            return
        if isinstance(event, ConnectionTerminated):
            self.goaway = True
            for stream_id, stream in list(self.streams.items()):
                if stream_id > event.last_stream_id:
                    stream._fail(GrpcError(StatusCode.UNAVAILABLE, "connection closed by peer"))
            return
        found = self.streams.get(event.stream_id)
        if found is None:
            return
        if isinstance(event, StreamReset):
            found.reset = True
            code = _RESET_STATUS.get(event.error_code, StatusCode.INTERNAL)
            found._fail(GrpcError(code, "stream reset by peer"))
            if found.handler_scope is not None:
                found.handler_scope.cancel()
        elif isinstance(event, MessageTooLarge):
            found._fail(GrpcError(StatusCode.RESOURCE_EXHAUSTED, event.message))
        else:
            found._push(event)

    async def _writer(self) -> None:
        socket = self.socket
        conn = self.conn
        while True:
            await self._send_needed.wait()
            self._send_needed = trio.Event()
            data = conn.data_to_send()
            if data:
                try:
                    await socket.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self._mark_closed("connection lost")
                    self._writer_done.set()
                    return
            if self._closing and not self._send_needed.is_set():
                self._writer_done.set()
                return

    def _mark_closed(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        error = GrpcError(StatusCode.UNAVAILABLE, reason)
        for stream in list(self.streams.values()):
            stream._fail(error)
            if stream.handler_scope is not None:
                stream.handler_scope.cancel()
        self._window_lot.unpark_all()

    # -- helpers for streams -------------------------------------------------
    def flush(self) -> None:
        self._send_needed.set()

    def acknowledge(self, stream_id: int, length: int) -> None:
        if length:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.conn.acknowledge_received_data(stream_id, length)
            self.flush()

    async def wait_window(self) -> None:
        if self.closed:
            raise GrpcError(StatusCode.UNAVAILABLE, "connection closed")
        await self._window_lot.park()

    def open_stream(self) -> Stream:
        stream_id = self.conn.get_next_available_stream_id()
        stream = Stream(self, stream_id)
        self.streams[stream_id] = stream
        return stream

    def release(self, stream: Stream) -> None:
        """Forget a finished stream."""
        self.streams.pop(stream.stream_id, None)
        self.conn.forget(stream.stream_id)

    async def close_gracefully(self) -> None:
        """Send GOAWAY and wait until everything queued, answers included, is written."""
        self.close()
        self._closing = True
        self.flush()
        await self._writer_done.wait()

    def close(self) -> None:
        """Send GOAWAY; the reader ends when the peer closes."""
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.H2Error):
            self.conn.h2_connection.close_connection()
        self.flush()
