"""Trio I/O for one HTTP/2 gRPC connection, client or server side.

A ``Transport`` owns the socket, a reader task feeding bytes to the sans-IO
``Connection`` and a writer task sending what it produces. Each gRPC call is a
``Stream`` with its own event queue; flow control, resets and connection loss
are delivered to the call that owns the stream.

The two share one module on purpose: on the per-message paths a ``Stream`` sends
through its transport's HTTP/2 and gRPC connections directly, and the transport
queues events on its streams and fails them. Apart, each would need the other's
internals as public names (or a call more per message).
"""

from __future__ import annotations

import logging
import math
import os
import struct
from collections import deque
from collections.abc import Callable

import trio

from tei_manager.grpc._grpc_events import (
    ConnectionTerminated,
    Event,
    MessageReceived,
    MessageRejected,
    RequestEnded,
    RequestReceived,
    ResponseEnded,
    ResponseReceived,
    StreamReset,
    WindowUpdated,
)
from tei_manager.grpc._grpc_headers import Metadata
from tei_manager.grpc._http2_frames import ErrorCode, ProtocolError, StreamClosedError
from tei_manager.grpc._protocol import Connection
from tei_manager.grpc.limits import DEFAULT_LIMITS, Limits
from tei_manager.grpc.rpc import GrpcError, StatusCode, over_limit, status_code

__all__ = [
    "MESSAGE_PREFIX_BYTES",
    "MessageReceived",
    "RequestEnded",
    "ResponseEnded",
    "ResponseReceived",
    "Stream",
    "StreamEvent",
    "StreamRefused",
    "Transport",
]

log = logging.getLogger(__name__)

RECEIVE_SIZE = 256 * 1024
_PREFIX = struct.Struct(">BL")
#: The length prefix gRPC puts before each message.
MESSAGE_PREFIX_BYTES = _PREFIX.size
#: A finished piece of output (a call's answer, the end of a request) is written
#: at once unless the last write went out less than this long ago; then it joins
#: the writer's next batch. Under load the replies of a long scheduler pass leave
#: every ~0.6 ms instead of all at its end, so the peer starts on them sooner, and
#: a lone reply skips the wait for the writer task. (Measured with
#: benches/multiplexer_overhead.py: 0.3 and 1 ms did about as well, 0 and 0.1 ms
#: worse, as each write then wakes the peer for a single reply.)
WRITE_INTERVAL = 0.0006
# Messages up to this size are framed by concatenation; larger ones are sent in two
# pieces (prefix, then the message itself) rather than copied.
_CONCAT_LIMIT = 64 * 1024

# How gRPC maps an RST_STREAM error code to a status (gRPC's http-grpc-status mapping).
_RESET_STATUS: dict[int, StatusCode] = {
    ErrorCode.NO_ERROR: StatusCode.INTERNAL,
    ErrorCode.REFUSED_STREAM: StatusCode.UNAVAILABLE,
    ErrorCode.CANCEL: StatusCode.CANCELLED,
    ErrorCode.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED,
}


class StreamRefused(GrpcError):
    """The server refused the stream (REFUSED_STREAM): it did no work, so the call
    may be made again (gRPC's transparent retry)."""


#: Events queued on a call's stream, read by ``Stream.receive_message``.
StreamEvent = MessageReceived | RequestEnded | ResponseReceived | ResponseEnded


class Stream:
    """One gRPC call on a transport: queued inbound events and outbound helpers."""

    __slots__ = (
        "_events",
        "_lot",
        "_transport",
        "error",
        "handler_scope",
        "local_closed",
        "on_release",
        "request",
        "reset",
        "response_ended",
        "response_headers",
        "stream_id",
        "trailers",
        "watcher",
    )

    def __init__(self, transport: Transport, stream_id: int) -> None:
        self._transport = transport
        self.stream_id = stream_id
        self._events: deque[StreamEvent] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self.request: RequestReceived | None = None
        self.response_headers: ResponseReceived | None = None
        self.trailers: ResponseEnded | None = None
        #: Client side: the status, as soon as it arrives (``trailers`` once read).
        self.response_ended: ResponseEnded | None = None
        self.error: GrpcError | None = None
        self.reset = False
        self.local_closed = False
        self.handler_scope: trio.CancelScope | None = None
        #: Called (from the connection's reader, so it must not block) after each
        #: event is queued and when the stream fails: a call driven by callbacks
        #: rather than by a task reads the queue with ``pop_event``.
        self.watcher: Callable[[Stream], None] | None = None
        #: Called once when the application releases the stream (a call's span ends).
        self.on_release: Callable[[Stream], None] | None = None

    # -- inbound -------------------------------------------------------------
    def _push(self, event: StreamEvent) -> None:
        self._events.append(event)
        if self.watcher is not None:
            self.watcher(self)
        if self._lot:
            self._lot.unpark_all()

    def _fail(self, error: GrpcError) -> None:
        if self.error is None:
            self.error = error
        if self.watcher is not None:
            self.watcher(self)
        self._lot.unpark_all()

    def pop_event(self) -> StreamEvent | None:
        """The next queued event without waiting (a received message's credit returned)."""
        if not self._events:
            return None
        event = self._events.popleft()
        if type(event) is MessageReceived:
            self._transport.acknowledge(self.stream_id, event.flow_controlled_length)
        return event

    def peek_event(self) -> StreamEvent | None:
        """The next queued event, left in the queue."""
        return self._events[0] if self._events else None

    @property
    def max_message_bytes(self) -> int:
        """The largest message this connection sends or accepts."""
        return self._transport.max_message_bytes

    @property
    def connection_closed(self) -> bool:
        """True once the connection carrying this stream is gone."""
        return self._transport.closed

    def release(self) -> None:
        """The application is done with the stream: forget it, return the credit of
        messages nobody read, reset it if the peer is still sending, and send what
        is queued. A server stream keeps counting against the connection's
        MAX_CONCURRENT_STREAMS until this is called."""
        transport = self._transport
        transport.release(self)
        transport.push()
        if self.on_release is not None:
            on_release, self.on_release = self.on_release, None
            on_release(self)

    async def receive_message(self) -> bytes | None:
        """The next message's bytes, or None once the peer ended its side.

        Raises ``GrpcError`` when the stream failed (reset, message rejected,
        connection lost) and, on the client side, when the call ended with a
        non-OK status.
        """
        events = self._events
        while True:
            while not events:
                if self.error is not None:
                    raise self.error
                await self._lot.park()
            event = events.popleft()
            kind = type(event)
            if kind is MessageReceived:
                self._transport.acknowledge(self.stream_id, event.flow_controlled_length)  # type: ignore[union-attr]
                return event.data  # type: ignore[union-attr]
            if kind is RequestEnded:
                return None
            if kind is ResponseReceived:
                self.response_headers = event  # type: ignore[assignment]
                continue
            assert isinstance(event, ResponseEnded)
            self.trailers = event
            if event.status != StatusCode.OK:
                raise GrpcError(status_code(event.status), event.status_message)
            return None

    # -- outbound ------------------------------------------------------------
    async def send_message(self, data: bytes) -> None:
        """Send one length-prefixed message, waiting for flow-control credit."""
        transport = self._transport
        limit = transport.max_message_bytes
        if len(data) > limit:
            raise GrpcError(StatusCode.RESOURCE_EXHAUSTED, over_limit(len(data), limit))
        if self.error is not None:
            raise self.error
        # A message is queued only as far as the connection's output cap leaves room:
        # a peer that grants windows but does not read makes the sender wait (before
        # framing, so a waiting sender holds no copy), not the output grow. Only
        # senders wait; the reader goes on reading, so the peer's WINDOW_UPDATEs
        # arrive and two of our transports sending each other large messages both
        # progress.
        cap = transport.limits.max_output_buffer_bytes
        need = min(len(data) + _PREFIX.size, cap)
        while transport.output_size + need > cap:
            transport.flush()
            await transport.wait_for_output()
            if self.error is not None:
                raise self.error
        prefix = _PREFIX.pack(0, len(data))
        pieces = (prefix + data,) if len(data) <= _CONCAT_LIMIT else (prefix, data)
        h2 = transport._h2
        stream_id = self.stream_id
        try:
            for piece in pieces:
                sent = h2.send_data(stream_id, piece, max_count=cap - transport.output_size)
                while sent < len(piece):
                    transport.flush()
                    await transport.wait_for_room()
                    if self.error is not None:
                        raise self.error
                    room = cap - transport.output_size
                    sent += h2.send_data(stream_id, piece, sent, max_count=room)
        except StreamClosedError:
            ended = self.response_ended
            if ended is None:
                raise self.error or GrpcError(
                    StatusCode.INTERNAL, "the call's stream is closed for sending"
                ) from None
            # The server answered before reading everything: the rest is moot, and
            # the call's outcome is the status it sent.
            if ended.status != StatusCode.OK:
                raise GrpcError(status_code(ended.status), ended.status_message) from None
            return
        transport.flush()

    def send_message_now(self, data: bytes, *, last: bool = False) -> bool:
        """Send one message if the flow-control windows take all of it now; else nothing.

        For callers that must not wait: False leaves the stream untouched (the
        message is over the size limit, the stream failed or closed, the peer's
        window is short, or the connection's output cap has no room for it).
        ``last`` (client side) ends the request with it, in the same frame.
        """
        transport = self._transport
        if (
            self.error is not None
            or len(data) > transport.max_message_bytes
            or transport.output_size + len(data) + _PREFIX.size
            > transport.limits.max_output_buffer_bytes
        ):
            return False
        h2 = transport._h2
        try:
            if h2.send_window_for(self.stream_id) < len(data) + _PREFIX.size:
                return False
            h2.send_data(self.stream_id, _PREFIX.pack(0, len(data)) + data, end_stream=last)
        except StreamClosedError:
            return False
        if last:
            self.local_closed = True
            transport.push()
        else:
            transport.flush()
        return True

    def start_response(self, custom_metadata: Metadata = ()) -> None:
        try:
            self._transport._conn.start_response(self.stream_id, custom_metadata)
        except StreamClosedError:  # reset by the client; the handler is being cancelled
            raise self.error or GrpcError(
                StatusCode.CANCELLED, "the call's stream is closed"
            ) from None
        self._transport.flush()

    def send_status(
        self,
        code: StatusCode,
        message: str = "",
        *,
        headers_sent: bool,
        retry_pushback_ms: int | None = None,
    ) -> None:
        """Server side: end the call with trailers carrying ``code`` (and, before any
        response headers, a ``grpc-retry-pushback-ms``)."""
        if self.local_closed or self.reset:
            return
        self.local_closed = True
        conn = self._transport._conn
        try:
            if headers_sent:
                conn.end_response(self.stream_id, code, message)
            else:
                conn.respond_status(
                    self.stream_id, code, message, retry_pushback_ms=retry_pushback_ms
                )
        except StreamClosedError:
            return
        self._transport.flush()

    def end_request(self) -> None:
        """Client side: half-close (no more requests)."""
        if self.local_closed or self.reset:
            return
        self.local_closed = True
        try:
            self._transport._conn.end_request(self.stream_id)
        except StreamClosedError:  # the peer already closed its side; nothing to end
            return
        self._transport.push()

    def cancel(self, code: int = ErrorCode.CANCEL) -> None:
        """Reset the stream (RST_STREAM) unless it already finished."""
        if self.reset:
            return
        self.reset = True
        self._transport._h2.reset_stream(self.stream_id, code)
        self._transport.flush()


class Transport:
    """One HTTP/2 connection. ``run`` drives it until the peer or we close it.

    Besides the reader and the writer, a watchdog task enforces the time limits:
    on a server, the client preface within ``handshake_timeout_secs`` and no
    ``idle_timeout_secs`` without a stream; on a client with
    ``keepalive_interval_secs``, a PING when nothing arrived for that long during
    a call, and the end of the connection when nothing answers it.
    """

    #: The sans-IO gRPC layer this transport drives (a test may put a faulty one in).
    connection_class: type[Connection] = Connection

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        client_side: bool,
        max_message_bytes: int,
        limits: Limits = DEFAULT_LIMITS,
        on_request: Callable[[Stream], None] | None = None,
    ) -> None:
        self.socket = stream
        self.limits = limits
        self.client_side = client_side
        self._conn = self.connection_class(
            client_side=client_side,
            max_message_bytes=max_message_bytes,
            limits=limits,
            clock=trio.current_time,
        )
        # The HTTP/2 layer under ``_conn``: data, flow control and resets go to it directly.
        self._h2 = self._conn.h2_connection
        self.max_message_bytes = max_message_bytes
        self.streams: dict[int, Stream] = {}
        self._on_request = on_request
        self._send_needed = trio.Event()
        self._window_lot = trio.lowlevel.ParkingLot()
        # Woken when the writer drained the output, and when a stream slot frees.
        self._room_lot = trio.lowlevel.ParkingLot()
        self._slot_lot = trio.lowlevel.ParkingLot()
        self.closed = False
        self.goaway = False
        self._closing = False
        self._writer_done = trio.Event()
        # Direct writes (``push``) need the socket's descriptor: plain TCP only.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._writing = 0  # bytes inside the writer's send_all
        self._writing_frames = 0  # of which not DATA (or not known to be)
        self._unsent = b""  # what a direct write left over, for the writer
        self._last_write = -math.inf
        self._last_receive = -math.inf
        # Since when the connection has had no stream (None while it has some).
        self._idle_since: float | None = None
        self._handshake_done = trio.Event()
        self._scope: trio.CancelScope | None = None
        #: Why the connection ended, when we ended it (a limit), for logs and tests.
        self.close_reason: str | None = None

    # -- driving -------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run reader, writer and watchdog until the connection ends; then fail open streams.

        A client is started once the server's first SETTINGS arrived (so its stream
        limit is known); none within ``handshake_timeout_secs`` raises ``GrpcError``
        (UNAVAILABLE), as grpc-go's wait for the server preface does.
        """
        self._conn.initiate_connection()
        self.flush()
        now = trio.current_time()
        self._idle_since = now
        self._last_receive = now
        no_handshake = False
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._writer)
                if not self.client_side or self.limits.keepalive_interval_secs is not None:
                    nursery.start_soon(self._watchdog)
                if not self.client_side:
                    task_status.started()
                    await self._reader()
                    nursery.cancel_scope.cancel()
                    return
                nursery.start_soon(self._read_then_stop, nursery.cancel_scope)
                with trio.move_on_after(self.limits.handshake_timeout_secs):
                    await self._handshake_done.wait()
                if self._h2.preface_received:
                    task_status.started()
                else:
                    no_handshake = True
                    nursery.cancel_scope.cancel()
        finally:
            self._mark_closed("connection closed")
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.socket.aclose()
        if no_handshake:
            raise GrpcError(StatusCode.UNAVAILABLE, "no HTTP/2 SETTINGS from the server")

    async def _read_then_stop(self, scope: trio.CancelScope) -> None:
        try:
            await self._reader()
        finally:
            self._handshake_done.set()  # wakes ``run`` if the server left first
            scope.cancel()

    async def _reader(self) -> None:
        socket = self.socket
        conn = self._conn
        h2 = self._h2
        dispatch = self._dispatch
        room = self.limits.max_output_buffer_bytes
        while True:
            try:
                data = await socket.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not data:
                return
            self._last_receive = trio.current_time()
            try:
                events = conn.receive_data(data if type(data) is bytes else bytes(data))
            except ProtocolError as error:
                log.debug("closing gRPC connection after protocol error: %s", error)
                self.close_reason = str(error)
                await self._flush_and_stop()
                return
            except Exception:
                # A bug of ours, met on this peer's bytes: it ends this connection
                # (GOAWAY INTERNAL_ERROR), never the server with its other peers.
                log.exception("closing gRPC connection after an internal error")
                self.close_reason = "internal error"
                self._fail_connection()
                await self._flush_and_stop()
                return
            for event in events:
                dispatch(event)
            self.flush()
            if not self._handshake_done.is_set() and h2.preface_received:
                self._handshake_done.set()
            if self._slot_lot and h2.can_open_stream():
                self._slot_lot.unpark_all()  # the peer's SETTINGS may have made room
            # A peer that does not read what we answer gets no more of our attention
            # until it does (its requests stay unread in the socket). Only answers
            # count: DATA is bounded by the peer's windows, and two of our transports
            # both sending large messages must keep reading each other.
            while self._answer_backlog() > room and not self.closed:
                await self._room_lot.park()

    def _fail_connection(self) -> None:
        """Queue GOAWAY INTERNAL_ERROR, if the HTTP/2 layer can still build one."""
        try:
            self._h2.close_connection(ErrorCode.INTERNAL_ERROR)
        except Exception:
            log.exception("could not queue GOAWAY after an internal error")

    async def _flush_and_stop(self) -> None:
        """Let the writer send the GOAWAY (and anything before it), for at most 1 s."""
        self._closing = True
        self._send_needed.set()
        with trio.move_on_after(1):
            await self._writer_done.wait()

    async def _watchdog(self) -> None:
        limits = self.limits
        if not self.client_side:
            with trio.move_on_after(limits.handshake_timeout_secs):
                await self._handshake_done.wait()
            if not self._handshake_done.is_set():
                await self._stop("no client preface in time")
                return
            await self._close_when_idle(limits.idle_timeout_secs)
        elif limits.keepalive_interval_secs is not None:
            await self._keepalive(limits.keepalive_interval_secs, limits.keepalive_timeout_secs)

    async def _close_when_idle(self, idle_secs: float) -> None:
        while True:
            idle_since = self._idle_since
            if idle_since is None:
                await trio.sleep(idle_secs)
                continue
            left = idle_since + idle_secs - trio.current_time()
            if left > 0:
                await trio.sleep(left)
                continue
            await self._stop("idle")
            return

    async def _keepalive(self, interval: float, answer_secs: float) -> None:
        # grpc's keepalive without GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS: PINGs only
        # while calls run (servers count PINGs on idle connections as abuse).
        while True:
            left = self._last_receive + interval - trio.current_time()
            if left > 0 or not self.streams:
                await trio.sleep(max(left, interval if not self.streams else 0))
                continue
            sent = trio.current_time()
            self._h2.send_ping()
            self.flush()
            await trio.sleep(answer_secs)
            if self._last_receive < sent:
                self.close_reason = "keepalive timeout"
                self._mark_closed("keepalive timeout: the server stopped answering")
                if self._scope is not None:
                    self._scope.cancel()
                return

    async def _stop(self, reason: str) -> None:
        """End the connection for a limit: GOAWAY if it got that far, then close."""
        self.close_reason = reason
        log.debug("closing gRPC connection: %s", reason)
        if self._h2.preface_received:
            self._h2.close_connection(ErrorCode.NO_ERROR)
        await self._flush_and_stop()
        if self._scope is not None:
            self._scope.cancel()

    def _dispatch(self, event: Event) -> None:
        kind = type(event)
        if (
            kind is MessageReceived
            or kind is ResponseEnded
            or kind is ResponseReceived
            or kind is RequestEnded
        ):
            found = self.streams.get(event.stream_id)  # type: ignore[union-attr]
            if found is not None:
                if kind is ResponseEnded:
                    found.response_ended = event  # type: ignore[assignment]
                found._push(event)  # type: ignore[arg-type]
            elif kind is MessageReceived:  # nobody will read it: give the credit back
                self._h2.acknowledge_received_data(event.stream_id, event.flow_controlled_length)  # type: ignore[union-attr]
            return
        if kind is WindowUpdated:
            self._window_lot.unpark_all()
            return
        if kind is RequestReceived:
            assert isinstance(event, RequestReceived)
            stream = Stream(self, event.stream_id)
            stream.request = event
            self.streams[event.stream_id] = stream
            self._idle_since = None
            if self.goaway or self._on_request is None:
                stream.send_status(
                    StatusCode.UNAVAILABLE, "server is shutting down", headers_sent=False
                )
                self.release(stream)
                return
            self._on_request(stream)
            return
        if kind is ConnectionTerminated:
            assert isinstance(event, ConnectionTerminated)
            self.goaway = True
            for stream_id, stream in list(self.streams.items()):
                if stream_id > event.last_stream_id:
                    stream._fail(GrpcError(StatusCode.UNAVAILABLE, "connection closed by peer"))
            self._slot_lot.unpark_all()
            return
        assert isinstance(event, StreamReset | MessageRejected)
        found = self.streams.get(event.stream_id)
        if found is None:
            return
        if isinstance(event, StreamReset):
            found.reset = True
            if event.error_code == ErrorCode.NO_ERROR and found.response_ended is not None:
                # The server answered and only asks us to stop sending (gRPC over
                # HTTP/2): the call's outcome is the status already received.
                self._window_lot.unpark_all()
                return
            if event.error_code == ErrorCode.REFUSED_STREAM:
                found._fail(StreamRefused(StatusCode.UNAVAILABLE, "stream refused by peer"))
            else:
                code = _RESET_STATUS.get(event.error_code, StatusCode.INTERNAL)
                found._fail(GrpcError(code, "stream reset by peer"))
            if found.handler_scope is not None:
                found.handler_scope.cancel()
        else:
            found._fail(GrpcError(event.status, event.message))
        # A sender waiting for window or output room on this stream must see the failure.
        self._window_lot.unpark_all()
        self._room_lot.unpark_all()

    async def _writer(self) -> None:
        socket = self.socket
        h2 = self._h2
        while True:
            await self._send_needed.wait()
            self._send_needed = trio.Event()
            frames = h2.frame_bytes_queued + len(self._unsent)
            data = h2.data_to_send()
            if self._unsent:
                data[:0] = self._unsent
                self._unsent = b""
            if data:
                self._writing = len(data)
                self._writing_frames = frames
                try:
                    await socket.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self._mark_closed("connection lost")
                    self._writer_done.set()
                    return
                finally:
                    self._writing = 0
                    self._writing_frames = 0
                self._last_write = trio.current_time()
                if self._room_lot:
                    self._room_lot.unpark_all()
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
        self._room_lot.unpark_all()
        self._slot_lot.unpark_all()

    # -- helpers for streams -------------------------------------------------
    def _answer_backlog(self) -> int:
        """Queued output that is not DATA (a direct write's leftover counted in full)."""
        return self._h2.frame_bytes_queued + self._writing_frames + len(self._unsent)

    @property
    def output_size(self) -> int:
        """Bytes queued for the peer and not yet taken by the socket."""
        return self._h2.output_size + len(self._unsent) + self._writing

    def flush(self) -> None:
        """Wake the writer if anything is queued."""
        if self._h2.output_pending or self._closing:
            self._send_needed.set()

    def push(self) -> None:
        """Send what is queued now, a piece of output being complete (``WRITE_INTERVAL``).

        Written straight to the socket when the writer is idle, nothing it left is
        waiting and the last write is old enough; otherwise the writer sends it.
        """
        if not self._h2.output_pending:
            return
        if self._fd >= 0 and not (self._writing or self._unsent or self._closing or self.closed):
            now = trio.current_time()
            if now - self._last_write >= WRITE_INTERVAL:
                self._last_write = now
                data = self._h2.data_to_send()
                try:
                    sent = os.write(self._fd, data)
                except OSError:  # would block, or the connection broke: the writer sees
                    sent = 0
                if sent == len(data):
                    return
                self._unsent = bytes(data[sent:])
        self._send_needed.set()

    def acknowledge(self, stream_id: int, length: int) -> None:
        self._h2.acknowledge_received_data(stream_id, length)
        if self._h2.output_pending:
            self._send_needed.set()

    async def wait_window(self) -> None:
        if self.closed:
            raise GrpcError(StatusCode.UNAVAILABLE, "connection closed")
        await self._window_lot.park()

    async def wait_for_room(self) -> None:
        """Wait for flow-control window, or for the output to drain when it is full."""
        if self.closed:
            raise GrpcError(StatusCode.UNAVAILABLE, "connection closed")
        if self.output_size >= self.limits.max_output_buffer_bytes:
            await self._room_lot.park()
        else:
            await self._window_lot.park()

    async def wait_for_output(self) -> None:
        """Wait until the writer has written something (the output shrank)."""
        if self.closed:
            raise GrpcError(StatusCode.UNAVAILABLE, "connection closed")
        await self._room_lot.park()

    async def wait_for_stream_slot(self) -> None:
        """Client side: wait until the peer's SETTINGS_MAX_CONCURRENT_STREAMS allows one
        more stream. Raises ``GrpcError`` (UNAVAILABLE) once the connection cannot."""
        h2 = self._h2
        # Until the server's first SETTINGS arrive its stream limit is unknown: wait
        # for them, as grpc-go does, rather than open streams it would refuse.
        while not (h2.preface_received and h2.can_open_stream()):
            if self.closed or self.goaway or h2.goaway_received:
                raise GrpcError(StatusCode.UNAVAILABLE, "no more calls allowed on this connection")
            await self._slot_lot.park()

    def can_send_now(self, size: int) -> bool:
        """Client side: True when a new call can start at once and send ``size`` bytes
        (windows, stream limit and output cap)."""
        h2 = self._h2
        return (
            not self.closed
            and not self.goaway
            and h2.preface_received
            and h2.can_open_stream()
            and h2.send_window >= size
            and h2.peer_initial_window >= size
            and self.output_size + size <= self.limits.max_output_buffer_bytes
        )

    def open_stream(self) -> Stream:
        if not self._h2.can_open_stream():
            raise GrpcError(StatusCode.UNAVAILABLE, "no more calls allowed on this connection")
        stream_id = self._h2.get_next_available_stream_id()
        stream = Stream(self, stream_id)
        self.streams[stream_id] = stream
        self._idle_since = None
        return stream

    def start_request(
        self,
        stream: Stream,
        scheme: str,
        path: str,
        authority: str,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> None:
        """Client side: send a new stream's request headers."""
        self._conn.start_request(stream.stream_id, scheme, path, authority, timeout, metadata)

    def release(self, stream: Stream) -> None:
        """Forget a finished stream, returning the credit of messages nobody read."""
        streams = self.streams
        streams.pop(stream.stream_id, None)
        events = stream._events
        if events:
            for event in events:
                if type(event) is MessageReceived:
                    self._h2.acknowledge_received_data(
                        stream.stream_id, event.flow_controlled_length
                    )
            events.clear()
        self._conn.forget(stream.stream_id)
        if not streams:
            self._idle_since = trio.current_time()
        if self._slot_lot:
            self._slot_lot.unpark()
        self.flush()

    async def close_gracefully(self) -> None:
        """Send GOAWAY and wait until everything queued, answers included, is written."""
        self.close()
        self._closing = True
        self._send_needed.set()
        await self._writer_done.wait()

    def close(self) -> None:
        """Send GOAWAY; the reader ends when the peer closes."""
        if self.closed:
            return
        self._h2.close_connection()
        self.flush()
