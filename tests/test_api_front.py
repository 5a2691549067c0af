"""The lean HTTP/1.1 front of the REST port, over real sockets.

Inference requests on a plaintext connection are answered by the front itself; the
first other request hands the connection to Hypercorn with the bytes already read.
These tests speak raw HTTP the way curl, load balancers, pipelining clients and
hostile peers do, and check that the connection is right at every turn: the handoff
both ways, pipelining, HTTP/1.0, ``Connection: close``, chunked bodies, ``Expect:
100-continue``, heads too large or too slow, HTTP/2 with prior knowledge, a client
that leaves, and shutdown.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h11
import pytest
import trio
import trio.testing
from hypercorn.config import Config
from prometheus_client import CollectorRegistry
from werkzeug.routing import Map, Rule

from tei_manager.api.auth import RequestGuard
from tei_manager.api.front import LEFT_POLL_SECS, LeanFront, ReplayStream, at_eof
from tei_manager.api.inference import INFERENCE_MAX_BODY_BYTES, Answer, InferenceRequest
from tei_manager.api.inference_asgi import InferenceDispatch
from tei_manager.api.openai_routes import OpenAIDoor
from tei_manager.auth.security import build_security
from tei_manager.config import ManagerConfig
from tests.test_api_connections import read_until_closed
from tests.test_inference_asgi import EMBED, Served, serve
from tests.test_inference_routes import vector

KEEP_ALIVE_SECS = 0.3


@pytest.fixture
async def opened() -> AsyncIterator[list[trio.SocketStream]]:
    streams: list[trio.SocketStream] = []
    yield streams
    for stream in streams:
        await stream.aclose()


async def open_raw(served: Served) -> trio.SocketStream:
    served.opened.append(await trio.open_tcp_stream("127.0.0.1", served.port))
    return served.opened[-1]


def embed_request(text: str = "one two", *, version: str = "1.1", extra: str = "") -> bytes:
    body = json.dumps({"model": "b", "input": text}).encode()
    head = (
        f"POST /v1/embeddings HTTP/{version}\r\nHost: t\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


LIVE = b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n"


class Answers:
    """Reads answers one after another off a stream, pipelined ones included."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self) -> tuple[int, dict[str, str], bytes]:
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "t")]))
        conn.send(h11.EndOfMessage())
        if self.buffer:  # (b"" would tell h11 the stream ended)
            conn.receive_data(self.buffer)
        status, headers, chunks = 0, {}, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self.buffer = conn.trailing_data[0]
                return status, headers, b"".join(chunks)
            elif not isinstance(event, h11.InformationalResponse):
                raise AssertionError(f"unexpected {event!r}")

    async def closed(self) -> bool:
        try:
            return self.buffer == b"" and await self.stream.receive_some(65536) == b""
        except trio.BrokenResourceError:
            return True


def embedding(body: bytes) -> list[float]:
    embedded: list[float] = json.loads(body)["data"][0]["embedding"]
    return embedded


# --- handing the connection to Hypercorn ---------------------------------------------


async def test_inference_then_control_plane_then_inference_on_one_connection(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened)
    stream = await open_raw(served)
    answers = Answers(stream)
    for request, text in ((embed_request("a b"), "a b"), (LIVE, ""), (embed_request("c d"), "c d")):
        await stream.send_all(request)
        status, headers, body = await answers.next()
        assert status == 200 and "connection" not in headers
        if text:
            assert embedding(body) == pytest.approx(vector(text))


async def test_control_plane_first_then_inference_on_one_connection(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened)
    stream = await open_raw(served)
    answers = Answers(stream)
    await stream.send_all(LIVE)
    assert (await answers.next())[0] == 200
    await stream.send_all(embed_request("a b"))
    status, _, body = await answers.next()
    assert status == 200 and embedding(body) == pytest.approx(vector("a b"))


async def test_pipelined_requests_are_answered_in_order_across_the_handoff(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened)
    stream = await open_raw(served)
    answers = Answers(stream)
    texts = ["one", "two", "three"]
    # All in one write: the front reads them at once, answers two, hands the rest over.
    await stream.send_all(
        embed_request(texts[0]) + embed_request(texts[1]) + LIVE + embed_request(texts[2])
    )
    for expected in (texts[0], texts[1], None, texts[2]):
        status, _, body = await answers.next()
        assert status == 200
        if expected is not None:
            assert embedding(body) == pytest.approx(vector(expected))


async def test_a_head_split_across_writes_is_handed_over_whole(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened)
    stream = await open_raw(served)
    for part in (b"GET /health/", b"live HTTP/1.1\r\nHo", b"st: t\r\n\r\n"):
        await stream.send_all(part)
        await trio.sleep(0.01)
    assert (await Answers(stream).next())[0] == 200


async def test_h2c_prior_knowledge_is_served_by_hypercorn(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened)
    stream = await open_raw(served)
    h2conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2conn.initiate_connection()
    headers = [
        (":method", "POST"),
        (":path", "/v1/embeddings"),
        (":scheme", "http"),
        (":authority", "t"),
        ("content-length", str(len(EMBED))),
    ]
    h2conn.send_headers(1, headers)
    h2conn.send_data(1, EMBED, end_stream=True)
    await stream.send_all(h2conn.data_to_send())
    status, body = "", b""
    with trio.fail_after(5):
        while True:
            data = await stream.receive_some(65536)
            assert data, "closed before the answer"
            for event in h2conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"].decode()
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    h2conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    break
            else:
                await stream.send_all(h2conn.data_to_send())
                continue
            break
    assert status == "200"
    assert embedding(body) == pytest.approx(vector("one two"))


# --- the connection's rules ----------------------------------------------------------


async def test_http_1_0_gets_its_answer_then_the_connection_closes(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened)
    stream = await open_raw(served)
    await stream.send_all(embed_request(version="1.0"))
    with trio.fail_after(5):
        answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"}")


async def test_connection_close_is_honoured(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened)
    stream = await open_raw(served)
    answers = Answers(stream)
    await stream.send_all(embed_request(extra="Connection: close\r\n"))
    with trio.fail_after(5):
        status, headers, _ = await answers.next()
        assert status == 200 and headers["connection"] == "close"
        assert await answers.closed()


async def test_a_chunked_body_is_read_whole(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened)
    stream = await open_raw(served)
    await stream.send_all(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for start in range(0, len(EMBED), 7):
        part = EMBED[start : start + 7]
        await stream.send_all(b"%x\r\n%s\r\n" % (len(part), part))
        await trio.sleep(0.005)
    await stream.send_all(b"0\r\n\r\n")
    answers = Answers(stream)
    status, _, body = await answers.next()
    assert status == 200 and embedding(body) == pytest.approx(vector("one two"))
    await stream.send_all(embed_request("more"))  # the connection carries the next one
    assert (await answers.next())[0] == 200


async def test_expect_100_continue_gets_its_interim_answer_before_the_body(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened)
    stream = await open_raw(served)
    head = (
        "POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
        f"Content-Length: {len(EMBED)}\r\n\r\n"
    )
    await stream.send_all(head.encode())
    with trio.fail_after(5):
        interim = await stream.receive_some(65536)
    assert interim.startswith(b"HTTP/1.1 100 ")
    await stream.send_all(EMBED)
    status, _, body = await Answers(stream).next()
    assert status == 200 and embedding(body) == pytest.approx(vector("one two"))


async def test_a_body_announced_too_large_gets_no_100_continue_but_413(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened)
    stream = await open_raw(served)
    head = (
        "POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
        f"Content-Length: {INFERENCE_MAX_BODY_BYTES + 1}\r\n\r\n"
    )
    await stream.send_all(head.encode())
    with trio.fail_after(5):
        answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in answer.lower()


async def test_a_chunked_body_over_the_limit_is_413_and_the_connection_closed(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened)
    stream = await open_raw(served)
    chunk = b"x" * (1 << 20)

    async def flood() -> None:
        try:
            await stream.send_all(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            while True:  # never ends: the server must stop it
                await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as flooding:
        flooding.start_soon(flood)
        with trio.fail_after(10):
            answer = await read_until_closed(stream)
        flooding.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in answer.lower()


# --- hostile peers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "whole"),
    [
        (17 * 1024, True),  # over Hypercorn's 16 KiB h11_max_incomplete_size, in one read
        (17 * 1024, False),  # the same, never finished
        (200 * 1024, True),  # more than one read
    ],
)
async def test_a_head_too_large_is_431_and_the_connection_closed(
    nursery: trio.Nursery,
    tmp_path: Path,
    opened: list[trio.SocketStream],
    size: int,
    whole: bool,
) -> None:
    served = await serve(nursery, tmp_path, opened)
    stream = await open_raw(served)
    padding = "x" * (size - 100)
    head = f"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nX-Pad: {padding}\r\n"
    if whole:
        head += f"Content-Length: {len(EMBED)}\r\n\r\n{EMBED.decode()}"
    # Closed while we may still be sending: the answer is readable all the same.
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.send_all(head.encode())
    with trio.fail_after(5):
        answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 431 ")


async def test_a_head_trickled_in_is_cut_off_at_the_keep_alive_timeout(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened, keep_alive=KEEP_ALIVE_SECS)
    stream = await open_raw(served)
    await stream.send_all(embed_request())  # one request served, then the slow one
    answers = Answers(stream)
    assert (await answers.next())[0] == 200

    async def trickle() -> None:
        try:
            await stream.send_all(b"POST /v1/embeddings HTTP/1.1\r\n")
            while True:  # a header byte at a time, never the end of the head
                await stream.send_all(b"X")
                await trio.sleep(KEEP_ALIVE_SECS / 10)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    started = trio.current_time()
    async with trio.open_nursery() as trickling:
        trickling.start_soon(trickle)
        with trio.fail_after(KEEP_ALIVE_SECS + 3):
            assert await answers.closed()
        trickling.cancel_scope.cancel()
    assert trio.current_time() - started >= KEEP_ALIVE_SECS * 0.9


async def test_a_connection_that_never_sends_is_closed_at_the_keep_alive_timeout(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened, keep_alive=KEEP_ALIVE_SECS)
    stream = await open_raw(served)
    with trio.fail_after(KEEP_ALIVE_SECS + 3):
        assert await read_until_closed(stream) == b""


_EMBED_HEAD = b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\n"


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(embed_request().replace(b"\r\n", b"\n", 3), id="bare LF"),
        pytest.param(
            _EMBED_HEAD + b"X-A: b\r\n c\r\n" + embed_request()[len(_EMBED_HEAD) :],
            id="obs-fold",
        ),
        pytest.param(
            _EMBED_HEAD
            + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(EMBED), EMBED),
            id="Content-Length and chunked",
        ),
    ],
)
async def test_a_head_the_front_does_not_read_plainly_is_hypercorns_to_judge(
    nursery: trio.Nursery,
    tmp_path: Path,
    opened: list[trio.SocketStream],
    request_bytes: bytes,
) -> None:
    """h11 serves what it accepts of these, read its way: with both framings the body
    is the chunked one (RFC 9112 §6.3), so no request hides in it. The request after
    is answered as the next one."""
    served = await serve(nursery, tmp_path, opened)
    stream = await open_raw(served)
    await stream.send_all(request_bytes + LIVE)
    answers = Answers(stream)
    with trio.fail_after(5):
        status, _, body = await answers.next()
        assert status == 200 and embedding(body) == pytest.approx(vector("one two"))
        status, _, body = await answers.next()
        assert status == 200 and json.loads(body)["status"] == "ok"


async def test_two_different_content_lengths_are_400_and_the_connection_closed(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened)
    stream = await open_raw(served)
    smuggled = embed_request().replace(b"Content-Length", b"Content-Length: 3\r\nContent-Length", 1)
    await stream.send_all(smuggled + LIVE)
    with trio.fail_after(5):
        answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1") == 1


async def test_a_malformed_head_is_400_and_the_connection_closed(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened)
    stream = await open_raw(served)
    await stream.send_all(b"POST /v1/embeddings HTTP/1.1\r\nNo colon here\r\n\r\n")
    with trio.fail_after(5):
        answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 400 ")


# --- a client that leaves, and shutdown ----------------------------------------------


@pytest.mark.parametrize("half_close", [False, True], ids=["close", "half-close"])
async def test_a_client_that_leaves_cancels_its_request_and_is_counted_as_499(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream], half_close: bool
) -> None:
    """As on Hypercorn, the end of the client's stream (a half-close) is the client
    going away too."""
    served = await serve(nursery, tmp_path, opened)
    stream = await open_raw(served)
    await stream.send_all(embed_request("hang"))
    await served.backend.hanging.wait()
    if half_close:
        await stream.send_eof()
    else:
        await stream.aclose()
    # The next request (limit 1) gets the slot only because the first one was cancelled.
    with trio.fail_after(5):
        if half_close:
            assert await read_until_closed(stream) == b""  # cancelled: no answer, closed
        fresh = await open_raw(served)
        await fresh.send_all(embed_request())
        assert (await Answers(fresh).next())[0] == 200
    assert not served.backend.release.is_set()
    duration = 'tei_manager_http_request_duration_seconds_count{method="POST",'
    assert f'{duration}route="/v1/embeddings",status="499"}} 1.0' in served.metrics()


async def test_a_request_pipelined_behind_a_running_one_does_not_cancel_it(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened)
    stream = await open_raw(served)
    await stream.send_all(embed_request("hang"))
    await served.backend.hanging.wait()
    await stream.send_all(embed_request("next"))
    await trio.sleep(3 * LEFT_POLL_SECS)  # polled with the next request waiting
    served.backend.release.set()
    answers = Answers(stream)
    with trio.fail_after(5):
        assert (await answers.next())[0] == 200
        status, _, body = await answers.next()
    assert status == 200 and embedding(body) == pytest.approx(vector("next"))


async def test_the_front_serves_only_while_it_watches_for_clients_that_leave(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = ManagerConfig(state_file=str(tmp_path / "s.toml"), log_dir=str(tmp_path))
    guard = RequestGuard(build_security(config, CollectorRegistry()))
    dispatch = InferenceDispatch(Map([]), {}, guard)

    async def hand_off(stream: ReplayStream) -> None:
        await stream.aclose()

    lean = LeanFront(dispatch, Config(), hand_off, lambda *observed: None)
    left, _ = trio.testing.lockstep_stream_pair()
    with pytest.raises(RuntimeError, match=r"LeanFront\.run"):
        await lean.serve(left)  # type: ignore[arg-type]


def test_where_poll_cannot_tell_a_close_a_peek_does() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        assert not at_eof(ours.fileno())  # open, nothing sent
        peer.send(b"G")
        assert not at_eof(ours.fileno())  # a pipelined request
        assert ours.recv(1) == b"G"  # only peeked
        peer.shutdown(socket.SHUT_WR)
        assert at_eof(ours.fileno())
        assert ours.fileno() >= 0  # borrowed, not closed


async def test_requests_are_timed_and_access_logged_with_the_client_address(
    nursery: trio.Nursery,
    tmp_path: Path,
    opened: list[trio.SocketStream],
    caplog: pytest.LogCaptureFixture,
) -> None:
    served = await serve(
        nursery,
        tmp_path,
        opened,
        '[auth]\nenabled = true\nproviders = ["api_key"]\n[auth.api_key]\n'
        f'keys = [{{ name = "ci", scopes = ["inference"], sha256 = "{"0" * 64}" }}]\n',
    )
    caplog.set_level(logging.INFO, logger="tei_manager.access")
    stream = await open_raw(served)
    await stream.send_all(embed_request())
    answers = Answers(stream)
    assert (await answers.next())[0] == 401
    await stream.send_all(embed_request())  # answered: the first one's record is written
    assert (await answers.next())[0] == 401
    logged = [r.getMessage() for r in caplog.records if r.name == "tei_manager.access"]
    assert any(line.startswith("127.0.0.1 POST /v1/embeddings 401") for line in logged)
    duration = 'tei_manager_http_request_duration_seconds_count{method="POST",'
    # The second one's record may still be on its way.
    recorded = f'{duration}route="/v1/embeddings",status="401"}} '
    assert re.search(re.escape(recorded) + r"[12]\.0\n", served.metrics())


async def test_shutdown_closes_idle_connections_at_once_and_lets_requests_finish(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    shutdown = trio.Event()
    served = await serve(nursery, tmp_path, opened, shutdown=shutdown, drain_timeout=30)
    idle = await open_raw(served)
    await idle.send_all(embed_request())
    idle_answers = Answers(idle)
    assert (await idle_answers.next())[0] == 200
    busy = await open_raw(served)
    await busy.send_all(embed_request("hang"))
    await served.backend.hanging.wait()
    shutdown.set()
    with trio.fail_after(2):  # well within the 5 s keep-alive timeout
        assert await idle_answers.closed()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", served.port)  # no longer accepting
    served.backend.release.set()
    busy_answers = Answers(busy)
    with trio.fail_after(5):
        status, headers, _ = await busy_answers.next()
        assert status == 200 and headers["connection"] == "close"
        assert await busy_answers.closed()


# --- the front alone, with a trivial view ----------------------------------------------


async def start_front(
    nursery: trio.Nursery, tmp_path: Path, config: Config, handed: list[bytes]
) -> int:
    """A front whose one inference route answers ``{}``; a handoff records what it replays."""

    async def view(request: InferenceRequest) -> Answer:
        return Answer(b"{}")

    async def hand_off(stream: ReplayStream) -> None:
        handed.append(bytes(await stream.receive_some(65536)))
        await stream.send_all(b"HTTP/1.1 204 \r\n\r\n")
        await stream.aclose()

    manager_config = ManagerConfig(state_file=str(tmp_path / "s.toml"), log_dir=str(tmp_path))
    guard = RequestGuard(build_security(manager_config, CollectorRegistry()))
    url_map = Map([Rule("/v1/embeddings", endpoint="embed", methods=["POST"])])
    dispatch = InferenceDispatch(url_map, {"embed": (OpenAIDoor(), view)}, guard)
    front = LeanFront(dispatch, config, hand_off, lambda *observed: None)
    await nursery.start(front.run)
    listeners = await nursery.start(trio.serve_tcp, front.serve, 0)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def test_the_handoff_replays_exactly_the_bytes_not_yet_served(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    handed: list[bytes] = []
    port = await start_front(nursery, tmp_path, Config(), handed)
    opened.append(stream := await trio.open_tcp_stream("127.0.0.1", port))
    rest = b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\nGET /metrics HTTP/1.1\r\nHost: t\r\n\r\n"
    await stream.send_all(embed_request() + embed_request() + rest)
    answers = Answers(stream)
    assert [(await answers.next())[0] for _ in range(3)] == [200, 200, 204]
    assert handed == [rest]


async def test_a_connection_closes_after_keep_alive_max_requests(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    config = Config()
    config.keep_alive_max_requests = 2
    port = await start_front(nursery, tmp_path, config, [])
    opened.append(stream := await trio.open_tcp_stream("127.0.0.1", port))
    answers = Answers(stream)
    await stream.send_all(embed_request())
    assert "connection" not in (await answers.next())[1]
    await stream.send_all(embed_request())
    assert (await answers.next())[1]["connection"] == "close"
    with trio.fail_after(5):
        assert await answers.closed()


# --- the connection limit --------------------------------------------------------------


def count_tasks() -> int:
    def below(task: trio.lowlevel.Task) -> int:
        return 1 + sum(below(child) for n in task.child_nurseries for child in n.child_tasks)

    return below(trio.lowlevel.current_root_task())


async def closed_unanswered(served: Served) -> bool:
    stream = await open_raw(served)
    try:
        await stream.send_all(LIVE)
        return await read_until_closed(stream) == b""
    except trio.BrokenResourceError:  # reset before or while sending
        return True


async def serve_one_more(served: Served) -> None:
    """A well-behaved client gets an embedding once a place is free (the server may
    take a moment to see the connection that left end)."""
    with trio.fail_after(5):  # well under the 30 s keep-alive timeout that would free one
        while True:
            fresh = await open_raw(served)
            await fresh.send_all(embed_request())
            try:
                status, _, body = await Answers(fresh).next()
                break
            except (trio.BrokenResourceError, h11.RemoteProtocolError):
                await trio.sleep(0.01)  # still at the limit
    assert status == 200 and embedding(body) == pytest.approx(vector("one two"))


async def test_connections_over_api_max_connections_are_closed_until_one_ends(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened, "api_max_connections = 2", keep_alive=30)
    # One idle connection in the lean front, one handed to Hypercorn: both count.
    front = await open_raw(served)
    front_answers = Answers(front)
    await front.send_all(embed_request())
    assert (await front_answers.next())[0] == 200
    handed = await open_raw(served)
    handed_answers = Answers(handed)
    await handed.send_all(LIVE)
    assert (await handed_answers.next())[0] == 200
    tasks = count_tasks()
    with trio.fail_after(5):
        for _ in range(20):  # a flood over the limit: each closed unanswered, none kept
            assert await closed_unanswered(served)
        await trio.testing.wait_all_tasks_blocked()
    assert count_tasks() <= tasks
    metrics = served.metrics()
    assert "tei_manager_http_connections 2.0" in metrics
    assert "tei_manager_http_connections_refused_total 20.0" in metrics
    assert "tei_manager_http_accept_errors_total 0.0" in metrics
    # The held connections are still served.
    await front.send_all(embed_request())
    assert (await front_answers.next())[0] == 200
    # Once the Hypercorn one ends, its place is free for a well-behaved client ...
    await handed.send_all(LIVE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert (await handed_answers.next())[0] == 200
    assert await handed_answers.closed()
    await serve_one_more(served)
    assert await closed_unanswered(served)  # at the limit again
    # ... and once the lean front's one ends, too.
    await front.aclose()
    await serve_one_more(served)
    assert await closed_unanswered(served)
