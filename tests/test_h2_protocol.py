"""The sans-IO HTTP/2 + gRPC layer against the ``h2`` package as an independent peer.

Our server side talks to an h2 client connection and our client side to an h2
server connection, in memory; where h2 would refuse to misbehave, raw frames are
built with ``hyperframe`` and ``hpack``.
"""

from __future__ import annotations

import base64
import itertools
import struct
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import trio
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PriorityFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.grpc._grpc_events import (
    ConnectionTerminated,
    MessageReceived,
    MessageRejected,
    RequestEnded,
    RequestReceived,
    ResponseEnded,
    ResponseReceived,
    StreamReset,
    WindowUpdated,
)
from tei_manager.grpc._grpc_headers import format_timeout, parse_timeout
from tei_manager.grpc._hpack import HeaderDecodeError, HeaderDecoder, encode_headers
from tei_manager.grpc._http2_frames import PREFACE, ErrorCode, ProtocolError, StreamClosedError
from tei_manager.grpc._protocol import Connection
from tei_manager.grpc.calls import CallContext
from tei_manager.grpc.channel import open_channel
from tei_manager.grpc.limits import DEFAULT_LIMITS, Limits
from tei_manager.grpc.rpc import GrpcError, StatusCode
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


def framed(message: bytes, *, compressed: bool = False) -> bytes:
    return struct.pack(">BL", int(compressed), len(message)) + message


def exchange(ours: Connection, peer: h2.connection.H2Connection) -> tuple[list[Any], list[Any]]:
    """Move bytes both ways until neither side has anything to send."""
    our_events: list[Any] = []
    peer_events: list[Any] = []
    while True:
        mine = bytes(ours.data_to_send())
        theirs = peer.data_to_send()
        if not mine and not theirs:
            return our_events, peer_events
        if mine:
            peer_events += peer.receive_data(mine)
        if theirs:
            our_events += ours.receive_data(theirs)


def of(kind: type, events: list[Any]) -> list[Any]:
    return [event for event in events if isinstance(event, kind)]


def server_pair(**kwargs: Any) -> tuple[Connection, h2.connection.H2Connection]:
    ours = Connection(
        client_side=False,
        max_message_bytes=kwargs.pop("max_message_bytes", 4096),
        limits=kwargs.pop("limits", DEFAULT_LIMITS),
    )
    ours.initiate_connection()
    peer = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8", **kwargs)
    )
    peer.initiate_connection()
    exchange(ours, peer)
    return ours, peer


def client_pair(**kwargs: Any) -> tuple[Connection, h2.connection.H2Connection]:
    ours = Connection(client_side=True, max_message_bytes=kwargs.pop("max_message_bytes", 4096))
    ours.initiate_connection()
    peer = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8", **kwargs)
    )
    peer.initiate_connection()
    exchange(ours, peer)
    return ours, peer


class RawClient:
    """Frames written by hand to our server, for what h2 will not send."""

    def __init__(self, *, acknowledge: bool = True, **kwargs: Any) -> None:
        self.ours = Connection(client_side=False, **{"max_message_bytes": 4096, **kwargs})
        self.ours.initiate_connection()
        self.ours.data_to_send()
        self.encoder = Encoder()
        start = PREFACE + SettingsFrame(0).serialize()
        if acknowledge:  # our SETTINGS
            start += SettingsFrame(0, flags=["ACK"]).serialize()
        self.ours.receive_data(start)
        self.ours.data_to_send()

    def headers(self, stream_id: int, headers: list[tuple[str, str]], **kwargs: Any) -> bytes:
        frame = HeadersFrame(stream_id, data=self.encoder.encode(headers), **kwargs)
        frame.flags.add("END_HEADERS")
        return bytes(frame.serialize())

    def send(self, data: bytes) -> list[Any]:
        return self.ours.receive_data(data)

    def sent_frames(self) -> bytes:
        return bytes(self.ours.data_to_send())


# -- our server, h2 client ----------------------------------------------------------------
def test_unary_call_round_trip() -> None:
    ours, peer = server_pair()
    metadata = [("x-request-id", "r-1"), ("trace-bin", base64.b64encode(b"\x00\xff").decode())]
    peer.send_headers(1, [*REQUEST, ("grpc-timeout", "250m"), *metadata])
    peer.send_data(1, framed(b"hello"), end_stream=True)
    events, _ = exchange(ours, peer)
    request, message, ended = events
    assert isinstance(request, RequestReceived)
    assert (request.path, request.service_name, request.method_name) == (
        PATH,
        "pkg.Service",
        "Method",
    )
    assert request.timeout == pytest.approx(0.25)
    assert request.custom_metadata == (("x-request-id", "r-1"), ("trace-bin", b"\x00\xff"))
    assert isinstance(message, MessageReceived) and message.data == b"hello"
    assert message.flow_controlled_length == 10
    assert isinstance(ended, RequestEnded)

    ours.start_response(1, [("x-answer", "yes")])
    ours.h2_connection.send_data(1, framed(b"world"))
    ours.end_response(1, StatusCode.NOT_FOUND, "no such thing: 100%\n", [("x-extra", "1")])
    _, peer_events = exchange(ours, peer)
    (response,) = of(h2.events.ResponseReceived, peer_events)
    assert dict(response.headers)[":status"] == "200"
    assert ("x-answer", "yes") in response.headers
    (data,) = of(h2.events.DataReceived, peer_events)
    assert data.data == framed(b"world")
    (trailers,) = of(h2.events.TrailersReceived, peer_events)
    fields = dict(trailers.headers)
    assert fields["grpc-status"] == "5"
    assert fields["grpc-message"] == "no such thing: 100%25%0A"
    assert fields["x-extra"] == "1"
    assert of(h2.events.StreamEnded, peer_events)
    assert not ours.h2_connection.is_open(1)


def test_trailers_only_answer() -> None:
    ours, peer = server_pair()
    peer.send_headers(1, REQUEST)
    peer.send_data(1, framed(b""), end_stream=True)
    exchange(ours, peer)
    ours.respond_status(1, StatusCode.UNIMPLEMENTED, "method /a/b is not implemented")
    _, peer_events = exchange(ours, peer)
    (response,) = of(h2.events.ResponseReceived, peer_events)
    fields = dict(response.headers)
    assert fields[":status"] == "200" and fields["grpc-status"] == "12"
    assert fields["grpc-message"] == "method /a/b is not implemented"
    assert of(h2.events.StreamEnded, peer_events)


def test_messages_split_across_frames_and_many_per_frame() -> None:
    ours, peer = server_pair(max_message_bytes=100_000)
    peer.send_headers(1, REQUEST)
    payload = framed(b"a" * 30_000) + framed(b"") + framed(b"bc")
    # h2 sends frames of at most 16384 bytes: the first message spans two.
    peer.send_data(1, payload[:16384])
    peer.send_data(1, payload[16384:], end_stream=True)
    events, _ = exchange(ours, peer)
    assert [e.data for e in of(MessageReceived, events)] == [b"a" * 30_000, b"", b"bc"]
    assert sum(e.flow_controlled_length for e in of(MessageReceived, events)) == len(payload)
    assert isinstance(events[-1], RequestEnded)


def test_padding_is_removed_and_credited_at_once() -> None:
    # A stream window of 100: credit goes back in batches of 50.
    ours, peer = server_pair(max_message_bytes=50, limits=Limits(stream_receive_window_bytes=100))
    peer.send_headers(1, REQUEST)
    assert peer.local_flow_control_window(1) == 100
    peer.send_data(1, framed(b"padded"), pad_length=60)  # 11 + 1 + 60 flow-controlled
    events, _ = exchange(ours, peer)
    (message,) = of(MessageReceived, events)
    assert message.data == b"padded"
    assert message.flow_controlled_length == 11
    # The padding was credited back at once; the message waits until it is consumed.
    assert peer.local_flow_control_window(1) == 100 - 11
    ours.h2_connection.acknowledge_received_data(1, message.flow_controlled_length)
    exchange(ours, peer)
    assert peer.local_flow_control_window(1) == 100 - 11  # under half a window: batched


def test_padded_headers_with_priority_and_continuation() -> None:
    raw = RawClient()
    block = raw.encoder.encode([*REQUEST, ("x-long", "v" * 3000)])
    first = HeadersFrame(1, data=block[:1000], pad_length=7)
    first.flags.add("PADDED")
    first.flags.add("PRIORITY")
    middle = ContinuationFrame(1, data=block[1000:2000])
    last = ContinuationFrame(1, data=block[2000:])
    last.flags.add("END_HEADERS")
    events = raw.send(first.serialize() + middle.serialize() + last.serialize())
    (request,) = events
    assert isinstance(request, RequestReceived)
    assert request.custom_metadata == (("x-long", "v" * 3000),)


def test_frames_between_continuations_are_a_protocol_error() -> None:
    raw = RawClient()
    block = raw.encoder.encode(REQUEST)
    first = HeadersFrame(1, data=block[:5])
    with pytest.raises(ProtocolError) as info:
        raw.send(first.serialize() + PriorityFrame(3).serialize())
    assert info.value.code == ErrorCode.PROTOCOL_ERROR
    assert raw.sent_frames()[3] == 0x7  # a GOAWAY was queued


def test_priority_and_unknown_frames_are_ignored() -> None:
    raw = RawClient()
    unknown = struct.pack(">BHBBL", 0, 8, 0x42, 0, 1) + b"whatever"
    events = raw.send(PriorityFrame(1).serialize() + unknown)
    assert events == []
    assert raw.send(raw.headers(1, REQUEST))


def test_window_update_on_closed_stream_is_ignored_on_idle_stream_an_error() -> None:
    ours, peer = server_pair()
    peer.send_headers(1, REQUEST)
    peer.send_data(1, framed(b"x"), end_stream=True)
    exchange(ours, peer)
    ours.respond_status(1, StatusCode.OK)
    exchange(ours, peer)
    assert ours.receive_data(WindowUpdateFrame(1, window_increment=1000).serialize()) == []
    with pytest.raises(ProtocolError):
        ours.receive_data(WindowUpdateFrame(9, window_increment=1000).serialize())


def test_send_window_follows_window_updates_and_settings() -> None:
    ours, peer = server_pair()
    h2c = ours.h2_connection
    peer.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    peer.send_headers(1, REQUEST)
    peer.send_data(1, framed(b"x"), end_stream=True)
    events, _ = exchange(ours, peer)
    assert of(WindowUpdated, events)  # the settings change
    ours.start_response(1)
    payload = framed(b"z" * 5000)
    sent = h2c.send_data(1, payload)
    assert sent == 1000 and h2c.send_data(1, payload, sent) == 0
    _, peer_events = exchange(ours, peer)
    received = sum(len(e.data) for e in of(h2.events.DataReceived, peer_events))
    assert received == 1000
    peer.acknowledge_received_data(1000, 1)
    # h2 credits the stream back in its own batches; ask it to open the window now.
    peer.increment_flow_control_window(3000, stream_id=1)
    events, _ = exchange(ours, peer)
    assert {e.stream_id for e in of(WindowUpdated, events)} >= {1}
    assert h2c.send_window_for(1) == 4000
    sent += h2c.send_data(1, payload, sent)
    assert sent == 5000
    # A larger INITIAL_WINDOW_SIZE grows open streams' windows by the difference.
    peer.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 11000})
    exchange(ours, peer)
    assert h2c.send_window_for(1) == 10000
    h2c.send_data(1, payload, sent)
    ours.end_response(1, StatusCode.OK)
    _, peer_events = exchange(ours, peer)
    assert of(h2.events.StreamEnded, peer_events)


def test_data_frames_respect_the_peers_max_frame_size() -> None:
    ours, peer = server_pair(max_message_bytes=100_000)
    peer.increment_flow_control_window(200_000)
    peer.send_headers(1, REQUEST)
    peer.send_data(1, framed(b""), end_stream=True)
    peer.increment_flow_control_window(200_000, stream_id=1)
    exchange(ours, peer)
    ours.start_response(1)
    payload = framed(b"q" * 50_000)
    assert ours.h2_connection.send_data(1, payload) == len(payload)
    # h2 raises FrameTooLargeError for a frame over its 16384-byte default.
    _, peer_events = exchange(ours, peer)
    chunks = [e.data for e in of(h2.events.DataReceived, peer_events)]
    assert len(chunks) == 4 and b"".join(chunks) == payload


def test_ping_is_answered() -> None:
    ours, peer = server_pair()
    peer.ping(b"12345678")
    _, peer_events = exchange(ours, peer)
    (ack,) = of(h2.events.PingAckReceived, peer_events)
    assert ack.ping_data == b"12345678"


def test_goaway_both_ways() -> None:
    ours, peer = server_pair()
    peer.send_headers(1, REQUEST)
    exchange(ours, peer)
    ours.h2_connection.close_connection()
    _, peer_events = exchange(ours, peer)
    (terminated,) = of(h2.events.ConnectionTerminated, peer_events)
    assert terminated.last_stream_id == 1 and terminated.error_code == 0

    ours, peer = server_pair()
    peer.close_connection(error_code=0, last_stream_id=0)
    events, _ = exchange(ours, peer)
    (goaway,) = of(ConnectionTerminated, events)
    assert (goaway.error_code, goaway.last_stream_id) == (0, 0)


def test_rst_stream_both_ways() -> None:
    ours, peer = server_pair()
    peer.send_headers(1, REQUEST)
    peer.send_headers(3, REQUEST)
    exchange(ours, peer)
    peer.reset_stream(1, error_code=8)
    events, _ = exchange(ours, peer)
    (reset,) = of(StreamReset, events)
    assert (reset.stream_id, reset.error_code) == (1, ErrorCode.CANCEL)
    ours.h2_connection.reset_stream(3, ErrorCode.REFUSED_STREAM)
    _, peer_events = exchange(ours, peer)
    (theirs,) = of(h2.events.StreamReset, peer_events)
    assert (theirs.stream_id, theirs.error_code) == (3, ErrorCode.REFUSED_STREAM)
    # Frames still in flight for a reset stream are ignored.
    peer_data = DataFrame(1, data=framed(b"late")).serialize()
    assert ours.receive_data(peer_data) == []


def test_oversized_message_fails_only_its_stream_and_returns_credit() -> None:
    ours, peer = server_pair(max_message_bytes=1024)
    window = peer.outbound_flow_control_window
    peer.send_headers(1, REQUEST)
    peer.send_data(1, framed(b"x" * 1500)[:1000])
    events, _ = exchange(ours, peer)
    (rejected,) = of(MessageRejected, events)
    assert rejected.status == StatusCode.RESOURCE_EXHAUSTED and "1024" in rejected.message
    peer.send_data(1, framed(b"x" * 1500)[1000:], end_stream=True)
    events, _ = exchange(ours, peer)
    assert events == []  # the rest is discarded, the end of the request too
    # All of it was credited back to the connection (in one batch, once large enough).
    h2c = ours.h2_connection
    assert h2c.recv_window + h2c._recv_credit == DEFAULT_LIMITS.connection_receive_window_bytes
    ours.respond_status(1, StatusCode.RESOURCE_EXHAUSTED, rejected.message)
    ours.forget(1)
    # The next call on the connection is fine.
    peer.send_headers(3, REQUEST)
    peer.send_data(3, framed(b"ok"), end_stream=True)
    events, _ = exchange(ours, peer)
    assert [e.data for e in of(MessageReceived, events)] == [b"ok"]
    assert peer.outbound_flow_control_window >= window - 2000


def test_compressed_message_is_unimplemented() -> None:
    ours, peer = server_pair()
    peer.send_headers(1, [*REQUEST, ("grpc-encoding", "gzip")])
    peer.send_data(1, framed(b"\x1f\x8b", compressed=True), end_stream=True)
    events, _ = exchange(ours, peer)
    (rejected,) = of(MessageRejected, events)
    assert rejected.status == StatusCode.UNIMPLEMENTED and "gzip" in rejected.message
    assert not of(RequestEnded, events)


def test_max_concurrent_streams_refuses_the_extra_stream() -> None:
    raw = RawClient(limits=Limits(max_concurrent_streams=1))
    assert raw.send(raw.headers(1, REQUEST))
    assert raw.send(raw.headers(3, REQUEST)) == []
    frames = raw.sent_frames()
    assert frames[3] == 0x3 and struct.unpack(">L", frames[9:13])[0] == ErrorCode.REFUSED_STREAM
    # Once the application is done with the first stream, a new one is accepted.
    raw.ours.forget(1)
    assert of(RequestReceived, raw.send(raw.headers(5, REQUEST)))


def test_streams_opened_after_our_goaway_are_refused() -> None:
    raw = RawClient()
    assert raw.send(raw.headers(1, REQUEST))
    raw.ours.h2_connection.close_connection()
    raw.sent_frames()
    assert raw.send(raw.headers(3, REQUEST)) == []
    frames = raw.sent_frames()
    assert frames[3] == 0x3 and struct.unpack(">L", frames[9:13])[0] == ErrorCode.REFUSED_STREAM


def test_data_after_end_stream_resets_the_stream() -> None:
    raw = RawClient()
    raw.send(raw.headers(1, REQUEST))
    end = DataFrame(1, data=framed(b"a"))
    end.flags.add("END_STREAM")
    events = raw.send(end.serialize())
    assert isinstance(events[-1], RequestEnded)
    (reset,) = of(StreamReset, raw.send(DataFrame(1, data=b"more").serialize()))
    assert reset.error_code == ErrorCode.STREAM_CLOSED


def test_header_list_over_the_limit_refuses_the_stream_not_the_connection() -> None:
    raw = RawClient()
    headers = [*REQUEST, ("x-big", "b" * 9000)]
    assert raw.send(raw.headers(1, headers)) == []
    frames = raw.sent_frames()
    assert frames[3] == 0x3
    assert struct.unpack(">L", frames[9:13])[0] == ErrorCode.ENHANCE_YOUR_CALM
    assert of(RequestReceived, raw.send(raw.headers(3, REQUEST)))


@pytest.mark.parametrize(
    "header",
    [
        ("", "x"),  # it took the server down (IndexError)
        ("X-Upper", "x"),
        ("bad name", "x"),
        ("connection", "keep-alive"),
        ("transfer-encoding", "chunked"),
        ("te", "gzip"),
        (":unknown", "x"),
    ],
)
def test_malformed_request_headers_reset_only_their_stream(header: tuple[str, str]) -> None:
    """RFC 9113 §8.2.1, §8.2.2, §8.3: malformed, so a stream PROTOCOL_ERROR (§8.1.1)."""
    raw = RawClient()
    assert raw.send(raw.headers(1, [*REQUEST, header], flags=["END_STREAM"])) == []
    frames = raw.sent_frames()
    assert (frames[3], struct.unpack(">L", frames[5:9])[0]) == (0x3, 1)  # RST_STREAM, stream 1
    assert struct.unpack(">L", frames[9:13])[0] == ErrorCode.PROTOCOL_ERROR
    assert of(RequestReceived, raw.send(raw.headers(3, REQUEST)))


_METHOD, _SCHEME, _PATH, _AUTHORITY, *_REGULAR = REQUEST


@pytest.mark.parametrize(
    "headers",
    [
        # A pseudo-header after a regular field.
        [_METHOD, _SCHEME, _PATH, *_REGULAR, _AUTHORITY],
        # The same pseudo-header twice, the same value or not.
        [_METHOD, _SCHEME, _PATH, _PATH, _AUTHORITY, *_REGULAR],
        [_METHOD, _METHOD, _SCHEME, _PATH, _AUTHORITY, *_REGULAR],
        [_METHOD, _SCHEME, (":scheme", "https"), _PATH, *_REGULAR],
        [_METHOD, _SCHEME, _PATH, _AUTHORITY, _AUTHORITY, *_REGULAR],
        # A response's pseudo-header in a request.
        [(":status", "200"), _METHOD, _SCHEME, _PATH, *_REGULAR],
        # A request (not CONNECT) without :method, :scheme or :path, or an empty :path.
        [_SCHEME, _PATH, _AUTHORITY, *_REGULAR],
        [_METHOD, _PATH, _AUTHORITY, *_REGULAR],
        [_METHOD, _SCHEME, _AUTHORITY, *_REGULAR],
        [_METHOD, _SCHEME, (":path", ""), _AUTHORITY, *_REGULAR],
        # CONNECT (§8.5) has :authority and no :scheme or :path.
        [(":method", "CONNECT"), _SCHEME, _PATH, _AUTHORITY, *_REGULAR],
        [(":method", "CONNECT"), *_REGULAR],
    ],
)
def test_malformed_pseudo_headers_reset_only_their_stream(headers: list[tuple[str, str]]) -> None:
    """RFC 9113 §8.3 and §8.3.1: malformed, so a stream PROTOCOL_ERROR (§8.1.1)."""
    raw = RawClient()
    assert raw.send(raw.headers(1, headers, flags=["END_STREAM"])) == []
    frames = raw.sent_frames()
    assert (frames[3], struct.unpack(">L", frames[5:9])[0]) == (0x3, 1)  # RST_STREAM, stream 1
    assert struct.unpack(">L", frames[9:13])[0] == ErrorCode.PROTOCOL_ERROR
    assert raw.ours.h2_connection.held_streams == 0  # it holds no place
    assert of(RequestReceived, raw.send(raw.headers(3, REQUEST)))


def test_a_well_formed_connect_is_refused_not_reset() -> None:
    raw = RawClient()
    headers = [(":method", "CONNECT"), _AUTHORITY, *_REGULAR]
    assert raw.send(raw.headers(1, headers, flags=["END_STREAM"])) == []
    frames = raw.sent_frames()
    assert frames[3] == 0x1  # HEADERS: answered, UNIMPLEMENTED (not POST)
    assert b"CONNECT" in frames


def test_pseudo_headers_in_request_trailers_fail_the_call() -> None:
    raw = RawClient()
    assert of(RequestReceived, raw.send(raw.headers(1, REQUEST)))
    trailers = raw.headers(1, [("x-trailer", "a"), (":path", PATH)], flags=["END_STREAM"])
    (rejected,) = of(MessageRejected, raw.send(trailers))
    assert rejected.stream_id == 1
    frames = raw.sent_frames()
    assert frames[3] == 0x3 and struct.unpack(">L", frames[9:13])[0] == ErrorCode.PROTOCOL_ERROR


def test_valid_custom_metadata_names_pass() -> None:
    raw = RawClient()
    headers = [*REQUEST, ("x-trace_id.1~", "a"), ("grpc-accept-encoding", "identity")]
    (request,) = of(RequestReceived, raw.send(raw.headers(1, headers)))
    assert request.custom_metadata == (("x-trace_id.1~", "a"),)


@pytest.mark.parametrize(
    "header",
    [("", "x"), ("X-Upper", "x"), (":path", "/a/b"), (":status", "200")],  # last: after regular
)
def test_malformed_response_headers_fail_the_call(header: tuple[str, str]) -> None:
    ours, peer = client_pair(validate_outbound_headers=False, normalize_outbound_headers=False)
    ours.start_request(1, "http", PATH, "a")
    ours.start_request(3, "http", PATH, "a")
    exchange(ours, peer)
    ok = [(":status", "200"), ("content-type", "application/grpc")]
    peer.send_headers(1, [*ok, header])
    peer.send_headers(3, [*ok, ("grpc-status", "0")], end_stream=True)
    events, peer_events = exchange(ours, peer)
    (failed,) = of(MessageRejected, events)
    assert (failed.stream_id, failed.status) == (1, StatusCode.INTERNAL)
    (reset,) = of(h2.events.StreamReset, peer_events)
    assert (reset.stream_id, reset.error_code) == (1, ErrorCode.PROTOCOL_ERROR)
    (ended,) = of(ResponseEnded, events)
    assert (ended.stream_id, ended.status) == (3, StatusCode.OK)


def test_a_status_pseudo_header_in_response_trailers_fails_the_call() -> None:
    ours, peer = client_pair(validate_outbound_headers=False, normalize_outbound_headers=False)
    ours.start_request(1, "http", PATH, "a")
    exchange(ours, peer)
    peer.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    peer.send_headers(1, [(":status", "200"), ("grpc-status", "0")], end_stream=True)
    events, _ = exchange(ours, peer)
    (failed,) = of(MessageRejected, events)
    assert (failed.stream_id, failed.status) == (1, StatusCode.INTERNAL)
    assert not of(ResponseEnded, events)


def test_request_that_is_not_grpc_gets_415() -> None:
    ours, peer = server_pair()
    peer.send_headers(1, [*REQUEST[:-1], ("content-type", "text/plain")], end_stream=True)
    events, peer_events = exchange(ours, peer)
    assert events == []
    (response,) = of(h2.events.ResponseReceived, peer_events)
    assert dict(response.headers)[":status"] == "415"


def test_malformed_timeout_is_answered_by_the_protocol_layer() -> None:
    ours, peer = server_pair()
    peer.send_headers(1, [*REQUEST, ("grpc-timeout", "12x")], end_stream=True)
    events, peer_events = exchange(ours, peer)
    assert events == []
    (response,) = of(h2.events.ResponseReceived, peer_events)
    assert dict(response.headers)["grpc-status"] == str(int(StatusCode.INTERNAL))


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ErrorCode.PROTOCOL_ERROR),
        (PREFACE + PriorityFrame(1).serialize(), ErrorCode.PROTOCOL_ERROR),  # not SETTINGS
    ],
)
def test_bad_start_is_a_connection_error(data: bytes, code: ErrorCode) -> None:
    ours = Connection(client_side=False, max_message_bytes=1024)
    ours.initiate_connection()
    with pytest.raises(ProtocolError) as info:
        ours.receive_data(data)
    assert info.value.code == code


def test_frame_over_our_max_frame_size_and_flow_control_violation() -> None:
    raw = RawClient()
    header = struct.pack(">BHBBL", 0xFF, 0xFFFF, 0, 0, 1) + b"\x00" * 16
    # A 2^24-1 byte frame is allowed; one byte more cannot even be expressed, so
    # shrink what we accept to see the check.
    raw.ours.h2_connection.local_max_frame_size = 16384
    with pytest.raises(ProtocolError) as info:
        raw.send(header)
    assert info.value.code == ErrorCode.FRAME_SIZE_ERROR

    raw = RawClient(max_message_bytes=1024)  # stream window 2048
    raw.send(raw.headers(1, REQUEST))
    with pytest.raises(ProtocolError) as info:
        raw.ours.h2_connection.recv_window = 100
        raw.send(DataFrame(1, data=b"y" * 200).serialize())
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR


def test_stream_flow_control_violation_resets_only_the_stream() -> None:
    raw = RawClient(max_message_bytes=1024, limits=Limits(stream_receive_window_bytes=2048))
    raw.send(raw.headers(1, REQUEST))
    events = raw.send(DataFrame(1, data=b"y" * 3000).serialize())
    (reset,) = of(StreamReset, events)
    assert reset.error_code == ErrorCode.FLOW_CONTROL_ERROR
    assert of(RequestReceived, raw.send(raw.headers(3, REQUEST)))


def test_a_smaller_stream_window_applies_once_our_settings_are_acknowledged() -> None:
    # RFC 9113 §6.9.3: until then the peer may still use the default 65535.
    raw = RawClient(
        acknowledge=False, max_message_bytes=1024, limits=Limits(stream_receive_window_bytes=2048)
    )
    raw.send(raw.headers(1, REQUEST))
    three = DataFrame(1, data=framed(b"m" * 1000) * 3).serialize()  # 3015 bytes, unread
    assert len(of(MessageReceived, raw.send(three))) == 3
    raw.send(SettingsFrame(0, flags=["ACK"]).serialize())
    # 65535 - 3015 - (65535 - 2048): the window is now negative, so any data is too much.
    (reset,) = of(StreamReset, raw.send(DataFrame(1, data=b"y").serialize()))
    assert reset.error_code == ErrorCode.FLOW_CONTROL_ERROR


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 3000), min_size=1, max_size=30))
def test_any_split_of_the_byte_stream_gives_the_same_events(steps: list[int]) -> None:
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    client.initiate_connection()
    client.send_headers(1, [*REQUEST, ("x-id", "1")])
    first = framed(b"m" * 20_000) + framed(b"n")
    client.send_data(1, first[:16_000])
    client.send_data(1, first[16_000:])
    client.send_data(1, framed(b"o" * 7), end_stream=True, pad_length=9)
    client.ping(b"pingpong")
    client.send_headers(3, REQUEST, end_stream=True)
    data = client.data_to_send()
    ours = Connection(client_side=False, max_message_bytes=100_000)
    events: list[Any] = []
    pos = 0
    for step in itertools.cycle(steps):
        if pos >= len(data):
            break
        events += ours.receive_data(data[pos : pos + step])
        pos += step
    summary = [
        (type(e).__name__, getattr(e, "stream_id", 0), getattr(e, "data", b"")[:3]) for e in events
    ]
    assert summary == [
        ("RequestReceived", 1, b""),
        ("MessageReceived", 1, b"mmm"),
        ("MessageReceived", 1, b"n"),
        ("MessageReceived", 1, b"ooo"),
        ("RequestEnded", 1, b""),
        ("RequestReceived", 3, b""),
        ("RequestEnded", 3, b""),
    ]
    assert b"pingpong" in ours.data_to_send()


# -- our client, h2 server ----------------------------------------------------------------
def test_client_call_round_trip_with_dynamic_table_and_huffman() -> None:
    ours, peer = client_pair()
    for stream_id in (1, 3, 5):  # h2's encoder indexes: later blocks use its table
        ours.start_request(
            stream_id,
            "http",
            PATH,
            "example:50051",
            timeout=1.5,
            metadata=[("x-id", str(stream_id)), ("blob-bin", b"\x01\x02\x03")],
        )
        ours.h2_connection.send_data(stream_id, framed(b"ask"))
        ours.end_request(stream_id)
        _, peer_events = exchange(ours, peer)
        (request,) = of(h2.events.RequestReceived, peer_events)
        fields = dict(request.headers)
        assert fields[":path"] == PATH and fields[":method"] == "POST"
        assert fields["te"] == "trailers" and fields["grpc-timeout"] == "1500000u"
        assert fields["content-type"].startswith("application/grpc")
        assert fields["blob-bin"] == "AQID" and fields["x-id"] == str(stream_id)
        assert of(h2.events.DataReceived, peer_events)[0].data == framed(b"ask")

        peer.send_headers(
            stream_id,
            [(":status", "200"), ("content-type", "application/grpc"), ("x-h", "v")],
        )
        peer.send_data(stream_id, framed(b"answer"))
        peer.send_headers(
            stream_id,
            [("grpc-status", "0"), ("grpc-message", "all%20good"), ("x-t", "t")],
            end_stream=True,
        )
        events, _ = exchange(ours, peer)
        response, message, ended = events
        assert isinstance(response, ResponseReceived)
        assert response.custom_metadata == (("x-h", "v"),)
        assert isinstance(message, MessageReceived) and message.data == b"answer"
        assert isinstance(ended, ResponseEnded)
        assert (ended.status, ended.status_message) == (0, "all good")
        assert ended.custom_metadata == (("x-t", "t"),)
        assert not ours.h2_connection.is_open(stream_id)


def test_client_trailers_only_and_http_errors() -> None:
    ours, peer = client_pair()
    ours.start_request(1, "http", PATH, "a")
    ours.start_request(3, "http", PATH, "a")
    exchange(ours, peer)
    peer.send_headers(
        1,
        [
            (":status", "200"),
            ("content-type", "application/grpc"),
            ("grpc-status", "8"),
            ("grpc-message", "too much"),
            ("x-why", "limits"),
        ],
        end_stream=True,
    )
    peer.send_headers(3, [(":status", "503")], end_stream=True)
    events, _ = exchange(ours, peer)
    (ended,) = of(ResponseEnded, events)
    assert (ended.stream_id, ended.status, ended.status_message) == (1, 8, "too much")
    assert ended.custom_metadata == (("x-why", "limits"),)
    (failed,) = of(MessageRejected, events)
    assert (failed.stream_id, failed.status) == (3, StatusCode.UNAVAILABLE)


def test_client_respects_peer_window_frame_size_and_stream_limit() -> None:
    ours, peer = client_pair()
    peer.update_settings(
        {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1,
            h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0,
        }
    )
    exchange(ours, peer)
    h2c = ours.h2_connection
    assert h2c.can_open_stream()
    ours.start_request(1, "http", PATH, "a")
    assert not h2c.can_open_stream()
    payload = framed(b"r" * 500)
    sent = h2c.send_data(1, payload)
    assert sent == 100
    _, peer_events = exchange(ours, peer)
    assert of(h2.events.RequestReceived, peer_events)  # our blocks decode at table size 0
    peer.acknowledge_received_data(100, 1)
    peer.increment_flow_control_window(1000, stream_id=1)
    events, _ = exchange(ours, peer)
    assert of(WindowUpdated, events)
    assert h2c.send_data(1, payload, sent) == 405


def test_end_stream_rides_on_the_last_data_frame_only_when_all_data_went() -> None:
    ours, peer = client_pair()
    peer.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
    exchange(ours, peer)
    h2c = ours.h2_connection
    ours.start_request(1, "http", PATH, "a")
    short = framed(b"s" * 500)
    assert h2c.send_data(1, short, end_stream=True) == 100  # the window cut it short
    ours.start_request(3, "http", PATH, "a")
    whole = framed(b"w" * 50)
    assert h2c.send_data(3, whole, end_stream=True) == len(whole)
    _, peer_events = exchange(ours, peer)
    data = {e.stream_id: e for e in of(h2.events.DataReceived, peer_events)}
    assert data[1].stream_ended is None and data[3].stream_ended is not None
    assert [e.stream_id for e in of(h2.events.StreamEnded, peer_events)] == [3]
    assert h2c.send_window_for(1) == 0  # still open for sending
    with pytest.raises(StreamClosedError):
        h2c.send_window_for(3)


def test_client_ignores_window_update_after_the_call_and_rejects_push() -> None:
    ours, peer = client_pair()
    ours.start_request(1, "http", PATH, "a")
    ours.end_request(1)
    exchange(ours, peer)
    peer.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    peer.send_headers(1, [("grpc-status", "0")], end_stream=True)
    exchange(ours, peer)
    assert ours.receive_data(WindowUpdateFrame(1, window_increment=5).serialize()) == []
    push = struct.pack(">BHBBL", 0, 4, 0x5, 0x4, 1) + struct.pack(">L", 2)
    with pytest.raises(ProtocolError):
        ours.receive_data(push)


# -- over loopback ------------------------------------------------------------------------
class Echo(tei_grpc.TokenizeServicer):
    async def Decode(
        self, request: tei_pb2.DecodeRequest, context: CallContext
    ) -> tei_pb2.DecodeResponse:
        return tei_pb2.DecodeResponse(text=str(len(request.ids)))


async def test_client_blocked_on_flow_control_gets_the_servers_early_status(
    nursery: trio.Nursery,
) -> None:
    """The server answers an oversized request at once and resets with NO_ERROR ("stop
    sending"), while the client still waits for window: the call ends with the status."""
    server = GrpcServer([Echo()], max_message_bytes=1024)  # a stream window of 2048
    port = await nursery.start(server.run)
    async with open_channel("127.0.0.1", port) as channel:
        method = tei_grpc.Tokenize.Decode
        big = tei_pb2.DecodeRequest(ids=list(range(50_000)))
        with pytest.raises(GrpcError) as info, trio.fail_after(5):
            await channel.unary_unary(method, big)
        assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert "1024" in info.value.message
        reply = await channel.unary_unary(method, tei_pb2.DecodeRequest(ids=[1, 2]))
    assert reply.text == "2"


# -- pieces -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1H", 3600), ("2M", 120), ("3S", 3), ("4m", 0.004), ("5u", 5e-6), ("6n", 6e-9)],
)
def test_parse_timeout_units(text: str, seconds: float) -> None:
    assert parse_timeout(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "S", "1", "1x", "123456789S", "-1S", "\u0661S"])
def test_parse_timeout_rejects(text: str) -> None:
    assert parse_timeout(text) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "1u"), (0.25, "250000u"), (99.0, "99000000u"), (300.0, "300000m"), (1e9, "16666667M")],
)
def test_format_timeout_fits_eight_digits(seconds: float, text: str) -> None:
    assert format_timeout(seconds) == text
    parsed = parse_timeout(text)
    assert parsed is not None and parsed >= seconds


def test_stateless_encoding_round_trips_through_hpack() -> None:
    headers = [
        (":status", "200"),
        (":method", "POST"),
        ("content-type", "application/grpc+proto"),
        ("grpc-status", "0"),
        ("x-custom", "ü"),
        ("a" * 200, "b" * 300),
    ]
    block = encode_headers(headers)
    assert block[0] == 0x88  # ":status 200" is static index 8
    decoded, size = HeaderDecoder(65536).decode(block)
    assert decoded == headers
    assert size == sum(len(name) + len(value) + 32 for name, value in headers)
    import hpack

    assert [(n, v) for n, v in hpack.Decoder().decode(block)] == headers


_header_names = st.sampled_from(
    [":path", ":authority", "user-agent", "grpc-timeout", "x-a", "x-b", "content-type", "te"]
)
_header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    blocks=st.lists(
        st.tuples(
            st.lists(st.tuples(_header_names, _header_values), max_size=8),
            st.sampled_from([None, 0, 64, 256, 4096]),  # a table size change before the block
            st.booleans(),  # Huffman
        ),
        min_size=1,
        max_size=12,
    )
)
def test_header_decoder_follows_the_dynamic_table_of_hpacks_encoder(
    blocks: list[tuple[list[tuple[str, str]], int | None, bool]],
) -> None:
    # hpack's Encoder indexes every header it may, evicts, and resizes the table: our
    # decoder must give back the same headers block after block.
    encoder = Encoder()
    decoder = HeaderDecoder(65536)
    for headers, table_size, huffman in blocks:
        if table_size is not None:
            encoder.header_table_size = table_size
        block = encoder.encode(headers, huffman=huffman)
        decoded, size = decoder.decode(block)
        assert decoded == headers
        assert size == sum(len(name) + len(value) + 32 for name, value in headers)


def test_header_decoder_reads_a_repeated_block_by_the_table_it_finds() -> None:
    # The same bytes, index 62, name the newest dynamic entry: what that is changes.
    decoder = HeaderDecoder(65536)
    encoder = Encoder()
    decoder.decode(encoder.encode([("x-a", "1")], huffman=False))
    assert decoder.decode(b"\xbe") == ([("x-a", "1")], 36)
    assert decoder.decode(b"\xbe") == ([("x-a", "1")], 36)  # from the block cache
    decoder.decode(encoder.encode([("x-b", "2")], huffman=False))
    assert decoder.decode(b"\xbe") == ([("x-b", "2")], 36)
    decoder.decode(b"\x20")  # a table size update to 0 empties the table
    with pytest.raises(HeaderDecodeError, match="index 62 is not in the table"):
        decoder.decode(b"\xbe")


@pytest.mark.parametrize(
    ("block", "problem"),
    [
        (b"\xbe", "index 62 is not in the table"),  # empty dynamic table
        (b"\x80", "index 0"),
        (b"\x82\x3f\xe1\x1f", "after the first header field"),  # size update mid-block
        (b"\x3f\xe2\x1f", "over the limit 4096"),  # 4097
        (b"\x40\x01a\x05ab", "truncated"),
        (b"\x40\x03ab", "cannot decode"),  # the name runs past the end
    ],
)
def test_header_decoder_rejects_broken_blocks(block: bytes, problem: str) -> None:
    with pytest.raises(HeaderDecodeError, match=problem):
        HeaderDecoder(65536).decode(block)


def test_header_decoder_refuses_a_header_list_bomb() -> None:
    # One 100-byte entry, then the same index many times: tiny on the wire, huge decoded.
    first = Encoder().encode([("x-bomb", "y" * 100)], huffman=False)
    with pytest.raises(HeaderDecodeError, match="header list over 4096 bytes"):
        HeaderDecoder(4096).decode(first + b"\xbe" * 100)
