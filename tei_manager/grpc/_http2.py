"""A sans-IO HTTP/2 connection (RFC 9113): the part of the protocol gRPC uses.

Bytes go in through ``receive_data`` and come back as a list of events; what we
send is queued as frames in ``data_to_send``. Frames are parsed and built with
``struct``; header blocks are HPACK (``_hpack``). The connection keeps the flow
control windows in both directions, the peer's settings and the open streams; it
answers PING and SETTINGS, ignores PRIORITY and unknown frame types, and turns a
peer's protocol violation into a stream reset or, for the connection as a whole, a
GOAWAY and ``ProtocolError``.

Every resource a peer can make us hold is bounded by ``Limits`` (``limits.py``):
streams (a stream counts from its HEADERS until the application calls
``release_stream``, reset or not), header blocks (running totals of bytes and
CONTINUATION frames), queued control frames, empty frames, SETTINGS, PINGs (with the
clock it is given), resets before an answer, and "glitches" (PRIORITY, unknown
frames, WINDOW_UPDATEs our DATA did not earn, stream errors: a token bucket on the
same clock); floods end with GOAWAY ENHANCE_YOUR_CALM. Every check is a counter
compared on the frame that moves it.

Received data is credited back (both windows) only as the application acknowledges
its bytes (``acknowledge_received_data``), so the windows bound what a peer can make
us hold; in batches of half a window, so small calls send no WINDOW_UPDATE at all.
Frames for a stream that is gone (reset, or finished) are ignored, as RFC 9113 §5.1
asks; their data is credited to the connection at once.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Callable
from typing import NoReturn

from tei_manager.grpc._hpack import HeaderDecodeError, HeaderDecoder
from tei_manager.grpc._http2_frames import (
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_WINDOW,
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
    SETTINGS_MAX_HEADER_LIST_SIZE,
    WINDOW_UPDATE,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    Event,
    HeadersReceived,
    ProtocolError,
    StreamClosedError,
    StreamReset,
    WindowUpdated,
)
from tei_manager.grpc.limits import DEFAULT_LIMITS, Limits

_FRAME = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, stream id
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")


class _Stream:
    __slots__ = ("local_closed", "recv_credit", "recv_window", "remote_closed", "send_window")

    def __init__(self, send_window: int, recv_window: int) -> None:
        self.send_window = send_window
        self.recv_window = recv_window
        self.recv_credit = 0
        self.local_closed = False
        self.remote_closed = False


class H2Connection:
    """One HTTP/2 connection, client or server side."""

    def __init__(
        self,
        *,
        client_side: bool,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client_side = client_side
        self.limits = limits
        #: Open streams (not yet closed in both directions, not reset).
        self.streams: dict[int, _Stream] = {}
        self._data_to_send = bytearray()
        # What we told the peer.
        self.local_initial_window = limits.stream_receive_window_bytes
        self.local_max_frame_size = limits.max_frame_bytes
        self.local_max_concurrent_streams = limits.max_concurrent_streams
        self.max_header_list_size = limits.max_header_list_bytes
        self._connection_window_target = limits.connection_receive_window_bytes
        # Until the peer acknowledges our SETTINGS it may still use the default stream
        # window (RFC 9113 §6.9.3): new streams get the larger of the two till then.
        self._stream_recv_initial = max(DEFAULT_WINDOW, self.local_initial_window)
        self._settings_acknowledged = False
        # What the peer told us.
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame_size = DEFAULT_MAX_FRAME_SIZE
        self.peer_max_concurrent_streams = 2**31 - 1
        # Connection flow control: what we may send, what the peer may still send us.
        self.send_window = DEFAULT_WINDOW
        self.recv_window = DEFAULT_WINDOW
        self._recv_credit = 0
        self._stream_update_at = max(1, self.local_initial_window // 2)
        self._connection_update_at = max(1, self._connection_window_target // 2)
        self._decoder = HeaderDecoder(
            max_block_list_size=max(65536, 4 * self.max_header_list_size),
            cache_bytes=limits.hpack_cache_bytes,
            cache_entry_max_bytes=limits.hpack_cache_entry_max_bytes,
        )
        self._first_header_block = True
        self.highest_inbound_id = 0
        self.next_outbound_id = 1 if client_side else 2
        self.goaway_sent = False
        self.goaway_received = False
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
        # Server side: streams the peer opened that the application has not released
        # (``release_stream``), reset ones included: they count against
        # MAX_CONCURRENT_STREAMS until their handlers finish (CVE-2023-44487).
        self._held: set[int] = set()
        #: Flood counters (see ``Limits``).
        self.streams_opened = 0
        self.premature_resets = 0
        self.empty_frames = 0
        self.settings_frames = 0
        self._control_queued = 0
        self._frame_bytes = 0
        self._clock = clock
        self._last_ping = -math.inf
        self._ping_strikes = 0
        #: Glitches (see ``Limits.glitch_burst``): all so far, and the token bucket.
        self.glitches = 0
        self._glitch_tokens = float(limits.glitch_burst)
        self._glitch_time = -math.inf
        # WINDOW_UPDATEs the peer has earned with our DATA frames and its streams.
        self._window_updates_earned = 0

    # -- starting and stopping ------------------------------------------------------
    def initiate_connection(self) -> None:
        """Queue the preface (client), our SETTINGS and the connection window increase."""
        settings = [
            (SETTINGS_INITIAL_WINDOW_SIZE, self.local_initial_window),
            (SETTINGS_MAX_FRAME_SIZE, self.local_max_frame_size),
            (SETTINGS_MAX_HEADER_LIST_SIZE, self.max_header_list_size),
        ]
        if self.client_side:
            self._data_to_send += PREFACE
            settings.insert(0, (SETTINGS_ENABLE_PUSH, 0))
        else:
            settings.insert(0, (SETTINGS_MAX_CONCURRENT_STREAMS, self.local_max_concurrent_streams))
        payload = b"".join(_SETTING.pack(key, value) for key, value in settings)
        self._frame(SETTINGS, 0, 0, payload)
        increase = self._connection_window_target - DEFAULT_WINDOW
        if increase > 0:
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(increase))
            self.recv_window += increase

    def close_connection(self, error_code: int = ErrorCode.NO_ERROR) -> None:
        """Queue a GOAWAY: the peer may open no new stream."""
        if self.goaway_sent:
            return
        self.goaway_sent = True
        self._frame(GOAWAY, 0, 0, _GOAWAY.pack(self.highest_inbound_id, error_code))

    @property
    def output_pending(self) -> bool:
        """True when frames are queued for ``data_to_send``."""
        return bool(self._data_to_send)

    @property
    def output_size(self) -> int:
        """Bytes queued for ``data_to_send``."""
        return len(self._data_to_send)

    @property
    def frame_bytes_queued(self) -> int:
        """Bytes of frames other than DATA queued for ``data_to_send``: what answering
        the peer costs (headers, resets, ACKs), unlike DATA, which its windows bound."""
        return self._frame_bytes

    @property
    def preface_received(self) -> bool:
        """True once the peer's first SETTINGS (after the client preface) arrived."""
        return not self._settings_expected

    @property
    def held_streams(self) -> int:
        """Server side: streams opened by the peer and not yet released, reset ones too."""
        return len(self._held)

    def data_to_send(self) -> bytearray:
        """Everything queued since the last call (the caller owns the buffer)."""
        data = self._data_to_send
        self._data_to_send = bytearray()
        self._control_queued = 0
        self._frame_bytes = 0
        return data

    def send_ping(self, payload: bytes = bytes(8)) -> None:
        """Queue a PING (keepalive); the peer's ACK is just more bytes received."""
        self._frame(PING, 0, 0, payload)

    def release_stream(self, stream_id: int) -> None:
        """Server side: the application is done with a stream the peer opened."""
        self._held.discard(stream_id)

    def _control(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        """Queue a frame we send in answer to the peer's; too many unsent is a flood."""
        self._control_queued += 1
        if self._control_queued > self.limits.max_queued_control_frames:
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "too many control frames queued")
        self._frame(kind, flags, stream_id, payload)

    # -- sending --------------------------------------------------------------------
    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        length = len(payload)
        self._frame_bytes += 9 + length
        self._data_to_send += _FRAME.pack(length >> 16, length & 0xFFFF, kind, flags, stream_id)
        self._data_to_send += payload

    def get_next_available_stream_id(self) -> int:
        return self.next_outbound_id

    def can_open_stream(self) -> bool:
        """True when the peer's SETTINGS_MAX_CONCURRENT_STREAMS allows one more stream."""
        return not self.goaway_received and len(self.streams) < self.peer_max_concurrent_streams

    def send_headers(self, stream_id: int, block: bytes, end_stream: bool = False) -> None:
        """Send an encoded header block, opening the stream when it is a new one of ours."""
        stream = self.streams.get(stream_id)
        if stream is None:
            if not self.client_side or stream_id < self.next_outbound_id or not stream_id & 1:
                raise StreamClosedError(f"stream {stream_id} is not open")
            stream = _Stream(self.peer_initial_window, self._stream_recv_initial)
            self.streams[stream_id] = stream
            self.next_outbound_id = stream_id + 2
            self._window_updates_earned += 2
        elif stream.local_closed:
            raise StreamClosedError(f"stream {stream_id} is closed for sending")
        self._ping_strikes = 0  # we are doing work for the peer: its PINGs are fair
        if self._first_header_block:
            # A dynamic table size update to 0: our encoder never uses the table,
            # and the peer's table size settings can then never require an update.
            self._first_header_block = False
            block = b"\x20" + block
        flags = END_STREAM if end_stream else 0
        limit = self.peer_max_frame_size
        if len(block) <= limit:
            self._frame(HEADERS, flags | END_HEADERS, stream_id, block)
        else:
            self._frame(HEADERS, flags, stream_id, block[:limit])
            rest = block[limit:]
            while rest:
                chunk, rest = rest[:limit], rest[limit:]
                self._frame(CONTINUATION, 0 if rest else END_HEADERS, stream_id, chunk)
        if end_stream:
            self._close_local(stream_id, stream)

    def send_window_for(self, stream_id: int) -> int:
        """Bytes of DATA the flow-control windows allow on ``stream_id`` now."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed:
            raise StreamClosedError(f"stream {stream_id} is not open for sending")
        return min(self.send_window, stream.send_window)

    def send_data(
        self,
        stream_id: int,
        data: bytes,
        start: int = 0,
        *,
        end_stream: bool = False,
        max_count: int = MAX_WINDOW,
    ) -> int:
        """Send ``data[start:]`` as far as the windows (and ``max_count``) allow;
        returns the bytes sent.

        With ``end_stream``, the last frame also half-closes the stream if all of the
        data went; otherwise the stream stays open.
        """
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed:
            raise StreamClosedError(f"stream {stream_id} is not open for sending")
        self._ping_strikes = 0
        count = min(len(data) - start, self.send_window, stream.send_window, max_count)
        if count <= 0:
            return 0
        self.send_window -= count
        stream.send_window -= count
        limit = self.peer_max_frame_size
        out = self._data_to_send
        end = start + count
        last = END_STREAM if end_stream and end == len(data) else 0
        earned = self.limits.window_updates_per_data_frame
        if start == 0 and end == len(data) and count <= limit:
            out += _FRAME.pack(count >> 16, count & 0xFFFF, DATA, last, stream_id)
            out += data
            self._window_updates_earned += earned
        else:
            view = memoryview(data)
            while start < end:
                size = min(limit, end - start)
                flags = last if start + size == end else 0
                out += _FRAME.pack(size >> 16, size & 0xFFFF, DATA, flags, stream_id)
                out += view[start : start + size]
                start += size
                self._window_updates_earned += earned
        if last:
            self._close_local(stream_id, stream)
        return count

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side with an empty DATA frame carrying END_STREAM."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed:
            raise StreamClosedError(f"stream {stream_id} is not open for sending")
        self._data_to_send += _FRAME.pack(0, 0, DATA, END_STREAM, stream_id)
        self._close_local(stream_id, stream)

    def _close_local(self, stream_id: int, stream: _Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            del self.streams[stream_id]

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        """Send RST_STREAM unless the stream is already closed."""
        if self.streams.pop(stream_id, None) is not None:
            self._frame(RST_STREAM, 0, stream_id, _U32.pack(error_code))

    def is_open(self, stream_id: int) -> bool:
        """True until the stream is closed in both directions or reset."""
        return stream_id in self.streams

    def acknowledge_received_data(self, stream_id: int, length: int) -> None:
        """The application consumed ``length`` bytes: credit them back, in batches."""
        credit = self._recv_credit + length
        if credit >= self._connection_update_at:
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(credit))
            self.recv_window += credit
            credit = 0
        self._recv_credit = credit
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.remote_closed:
            credit = stream.recv_credit + length
            if credit >= self._stream_update_at:
                self._frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(credit))
                stream.recv_window += credit
                credit = 0
            stream.recv_credit = credit

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
        unpack = _FRAME.unpack_from
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
        if not self.client_side:
            # grpc-go's and grpc-core's keepalive enforcement: PINGs closer together
            # than the minimum interval are strikes, until we next send headers.
            now = self._clock()
            if now - self._last_ping < self.limits.min_ping_interval_secs:
                self._ping_strikes += 1
                if self._ping_strikes > self.limits.max_ping_strikes:
                    self._fail(ErrorCode.ENHANCE_YOUR_CALM, "too many pings")
            self._last_ping = now
        self._control(PING, ACK, 0, payload)

    def _empty_frame(self) -> None:
        """A frame that does nothing for the peer (CVE-2019-9518): count it."""
        self.empty_frames += 1
        if self.empty_frames > self.limits.max_empty_frames:
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "too many empty frames")

    def count_glitch(self) -> None:
        """The peer made us work for nothing (see ``Limits.glitch_burst``): take a
        token from the bucket; none left is a flood."""
        self.glitches += 1
        limits = self.limits
        now = self._clock()
        tokens = self._glitch_tokens + (now - self._glitch_time) * limits.glitch_rate_per_sec
        self._glitch_time = now
        tokens = min(tokens, limits.glitch_burst) - 1
        if tokens < 0:
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "too many frames that do nothing")
        self._glitch_tokens = tokens

    def _premature_reset(self) -> None:
        """A stream the peer reset before we answered, or one we refused."""
        self.premature_resets += 1
        limits = self.limits
        if (
            self.streams_opened >= limits.rapid_reset_min_streams
            and self.premature_resets > limits.rapid_reset_max_ratio * self.streams_opened
        ):
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "too many streams reset")

    def _fail(self, code: ErrorCode, message: str) -> NoReturn:
        self.close_connection(code)
        raise ProtocolError(code, message)

    def _stream_error(self, stream_id: int, code: ErrorCode, events: list[Event]) -> None:
        """Reset a stream for the peer's error; tell the application if it knew the stream."""
        self.count_glitch()
        if self.streams.pop(stream_id, None) is not None:
            events.append(StreamReset(stream_id, code))
        self._control(RST_STREAM, 0, stream_id, _U32.pack(code))

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
            self.streams_opened += 1
            self._window_updates_earned += 2
            if self.goaway_sent or len(self._held) >= self.local_max_concurrent_streams:
                # Reset streams whose handlers still run count too (CVE-2023-44487).
                self._control(RST_STREAM, 0, stream_id, _U32.pack(ErrorCode.REFUSED_STREAM))
                if not self.goaway_sent:
                    self._premature_reset()
                return
            if oversized:
                self._control(RST_STREAM, 0, stream_id, _U32.pack(ErrorCode.ENHANCE_YOUR_CALM))
                return
            stream = _Stream(self.peer_initial_window, self._stream_recv_initial)
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
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if self._window_updates_earned > 0:
            self._window_updates_earned -= 1
        else:
            self.count_glitch()  # more than our DATA can have called for
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
            events.append(StreamReset(stream_id, _U32.unpack(payload)[0]))

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
        self.settings_frames += 1
        if self.settings_frames > self.limits.max_settings_frames:
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "too many SETTINGS frames")
        if len(payload) // 6 > self.limits.max_settings_entries:
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "too many settings in one frame")
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
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
        last_stream_id, code = _GOAWAY.unpack_from(payload)
        self.goaway_received = True
        events.append(ConnectionTerminated(code, last_stream_id & 0x7FFFFFFF))
