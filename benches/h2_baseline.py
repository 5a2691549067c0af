"""The baseline for benches/grpc_transport.py: the same unary gRPC call on h2 4.x.

A minimal gRPC client and server written directly on h2's ``H2Connection`` over trio
sockets, the stack purerpc was built on (our own layer replaced it for its cost, see
DESIGN.md "gRPC stack"). Just what one small unary call needs: HEADERS, one
length-prefixed message each way, trailers with ``grpc-status``. No deadlines, no
errors, no flow-control tuning beyond crediting back what arrives.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import trio

__all__ = ["H2Client", "serve_h2"]

_GRPC_HEADERS = [("content-type", "application/grpc"), ("te", "trailers")]


def _frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


def _unframe(data: bytes) -> bytes:
    _, length = struct.unpack_from(">BI", data)
    return data[5 : 5 + length]


async def serve_h2(
    path: str,
    handler: Callable[[bytes], bytes],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve unary ``path`` with ``handler`` (request bytes → reply bytes) on a free port."""

    async def connection(stream: trio.SocketStream) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        await stream.send_all(conn.data_to_send())
        bodies: dict[int, bytearray] = {}
        while data := await stream.receive_some(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    assert dict(event.headers)[":path"] == path
                    bodies[event.stream_id] = bytearray()
                elif isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    reply = handler(_unframe(bytes(bodies.pop(event.stream_id))))
                    sid = event.stream_id
                    conn.send_headers(sid, [(":status", "200"), _GRPC_HEADERS[0]])
                    conn.send_data(sid, _frame(reply))
                    conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
            await stream.send_all(conn.data_to_send())

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(connection, listeners)


class H2Client:
    """One HTTP/2 connection making unary gRPC calls; use inside ``async with``."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self._waiting: dict[int, tuple[trio.Event, bytearray]] = {}
        self._send_lock = trio.Lock()

    async def __aenter__(self) -> H2Client:
        self._stream = await trio.open_tcp_stream("127.0.0.1", self._port)
        self._nursery_manager = trio.open_nursery()
        nursery = await self._nursery_manager.__aenter__()
        self._conn.initiate_connection()
        await self._stream.send_all(self._conn.data_to_send())
        nursery.start_soon(self._read)
        self._cancel = nursery.cancel_scope
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._cancel.cancel()
        await self._nursery_manager.__aexit__(*exc)
        await self._stream.aclose()

    async def unary(self, path: str, request: bytes) -> bytes:
        """Call ``path`` with ``request``'s bytes; the reply's bytes."""
        done, body = trio.Event(), bytearray()
        async with self._send_lock:
            sid = self._conn.get_next_available_stream_id()
            self._waiting[sid] = (done, body)
            headers = [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", f"127.0.0.1:{self._port}"),
                *_GRPC_HEADERS,
            ]
            self._conn.send_headers(sid, headers)
            self._conn.send_data(sid, _frame(request), end_stream=True)
            await self._stream.send_all(self._conn.data_to_send())
        await done.wait()
        return _unframe(bytes(body))

    async def _read(self) -> None:
        while data := await self._stream.receive_some(65536):
            for event in self._conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self._waiting[event.stream_id][1].extend(event.data)
                    self._conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, h2.events.StreamEnded):
                    self._waiting.pop(event.stream_id)[0].set()
            # Taken under the lock, so frames leave in the order h2 made them.
            async with self._send_lock:
                if out := self._conn.data_to_send():
                    await self._stream.send_all(out)
