"""The sending half of a sans-IO HTTP/2 connection (RFC 9113), and the state both
halves share: the open streams, both sides' settings, the flow-control windows.

``H2Sender`` queues what we send as frames in ``data_to_send``: the preface and our
SETTINGS, HEADERS (split into CONTINUATION frames at the peer's MAX_FRAME_SIZE), DATA
as far as the connection's and the stream's send windows allow, RST_STREAM, PING and
GOAWAY. Received data is credited back (both windows) only as the application
acknowledges its bytes (``acknowledge_received_data``), so the windows bound what a
peer can make us hold; in batches of half a window, so small calls send no
WINDOW_UPDATE at all. ``_http2.H2Connection`` adds the receiving half on top; the
frames we send in answer to the peer's are counted by its ``FloodGuard``.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import NoReturn

from tei_manager.grpc._http2_floods import FloodGuard
from tei_manager.grpc._http2_frames import (
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    MAX_WINDOW,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    SETTINGS_MAX_FRAME_SIZE,
    SETTINGS_MAX_HEADER_LIST_SIZE,
    WINDOW_UPDATE,
    ErrorCode,
    ProtocolError,
    StreamClosedError,
)
from tei_manager.grpc.limits import DEFAULT_LIMITS, Limits

#: A frame header: length (24 bits as 8 + 16), type, flags, stream id.
FRAME_HEADER = struct.Struct(">BHBBL")
U32 = struct.Struct(">L")
SETTING = struct.Struct(">HL")
GOAWAY_PAYLOAD = struct.Struct(">LL")


class StreamState:
    """One open stream's windows and which sides have closed it."""

    __slots__ = ("local_closed", "recv_credit", "recv_window", "remote_closed", "send_window")

    def __init__(self, send_window: int, recv_window: int) -> None:
        self.send_window = send_window
        self.recv_window = recv_window
        self.recv_credit = 0
        self.local_closed = False
        self.remote_closed = False


class H2Sender:
    """What one HTTP/2 connection sends, client or server side (see ``H2Connection``).

    The receiving half, its subclass, also uses ``_fail``, ``_control``, ``_held``
    and ``_stream_recv_initial``; nothing else reaches them.
    """

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
        self.streams: dict[int, StreamState] = {}
        self._data_to_send = bytearray()
        # Bytes of frames other than DATA in ``_data_to_send``.
        self._frame_bytes = 0
        # What we told the peer.
        self.local_initial_window = limits.stream_receive_window_bytes
        self.local_max_frame_size = limits.max_frame_bytes
        self.local_max_concurrent_streams = limits.max_concurrent_streams
        self.max_header_list_size = limits.max_header_list_bytes
        self._connection_window_target = limits.connection_receive_window_bytes
        # Until the peer acknowledges our SETTINGS it may still use the default stream
        # window (RFC 9113 §6.9.3): new streams get the larger of the two till then.
        self._stream_recv_initial = max(DEFAULT_WINDOW, self.local_initial_window)
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
        self._first_header_block = True
        self.highest_inbound_id = 0
        self.next_outbound_id = 1 if client_side else 2
        self.goaway_sent = False
        self.goaway_received = False
        # Server side: streams the peer opened that the application has not released
        # (``release_stream``), reset ones included: they count against
        # MAX_CONCURRENT_STREAMS until their handlers finish (CVE-2023-44487).
        self._held: set[int] = set()
        #: What the peer made us do for nothing (see ``Limits``).
        self.floods = FloodGuard(limits, clock)

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
        payload = b"".join(SETTING.pack(key, value) for key, value in settings)
        self._frame(SETTINGS, 0, 0, payload)
        increase = self._connection_window_target - DEFAULT_WINDOW
        if increase > 0:
            self._frame(WINDOW_UPDATE, 0, 0, U32.pack(increase))
            self.recv_window += increase

    def close_connection(self, error_code: int = ErrorCode.NO_ERROR) -> None:
        """Queue a GOAWAY: the peer may open no new stream."""
        if self.goaway_sent:
            return
        self.goaway_sent = True
        self._frame(GOAWAY, 0, 0, GOAWAY_PAYLOAD.pack(self.highest_inbound_id, error_code))

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
    def held_streams(self) -> int:
        """Server side: streams opened by the peer and not yet released, reset ones too."""
        return len(self._held)

    def data_to_send(self) -> bytearray:
        """Everything queued since the last call (the caller owns the buffer)."""
        data = self._data_to_send
        self._data_to_send = bytearray()
        self._frame_bytes = 0
        self.floods.control_queued = 0
        return data

    def send_ping(self, payload: bytes = bytes(8)) -> None:
        """Queue a PING (keepalive); the peer's ACK is just more bytes received."""
        self._frame(PING, 0, 0, payload)

    def release_stream(self, stream_id: int) -> None:
        """Server side: the application is done with a stream the peer opened."""
        self._held.discard(stream_id)

    def _control(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        """Queue a frame we send in answer to the peer's; too many unsent is a flood."""
        if self.floods.control_frame():
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "too many control frames queued")
        self._frame(kind, flags, stream_id, payload)

    # -- sending --------------------------------------------------------------------
    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        length = len(payload)
        self._frame_bytes += 9 + length
        self._data_to_send += FRAME_HEADER.pack(
            length >> 16, length & 0xFFFF, kind, flags, stream_id
        )
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
            stream = StreamState(self.peer_initial_window, self._stream_recv_initial)
            self.streams[stream_id] = stream
            self.next_outbound_id = stream_id + 2
            self.floods.window_updates_earned += 2
        elif stream.local_closed:
            raise StreamClosedError(f"stream {stream_id} is closed for sending")
        self.floods.ping_strikes = 0  # we are doing work for the peer: its PINGs are fair
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
        floods = self.floods
        floods.ping_strikes = 0
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
            out += FRAME_HEADER.pack(count >> 16, count & 0xFFFF, DATA, last, stream_id)
            out += data
            floods.window_updates_earned += earned
        else:
            view = memoryview(data)
            while start < end:
                size = min(limit, end - start)
                flags = last if start + size == end else 0
                out += FRAME_HEADER.pack(size >> 16, size & 0xFFFF, DATA, flags, stream_id)
                out += view[start : start + size]
                start += size
                floods.window_updates_earned += earned
        if last:
            self._close_local(stream_id, stream)
        return count

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side with an empty DATA frame carrying END_STREAM."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed:
            raise StreamClosedError(f"stream {stream_id} is not open for sending")
        self._data_to_send += FRAME_HEADER.pack(0, 0, DATA, END_STREAM, stream_id)
        self._close_local(stream_id, stream)

    def _close_local(self, stream_id: int, stream: StreamState) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            del self.streams[stream_id]

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        """Send RST_STREAM unless the stream is already closed."""
        if self.streams.pop(stream_id, None) is not None:
            self._frame(RST_STREAM, 0, stream_id, U32.pack(error_code))

    def is_open(self, stream_id: int) -> bool:
        """True until the stream is closed in both directions or reset."""
        return stream_id in self.streams

    def acknowledge_received_data(self, stream_id: int, length: int) -> None:
        """The application consumed ``length`` bytes: credit them back, in batches."""
        credit = self._recv_credit + length
        if credit >= self._connection_update_at:
            self._frame(WINDOW_UPDATE, 0, 0, U32.pack(credit))
            self.recv_window += credit
            credit = 0
        self._recv_credit = credit
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.remote_closed:
            credit = stream.recv_credit + length
            if credit >= self._stream_update_at:
                self._frame(WINDOW_UPDATE, 0, stream_id, U32.pack(credit))
                stream.recv_window += credit
                credit = 0
            stream.recv_credit = credit

    def _fail(self, code: ErrorCode, message: str) -> NoReturn:
        """The peer broke the protocol: queue GOAWAY and raise ``ProtocolError``."""
        self.close_connection(code)
        raise ProtocolError(code, message)
