"""Random and mutated frame sequences against the sans-IO HTTP/2 and gRPC connections.

``H2Connection.receive_data`` and ``Connection.receive_data`` document one error:
``ProtocolError``, with a GOAWAY queued. Whatever bytes arrive — valid prefaces then
mutated frames, random bytes, truncated frames, lengths that lie, bad padding, long
CONTINUATION chains — nothing else may come out, the CPU spent stays linear in the
bytes fed, and the memory held while feeding stays within a bound. Deterministic
(``derandomize``) and bounded, so CI stays fast.
"""

from __future__ import annotations

import gc
import struct
import time
import tracemalloc
from collections.abc import Callable

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tei_manager.grpc._http2 import H2Connection
from tei_manager.grpc._http2_frames import GOAWAY, ProtocolError
from tei_manager.grpc._protocol import Connection
from tests.hostile import (
    CONTINUATION,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    INDEXED_REQUEST,
    PREFACE,
    TOKENIZE,
    TOKENIZE_REQUEST,
    frame,
    hpack_literal,
    indexing_request_block,
    request_block,
    settings_frame,
)

FUZZ = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: CPU allowed per byte fed, above a fixed allowance (an honest frame costs ~1 µs/byte).
CPU_PER_BYTE = 20e-6
CPU_BASE = 0.25
MEMORY_BASE = 2 * 2**20
MEMORY_PER_BYTE = 16

# Pieces a mutated frame may carry: real header blocks, settings, windows, junk.
BLOCKS = [
    request_block(),
    indexing_request_block(),
    INDEXED_REQUEST,
    request_block("/x.Y/" + "z" * 3000),
    hpack_literal("x-bin", b"\xff\xfe"),  # not UTF-8
    b"\x3f\xe1\x1f",  # a table size update over the limit
    b"\xff\xff\xff\xff\xff\x7f",  # an index far too large
    b"\x00\x7f\xff\xff\xff\x0f",  # a name length past the block
    b"\x20\x83\x86",
    hpack_literal("", ""),  # an empty name (RFC 9113 §8.2: malformed)
    request_block(TOKENIZE, hpack_literal("", "x")),
    b"\x88" + hpack_literal("", "x"),  # :status 200 and an empty name
]
payloads = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(BLOCKS),
    st.sampled_from([TOKENIZE_REQUEST, struct.pack(">BL", 1, 5) + b"hello"]),
    st.builds(lambda n: struct.pack(">BL", 0, n), st.integers(0, 2**32 - 1)),
    st.builds(lambda k, v: struct.pack(">HL", k, v), st.integers(0, 8), st.integers(0, 2**32 - 1)),
    st.builds(lambda v: struct.pack(">L", v), st.integers(0, 2**32 - 1)),
    st.builds(lambda pad, body: bytes([pad]) + body, st.integers(0, 255), st.binary(max_size=16)),
)
stream_ids = st.one_of(st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1]), st.integers(0, 2**32 - 1))


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One frame, possibly mutated: any type and flags, a length that may lie."""
    kind = draw(st.one_of(st.integers(0, 9), st.integers(0, 255)))
    data = frame(kind, draw(st.integers(0, 255)), draw(stream_ids), draw(payloads))
    mutation = draw(st.sampled_from(["none", "none", "length", "truncate", "flip"]))
    if mutation == "length":
        length = draw(st.integers(0, 2**24 - 1))
        data = struct.pack(">L", length)[1:] + data[3:]
    elif mutation == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif mutation == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    return data


@st.composite
def continuation_chains(draw: st.DrawFn) -> bytes:
    """A HEADERS without END_HEADERS, then a long run of CONTINUATION frames."""
    stream_id = draw(st.sampled_from([1, 3]))
    count = draw(st.integers(0, 4000))
    size = draw(st.sampled_from([0, 0, 1, 64]))
    part = frame(CONTINUATION, 0, stream_id, bytes(size))
    end = frame(CONTINUATION, END_HEADERS, stream_id) if draw(st.booleans()) else b""
    return frame(HEADERS, 0, stream_id, request_block()) + part * count + end


sequences = st.one_of(
    st.lists(frames(), max_size=40).map(b"".join),
    continuation_chains(),
    st.binary(max_size=512),
)


def _server_feed() -> tuple[Callable[[bytes], object], Callable[[], bytes]]:
    connection = Connection(client_side=False, max_message_bytes=4096)
    connection.initiate_connection()
    connection.data_to_send()
    return connection.receive_data, lambda: bytes(connection.data_to_send())


def _client_feed() -> tuple[Callable[[bytes], object], Callable[[], bytes]]:
    connection = Connection(client_side=True, max_message_bytes=4096)
    connection.initiate_connection()
    connection.start_request(1, "http", "/tei.v1.Tokenize/Tokenize", "example")
    connection.data_to_send()
    return connection.receive_data, lambda: bytes(connection.data_to_send())


def _h2_feed() -> tuple[Callable[[bytes], object], Callable[[], bytes]]:
    connection = H2Connection(client_side=False)
    connection.initiate_connection()
    connection.data_to_send()
    return connection.receive_data, lambda: bytes(connection.data_to_send())


def feed(
    make: Callable[[], tuple[Callable[[bytes], object], Callable[[], bytes]]],
    data: bytes,
    splits: list[int],
) -> None:
    """Feed ``data`` in pieces; only ``ProtocolError`` may come out, with a GOAWAY."""
    receive, sent = make()
    pieces = []
    start = 0
    for split in sorted(splits):
        pieces.append(data[start:split])
        start = split
    pieces.append(data[start:])
    for piece in pieces:
        try:
            receive(piece)
        except ProtocolError:
            output = sent()
            assert any(output[i + 3] == GOAWAY for i in range(len(output) - 8)), (
                "ProtocolError without a GOAWAY queued"
            )
            return
        sent()


def check_bounded(
    make: Callable[[], tuple[Callable[[bytes], object], Callable[[], bytes]]],
    data: bytes,
    splits: list[int],
) -> None:
    gc.disable()  # the collector's work on others' garbage is not ours to count
    try:
        started = time.process_time()
        feed(make, data, splits)
        spent = time.process_time() - started
    finally:
        gc.enable()
    assert spent <= CPU_BASE + CPU_PER_BYTE * len(data), f"{spent:.3f} s for {len(data)} bytes"
    tracemalloc.start(1)
    try:
        base = tracemalloc.get_traced_memory()[0]
        feed(make, data, splits)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak <= MEMORY_BASE + MEMORY_PER_BYTE * len(data), f"{peak} bytes held"


OPENING = PREFACE + settings_frame()
HUGE_CHAIN = frame(HEADERS, 0, 1, request_block()) + frame(CONTINUATION, 0, 1) * 16_000
#: A request, and a response, with a header whose name is empty.
EMPTY_NAME_REQUEST = frame(
    HEADERS, END_HEADERS | END_STREAM, 1, request_block(TOKENIZE, hpack_literal("", "x"))
)
EMPTY_NAME_RESPONSE = frame(HEADERS, END_HEADERS, 1, b"\x88" + hpack_literal("", "x"))


@FUZZ
@given(sequences, st.lists(st.integers(0, 4096), max_size=4))
@example(HUGE_CHAIN, [])
@example(EMPTY_NAME_REQUEST, [])
def test_server_connection_only_raises_protocol_error(data: bytes, splits: list[int]) -> None:
    check_bounded(_server_feed, OPENING + data, [s + len(OPENING) for s in splits])


@FUZZ
@given(sequences, st.lists(st.integers(0, 4096), max_size=4))
@example(HUGE_CHAIN, [])
def test_h2_connection_only_raises_protocol_error(data: bytes, splits: list[int]) -> None:
    check_bounded(_h2_feed, OPENING + data, [s + len(OPENING) for s in splits])


@FUZZ
@given(sequences, st.lists(st.integers(0, 4096), max_size=4))
@example(EMPTY_NAME_RESPONSE, [])
def test_client_connection_only_raises_protocol_error(data: bytes, splits: list[int]) -> None:
    check_bounded(_client_feed, settings_frame() + data, splits)


@FUZZ
@given(st.binary(max_size=2048), st.lists(st.integers(0, 2048), max_size=4))
def test_random_bytes_from_the_start(data: bytes, splits: list[int]) -> None:
    check_bounded(_server_feed, data, splits)
    check_bounded(_client_feed, data, splits)
