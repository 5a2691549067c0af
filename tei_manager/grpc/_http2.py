"""A sans-IO HTTP/2 connection (RFC 9113): the part of the protocol gRPC uses.

Bytes go in through ``receive_data`` and come back as a list of events; what we
send is queued as frames in ``data_to_send`` (the sending half and the flow-control
windows are ``_http2_send.H2Sender``, which ``H2Connection`` extends). Frames are
parsed with ``struct``; header blocks are HPACK (``_hpack``). The connection answers
PING and SETTINGS, ignores PRIORITY and unknown frame types, and turns a peer's
protocol violation into a stream reset or, for the connection as a whole, a GOAWAY
and ``ProtocolError``.

Every resource a peer can make us hold is bounded by ``Limits`` (``limits.py``):
streams (a stream counts from its HEADERS until the application calls
``release_stream``, reset or not), header blocks (running totals of bytes and
CONTINUATION frames), queued control frames, empty frames, SETTINGS, PINGs (with the
clock it is given), resets before an answer, and "glitches" (PRIORITY, unknown
frames, WINDOW_UPDATEs our DATA did not earn, stream errors: a token bucket on the
same clock); floods end with GOAWAY ENHANCE_YOUR_CALM. Every check is a counter
(``_http2_floods.FloodGuard``) compared on the frame that moves it.

Frames for a stream that is gone (reset, or finished) are ignored, as RFC 9113 §5.1
asks; their data is credited to the connection at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tei_manager.grpc._hpack import HeaderDecodeError, HeaderDecoder
from tei_manager.grpc._http2_frames import (
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME_SIZE,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    MAX_FRAME_SIZE_LIMIT,
    MAX_WINDOW,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    SETTINGS_MAX_FRAME_SIZE,
    WINDOW_UPDATE,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    Event,
    HeadersReceived,
    StreamReset,
    WindowUpdated,
)
from tei_manager.grpc._http2_send import (
    FRAME_HEADER,
    GOAWAY_PAYLOAD,
    SETTING,
    U32,
    H2Sender,
    StreamState,
)
from tei_manager.grpc.limits import DEFAULT_LIMITS, Limits


class H2Connection(H2Sender):
    """One HTTP/2 connection, client or server side."""

    def __init__(
        self,
        *,
        client_side: bool,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(client_side=client_side, limits=limits, clock=clock)
        self._settings_acknowledged = False
        self._decoder = HeaderDecoder(
            max_block_list_size=max(65536, 4 * self.max_header_list_size),
            cache_bytes=limits.hpack_cache_bytes,
            cache_entry_max_bytes=limits.hpack_cache_entry_max_bytes,
        )
        # Inbound bytes not yet parsed: chunks, their total size, the size we wait for.
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._pending_need = 0
        self._preface_left = 0 if client_side else len(PREFACE)
        self._settings_expected = True
        # A header block waiting for CONTINUATION frames: stream id (0: none), its
        # END_STREAM, the parts, and running totals of their bytes and frames.
        self._block_stream = 0
        self._block_end_stream = False
        self._block_parts: list[bytes] = []
        self._block_bytes = 0
        self._block_frames = 0

    @property
    def preface_received(self) -> bool:
        """True once the peer's first SETTINGS (after the client preface) arrived."""
        return not self._settings_expected

    # -- receiving ------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; returns what happened. Raises ``ProtocolError``."""
        if self._pending:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size < self._pending_need:
                return []
            data = b"".join(self._pending)
            self._pending = []
        events: list[Event] = []
        pos = 0
        end = len(data)
        if self._preface_left:
            if end < self._preface_left:
                return self._keep(data, 0, self._preface_left)
            if data[: len(PREFACE)] != PREFACE:
                self._fail(ErrorCode.PROTOCOL_ERROR, "invalid HTTP/2 client preface")
            self._preface_left = 0
            pos = len(PREFACE)
        unpack = FRAME_HEADER.unpack_from
        max_size = self.local_max_frame_size
        while end - pos >= 9:
            high, low, kind, flags, stream_id = unpack(data, pos)
            length = high << 16 | low
            if length > max_size:
                self._fail(ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes is too large")
            if end - pos - 9 < length:
                return self._keep(data, pos, 9 + length, events)
            payload = data[pos + 9 : pos + 9 + length]
            pos += 9 + length
            stream_id &= 0x7FFFFFFF
            if self._block_stream and kind != CONTINUATION:
                self._fail(ErrorCode.PROTOCOL_ERROR, "header block interrupted")
            if self._settings_expected:
                if kind != SETTINGS or flags & ACK:
                    self._fail(ErrorCode.PROTOCOL_ERROR, "the first frame must be SETTINGS")
                self._settings_expected = False
            if kind == DATA:
                self._receive_data_frame(stream_id, flags, payload, events)
            elif kind == HEADERS:
                self._receive_headers(stream_id, flags, payload, events)
            elif kind == WINDOW_UPDATE:
                self._receive_window_update(stream_id, payload, events)
            elif kind == RST_STREAM:
                self._receive_rst_stream(stream_id, payload, events)
            elif kind == SETTINGS:
                self._receive_settings(stream_id, flags, payload, events)
            elif kind == PING:
                if stream_id != 0:
                    self._fail(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
                if length != 8:
                    self._fail(ErrorCode.FRAME_SIZE_ERROR, "PING payload must be 8 bytes")
                if not flags & ACK:
                    self._receive_ping(payload)
            elif kind == CONTINUATION:
                self._receive_continuation(stream_id, flags, payload, events)
            elif kind == GOAWAY:
                self._receive_goaway(stream_id, payload, events)
            elif kind == PRIORITY:
                if stream_id == 0:
                    self._fail(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
                if length != 5:
                    self._stream_error(stream_id, ErrorCode.FRAME_SIZE_ERROR, events)
                else:
                    self.count_glitch()  # we ignore priorities: no work for the peer
            elif kind == PUSH_PROMISE:
                # We never enable push (client) and servers must not receive it.
                self._fail(ErrorCode.PROTOCOL_ERROR, "unexpected PUSH_PROMISE")
            else:
                # Unknown frame types are ignored (RFC 9113 §4.1): no work done for them.
                self.count_glitch()
        if pos < end:
            return self._keep(data, pos, 9, events)
        return events

    def _keep(
        self, data: bytes, pos: int, need: int, events: list[Event] | None = None
    ) -> list[Event]:
        rest = data[pos:]
        self._pending = [rest]
        self._pending_size = len(rest)
        self._pending_need = need
        return [] if events is None else events

    def _receive_ping(self, payload: bytes) -> None:
        if not self.client_side and self.floods.ping():
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "too many pings")
        self._control(PING, ACK, 0, payload)

    def _empty_frame(self) -> None:
        """A frame that does nothing for the peer (CVE-2019-9518): count it."""
        if self.floods.empty_frame():
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "too many empty frames")

    def count_glitch(self) -> None:
        """The peer made us work for nothing (see ``Limits.glitch_burst``): take a
        token from the bucket; none left is a flood."""
        if self.floods.glitch():
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "too many frames that do nothing")

    def _premature_reset(self) -> None:
        """A stream the peer reset before we answered, or one we refused."""
        if self.floods.premature_reset():
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "too many streams reset")

    def _stream_error(self, stream_id: int, code: ErrorCode, events: list[Event]) -> None:
        """Reset a stream for the peer's error; tell the application if it knew the stream."""
        self.count_glitch()
        if self.streams.pop(stream_id, None) is not None:
            events.append(StreamReset(stream_id, code))
        self._control(RST_STREAM, 0, stream_id, U32.pack(code))

    def _is_idle(self, stream_id: int) -> bool:
        """True for a stream id no one has used yet."""
        if (stream_id & 1) == self.client_side:
            return stream_id >= self.next_outbound_id
        return stream_id > self.highest_inbound_id

    def _unpad(self, flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            self._fail(ErrorCode.PROTOCOL_ERROR, "padding exceeds the frame")
        return payload[1 : len(payload) - payload[0]]

    def _receive_data_frame(
        self, stream_id: int, flags: int, payload: bytes, events: list[Event]
    ) -> None:
        if stream_id == 0:
            self._fail(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
        if flow > self.recv_window:
            self._fail(ErrorCode.FLOW_CONTROL_ERROR, "the peer overran the connection window")
        self.recv_window -= flow
        if not flow and not flags & END_STREAM:
            self._empty_frame()
        data = self._unpad(flags, payload)
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed or flow > stream.recv_window:
            # Nobody will consume these bytes: credit the connection now.
            self.acknowledge_received_data(0, flow)
            if stream is None:
                if self._is_idle(stream_id):
                    self._fail(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
                return  # a stream we reset or finished: frames in flight are ignored
            code = ErrorCode.STREAM_CLOSED if stream.remote_closed else ErrorCode.FLOW_CONTROL_ERROR
            self._stream_error(stream_id, code, events)
            return
        stream.recv_window -= flow
        if flow != len(data):
            self.acknowledge_received_data(stream_id, flow - len(data))
        end_stream = bool(flags & END_STREAM)
        if end_stream:
            stream.remote_closed = True
            if stream.local_closed:
                del self.streams[stream_id]
        events.append(DataReceived(stream_id, data, end_stream))

    def _receive_headers(
        self, stream_id: int, flags: int, payload: bytes, events: list[Event]
    ) -> None:
        if stream_id == 0:
            self._fail(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        block = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                self._fail(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            block = block[5:]
        end_stream = bool(flags & END_STREAM)
        if len(block) > self.limits.max_header_block_bytes:
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            self._header_block(stream_id, block, end_stream, events)
            return
        if not block:
            self._empty_frame()
        self._block_stream = stream_id
        self._block_end_stream = end_stream
        self._block_parts = [block]
        self._block_bytes = len(block)
        self._block_frames = 0

    def _receive_continuation(
        self, stream_id: int, flags: int, payload: bytes, events: list[Event]
    ) -> None:
        if not self._block_stream or self._block_stream != stream_id:
            self._fail(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        # Running totals, checked as each frame arrives (CVE-2024-27316).
        self._block_frames += 1
        self._block_bytes += len(payload)
        limits = self.limits
        if self._block_frames > limits.max_continuation_frames:
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "too many CONTINUATION frames")
        if self._block_bytes > limits.max_header_block_bytes:
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if payload:
            self._block_parts.append(payload)
        elif not flags & END_HEADERS:
            self._empty_frame()
        if flags & END_HEADERS:
            parts = self._block_parts
            self._block_stream = 0
            self._block_parts = []
            block = parts[0] if len(parts) == 1 else b"".join(parts)
            self._header_block(stream_id, block, self._block_end_stream, events)

    def _header_block(
        self, stream_id: int, block: bytes, end_stream: bool, events: list[Event]
    ) -> None:
        # Decode first, whatever becomes of the stream: the HPACK state must follow.
        try:
            headers, size = self._decoder.decode(block)
        except HeaderDecodeError as error:
            self._fail(ErrorCode.COMPRESSION_ERROR, str(error))
        oversized = size > self.max_header_list_size
        stream = self.streams.get(stream_id)
        if stream is None:
            if self.client_side or not stream_id & 1:
                if self._is_idle(stream_id):
                    self._fail(ErrorCode.PROTOCOL_ERROR, f"HEADERS on idle stream {stream_id}")
                return  # a stream we reset or finished
            if stream_id <= self.highest_inbound_id:
                if not end_stream:
                    # Not trailers in flight for a stream we closed, but a new stream
                    # whose id went backwards (RFC 9113 §5.1.1).
                    self._fail(ErrorCode.PROTOCOL_ERROR, f"stream id {stream_id} went backwards")
                # Trailers for a stream we closed: legitimate once per stream at most,
                # and gRPC clients send none; a stream of them is a flood.
                self._empty_frame()
                return
            self.highest_inbound_id = stream_id
            floods = self.floods
            floods.streams_opened += 1
            floods.window_updates_earned += 2
            if self.goaway_sent or len(self._held) >= self.local_max_concurrent_streams:
                # Reset streams whose handlers still run count too (CVE-2023-44487).
                self._control(RST_STREAM, 0, stream_id, U32.pack(ErrorCode.REFUSED_STREAM))
                if not self.goaway_sent:
                    self._premature_reset()
                return
            if oversized:
                self._control(RST_STREAM, 0, stream_id, U32.pack(ErrorCode.ENHANCE_YOUR_CALM))
                return
            stream = StreamState(self.peer_initial_window, self._stream_recv_initial)
            self.streams[stream_id] = stream
            self._held.add(stream_id)
        elif stream.remote_closed:
            self._stream_error(stream_id, ErrorCode.STREAM_CLOSED, events)
            return
        elif oversized:
            self._stream_error(stream_id, ErrorCode.ENHANCE_YOUR_CALM, events)
            return
        if end_stream:
            stream.remote_closed = True
            if stream.local_closed:
                del self.streams[stream_id]
        events.append(HeadersReceived(stream_id, headers, end_stream))

    def _receive_window_update(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            self._fail(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE payload must be 4 bytes")
        increment = U32.unpack(payload)[0] & 0x7FFFFFFF
        if self.floods.window_update():  # more than our DATA can have called for
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "too many frames that do nothing")
        if stream_id == 0:
            if increment == 0:
                self._fail(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                self._fail(ErrorCode.FLOW_CONTROL_ERROR, "connection window over 2^31-1")
            events.append(WindowUpdated(0))
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            # Closed streams: frames in flight are ignored (RFC 9113 §5.1).
            if self._is_idle(stream_id):
                self._fail(ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}")
            return
        if increment == 0:
            self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR, events)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(stream_id, ErrorCode.FLOW_CONTROL_ERROR, events)
            return
        events.append(WindowUpdated(stream_id))

    def _receive_rst_stream(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            self._fail(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM payload must be 4 bytes")
        if stream_id == 0 or (stream_id not in self.streams and self._is_idle(stream_id)):
            self._fail(ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            if not stream.local_closed and not self.client_side:
                self._premature_reset()
            events.append(StreamReset(stream_id, U32.unpack(payload)[0]))

    def _receive_settings(
        self, stream_id: int, flags: int, payload: bytes, events: list[Event]
    ) -> None:
        if stream_id != 0:
            self._fail(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                self._fail(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if not self._settings_acknowledged:
                # Our one SETTINGS is in force now: a smaller window applies from here.
                self._settings_acknowledged = True
                delta = self.local_initial_window - self._stream_recv_initial
                self._stream_recv_initial = self.local_initial_window
                if delta:
                    for stream in self.streams.values():
                        stream.recv_window += delta
            return
        if len(payload) % 6:
            self._fail(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS payload not a multiple of 6")
        if self.floods.settings_frame():
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "too many SETTINGS frames")
        if len(payload) // 6 > self.limits.max_settings_entries:
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "too many settings in one frame")
        for offset in range(0, len(payload), 6):
            key, value = SETTING.unpack_from(payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    self._fail(ErrorCode.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE over 2^31-1")
                delta = value - self.peer_initial_window
                if delta:
                    self.peer_initial_window = value
                    for stream in self.streams.values():
                        stream.send_window += delta
                        if stream.send_window > MAX_WINDOW:
                            self._fail(ErrorCode.FLOW_CONTROL_ERROR, "stream window over 2^31-1")
                    events.append(WindowUpdated(0))
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME_SIZE <= value <= MAX_FRAME_SIZE_LIMIT:
                    self._fail(ErrorCode.PROTOCOL_ERROR, f"invalid MAX_FRAME_SIZE {value}")
                self.peer_max_frame_size = value
            elif key == SETTINGS_MAX_CONCURRENT_STREAMS:
                self.peer_max_concurrent_streams = value
            elif key == SETTINGS_ENABLE_PUSH and value > 1:
                self._fail(ErrorCode.PROTOCOL_ERROR, f"invalid ENABLE_PUSH {value}")
            # HEADER_TABLE_SIZE: our encoder never uses the table; MAX_HEADER_LIST_SIZE
            # is advisory; unknown settings are ignored.
        self._control(SETTINGS, ACK, 0)

    def _receive_goaway(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id != 0:
            self._fail(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            self._fail(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY payload too short")
        last_stream_id, code = GOAWAY_PAYLOAD.unpack_from(payload)
        self.goaway_received = True
        events.append(ConnectionTerminated(code, last_stream_id & 0x7FFFFFFF))
