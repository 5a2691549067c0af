"""The inference routes served in front of Quart, over real sockets: the connection,
auth, CORS, a client that leaves, and what still goes to Quart.

The routes' answers themselves are checked in ``tests/test_inference_routes.py``;
here, that the lean path keeps what Quart's gave every request.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from werkzeug.routing import Map, MapAdapter, Rule

from tei_manager.api import exchange, inference_asgi, serve_api
from tei_manager.api.auth import RequestGuard
from tei_manager.api.inference import INFERENCE_MAX_BODY_BYTES, Answer, InferenceRequest
from tei_manager.api.openai_routes import OpenAIDoor
from tei_manager.auth.security import build_security
from tei_manager.config import InstanceConfig, parse_config
from tei_manager.core.instances import InstanceTable
from tei_manager.core.ports import PortAllocator
from tei_manager.gateway.relay import Gateway, create_gateway
from tei_manager.grpc.server import GrpcServer
from tei_manager.multiplexer.server import shared_routing
from tests.fake_manager import FakeManager
from tests.test_api_connections import Connection, read_until_closed
from tests.test_inference_routes import Backend, InfoBackend, vector

KEY = "ci-secret"
ORIGIN = "https://ui.example.com"
EMBED = json.dumps({"model": "b", "input": "one two"}).encode()


@dataclass
class Served:
    port: int
    backend: Backend
    gateway: Gateway
    manager: FakeManager
    opened: list[trio.SocketStream]

    async def connection(self) -> Connection:
        self.opened.append(await trio.open_tcp_stream("127.0.0.1", self.port))
        return Connection(self.opened[-1])

    def metrics(self) -> str:
        return generate_latest(self.manager.metrics.prometheus).decode()


@pytest.fixture
async def opened() -> AsyncIterator[list[trio.SocketStream]]:
    """Client streams, each closed when the test ends."""
    streams: list[trio.SocketStream] = []
    yield streams
    for stream in streams:
        await stream.aclose()


async def serve(
    nursery: trio.Nursery,
    tmp_path: Path,
    opened: list[trio.SocketStream],
    extra: str = "",
    *,
    keep_alive: float = 5,
    shutdown: trio.Event | None = None,
    drain_timeout: float | None = None,
) -> Served:
    config = parse_config(
        f"""
api_port = 0
grpc_port = 0
api_keep_alive_timeout_secs = {keep_alive}
state_file = "{tmp_path / "state.toml"}"
log_dir = "{tmp_path / "logs"}"
{extra}
""",
        env={},
    )
    backend = Backend()
    backend_port = await nursery.start(GrpcServer([backend, InfoBackend()]).run)
    table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    record = table.add(
        InstanceConfig(name="b", model_id="m/b", max_concurrent_requests=1),
        created_at=datetime.now(UTC),
    )
    record.config = msgspec.structs.replace(record.config, port=backend_port)
    record.mark_starting(pid=1, now=datetime.now(UTC))
    record.mark_running()
    manager = FakeManager(config)
    shared = shared_routing(config, table)
    await nursery.start(shared.pool.run)
    gateway = create_gateway(
        config,
        table,
        manager.metrics.prometheus,
        shared,
    )
    security = build_security(config, manager.metrics.prometheus)
    port = await nursery.start(
        partial(
            serve_api,
            manager,
            "127.0.0.1",
            0,
            gateway=gateway,
            security=security,
            shutdown=shutdown,
            drain_timeout_secs=drain_timeout,
        )
    )
    return Served(port, backend, gateway, manager, opened)


async def test_one_connection_carries_inference_and_management_requests(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened)
    conn = await served.connection()
    for _ in range(3):
        status, headers, body = await conn.request("POST", "/v1/embeddings", EMBED)
        assert status == 200 and headers["content-type"] == "application/json"
        assert int(headers["content-length"]) == len(body)
        assert json.loads(body)["data"][0]["embedding"] == pytest.approx(vector("one two"))
    # A body on a GET the route ignores is read off; the next request parses cleanly.
    status, _, body = await conn.request("GET", "/v1/models", b'{"ignored": true}')
    assert status == 200 and json.loads(body)["object"] == "list"
    status, headers, body = await conn.request("GET", "/tei/b/health")
    assert (status, body) == (200, b"") and "content-type" not in headers
    status, _, _ = await conn.request("POST", "/tei/b", json.dumps({"inputs": "x"}).encode())
    assert status == 200
    status, _, _ = await conn.request("GET", "/health/live")  # Quart's, same connection
    assert status == 200
    assert "connection" not in headers
    duration = served.metrics()
    assert 'route="/v1/embeddings",status="200"' in duration
    assert 'route="/tei/<model_id:model>/health",status="200"' in duration


async def test_what_the_inference_path_leaves_to_quart(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened)
    conn = await served.connection()
    status, headers, body = await conn.request("GET", "/v1/embeddings")
    assert status == 405 and "POST" in headers["allow"]
    assert json.loads(body)["error"]["code"] == "METHOD_NOT_ALLOWED"  # in OpenAI's shape
    status, _, body = await conn.request("POST", "/v1/nothing", b"{}")
    assert status == 404 and json.loads(body)["error"]["code"] == "NOT_FOUND"
    status, headers, body = await conn.request("HEAD", "/v1/models")
    assert status == 200 and body == b""
    assert 'route="unmatched",status="405"' in served.metrics()


async def test_a_body_over_the_limit_is_refused_unread_and_the_connection_closed(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened)
    conn = await served.connection()
    head = (
        "POST /v1/embeddings HTTP/1.1\r\nHost: t\r\n"
        f"Content-Length: {INFERENCE_MAX_BODY_BYTES + 1}\r\n\r\n"
    )
    await conn.stream.send_all(head.encode() + b"{")
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.endswith(b"}}"):
        answer += await conn.stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in answer.lower()
    assert b'"code":"PAYLOAD_TOO_LARGE"' in answer


async def test_a_body_that_stalls_is_408_and_the_connection_closed(
    nursery: trio.Nursery,
    tmp_path: Path,
    opened: list[trio.SocketStream],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inference_asgi, "BODY_TIMEOUT_SECS", 0.2)
    monkeypatch.setattr(exchange, "BODY_LINGER_SECS", 0.1)
    served = await serve(nursery, tmp_path, opened)
    conn = await served.connection()
    head = "POST /tei/b/embed HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n"
    await conn.stream.send_all(head.encode() + b"{")
    with trio.fail_after(5):
        answer = await read_until_closed(conn.stream)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"connection: close" in answer.lower()
    assert answer.endswith(b'"error_type":"Validation"}')


async def test_a_client_that_leaves_cancels_its_request_and_frees_its_slot(
    nursery: trio.Nursery, tmp_path: Path, opened: list[trio.SocketStream]
) -> None:
    served = await serve(nursery, tmp_path, opened)
    conn = await served.connection()
    hang = json.dumps({"model": "b", "input": "hang"}).encode()
    head = f"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: {len(hang)}\r\n\r\n"
    await conn.stream.send_all(head.encode() + hang)
    await served.backend.hanging.wait()
    assert served.gateway.admission.statistics()["b"].in_flight == 1
    await conn.stream.aclose()
    # The instance still hangs; the next request (limit 1) gets the slot only because
    # the first one was cancelled when its client left.
    fresh = await served.connection()
    with trio.fail_after(5):
        assert (await fresh.request("POST", "/v1/embeddings", EMBED))[0] == 200
    assert served.gateway.admission.statistics()["b"].in_flight == 0
    assert not served.backend.release.is_set()
    errors = 'tei_manager_inference_errors_total{model="m/b",route="/v1/embeddings",status="499"}'
    assert errors in served.metrics()


async def test_auth_cors_and_the_access_log_apply_to_inference_requests(
    nursery: trio.Nursery,
    tmp_path: Path,
    opened: list[trio.SocketStream],
    caplog: pytest.LogCaptureFixture,
) -> None:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    served = await serve(
        nursery,
        tmp_path,
        opened,
        f"""
[auth]
enabled = true
providers = ["api_key"]
[auth.api_key]
keys = [{{ name = "ci", scopes = ["inference"], sha256 = "{digest}" }}]
[cors]
allowed_origins = ["{ORIGIN}"]
""",
    )
    conn = await served.connection()
    caplog.set_level(logging.INFO, logger="tei_manager.access")
    origin = [("Origin", ORIGIN)]
    # Refused with its body unread by the handler: the connection still carries the next one.
    status, headers, body = await conn.request("POST", "/v1/embeddings", EMBED, origin)
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert headers["access-control-allow-origin"] == ORIGIN
    assert "connection" not in headers
    assert json.loads(body)["error"]["code"] == "UNAUTHENTICATED"  # in OpenAI's shape
    auth = [("Authorization", f"Bearer {KEY}"), *origin]
    status, headers, body = await conn.request("POST", "/v1/embeddings", EMBED, auth)
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    assert len(json.loads(body)["data"]) == 1
    logged = [r.getMessage() for r in caplog.records if r.name == "tei_manager.access"]
    assert any("POST /v1/embeddings 401 identity=-" in line for line in logged)
    assert any("POST /v1/embeddings 200 identity=ci" in line for line in logged)
    # The CORS preflight is Quart's, as before.
    status, headers, _ = await conn.request(
        "OPTIONS", "/v1/embeddings", headers=[*origin, ("Access-Control-Request-Method", "POST")]
    )
    assert status == 204 and headers["access-control-allow-origin"] == ORIGIN


def test_routing_answers_are_remembered_within_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    class CountingMap(Map):
        """Werkzeug's map, noting each path its matcher is asked about."""

        def bind(self, *args: Any, **kwargs: Any) -> MapAdapter:
            adapter = super().bind(*args, **kwargs)
            match = adapter.match

            def counted(path: str, method: str, **options: Any) -> Any:
                asked.append(path)
                return match(path, method, **options)

            adapter.match = counted  # type: ignore[method-assign,assignment]
            return adapter

    async def view(request: InferenceRequest) -> Answer:
        return Answer(b"{}")

    monkeypatch.setattr(inference_asgi, "MAX_REMEMBERED_MATCHES", 4)
    config = parse_config(f'state_file = "{tmp_path / "s.toml"}"\nlog_dir = "{tmp_path}"\n', env={})
    rules = [
        Rule("/v1/embeddings", endpoint="embed", methods=["POST"]),
        Rule("/tei/<path:model>/embed", endpoint="tei_embed", methods=["POST"]),
    ]
    door = OpenAIDoor()
    dispatch = inference_asgi.InferenceDispatch(
        CountingMap(rules),
        {"embed": (door, view), "tei_embed": (door, view)},
        RequestGuard(build_security(config, CollectorRegistry())),
    )
    first = dispatch.match_path("POST", "/v1/embeddings")
    assert first is not None and first.label == "/v1/embeddings" and first.view is view
    assert dispatch.match_path("POST", "/v1/embeddings") is first
    assert dispatch.match_path("GET", "/v1/embeddings") is None  # 405: Quart's
    assert dispatch.match_path("GET", "/v1/embeddings") is None
    assert asked == ["/v1/embeddings", "/v1/embeddings"]
    # Each name its own answer.
    a, b = (dispatch.match_path("POST", f"/tei/{name}/embed") for name in "ab")
    assert a is not None and a.model == "a" and b is not None and b.model == "b"
    assert len(asked) == 4
    # The fifth remembered answer forgets the other four: the first is asked again.
    assert dispatch.match_path("POST", "/tei/c/embed") is not None
    assert dispatch.match_path("POST", "/v1/embeddings") == first
    assert asked[4:] == ["/tei/c/embed", "/v1/embeddings"]
    # A path longer than the bound is never remembered.
    long = "/tei/" + "x" * inference_asgi.MAX_REMEMBERED_PATH_CHARS + "/embed"
    for _ in range(2):
        found = dispatch.match_path("POST", long)
        assert found is not None and found.model == "x" * inference_asgi.MAX_REMEMBERED_PATH_CHARS
    assert asked[6:] == [long, long]
