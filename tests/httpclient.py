"""A tiny HTTP/1.1 client on trio and h11, for driving a real server in tests.

One request per connection (``Connection: close``), trio-native so it is
cancellable and needs no thread, and low-level enough to send what a polite
client would not: oversized or chunked bodies, any method, any header.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import h11
import trio

__all__ = ["HttpResponse", "http_request"]


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http_request(
    port: int,
    method: str,
    target: str,
    *,
    body: bytes | None = None,
    headers: Sequence[tuple[str, str]] = (),
    chunked: bool = False,
    host: str = "127.0.0.1",
) -> HttpResponse:
    """Send one request to ``host:port`` and read the whole response.

    ``chunked`` sends the body with chunked transfer encoding (no Content-Length).
    If the server answers and closes before taking the whole body (413), the
    answer is still read and returned.
    """
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        head = [("Host", f"{host}:{port}"), ("Connection", "close"), *headers]
        if body is not None:
            if chunked:
                head.append(("Transfer-Encoding", "chunked"))
            else:
                head.append(("Content-Length", str(len(body))))
        try:
            await stream.send_all(
                conn.send(h11.Request(method=method, target=target, headers=head))
            )
            if body:
                step = 64 * 1024 if chunked else len(body)
                for i in range(0, len(body), step):
                    data = conn.send(h11.Data(data=body[i : i + step]))
                    assert data is not None
                    await stream.send_all(data)
            end = conn.send(h11.EndOfMessage())
            assert end is not None
            await stream.send_all(end)
        except trio.BrokenResourceError:
            pass  # the server answered early and closed; read what it said
        return await _read_response(stream, conn)


async def _read_response(stream: trio.SocketStream, conn: h11.Connection) -> HttpResponse:
    status = 0
    headers: dict[str, str] = {}
    chunks: list[bytes] = []
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as error:  # e.g. closed mid-response
            raise ConnectionError(f"server broke off the response: {error}") from None
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return HttpResponse(status, headers, b"".join(chunks))
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionError("server closed the connection without a response")
