"""Each of ``Limits``' guards, one focused test apiece.

Sans-IO tests feed hand-written frames (hyperframe) to our ``Connection`` or talk to
it through h2; trio tests use real sockets on port 0 and the autojump clock.
"""

from __future__ import annotations

import errno
import logging
import struct
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import trio
import trio.testing
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.grpc._grpc_events import MessageReceived, RequestReceived
from tei_manager.grpc._grpc_headers import MAX_STATUS_MESSAGE_CHARS, status_headers
from tei_manager.grpc._hpack import HeaderDecoder
from tei_manager.grpc._http2_frames import PREFACE, ErrorCode, ProtocolError
from tei_manager.grpc._protocol import Connection
from tei_manager.grpc.calls import CallContext
from tei_manager.grpc.channel import Channel, open_channel
from tei_manager.grpc.limits import DEFAULT_LIMITS, Limits, validate_limits
from tei_manager.grpc.rpc import (
    CLIENT_TEXT_CHARS,
    Cardinality,
    GrpcError,
    MethodSpec,
    StatusCode,
    client_text,
)
from tei_manager.grpc.server import GrpcServer

PATH = "/pkg.Service/Method"
REQUEST = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", PATH),
    (":authority", "example:50051"),
    ("te", "trailers"),
    ("content-type", "application/grpc"),
]


def framed(message: bytes) -> bytes:
    return struct.pack(">BL", 0, len(message)) + message


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Raw:
    """Our server-side connection, fed frames written by hand."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.ours = Connection(
            client_side=False, max_message_bytes=1 << 20, limits=limits, clock=self.clock
        )
        self.ours.initiate_connection()
        self.encoder = Encoder()
        self.send(
            PREFACE + SettingsFrame(0).serialize() + SettingsFrame(0, flags=["ACK"]).serialize()
        )
        self.ours.data_to_send()

    def send(self, data: bytes) -> list[Any]:
        return self.ours.receive_data(data)

    def headers(self, stream_id: int, headers: list[tuple[str, str]] = REQUEST) -> bytes:
        frame = HeadersFrame(stream_id, data=self.encoder.encode(headers))
        frame.flags.add("END_HEADERS")
        return bytes(frame.serialize())

    def frames_sent(self) -> list[tuple[int, int, bytes]]:
        """(type, stream id, payload) of each frame we queued."""
        data = bytes(self.ours.data_to_send())
        frames = []
        while data:
            length = int.from_bytes(data[:3], "big")
            kind, stream_id = data[3], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
            frames.append((kind, stream_id, data[9 : 9 + length]))
            data = data[9 + length :]
        return frames


def fails_with(code: ErrorCode, raw: Raw, data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        raw.send(data)
    assert info.value.code == code
    goaway = [payload for kind, _, payload in raw.frames_sent() if kind == 0x7]
    assert goaway and struct.unpack(">L", goaway[-1][4:8])[0] == code
    return info.value


# -- Limits itself ---------------------------------------------------------------------
def test_defaults_are_valid_and_documented() -> None:
    assert validate_limits(DEFAULT_LIMITS) == []
    assert DEFAULT_LIMITS.max_concurrent_streams == 100
    # A 40 MiB message is larger than the stream window: it must not need one.
    assert DEFAULT_LIMITS.stream_receive_window_bytes < 40 * 1024 * 1024


def test_validation_names_the_field() -> None:
    errors = dict(validate_limits(Limits(max_connections=0, rapid_reset_max_ratio=2.0)))
    assert set(errors) == {"max_connections", "rapid_reset_max_ratio"}


# -- header blocks -----------------------------------------------------------------------
def test_continuation_frames_are_counted_as_they_arrive() -> None:
    raw = Raw(Limits(max_continuation_frames=3))
    block = raw.encoder.encode(REQUEST)
    raw.send(HeadersFrame(1, data=block[:4]).serialize())
    for _ in range(3):
        assert raw.send(ContinuationFrame(1, data=b"").serialize()) == []
    error = fails_with(ErrorCode.ENHANCE_YOUR_CALM, raw, ContinuationFrame(1).serialize())
    assert "CONTINUATION" in str(error)


def test_header_block_bytes_are_a_running_total() -> None:
    limits = Limits(max_header_block_bytes=4096, max_header_list_bytes=2048)
    raw = Raw(limits)
    raw.send(HeadersFrame(1, data=b"\x00" * 2000).serialize())
    raw.send(ContinuationFrame(1, data=b"\x00" * 2000).serialize())
    fails_with(
        ErrorCode.ENHANCE_YOUR_CALM, raw, ContinuationFrame(1, data=b"\x00" * 100).serialize()
    )
    # A single HEADERS frame over the budget fails at once too.
    raw = Raw(limits)
    fails_with(ErrorCode.ENHANCE_YOUR_CALM, raw, HeadersFrame(1, data=b"\x00" * 5000).serialize())


def test_a_block_within_the_budget_still_decodes() -> None:
    raw = Raw(Limits(max_continuation_frames=3))
    block = raw.encoder.encode(REQUEST)
    third = len(block) // 3
    raw.send(HeadersFrame(1, data=block[:third]).serialize())
    raw.send(ContinuationFrame(1, data=block[third : 2 * third]).serialize())
    end = ContinuationFrame(1, data=block[2 * third :])
    end.flags.add("END_HEADERS")
    assert [type(e) for e in raw.send(end.serialize())] == [RequestReceived]


def test_hpack_caches_are_bounded_in_bytes() -> None:
    decoder = HeaderDecoder(1 << 20, cache_bytes=4096, cache_entry_max_bytes=200)
    encoder = Encoder()
    encoder.header_table_size = 0  # literals only: every block is new bytes
    for i in range(200):
        decoder.decode(encoder.encode([("x-k", f"value-{i}" * 3)]))
        assert decoder.cached_bytes <= 4096
    assert decoder.cached_bytes > 3000  # small entries were cached until full
    before = decoder.cached_bytes
    decoder.decode(encoder.encode([("x-big", "v" * 300)]))  # larger than an entry may be
    assert decoder.cached_bytes == before


# -- streams ---------------------------------------------------------------------------------
def test_a_reset_stream_counts_until_the_application_releases_it() -> None:
    raw = Raw(Limits(max_concurrent_streams=1))
    assert raw.send(raw.headers(1))
    raw.send(RstStreamFrame(1, error_code=ErrorCode.CANCEL).serialize())
    assert raw.ours.h2_connection.held_streams == 1  # its handler still runs
    raw.ours.data_to_send()
    assert raw.send(raw.headers(3)) == []
    assert (0x3, 3, struct.pack(">L", ErrorCode.REFUSED_STREAM)) in raw.frames_sent()
    raw.ours.forget(1)  # the handler finished
    assert [type(e) for e in raw.send(raw.headers(5))] == [RequestReceived]


def test_stream_ids_going_backwards_are_a_connection_error() -> None:
    raw = Raw()
    raw.send(raw.headers(5))
    error = fails_with(ErrorCode.PROTOCOL_ERROR, raw, raw.headers(3))
    assert "backwards" in str(error)


def test_rapid_reset_gets_goaway_enhance_your_calm() -> None:
    raw = Raw(Limits(rapid_reset_min_streams=10))
    for stream_id in range(1, 19, 2):  # 9 streams opened and reset at once
        raw.send(raw.headers(stream_id))
        raw.send(RstStreamFrame(stream_id, error_code=ErrorCode.CANCEL).serialize())
        raw.ours.forget(stream_id)
    raw.send(raw.headers(19))
    fails_with(ErrorCode.ENHANCE_YOUR_CALM, raw, RstStreamFrame(19).serialize())


def test_resets_after_our_answer_are_not_premature() -> None:
    raw = Raw(Limits(rapid_reset_min_streams=10))
    for stream_id in range(1, 41, 2):
        raw.send(raw.headers(stream_id))
        raw.ours.respond_status(stream_id, StatusCode.OK)
        raw.send(RstStreamFrame(stream_id, error_code=ErrorCode.NO_ERROR).serialize())
        raw.ours.forget(stream_id)
    assert raw.ours.h2_connection.floods.premature_resets == 0


# -- floods -------------------------------------------------------------------------------------
def test_empty_data_frames_are_a_flood() -> None:
    raw = Raw(Limits(max_empty_frames=5))
    raw.send(raw.headers(1))
    raw.send(DataFrame(1, data=b"").serialize() * 5)
    fails_with(ErrorCode.ENHANCE_YOUR_CALM, raw, DataFrame(1, data=b"").serialize())


def test_empty_data_with_end_stream_is_not_empty() -> None:
    raw = Raw(Limits(max_empty_frames=1))
    for stream_id in (1, 3, 5):
        raw.send(raw.headers(stream_id))
        raw.send(DataFrame(stream_id, data=b"", flags=["END_STREAM"]).serialize())
    assert raw.ours.h2_connection.floods.empty_frames == 0


def test_settings_floods() -> None:
    raw = Raw(Limits(max_settings_frames=3))  # the opening SETTINGS was the first
    raw.send(SettingsFrame(0, settings={4: 70000}).serialize() * 2)
    fails_with(ErrorCode.ENHANCE_YOUR_CALM, raw, SettingsFrame(0).serialize())
    raw = Raw(Limits(max_settings_entries=2))
    many = SettingsFrame(0, settings={1: 4096, 4: 70000, 5: 16384})
    fails_with(ErrorCode.ENHANCE_YOUR_CALM, raw, many.serialize())


def _priority(stream_id: int) -> bytes:
    return struct.pack(">BHBBL", 0, 5, 0x2, 0, stream_id) + struct.pack(">LB", 0, 15)


def _window_update(stream_id: int, increment: int) -> bytes:
    return struct.pack(">BHBBL", 0, 4, 0x8, 0, stream_id) + struct.pack(">L", increment)


def test_priority_frames_are_glitches_limited_by_a_token_bucket() -> None:
    """CVE-2019-9513 style: PRIORITY makes us do nothing; a stream of them is a flood."""
    raw = Raw(Limits(glitch_burst=5, glitch_rate_per_sec=2))
    raw.send(b"".join(_priority(stream_id) for stream_id in range(1, 11, 2)))  # the burst
    raw.clock.now = 1.0  # two tokens back
    raw.send(_priority(11) + _priority(13))
    assert raw.ours.h2_connection.floods.glitches == 7
    error = fails_with(ErrorCode.ENHANCE_YOUR_CALM, raw, _priority(15))
    assert "do nothing" in str(error)


def test_unknown_frames_are_glitches() -> None:
    raw = Raw(Limits(glitch_burst=3, glitch_rate_per_sec=1))
    unknown = struct.pack(">BHBBL", 0, 4, 0x42, 0, 0) + b"junk"
    raw.send(unknown * 3)
    fails_with(ErrorCode.ENHANCE_YOUR_CALM, raw, unknown)


def test_window_updates_our_data_did_not_earn_are_glitches() -> None:
    """A 1-byte WINDOW_UPDATE flood on an open stream: only the ones our DATA (or the
    stream's opening) can have called for are free."""
    raw = Raw(Limits(glitch_burst=3, glitch_rate_per_sec=1, window_updates_per_data_frame=4))
    raw.send(raw.headers(1))
    h2c = raw.ours.h2_connection
    raw.ours.start_response(1)
    h2c.send_data(1, b"x" * 10)  # one DATA frame: four WINDOW_UPDATEs earned
    raw.ours.data_to_send()
    # Two for the stream, four for the DATA frame, three from the bucket.
    raw.send(_window_update(1, 1) * 6 + _window_update(0, 1) * 3)
    assert h2c.floods.glitches == 3
    fails_with(ErrorCode.ENHANCE_YOUR_CALM, raw, _window_update(1, 1))


def test_well_behaved_flow_control_has_no_glitches() -> None:
    """A peer crediting back a large answer as it reads: every WINDOW_UPDATE earned."""
    ours, peer = _h2_pair(DEFAULT_LIMITS)
    peer.send_headers(1, REQUEST)
    peer.send_data(1, framed(b"q"), end_stream=True)
    ours.receive_data(peer.data_to_send())
    ours.start_response(1)
    h2c = ours.h2_connection
    payload = framed(b"z" * 1_000_000)
    sent = 0
    while sent < len(payload):
        sent += h2c.send_data(1, payload, sent)
        for event in peer.receive_data(bytes(ours.data_to_send())):
            if isinstance(event, h2.events.DataReceived):
                # Credit every frame at once: as many WINDOW_UPDATEs as a peer sends.
                peer.increment_flow_control_window(event.flow_controlled_length)
                peer.increment_flow_control_window(event.flow_controlled_length, stream_id=1)
        ours.receive_data(peer.data_to_send())
    assert h2c.floods.glitches == 0


def test_malformed_requests_and_stream_errors_are_glitches() -> None:
    """Each costs a decode and a reset and does nothing: a stream of them is a flood."""
    raw = Raw(Limits(glitch_burst=3, glitch_rate_per_sec=1))
    pseudo_last = [*REQUEST[4:], *REQUEST[:4]]  # pseudo-headers after regular ones
    raw.send(raw.headers(1, pseudo_last) + raw.headers(3, pseudo_last))
    raw.send(raw.headers(5))
    raw.send(_window_update(5, 0))  # a stream error: the third
    assert raw.ours.h2_connection.floods.glitches == 3
    fails_with(ErrorCode.ENHANCE_YOUR_CALM, raw, raw.headers(7, pseudo_last))


def test_zero_window_increment_is_a_stream_error_or_a_connection_error() -> None:
    """RFC 9113 §6.9: on a stream, RST_STREAM PROTOCOL_ERROR; on the connection, GOAWAY."""
    raw = Raw()
    raw.send(raw.headers(1))
    raw.ours.data_to_send()
    (reset,) = raw.send(_window_update(1, 0))
    assert (reset.stream_id, reset.error_code) == (1, ErrorCode.PROTOCOL_ERROR)
    assert (0x3, 1, struct.pack(">L", ErrorCode.PROTOCOL_ERROR)) in raw.frames_sent()
    assert raw.send(raw.headers(3))  # the connection goes on
    fails_with(ErrorCode.PROTOCOL_ERROR, raw, _window_update(0, 0))


def test_a_window_over_2_31_minus_1_is_a_flow_control_error() -> None:
    """RFC 9113 §6.9.1: the stream's is reset, the connection's ends the connection."""
    raw = Raw()
    raw.send(raw.headers(1))
    raw.ours.data_to_send()
    (reset,) = raw.send(_window_update(1, 2**31 - 1))  # on top of the initial 65535
    assert (reset.stream_id, reset.error_code) == (1, ErrorCode.FLOW_CONTROL_ERROR)
    assert (0x3, 1, struct.pack(">L", ErrorCode.FLOW_CONTROL_ERROR)) in raw.frames_sent()
    raw.send(_window_update(0, 2**31 - 1 - 65535))  # exactly the largest window: fine
    fails_with(ErrorCode.FLOW_CONTROL_ERROR, raw, _window_update(0, 1))


def test_control_frames_unsent_are_bounded() -> None:
    raw = Raw(Limits(max_queued_control_frames=10, max_ping_strikes=100))
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    raw.send(ping * 10)
    raw.ours.data_to_send()  # written: the count starts over
    raw.send(ping * 10)
    fails_with(ErrorCode.ENHANCE_YOUR_CALM, raw, ping)


def test_pings_closer_than_the_minimum_are_strikes() -> None:
    raw = Raw(Limits(min_ping_interval_secs=60, max_ping_strikes=2))
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    raw.send(ping)
    raw.clock.now = 60.0
    raw.send(ping)  # a minute apart: fine
    raw.send(ping * 2)  # two strikes
    raw.send(raw.headers(1))
    raw.ours.respond_status(1, StatusCode.OK)  # we sent headers: strikes start over
    raw.send(ping * 2)
    fails_with(ErrorCode.ENHANCE_YOUR_CALM, raw, ping)


# -- flow control -----------------------------------------------------------------------------
def test_a_message_larger_than_the_stream_window_streams_through() -> None:
    limits = Limits(stream_receive_window_bytes=65535, connection_receive_window_bytes=65535)
    ours = Connection(client_side=False, max_message_bytes=1 << 20, limits=limits)
    ours.initiate_connection()
    peer = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
    peer.initiate_connection()
    ours.receive_data(peer.data_to_send())
    peer.receive_data(bytes(ours.data_to_send()))
    peer.send_headers(1, REQUEST)
    message = framed(b"m" * 1_000_000)
    sent = 0
    events: list[Any] = []
    for _ in range(200):  # the application never consumes anything meanwhile
        room = min(peer.local_flow_control_window(1), len(message) - sent, 16384)
        if room:
            peer.send_data(1, message[sent : sent + room], end_stream=sent + room == len(message))
            sent += room
        events += ours.receive_data(peer.data_to_send())
        peer.receive_data(bytes(ours.data_to_send()))
        if sent == len(message):
            break
    (received,) = [e for e in events if isinstance(e, MessageReceived)]
    assert len(received.data) == 1_000_000


def test_complete_messages_hold_the_stream_window_until_consumed() -> None:
    limits = Limits(stream_receive_window_bytes=65535)
    ours = Connection(client_side=False, max_message_bytes=1 << 20, limits=limits)
    ours.initiate_connection()
    peer = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
    peer.initiate_connection()
    ours.receive_data(peer.data_to_send())
    peer.receive_data(bytes(ours.data_to_send()))
    peer.send_headers(1, REQUEST)
    peer.send_headers(3, REQUEST)
    for stream_id in (1, 3):
        while peer.local_flow_control_window(stream_id) >= 1005:
            peer.send_data(stream_id, framed(b"x" * 1000))
    ours.receive_data(peer.data_to_send())
    peer.receive_data(bytes(ours.data_to_send()))
    # Unread, both streams stay stalled; the connection window does not (it is
    # credited on receipt), so a third call still gets through.
    assert peer.local_flow_control_window(1) < 1005
    assert peer.local_flow_control_window(3) < 1005
    peer.send_headers(5, REQUEST)
    peer.send_data(5, framed(b"third"), end_stream=True)
    events = ours.receive_data(peer.data_to_send())
    assert [e.data for e in events if isinstance(e, MessageReceived)] == [b"third"]


def test_we_advertise_the_limits() -> None:
    ours = Connection(client_side=False, max_message_bytes=1 << 20)
    ours.initiate_connection()
    peer = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
    peer.initiate_connection()
    peer.receive_data(bytes(ours.data_to_send()))
    settings = peer.remote_settings
    assert settings.max_concurrent_streams == DEFAULT_LIMITS.max_concurrent_streams
    assert settings.initial_window_size == DEFAULT_LIMITS.stream_receive_window_bytes
    assert settings.max_frame_size == DEFAULT_LIMITS.max_frame_bytes
    assert settings.max_header_list_size == DEFAULT_LIMITS.max_header_list_bytes
    assert peer.outbound_flow_control_window == DEFAULT_LIMITS.connection_receive_window_bytes


# -- client strings in status messages ----------------------------------------------------------
def test_client_text_is_bounded_and_escaped() -> None:
    assert client_text("/a\r\nb") == "'/a\\r\\nb'"
    long = client_text("x" * 100_000)
    assert len(long) < CLIENT_TEXT_CHARS + 40 and "100000 characters" in long
    assert client_text(None) == "(none)"
    (_, (_, message)) = status_headers(2, "y" * 100_000)
    assert len(message) == MAX_STATUS_MESSAGE_CHARS


def test_a_malformed_path_is_not_echoed_unbounded() -> None:
    raw = Raw()
    path = "/x" * 3000  # malformed: too many slashes
    raw.send(raw.headers(1, headers=[*REQUEST[:2], (":path", path), *REQUEST[3:]]))
    (block,) = [payload for kind, _, payload in raw.frames_sent() if kind == 0x1]
    assert len(block) < 300


# -- the trio layer --------------------------------------------------------------------------------
class Echo(tei_grpc.TokenizeServicer):
    def __init__(self) -> None:
        self.running = 0
        self.most = 0

    async def Decode(
        self, request: tei_pb2.DecodeRequest, context: CallContext
    ) -> tei_pb2.DecodeResponse:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await trio.sleep(0.1)
        finally:
            self.running -= 1
        return tei_pb2.DecodeResponse(text=str(list(request.ids)))


async def _serve(nursery: trio.Nursery, limits: Limits, servicer: Any = None) -> GrpcServer:
    server = GrpcServer([servicer or Echo()], port=0, limits=limits)
    await nursery.start(server.run)
    return server


async def _read_until_closed(sock: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await sock.receive_some():
        data += chunk
    return data


async def test_no_preface_in_time_closes_the_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await _serve(nursery, Limits(handshake_timeout_secs=10))
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as sock:
        started = trio.current_time()
        await sock.send_all(PREFACE[:10])  # half a preface, then nothing
        data = await _read_until_closed(sock)
    assert trio.current_time() - started == pytest.approx(10)
    assert b"\x00\x00\x00\x07" not in data[9:]  # no GOAWAY without a preface


async def test_an_idle_connection_gets_goaway_then_closes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await _serve(nursery, Limits(idle_timeout_secs=30))
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as sock:
        await sock.send_all(PREFACE + SettingsFrame(0).serialize())
        started = trio.current_time()
        data = await _read_until_closed(sock)
    assert trio.current_time() - started == pytest.approx(30)
    client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
    client.initiate_connection()
    events = client.receive_data(data)
    assert any(type(e).__name__ == "ConnectionTerminated" for e in events)


async def test_calls_keep_a_connection_from_being_idle(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await _serve(nursery, Limits(idle_timeout_secs=1))
    async with open_channel("127.0.0.1", server.port) as channel:
        for i in range(30):  # 0.1 s each: 3 s in all, with calls back to back
            await channel.unary_unary(tei_grpc.Tokenize.Decode, tei_pb2.DecodeRequest(ids=[i]))
        assert channel.usable
        await trio.sleep(1.5)
        assert not channel.usable


async def test_connections_over_the_limit_are_closed_and_counted(nursery: trio.Nursery) -> None:
    server = await _serve(nursery, Limits(max_connections=2))
    kept = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(2)]
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as extra:
        with trio.fail_after(5):
            assert await _read_until_closed(extra) == b""
    assert server.statistics()["connections_refused"] == 1
    for sock in kept:
        await sock.aclose()
    with trio.fail_after(5):  # the slots free up: a new connection is served
        while server.statistics()["connections"] == 0:
            async with await trio.open_tcp_stream("127.0.0.1", server.port) as sock:
                await sock.send_all(PREFACE + SettingsFrame(0).serialize())
                with trio.move_on_after(0.2):
                    if await sock.receive_some():  # our SETTINGS: served
                        break


class FlakyListener:
    """Fails ``accept`` with ``failures`` errors, then waits forever."""

    def __init__(self, failures: list[int]) -> None:
        self.failures = failures

    async def accept(self) -> trio.SocketStream:
        if self.failures:
            raise OSError(self.failures.pop(0), "simulated")
        await trio.sleep_forever()
        raise AssertionError


async def test_accept_backs_off_on_resource_errors_and_logs_once(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    server = GrpcServer([])
    listener = FlakyListener([errno.EMFILE] * 20)
    with caplog.at_level(logging.WARNING), trio.move_on_after(10):
        async with trio.open_nursery() as nursery:
            await server.accept_connections(listener, nursery)  # type: ignore[arg-type]
    warnings = [r for r in caplog.records if "accept failed" in r.getMessage()]
    assert len(warnings) == 1
    assert server.statistics()["accept_errors"] == 20


async def test_accept_errors_that_are_not_resources_are_raised(nursery: trio.Nursery) -> None:
    server = GrpcServer([])
    with pytest.raises(OSError) as info:
        await server.accept_connections(FlakyListener([errno.EINVAL]), nursery)  # type: ignore[arg-type]
    assert info.value.errno == errno.EINVAL


async def test_channel_queues_calls_over_the_servers_stream_limit(nursery: trio.Nursery) -> None:
    echo = Echo()
    server = await _serve(nursery, Limits(max_concurrent_streams=2), echo)
    results: list[str] = []
    async with open_channel("127.0.0.1", server.port) as channel:

        async def call(i: int) -> None:
            reply = await channel.unary_unary(
                tei_grpc.Tokenize.Decode, tei_pb2.DecodeRequest(ids=[i])
            )
            results.append(reply.text)

        async with trio.open_nursery() as calls:
            for i in range(7):
                calls.start_soon(call, i)
    assert sorted(results) == sorted(f"[{i}]" for i in range(7))
    assert echo.most == 2


async def test_keepalive_drops_a_connection_whose_peer_went_silent(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # A "server" that sends its SETTINGS and then never says a thing.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    received: list[bytes] = []

    async def silent(sock: trio.SocketStream) -> None:
        await sock.send_all(SettingsFrame(0).serialize())
        while chunk := await sock.receive_some():
            received.append(chunk)

    nursery.start_soon(trio.serve_listeners, silent, listeners)
    limits = Limits(keepalive_interval_secs=5, keepalive_timeout_secs=2)
    channel = Channel("127.0.0.1", port, limits=limits)
    await nursery.start(channel.run)
    started = trio.current_time()
    with pytest.raises(GrpcError) as info:
        await channel.unary_unary(tei_grpc.Tokenize.Decode, tei_pb2.DecodeRequest(ids=[1]))
    assert info.value.code == StatusCode.UNAVAILABLE
    assert trio.current_time() - started == pytest.approx(7)
    assert PingFrame(0, opaque_data=bytes(8)).serialize() in b"".join(received)


async def test_a_server_that_never_sends_settings_fails_the_connect(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def mute(sock: trio.SocketStream) -> None:
        await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, mute, listeners)
    channel = Channel("127.0.0.1", port, limits=Limits(handshake_timeout_secs=3))
    started = trio.current_time()
    with pytest.raises(GrpcError) as info:
        await nursery.start(channel.run)
    assert info.value.code == StatusCode.UNAVAILABLE
    assert trio.current_time() - started == pytest.approx(3)


class Lingering(tei_grpc.TokenizeServicer):
    """A handler that takes a while to finish once cancelled."""

    async def Decode(
        self, request: tei_pb2.DecodeRequest, context: CallContext
    ) -> tei_pb2.DecodeResponse:
        if request.ids[0] == 0:
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.sleep(0.05)
        return tei_pb2.DecodeResponse(text="ok")


async def test_a_refused_unary_call_is_made_again(nursery: trio.Nursery) -> None:
    # The server still counts the reset stream while its handler winds down, and
    # refuses the next one: the channel tries again instead of failing the call.
    server = await _serve(nursery, Limits(max_concurrent_streams=1), Lingering())
    decode = tei_grpc.Tokenize.Decode
    async with open_channel("127.0.0.1", server.port) as channel:
        with trio.move_on_after(0.1):
            await channel.unary_unary(decode, tei_pb2.DecodeRequest(ids=[0]))
        reply = await channel.unary_unary(decode, tei_pb2.DecodeRequest(ids=[1]))
    assert reply.text == "ok"


class Firehose(tei_grpc.TokenizeServicer):
    """Answers a DecodeStream call with 1 MiB messages for as long as it may."""

    def __init__(self) -> None:
        self.sent = 0

    async def DecodeStream(  # type: ignore[override]
        self, requests: Any, context: CallContext
    ) -> Any:
        while True:
            yield tei_pb2.DecodeResponse(text="x" * (1 << 20))
            self.sent += 1


async def test_a_peer_that_does_not_read_makes_the_sender_wait(nursery: trio.Nursery) -> None:
    firehose = Firehose()
    server = await _serve(nursery, Limits(max_output_buffer_bytes=1 << 20), firehose)
    client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    client.increment_flow_control_window(2**31 - 1 - 65535)
    client.send_headers(
        1, [*REQUEST[:2], (":path", tei_grpc.Tokenize.DecodeStream.path), *REQUEST[3:]]
    )
    client.send_data(1, framed(tei_pb2.DecodeRequest(ids=[1]).SerializeToString()))
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", server.port))
    async with trio.SocketStream(sock) as stream:
        await stream.send_all(client.data_to_send())
        await trio.sleep(1)  # and never read
        # What the kernel buffers, plus our 1 MiB and the message being queued:
        # a handful of messages, where without the bound it would be hundreds.
        assert firehose.sent < 16
        assert 0 < server.statistics()["queued_output_bytes"] <= 3 << 20


def _h2_pair(limits: Limits) -> tuple[Connection, h2.connection.H2Connection]:
    ours = Connection(client_side=False, max_message_bytes=1 << 20, limits=limits)
    ours.initiate_connection()
    peer = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
    peer.initiate_connection()
    ours.receive_data(peer.data_to_send())
    peer.receive_data(bytes(ours.data_to_send()))
    return ours, peer


def _pump(
    ours: Connection, peer: h2.connection.H2Connection, messages: dict[int, bytes], *, end: bool
) -> tuple[int, list[Any]]:
    """Send each stream's bytes as the windows allow until nothing moves; bytes sent."""
    sent = dict.fromkeys(messages, 0)
    events: list[Any] = []
    moved = True
    while moved:
        moved = False
        for stream_id, message in messages.items():
            room = min(
                peer.local_flow_control_window(stream_id),
                len(message) - sent[stream_id],
                16384,
            )
            if room > 0:
                done = end and sent[stream_id] + room == len(message)
                peer.send_data(stream_id, message[sent[stream_id] :][:room], end_stream=done)
                sent[stream_id] += room
                moved = True
        events += ours.receive_data(peer.data_to_send())
        peer.receive_data(bytes(ours.data_to_send()))
    return sum(sent.values()), events


def test_large_messages_on_two_streams_take_turns() -> None:
    ours, peer = _h2_pair(Limits(stream_receive_window_bytes=65535))
    for stream_id in (1, 3):
        peer.send_headers(stream_id, REQUEST)
    big = {1: framed(b"a" * 500_000), 3: framed(b"b" * 500_000)}
    _, events = _pump(ours, peer, big, end=True)
    received = {e.stream_id: len(e.data) for e in events if isinstance(e, MessageReceived)}
    assert received == {1: 500_000, 3: 500_000}


def test_partial_messages_cannot_park_more_than_the_window_and_one_message() -> None:
    window = 2 * 65535
    limits = Limits(stream_receive_window_bytes=65535, connection_receive_window_bytes=window)
    ours, peer = _h2_pair(limits)
    streams = range(1, 21, 2)
    for stream_id in streams:
        peer.send_headers(stream_id, REQUEST)
    # Ten streams, each the start of a 200 KB message that never ends.
    partial = framed(b"p" * 200_000)[:150_000]
    sent, events = _pump(ours, peer, dict.fromkeys(streams, partial), end=False)
    assert not [e for e in events if isinstance(e, MessageReceived)]
    assert sent <= window + 150_000  # crediting every partial would take 1.5 MB


def test_trailers_for_closed_streams_count_as_empty_frames() -> None:
    raw = Raw(Limits(max_empty_frames=3))
    raw.send(raw.headers(9))
    raw.ours.forget(9)
    for stream_id in (1, 3, 5):
        trailers = HeadersFrame(stream_id, data=raw.encoder.encode([("x", "y")]))
        for flag in ("END_HEADERS", "END_STREAM"):
            trailers.flags.add(flag)
        raw.send(trailers.serialize())
    trailers = HeadersFrame(7, data=raw.encoder.encode([("x", "y")]))
    for flag in ("END_HEADERS", "END_STREAM"):
        trailers.flags.add(flag)
    fails_with(ErrorCode.ENHANCE_YOUR_CALM, raw, trailers.serialize())


async def test_an_unknown_methods_long_path_is_not_echoed(nursery: trio.Nursery) -> None:
    server = await _serve(nursery, DEFAULT_LIMITS)
    spec = MethodSpec(
        "pkg.Service",
        "M" * 6000,
        Cardinality.UNARY_UNARY,
        tei_pb2.DecodeRequest,
        tei_pb2.DecodeResponse,
    )
    async with open_channel("127.0.0.1", server.port) as channel:
        with pytest.raises(GrpcError) as info:
            await channel.unary_unary(spec, tei_pb2.DecodeRequest(ids=[1]))
    assert info.value.code == StatusCode.UNIMPLEMENTED
    assert len(info.value.message) < 2 * CLIENT_TEXT_CHARS + 60


async def test_a_peer_that_does_not_read_its_answers_stops_being_read(
    nursery: trio.Nursery,
) -> None:
    # PINGs answered with PING ACKs the client never reads (floods other than the
    # backlog itself are let through here).
    limits = Limits(
        max_output_buffer_bytes=1 << 16,
        max_ping_strikes=10**9,
        max_queued_control_frames=10**9,
    )
    server = await _serve(nursery, limits)
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", server.port))
    pings = PingFrame(0, opaque_data=b"12345678").serialize() * 4000  # 68 KB
    sent = 0
    async with trio.SocketStream(sock) as stream:
        await stream.send_all(PREFACE + SettingsFrame(0).serialize())
        with trio.move_on_after(2):
            while sent < 200 << 20:
                await stream.send_all(pings)
                sent += len(pings)
        # The server stopped reading: the client's writes stalled far short of
        # 200 MB, and what waits for it is one read's answers over the bound.
        assert sent < 100 << 20
        assert server.statistics()["queued_output_bytes"] <= (1 << 16) + (1 << 18) + len(pings)
