"""gRPC's length-prefixed messages as they arrive, sans-IO: each call's partial
message, and the flow-control credit of what it buffers.

``MessageReader`` is the receiving half of ``_protocol.Connection`` for DATA: it cuts
each stream's bytes into messages (``MessageReceived``), rejects a message over
``max_message_bytes`` or a compressed one (``MessageRejected``: only its stream
fails, its remaining bytes are discarded and credited back at once), and lets one
stream per connection at a time have a large message credited as it is buffered,
so a message larger than a window still streams through. ``Connection`` adds the
header blocks and what we send.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from tei_manager.grpc._grpc_events import (
    Event,
    MessageReceived,
    MessageRejected,
    RequestEnded,
    ResponseEnded,
)
from tei_manager.grpc._http2 import H2Connection
from tei_manager.grpc._http2_frames import DataReceived, ErrorCode
from tei_manager.grpc.limits import DEFAULT_LIMITS, Limits
from tei_manager.grpc.rpc import StatusCode, over_limit

_PREFIX = struct.Struct(">BL")


class CallState:
    """Per-stream gRPC state: the partial message being read, and how the call stands."""

    __slots__ = (
        "credited",
        "discarding",
        "encoding",
        "headers_received",
        "need",
        "pending",
        "pending_size",
    )

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.credited = 0  # bytes of ``pending`` already credited back (large message)
        self.need = 0
        self.discarding = False
        self.headers_received = False
        self.encoding: str | None = None


class MessageReader:
    """The calls of one gRPC connection and their inbound messages (see ``Connection``).

    ``Connection``, its subclass, also uses ``_calls``, ``_data``, ``_drop`` and
    ``_fail_stream``; nothing else reaches them.
    """

    def __init__(
        self,
        *,
        client_side: bool,
        max_message_bytes: int,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client_side = client_side
        self.max_message_bytes = max_message_bytes
        self.h2_connection = H2Connection(client_side=client_side, limits=limits, clock=clock)
        # The one stream whose large message is credited as it is buffered (0: none),
        # and the partial size from which a message counts as large.
        self._large = 0
        self._large_at = max(1, limits.stream_receive_window_bytes // 2)
        self._calls: dict[int, CallState] = {}

    def _data(self, event: DataReceived, out: list[Event]) -> None:
        stream_id = event.stream_id
        data = event.data
        call = self._calls.get(stream_id)
        if call is None or call.discarding:
            if data:  # nobody reads these bytes: credit them back now
                self.h2_connection.acknowledge_received_data(stream_id, len(data))
            return
        if self.client_side and not call.headers_received:
            self._fail_stream(stream_id, StatusCode.INTERNAL, "DATA before response headers", out)
            return
        if data:
            self._messages(call, stream_id, data, out)
        if event.end_stream and not call.discarding:
            if call.pending_size:
                self._fail_stream(
                    stream_id, StatusCode.INTERNAL, "the stream ended inside a message", out
                )
            elif self.client_side:
                message = "the server ended the call without a status"
                out.append(ResponseEnded(stream_id, StatusCode.INTERNAL, message))
            else:
                out.append(RequestEnded(stream_id))

    def _messages(self, call: CallState, stream_id: int, data: bytes, out: list[Event]) -> None:
        # A message's bytes are credited back when the application consumes it, so
        # the windows bound what a peer can park. A message larger than a window
        # would then never arrive: one stream per connection at a time (``_large``)
        # has its partial message's bytes credited as they enter the message buffer
        # (bounded by ``max_message_bytes``), so a 40 MiB message streams through a
        # 4 MiB window at full speed. ``carried``: bytes at the start of ``data``
        # already credited.
        carried = 0
        if call.pending:
            call.pending.append(data)
            call.pending_size += len(data)
            if call.pending_size < call.need:
                if self._large == stream_id:
                    self.h2_connection.acknowledge_received_data(stream_id, len(data))
                    call.credited += len(data)
                elif not self._large and call.pending_size >= self._large_at:
                    self._make_large(stream_id, call)
                return
            carried = call.credited
            call.credited = 0
            data = b"".join(call.pending)
            call.pending = []
            call.pending_size = 0
            if self._large == stream_id:
                self._large = 0  # its message is complete: another may go next
                self._next_large()
        pos = 0
        end = len(data)
        limit = self.max_message_bytes
        need = 5
        while end - pos >= 5:
            compressed, length = _PREFIX.unpack_from(data, pos)
            if length > limit or compressed:
                if compressed:
                    message = f"compressed messages ({call.encoding or 'no grpc-encoding'}) "
                    message += "are not supported"
                    status = StatusCode.INTERNAL if self.client_side else StatusCode.UNIMPLEMENTED
                else:
                    message = over_limit(length, limit)
                    status = StatusCode.RESOURCE_EXHAUSTED
                call.discarding = True
                self.h2_connection.acknowledge_received_data(stream_id, end - pos - carried)
                out.append(MessageRejected(stream_id, status, message))
                if self._large == stream_id:
                    self._large = 0
                    self._next_large()
                return
            stop = pos + 5 + length
            if stop > end:
                need = 5 + length
                break
            out.append(MessageReceived(stream_id, data[pos + 5 : stop], stop - pos - carried))
            carried = 0
            pos = stop
        if pos < end:
            rest = data[pos:] if pos else data
            call.pending = [rest]
            call.pending_size = len(rest)
            call.credited = carried  # 0 once a message completed
            call.need = need
            if self._large == stream_id or (not self._large and len(rest) >= self._large_at):
                self._make_large(stream_id, call)

    def _make_large(self, stream_id: int, call: CallState) -> None:
        """Let ``stream_id``'s partial message be credited as it is buffered."""
        self._large = stream_id
        owed = call.pending_size - call.credited
        if owed:
            self.h2_connection.acknowledge_received_data(stream_id, owed)
            call.credited = call.pending_size

    def _next_large(self) -> None:
        """The large message is done: the next stream waiting with one goes on."""
        for stream_id, call in self._calls.items():
            if call.pending_size >= self._large_at and not call.discarding:
                self._make_large(stream_id, call)
                return

    def _fail_stream(
        self,
        stream_id: int,
        status: StatusCode,
        message: str,
        out: list[Event],
        code: int | None = None,
    ) -> None:
        """The peer broke gRPC on this stream: fail the call, reset the stream (with
        ``code``, or the side's default), drop its data."""
        call = self._calls.get(stream_id)
        if call is not None:
            call.discarding = True
            self._release_pending(stream_id, call)
        if code is None:
            code = ErrorCode.CANCEL if self.client_side else ErrorCode.PROTOCOL_ERROR
        self.h2_connection.reset_stream(stream_id, code)
        out.append(MessageRejected(stream_id, status, message))

    def _release_pending(self, stream_id: int, call: CallState) -> None:
        owed = call.pending_size - call.credited
        if owed:
            self.h2_connection.acknowledge_received_data(stream_id, owed)
        call.pending = []
        call.pending_size = 0
        call.credited = 0
        if self._large == stream_id:
            self._large = 0
            self._next_large()

    def _drop(self, stream_id: int) -> None:
        call = self._calls.pop(stream_id, None)
        if call is not None:
            self._release_pending(stream_id, call)
