"""purerpc's sans-IO gRPC connection, with the fixes this project needs.

purerpc's ``GRPCConnection`` turns HTTP/2 frames into gRPC events and back; we
keep it and drive it with our own trio I/O layer (``transport.py``). Fixes:

- WINDOW_UPDATE for a stream that already ended is ignored, as RFC 7540 §5.1
  asks; h2 3.2 treats it as a connection error and tears down every call.
- A message over the size limit fails that one stream (RESOURCE_EXHAUSTED) and
  its remaining bytes are discarded and acknowledged, instead of raising out of
  ``receive_data`` and killing the connection.
- RST_STREAM and GOAWAY are surfaced as events, so a cancelled call cancels its
  handler and a closing peer fails pending calls.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.exceptions import MessageTooLargeError


class StreamReset:
    """The peer reset a stream (RST_STREAM)."""

    __slots__ = ("error_code", "stream_id")

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code


class MessageTooLarge:
    """A message on this stream is over the size limit; the stream is dead."""

    __slots__ = ("message", "stream_id")

    def __init__(self, stream_id: int, message: str) -> None:
        self.stream_id = stream_id
        self.message = message


class ConnectionTerminated:
    """The peer sent GOAWAY: no new streams; streams above ``last_stream_id`` failed."""

    __slots__ = ("error_code", "last_stream_id")

    def __init__(self, error_code: int, last_stream_id: int) -> None:
        self.error_code = error_code
        self.last_stream_id = last_stream_id


class _H2Connection(h2.connection.H2Connection):  # type: ignore[misc]
    def _receive_window_update_frame(self, frame: Any) -> Any:
        try:
            return super()._receive_window_update_frame(frame)
        except (h2.exceptions.StreamClosedError, h2.exceptions.StreamIDTooLowError):
            # RFC 7540 §5.1: WINDOW_UPDATE can arrive for a short period after
            # a stream closed with END_STREAM; it must be ignored.
            if frame.stream_id == 0:
                raise
            return [], []


class Connection(GRPCConnection):  # type: ignore[misc]
    """``GRPCConnection`` with the fixes above and a configurable message limit."""

    def __init__(
        self,
        *,
        client_side: bool,
        max_message_bytes: int,
        max_concurrent_streams: int | None = None,
    ) -> None:
        super().__init__(
            GRPCConfiguration(client_side=client_side, max_message_length=max_message_bytes)
        )
        if max_concurrent_streams is not None:
            self.MAX_CONCURRENT_STREAMS = max_concurrent_streams
        self.h2_connection = _H2Connection(
            h2.config.H2Configuration(
                client_side=client_side,
                header_encoding="utf-8",
                # The headers we send are built here, lower-case and valid: checking
                # them again costs a good part of a small call's CPU.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                # A client talks to our own instances; a server checks what it receives.
                validate_inbound_headers=not client_side,
            )
        )
        self.h2_connection.clear_outbound_data_buffer()
        self._set_h2_connection_local_settings()
        # Streams whose inbound data is thrown away after an oversized message.
        self._discarding: set[int] = set()

    def _data_received(self, event: h2.events.DataReceived) -> list[Any]:
        stream_id = event.stream_id
        if stream_id in self._discarding or stream_id not in self.message_read_buffers:
            # Nothing will read these bytes: give the flow-control credit back now.
            self._ack(stream_id, event.flow_controlled_length)
            return []
        try:
            return super()._data_received(event)  # type: ignore[no-any-return]
        except MessageTooLargeError as error:
            del self.message_read_buffers[stream_id]
            self._discarding.add(stream_id)
            self._ack(stream_id, event.flow_controlled_length)
            return [MessageTooLarge(stream_id, str(error))]

    def _ack(self, stream_id: int, length: int) -> None:
        if length:
            try:
                self.h2_connection.acknowledge_received_data(length, stream_id)
            except h2.exceptions.StreamClosedError:
                self.h2_connection.acknowledge_received_data(length, 0)

    def _stream_ended(self, event: h2.events.StreamEnded) -> list[Any]:
        if event.stream_id in self._discarding:
            return []
        return super()._stream_ended(event)  # type: ignore[no-any-return]

    def _stream_reset(self, event: h2.events.StreamReset) -> list[Any]:
        self.message_read_buffers.pop(event.stream_id, None)
        self._discarding.discard(event.stream_id)
        return [StreamReset(event.stream_id, int(event.error_code))]

    def _connection_terminated(self, event: h2.events.ConnectionTerminated) -> list[Any]:
        return [ConnectionTerminated(int(event.error_code), event.last_stream_id or 0)]

    def forget(self, stream_id: int) -> None:
        """Drop per-stream bookkeeping once a stream is finished locally."""
        self.message_read_buffers.pop(stream_id, None)
        self._discarding.discard(stream_id)
