"""The REST port's connections, over real sockets: closing, keep-alive, bodies, shutdown.

Each test talks raw HTTP/1.1 (or 1.0) through a trio socket to ``serve_api`` with an
in-memory manager, the way curl, a load balancer or a scanner would, and watches
what the server does with the connection.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import h11
import httpx2
import pytest
import trio

from tei_manager.api import serve_api
from tei_manager.api.exchange import BODY_LINGER_SECS
from tei_manager.api.routes import MAX_BODY_BYTES
from tei_manager.config import ManagerConfig
from tests.fake_manager import FakeManager

# The keep-alive timeout the tests serve with: short, so waiting it out is cheap.
KEEP_ALIVE_SECS = 0.3


def make_manager(tmp_path: Path, keep_alive: float = KEEP_ALIVE_SECS) -> FakeManager:
    config = ManagerConfig(
        state_file=str(tmp_path / "state.toml"),
        log_dir=str(tmp_path / "logs"),
        api_port=0,
        grpc_port=0,
        api_keep_alive_timeout_secs=keep_alive,
    )
    return FakeManager(config, gpu_count=1)


@pytest.fixture
def manager(tmp_path: Path) -> FakeManager:
    return make_manager(tmp_path)


@pytest.fixture
async def port(nursery: trio.Nursery, manager: FakeManager) -> int:
    port: int = await nursery.start(serve_api, manager, "127.0.0.1", 0)
    return port


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Opens client sockets to a port; every one is closed when the test ends."""
    opened: list[trio.SocketStream] = []

    async def open_stream(port: int) -> trio.SocketStream:
        opened.append(await trio.open_tcp_stream("127.0.0.1", port))
        return opened[-1]

    yield open_stream
    for stream in opened:
        await stream.aclose()


Connect = Callable[[int], Awaitable[trio.SocketStream]]


class Connection:
    """One client connection that sends request after request, as keep-alive clients do."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    async def request(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request and read its answer; the connection stays open if the server lets it."""
        if self.h11.our_state is h11.DONE:
            self.h11.start_next_cycle()
        head = [("Host", "test"), ("Content-Length", str(len(body))), *headers]
        out = self.h11.send(h11.Request(method=method, target=target, headers=head))
        out = (out or b"") + (self.h11.send(h11.Data(data=body)) or b"") if body else out
        await self.stream.send_all((out or b"") + (self.h11.send(h11.EndOfMessage()) or b""))
        status, answer_headers, chunks = 0, {}, []
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                answer_headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, answer_headers, b"".join(chunks)
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def closed_by_server(self) -> bool:
        """Whether the server closes the connection (rather than sending anything more)."""
        try:
            return await self.stream.receive_some(65536) == b""
        except trio.BrokenResourceError:  # reset: closed too
            return True


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


# --- closing when asked --------------------------------------------------------------


async def test_connection_close_is_honoured(port: int, connect: Connect) -> None:
    conn = Connection(await connect(port))
    with trio.fail_after(2):  # well under the keep-alive timeout's multiple
        status, headers, _ = await conn.request(
            "GET", "/health/live", headers=[("Connection", "close")]
        )
        assert status == 200
        assert headers.get("connection") == "close"
        assert await conn.closed_by_server()


async def test_http_1_0_gets_one_answer_then_close(port: int, connect: Connect) -> None:
    stream = await connect(port)
    with trio.fail_after(2):
        await stream.send_all(b"GET /health/live HTTP/1.0\r\n\r\n")
        answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b'{"status":"ok"}')


# --- idle keep-alive -----------------------------------------------------------------


async def test_idle_keep_alive_connection_times_out(port: int, connect: Connect) -> None:
    conn = Connection(await connect(port))
    assert (await conn.request("GET", "/health/live"))[0] == 200
    # Kept alive: a second request on the same connection is answered.
    assert (await conn.request("GET", "/health/live"))[0] == 200
    started = time.monotonic()
    with trio.fail_after(5):
        assert await conn.closed_by_server()
    assert KEEP_ALIVE_SECS * 0.8 <= time.monotonic() - started < KEEP_ALIVE_SECS + 2


async def test_a_connection_that_never_sends_times_out(port: int, connect: Connect) -> None:
    stream = await connect(port)
    await stream.send_all(b"GET /health/li")  # half a request line, then nothing
    with trio.fail_after(5):
        assert await read_until_closed(stream) == b""


async def test_keep_alive_timeout_is_the_configured_one(
    nursery: trio.Nursery, tmp_path: Path, connect: Connect
) -> None:
    port = await nursery.start(serve_api, make_manager(tmp_path, keep_alive=30), "127.0.0.1", 0)
    conn = Connection(await connect(port))
    assert (await conn.request("GET", "/health/live"))[0] == 200
    with trio.move_on_after(1) as waited:
        await conn.closed_by_server()
    assert waited.cancelled_caught  # still open after three times the tests' usual timeout
    assert (await conn.request("GET", "/health/live"))[0] == 200


# --- every request on a kept-alive connection is answered ----------------------------


async def test_unknown_routes_with_bodies_are_all_answered_on_one_connection(
    port: int, connect: Connect
) -> None:
    conn = Connection(await connect(port))
    with trio.fail_after(20):
        for i in range(80):
            body = json.dumps({"pad": "x" * (i * 997)}).encode()  # up to ~80 KB
            status, _, answer = await conn.request(
                "POST", f"/nope/{i}", body, headers=[("Content-Type", "application/json")]
            )
            assert status == 404, answer
            assert json.loads(answer)["code"] == "NOT_FOUND"
        # The connection carried all of them and still carries the next one.
        assert (await conn.request("GET", "/health/live"))[0] == 200


async def test_a_body_the_handler_ignores_is_read_off(
    port: int, manager: FakeManager, connect: Connect
) -> None:
    conn = Connection(await connect(port))
    body = json.dumps({"name": "bge", "model_id": "BAAI/bge"}).encode()
    assert (await conn.request("POST", "/instances", body))[0] == 201
    # /stop takes no body; one sent anyway must not be read as the next request.
    status, _, _ = await conn.request("POST", "/instances/bge/stop", b"GET / HTTP/1.1\r\n\r\n")
    assert status == 200
    assert (await conn.request("GET", "/instances/bge"))[0] == 200


async def test_a_chunked_body_to_an_unknown_route(port: int, connect: Connect) -> None:
    stream = await connect(port)
    request = (
        b"POST /nope HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
        b"GET /health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    with trio.fail_after(5):
        await stream.send_all(request)
        answers = await read_until_closed(stream)
    assert answers.startswith(b"HTTP/1.1 404 ")
    assert answers.count(b"HTTP/1.1 ") == 2
    assert b"HTTP/1.1 200 " in answers


async def test_a_body_too_large_is_refused_and_the_connection_closed(
    port: int, connect: Connect
) -> None:
    stream = await connect(port)
    head = b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1)
    with trio.fail_after(5):
        await stream.send_all(head + b"x" * 1000)
        answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 404 ")
    assert b"connection: close" in answer.lower()


async def test_a_body_that_never_arrives_closes_after_the_linger(
    port: int, connect: Connect
) -> None:
    stream = await connect(port)
    started = time.monotonic()
    with trio.fail_after(BODY_LINGER_SECS + 5):
        await stream.send_all(b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc")
        answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 404 ")
    assert b"connection: close" in answer.lower()
    assert time.monotonic() - started >= BODY_LINGER_SECS * 0.9


async def test_httpx_reuses_one_connection_for_many_requests(port: int) -> None:
    transport = httpx2.AsyncHTTPTransport(limits=httpx2.Limits(max_connections=1))
    async with httpx2.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", transport=transport, timeout=5
    ) as client:
        for i in range(20):
            answer = await client.post(f"/nope/{i}", content=b"x" * (i * 4096))
            assert answer.status_code == 404
            answer = await client.get("/health/live")
            assert answer.status_code == 200


# --- shutdown --------------------------------------------------------------------------


async def test_an_idle_connection_does_not_hold_up_shutdown(
    tmp_path: Path, connect: Connect
) -> None:
    manager = make_manager(tmp_path, keep_alive=60)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: serve_api(
                manager, "127.0.0.1", 0, shutdown=shutdown, drain_timeout_secs=10,
                task_status=task_status,
            )
        )  # fmt: skip
        idle = Connection(await connect(port))
        assert (await idle.request("GET", "/health/live"))[0] == 200
        silent = await connect(port)  # connected, never sent
        await silent.send_all(b"")
        started = time.monotonic()
        shutdown.set()
    # Far below both the drain deadline (10 s) and the keep-alive timeout (60 s).
    assert time.monotonic() - started < 2
    with trio.fail_after(2):
        assert await idle.closed_by_server()
