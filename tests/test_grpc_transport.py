"""How the transport writes: a finished piece of output goes straight to the socket when
the writer is idle, output close behind a write waits for the writer, and what the
socket cannot take at once follows in order."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.lowlevel
import trio.testing
from hyperframe.frame import SettingsFrame

from tei_manager.grpc._grpc_events import Event
from tei_manager.grpc._http2 import H2Connection
from tei_manager.grpc._http2_frames import PREFACE, DataReceived, ErrorCode, HeadersReceived
from tei_manager.grpc._protocol import Connection
from tei_manager.grpc.limits import Limits
from tei_manager.grpc.rpc import GrpcError
from tei_manager.grpc.transport import WRITE_INTERVAL, Stream, Transport


class Peer:
    """The far end of a transport's socket, read without trio."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        #: The preface and SETTINGS the transport opened with.
        self.opening = b""

    def read_now(self) -> bytes:
        """Whatever has arrived, without waiting."""
        chunks = []
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except BlockingIOError:
                return b"".join(chunks)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


@asynccontextmanager
async def _transport() -> AsyncIterator[tuple[Transport, Peer]]:
    ours, theirs = socket.socketpair()
    with theirs:
        theirs.send(SettingsFrame(0).serialize())  # the server's side of the handshake
        transport = Transport(
            trio.SocketStream(trio.socket.from_stdlib_socket(ours)),
            client_side=True,
            max_message_bytes=1 << 20,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(transport.run)
            await trio.testing.wait_all_tasks_blocked()
            peer = Peer(theirs)
            peer.opening = peer.read_now()
            assert peer.opening.startswith(b"PRI * HTTP/2.0")  # sent by the writer task
            yield transport, peer
            nursery.cancel_scope.cancel()


def _request(transport: Transport, metadata: tuple[tuple[str, str], ...] = ()) -> Stream:
    stream = transport.open_stream()
    transport.start_request(stream, "http", "/s/M", "host", None, metadata)
    return stream


def _header_blocks(peer: Peer, data: bytes) -> list[HeadersReceived]:
    server = H2Connection(client_side=False)
    events = server.receive_data(peer.opening + data)
    return [event for event in events if isinstance(event, HeadersReceived)]


async def test_a_finished_request_is_written_before_the_writer_runs(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with _transport() as (transport, peer):
        mock_clock.jump(WRITE_INTERVAL)
        _request(transport).end_request()
        # No checkpoint since: the writer task has not run, the bytes are there.
        sent = peer.read_now()
        assert sent
        assert [block.stream_id for block in _header_blocks(peer, sent)] == [1]


async def test_output_close_behind_a_write_waits_for_the_writer(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with _transport() as (transport, peer):
        mock_clock.jump(WRITE_INTERVAL)
        _request(transport).end_request()
        first = peer.read_now()
        _request(transport).end_request()
        _request(transport).end_request()
        assert peer.read_now() == b""  # no time has passed: these two wait
        await trio.testing.wait_all_tasks_blocked()
        rest = peer.read_now()
        assert [block.stream_id for block in _header_blocks(peer, first + rest)] == [1, 3, 5]


async def test_what_the_socket_cannot_take_is_sent_first_by_the_writer(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with _transport() as (transport, peer):
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        mock_clock.jump(WRITE_INTERVAL)
        # Header blocks are not flow controlled: 2 MB of them overfill the socket
        # in the first (direct) write; the writer sends the rest, then what follows.
        big = tuple((f"x-pad-{i}", "v" * 1000) for i in range(7))
        streams = [_request(transport, big) for _ in range(300)]
        for stream in streams:
            stream.end_request()
        first = peer.read_now()
        assert 0 < len(first) < 2_000_000
        server = H2Connection(client_side=False, limits=Limits(max_concurrent_streams=300))
        events = server.receive_data(peer.opening + first)
        ended: list[int] = []
        while len(ended) < 300:
            await trio.lowlevel.checkpoint()
            events += server.receive_data(peer.read_now())  # raises if out of order
            ended = [e.stream_id for e in events if isinstance(e, DataReceived) and e.end_stream]
        blocks = [event for event in events if isinstance(event, HeadersReceived)]
        assert [block.stream_id for block in blocks] == list(range(1, 600, 2))
        assert ended == list(range(1, 600, 2))
        assert all(len(block.headers) == 6 + 7 for block in blocks)


async def test_nothing_is_written_directly_once_the_connection_closed() -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    transport = Transport(
        trio.SocketStream(trio.socket.from_stdlib_socket(ours)),
        client_side=True,
        max_message_bytes=1 << 20,
    )
    with trio.fail_after(5), pytest.raises(GrpcError):
        await transport.run()  # ends at once: the peer is gone before its SETTINGS
    assert transport.closed
    # The descriptor number is free again and likely reused: push must not write.
    reuse, reuse_peer = socket.socketpair()
    with reuse, reuse_peer:
        reuse_peer.setblocking(False)
        _request(transport)  # queues a header block
        transport.push()
        with pytest.raises(BlockingIOError):
            reuse_peer.recv(1024)


class FaultyConnection(Connection):
    """A gRPC layer with a bug: bytes starting with ``BUG`` make it raise."""

    BUG = b"\xffbug"

    def receive_data(self, data: bytes) -> list[Event]:
        if data.startswith(self.BUG):
            raise RuntimeError("a bug in the sans-IO layer")
        return super().receive_data(data)


class FaultyTransport(Transport):
    connection_class = FaultyConnection


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) of each frame in ``data``."""
    frames = []
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        frames.append((data[pos + 3], data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return frames


async def test_an_internal_error_ends_only_its_connection_with_goaway(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception out of the sans-IO layer is logged, answered with GOAWAY
    INTERNAL_ERROR and ends that connection; ``run`` returns, raising nothing."""
    ours, theirs = socket.socketpair()
    with theirs:
        transport = FaultyTransport(
            trio.SocketStream(trio.socket.from_stdlib_socket(ours)),
            client_side=False,
            max_message_bytes=1 << 20,
        )
        theirs.sendall(PREFACE + SettingsFrame(0).serialize())
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(transport.run)
                await trio.testing.wait_all_tasks_blocked()
                theirs.sendall(FaultyConnection.BUG)
            # The nursery exited cleanly: run ended without raising.
        peer = Peer(theirs)
        frames = _frames(peer.read_now())
    assert transport.closed
    assert transport.close_reason == "internal error"
    goaways = [payload for kind, payload in frames if kind == 0x7]
    assert len(goaways) == 1
    assert struct.unpack(">LL", goaways[0][:8])[1] == ErrorCode.INTERNAL_ERROR
    logged = [r for r in caplog.records if r.exc_info and r.levelno >= logging.ERROR]
    assert logged and "sans-IO layer" in str(logged[0].exc_info[1])  # type: ignore[index]
