"""The inference routes over a real socket, against an in-process tei.v1 backend the test steers.

Fast checks of what does not need a model: admission (429 with Retry-After on both
doors), JSON assembly of large answers, body limits, metrics, the OpenAPI document.
The real clients against real workers are in ``tests/test_http_inference.py``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import httpx
import msgspec
import numpy as np
import openai
import pytest
import trio
from prometheus_client import generate_latest

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.api import create_app, serve_api
from tei_manager.api.auth import scope_for
from tei_manager.api.inference import INFERENCE_MAX_BODY_BYTES, retry_headers
from tei_manager.api.openapi import build_openapi
from tei_manager.api.refusals import render_refusal
from tei_manager.auth.identity import Refusal, Scope
from tei_manager.auth.security import build_security
from tei_manager.config import InstanceConfig, ManagerConfig, parse_config
from tei_manager.core.instances import InstanceStatus, InstanceTable
from tei_manager.core.ports import PortAllocator
from tei_manager.errors import ErrorCode
from tei_manager.gateway.errors import InferenceError, Kind
from tei_manager.gateway.relay import Gateway, create_gateway
from tei_manager.grpc.calls import CallContext
from tei_manager.grpc.server import GrpcServer
from tei_manager.multiplexer.server import shared_routing
from tests.fake_manager import FakeManager
from tests.httpclient import HttpResponse, http_request

DIM = 384


def vector(text: str) -> list[float]:
    """A deterministic, text-dependent embedding with awkward float32 values."""
    rng = np.random.default_rng(len(text) * 7919 + sum(map(ord, text)))
    return rng.standard_normal(DIM).astype(np.float32).tolist()


class InfoBackend(tei_grpc.InfoServicer):
    async def Info(
        self, request: tei_pb2.InfoRequest, context: CallContext
    ) -> tei_pb2.InfoResponse:
        return tei_pb2.InfoResponse(
            model_id="m/b", model_type=tei_pb2.MODEL_TYPE_EMBEDDING, max_client_batch_size=32
        )


class Backend(tei_grpc.EmbedServicer):
    """An embedding instance; a text "hang" waits until ``release`` is set."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.hanging = trio.Event()

    async def _embed(self, request: tei_pb2.EmbedRequest) -> tei_pb2.EmbedResponse:
        if request.inputs == "hang":
            self.hanging.set()
            await self.release.wait()
        return tei_pb2.EmbedResponse(
            embeddings=vector(request.inputs),
            metadata=tei_pb2.Metadata(compute_tokens=len(request.inputs.split())),
        )

    async def Embed(
        self, request: tei_pb2.EmbedRequest, context: CallContext
    ) -> tei_pb2.EmbedResponse:
        return await self._embed(request)

    async def EmbedStream(
        self, requests: AsyncIterator[tei_pb2.EmbedRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.EmbedResponse]:
        async for request in requests:
            yield await self._embed(request)


class Setup:
    def __init__(
        self,
        port: int,
        backend: Backend,
        gateway: Gateway,
        manager: FakeManager,
        table: InstanceTable,
    ) -> None:
        self.port = port
        self.backend = backend
        self.gateway = gateway
        self.manager = manager
        self.table = table

    async def post(self, path: str, body: object) -> HttpResponse:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await http_request(self.port, "POST", path, body=data)

    async def get(self, path: str) -> HttpResponse:
        return await http_request(self.port, "GET", path)


@pytest.fixture
async def setup(nursery: trio.Nursery, tmp_path: Path) -> Setup:
    config = ManagerConfig(
        api_host="127.0.0.1", api_port=0, grpc_port=0,
        state_file=str(tmp_path / "state.toml"), log_dir=str(tmp_path / "logs"),
        max_queued_requests=0,
    )  # fmt: skip
    backend = Backend()
    backend_port = await nursery.start(GrpcServer([backend, InfoBackend()]).run)
    table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    now = datetime.now(UTC)
    for name, status in (("b", InstanceStatus.RUNNING), ("idle", InstanceStatus.STOPPED)):
        record = table.add(
            InstanceConfig(name=name, model_id="m/b", max_concurrent_requests=1), created_at=now
        )
        record.config = msgspec.structs.replace(record.config, port=backend_port)
        record.mark_starting(pid=1, now=now)
        if status is InstanceStatus.RUNNING:
            record.mark_running()
        else:
            record.mark_stopped()
    manager = FakeManager(config)
    shared = shared_routing(config, table)
    await nursery.start(shared.pool.run)
    gateway = create_gateway(
        config,
        table,
        manager.metrics.prometheus,
        shared,
    )
    port = await nursery.start(partial(serve_api, manager, "127.0.0.1", 0, gateway=gateway))
    return Setup(port, backend, gateway, manager, table)


async def test_large_answers_are_exact_float32_json(setup: Setup) -> None:
    texts = [f"text number {i}" for i in range(100)]  # 38400 floats: the Arrow path
    reply = await setup.post("/v1/embeddings", {"model": "b", "input": texts})
    assert reply.status == 200, reply.body
    body = reply.json()
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert np.array_equal(got, np.array([vector(t) for t in texts], dtype=np.float32))
    assert [d["index"] for d in body["data"]] == list(range(100))
    assert body["usage"] == {"prompt_tokens": 300, "total_tokens": 300}
    assert body["model"] == "b" and body["object"] == "list"
    small = (await setup.post("/v1/embeddings", {"model": "m/b", "input": "one"})).json()
    assert np.array_equal(np.array(small["data"][0]["embedding"], np.float32), vector("one"))
    b64 = await setup.post(
        "/v1/embeddings", {"model": "b", "input": ["x y"], "encoding_format": "base64"}
    )
    floats = np.frombuffer(base64.b64decode(b64.json()["data"][0]["embedding"]), "<f4")
    assert np.array_equal(floats, np.array(vector("x y"), np.float32))
    for root in ("/tei/b", "/tei/b/"):  # TEI's POST /, reached without a redirect
        answer = await setup.post(root, {"inputs": "one"})
        assert answer.status == 200
        assert answer.json() == [pytest.approx(vector("one"))]
    tei = await setup.post("/tei/b/embed", {"inputs": texts[:30]})  # 11520 floats
    assert np.array_equal(np.array(tei.json(), np.float32), got[:30])


async def test_over_capacity_is_429_with_retry_after_on_both_doors(setup: Setup) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(setup.post, "/v1/embeddings", {"model": "b", "input": "hang"})
        await setup.backend.hanging.wait()
        openai = await setup.post("/v1/embeddings", {"model": "b", "input": "x"})
        assert openai.status == 429
        assert int(openai.headers["retry-after"]) >= 1
        error = openai.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "OVERLOADED")
        assert "max_concurrent_requests 1" in error["message"]
        tei = await setup.post("/tei/b/embed", {"inputs": "x"})
        assert tei.status == 429 and tei.json()["error_type"] == "Overloaded"
        assert "retry-after" in tei.headers
        setup.backend.release.set()
    after = await setup.post("/v1/embeddings", {"model": "b", "input": "x"})
    assert after.status == 200
    metrics = generate_latest(setup.manager.metrics.prometheus).decode()
    assert (
        'tei_manager_inference_errors_total{model="m/b",route="/v1/embeddings",status="429"} 1.0'
        in metrics
    )
    assert 'tei_manager_inference_requests_total{model="m/b",route="/v1/embeddings"} 3.0' in metrics
    assert (
        'tei_manager_inference_input_tokens_total{model="m/b",route="/v1/embeddings"} 2.0'
        in metrics
    )
    assert 'tei_manager_inference_queue_depth{instance="b"} 0.0' in metrics


async def test_routing_failures_and_bad_bodies(setup: Setup) -> None:
    stopped = await setup.post("/v1/embeddings", {"model": "idle", "input": "x"})
    assert stopped.status == 503 and stopped.json()["error"]["type"] == "server_error"
    assert (await setup.post("/tei/idle/embed", {"inputs": "x"})).json()[
        "error_type"
    ] == "Unhealthy"
    assert (await setup.get("/tei/b/health")).status == 200
    unhealthy = await setup.get("/tei/idle/health")
    assert unhealthy.status == 503 and unhealthy.json()["error_type"] == "Unhealthy"
    assert (await setup.get("/tei/nope/health")).status == 404
    long_name = await setup.post("/v1/embeddings", {"model": "m" * 5000, "input": "x"})
    assert long_name.status == 400 and len(long_name.body) < 300  # the name is not echoed
    missing = await setup.post("/v1/embeddings", {"input": "x"})
    assert missing.status == 400 and missing.json()["error"]["param"] == "model"
    mixed = await setup.post("/v1/embeddings", {"model": "b", "input": ["a", [1, 2]]})
    assert mixed.status == 400 and mixed.json()["error"]["param"] == "input[1]"
    dims = await setup.post("/v1/embeddings", {"model": "b", "input": "a", "dimensions": 0})
    assert dims.json()["error"]["param"] == "dimensions"
    big = await setup.post("/v1/embeddings", b" " * (INFERENCE_MAX_BODY_BYTES + 1))
    assert big.status == 413 and big.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    # Bodies between the management limit (1 MiB) and the inference one are accepted.
    texts = ["word " * 110] * 2000
    assert (await setup.post("/v1/embeddings", {"model": "b", "input": texts})).status == 200
    tei_big = await setup.post("/tei/b/embed", b" " * (INFERENCE_MAX_BODY_BYTES + 1))
    assert tei_big.status == 413 and tei_big.json()["error_type"] == "Validation"


def test_openapi_documents_the_inference_routes_with_their_scope() -> None:
    doc = build_openapi()
    embeddings = doc["paths"]["/v1/embeddings"]["post"]
    assert embeddings["x-scope"] == "inference"
    assert embeddings["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/EmbeddingsRequest"
    }
    assert embeddings["responses"]["429"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OpenAIError"
    }
    embed = doc["paths"]["/tei/{model}/embed"]["post"]
    assert embed["parameters"][0]["name"] == "model"
    assert "424" in embed["responses"]
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


async def test_the_app_serves_exactly_the_documented_inference_routes(setup: Setup) -> None:
    security = build_security(setup.manager.config, None)  # no second set of counters
    app = create_app(setup.manager, security, setup.gateway)
    served = {
        (rule.rule, method)
        for rule in app.url_map.iter_rules()
        for method in rule.methods or ()
        if method not in {"HEAD", "OPTIONS"}
    }
    documented = {
        (path.replace("{model}", "<model_id:model>"), method.upper())
        for path, item in build_openapi()["paths"].items()
        for method, op in item.items()
        if "inference" in op.get("tags", ())
    }
    assert documented and documented <= served


def test_the_auth_layer_asks_each_inference_route_for_its_documented_scope() -> None:
    inference = [
        (method.upper(), path.replace("{model}", "org/m"), op["x-scope"])
        for path, item in build_openapi()["paths"].items()
        for method, op in item.items()
        if "inference" in op.get("tags", ())
    ]
    assert len(inference) > 10
    for method, path, scope in inference:
        assert scope == Scope.INFERENCE
        assert scope_for(method, path) is Scope.INFERENCE, (method, path)


async def test_inference_routes_need_the_inference_scope(
    setup: Setup, nursery: trio.Nursery, tmp_path: Path
) -> None:
    keys = {"ci": ("ci-secret", "inference"), "reader": ("reader-secret", "read")}
    rows = ", ".join(
        f'{{ name = "{name}", scopes = ["{scope}"], '
        f'sha256 = "{hashlib.sha256(key.encode()).hexdigest()}" }}'
        for name, (key, scope) in keys.items()
    )
    config = parse_config(
        f"""
api_port = 0
grpc_port = 0
state_file = "{tmp_path / "auth-state.toml"}"
log_dir = "{tmp_path / "auth-logs"}"
[auth]
enabled = true
providers = ["api_key"]
[auth.api_key]
keys = [{rows}]
""",
        env={},
    )
    manager = FakeManager(config)
    security = build_security(config, manager.metrics.prometheus)
    port = await nursery.start(
        partial(serve_api, manager, "127.0.0.1", 0, gateway=setup.gateway, security=security)
    )

    async def status(method: str, path: str, key: str | None, body: object = None) -> int:
        headers = [] if key is None else [("Authorization", f"Bearer {key}")]
        data = None if body is None else json.dumps(body).encode()
        return (await http_request(port, method, path, body=data, headers=headers)).status

    embed = {"model": "b", "input": "hi"}
    assert await status("POST", "/v1/embeddings", None, embed) == 401
    assert await status("POST", "/v1/embeddings", "ci-secret", embed) == 200
    assert await status("POST", "/tei/b/embed", "ci-secret", {"inputs": "hi"}) == 200
    assert await status("GET", "/v1/models", "ci-secret") == 200
    assert await status("GET", "/instances", "ci-secret") == 403
    assert await status("POST", "/v1/embeddings", "reader-secret", embed) == 403
    assert await status("GET", "/v1/models", "reader-secret") == 403
    assert await status("GET", "/instances", "reader-secret") == 200


def keys_rows(keys: dict[str, tuple[str, str]]) -> str:
    return ", ".join(
        f'{{ name = "{name}", scopes = ["{scope}"], '
        f'sha256 = "{hashlib.sha256(key.encode()).hexdigest()}" }}'
        for name, (key, scope) in keys.items()
    )


async def test_no_such_route_and_method_not_allowed_answer_in_each_doors_error_shape(
    setup: Setup,
) -> None:
    """What routing itself refuses under a door is in that door's shape too: the
    OpenAI SDK raises NotFoundError with our message, a TEI client reads its shape."""
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{setup.port}/v1", api_key="x")
    with pytest.raises(openai.NotFoundError, match="no such route: POST /v1/nope"):
        await client.post("/nope", cast_to=httpx.Response, body={})
    await client.close()
    missing = await setup.post("/v1/nope", {})
    assert missing.status == 404
    assert missing.json() == {
        "error": {
            "message": "no such route: POST /v1/nope",
            "type": "invalid_request_error",
            "param": None,
            "code": "NOT_FOUND",
        }
    }
    wrong = await setup.get("/v1/embeddings")
    assert wrong.status == 405 and wrong.headers["allow"] == "OPTIONS, POST"
    assert wrong.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert wrong.json()["error"]["message"].startswith("GET is not allowed on /v1/embeddings")
    tei = await setup.get("/tei/b/embed")
    assert tei.status == 405
    assert tei.json() == {
        "error": "GET is not allowed on /tei/b/embed: use OPTIONS, POST",
        "error_type": "Validation",
    }
    long = await setup.post("/v1/" + "x" * 5000, {})
    assert long.status == 404 and len(long.body) < 400  # the path is not echoed whole
    manager = await setup.post("/nope", {})
    assert manager.status == 404 and manager.json()["code"] == "NOT_FOUND"  # the manager's


async def test_refusals_answer_in_each_doors_error_shape(
    setup: Setup, nursery: trio.Nursery, tmp_path: Path
) -> None:
    keys = {"ci": ("ci-secret", "inference"), "reader": ("reader-secret", "read")}
    config = parse_config(
        f"""
api_port = 0
grpc_port = 0
state_file = "{tmp_path / "auth-state.toml"}"
log_dir = "{tmp_path / "auth-logs"}"
[auth]
enabled = true
providers = ["api_key"]
[auth.api_key]
keys = [{keys_rows(keys)}]
[rate_limit]
enabled = true
inference = {{ requests_per_sec = 0.01, burst = 2 }}
""",
        env={},
    )
    manager = FakeManager(config)
    security = build_security(config, manager.metrics.prometheus)
    port = await nursery.start(
        partial(serve_api, manager, "127.0.0.1", 0, gateway=setup.gateway, security=security)
    )

    def embed(key: str) -> None:
        base = f"http://127.0.0.1:{port}/v1"
        with openai.OpenAI(base_url=base, api_key=key, max_retries=0) as client:
            client.embeddings.create(model="b", input="hi")

    async def refused(key: str, error: type[openai.APIStatusError]) -> openai.APIStatusError:
        with pytest.raises(error) as raised:
            await trio.to_thread.run_sync(embed, key)
        return raised.value

    # The OpenAI SDK raises its own exception classes, carrying our message.
    wrong = await refused("wrong-secret", openai.AuthenticationError)
    assert wrong.body == {
        "message": "the API key is not valid",
        "type": "invalid_request_error",
        "param": None,
        "code": "UNAUTHENTICATED",
    }
    assert "the API key is not valid" in str(wrong)
    assert wrong.response.headers["www-authenticate"] == (
        'Bearer realm="tei-manager", error="invalid_token"'
    )
    denied = await refused("reader-secret", openai.PermissionDeniedError)
    assert isinstance(denied.body, dict)
    assert denied.body["type"] == "invalid_request_error" and denied.body["code"] == "FORBIDDEN"
    assert "inference" in denied.body["message"]
    await trio.to_thread.run_sync(embed, "ci-secret")
    await trio.to_thread.run_sync(embed, "ci-secret")
    limited = await refused("ci-secret", openai.RateLimitError)
    assert isinstance(limited.body, dict)
    assert (limited.body["type"], limited.body["code"]) == ("requests", "OVERLOADED")
    assert 90 <= int(limited.response.headers["retry-after"]) <= 100

    # TEI's door: TEI's {"error", "error_type"}, with the same headers.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        missing = await http.post("/tei/b/embed", json={"inputs": "hi"})
        assert missing.status_code == 401
        assert missing.json()["error_type"] == "Validation"
        assert missing.json()["error"].startswith("credentials required")
        assert missing.headers["www-authenticate"] == 'Bearer realm="tei-manager"'
        reader = {"Authorization": "Bearer reader-secret"}
        forbidden = await http.get("/tei/b/health", headers=reader)
        assert forbidden.status_code == 403 and forbidden.json()["error_type"] == "Validation"
        ci = {"Authorization": "Bearer ci-secret"}
        tei_limited = await http.post("/tei/b/embed", json={"inputs": "hi"}, headers=ci)
        assert tei_limited.status_code == 429
        assert tei_limited.json()["error_type"] == "Overloaded"
        assert int(tei_limited.headers["retry-after"]) >= 1
        # Elsewhere, the manager's own shape.
        manager_shape = await http.get("/instances")
        assert manager_shape.status_code == 401
        assert set(manager_shape.json()) == {"error", "code", "timestamp"}


async def test_a_routing_header_names_the_model_when_the_body_does_not(setup: Setup) -> None:
    async def post(path: str, body: object, *headers: tuple[str, str]) -> HttpResponse:
        data = json.dumps(body).encode()
        return await http_request(setup.port, "POST", path, body=data, headers=headers)

    by_model = await post("/v1/embeddings", {"input": "one"}, ("x-tei-model", "m/b"))
    assert by_model.status == 200, by_model.body
    assert by_model.json()["model"] == "m/b"
    assert by_model.json()["data"][0]["embedding"] == pytest.approx(vector("one"))
    by_instance = await post("/v1/embeddings", {"input": "one"}, ("x-tei-instance", "b"))
    assert by_instance.status == 200 and by_instance.json()["model"] == "b"
    agreeing = await post("/v1/embeddings", {"model": "b", "input": "x"}, ("x-tei-instance", "b"))
    assert agreeing.status == 200
    assert (await post("/tei/b/embed", {"inputs": "x"}, ("x-tei-model", "b"))).status == 200
    retrieved = await http_request(
        setup.port, "GET", "/v1/models/m%2Fb", headers=[("x-tei-model", "m/b")]
    )
    assert retrieved.status == 200
    # Disagreements: 400 in OpenAI's shape, 422 Validation in TEI's, naming both fields.
    openai = await post("/v1/embeddings", {"model": "b", "input": "x"}, ("x-tei-model", "m/b"))
    assert openai.status == 400
    error = openai.json()["error"]
    assert error["param"] == "model" and error["code"] == "VALIDATION_ERROR"
    assert error["message"].startswith('model, x-tei-model: model "b" and header x-tei-model')
    tei = await post("/tei/b/embed", {"inputs": "x"}, ("x-tei-instance", "idle"))
    assert tei.status == 422 and tei.json()["error_type"] == "Validation"
    assert tei.json()["error"].startswith("model, x-tei-instance")
    health = await http_request(setup.port, "GET", "/tei/b/health", headers=[("x-tei-model", "z")])
    assert health.status == 422
    both = await post(
        "/v1/rerank",
        {"query": "q", "documents": ["d"]},
        ("x-tei-instance", "b"),
        ("x-tei-model", "m/b"),
    )
    assert both.status == 400 and "x-tei-instance, x-tei-model" in both.json()["error"]["message"]
    long = await post("/v1/embeddings", {"input": "x"}, ("x-tei-model", "m" * 5000))
    assert long.status == 400 and len(long.body) < 300  # the value is not echoed
    far = await post("/v1/embeddings", {"model": "m" * 300, "input": "x"}, ("x-tei-model", "b"))
    assert far.status == 400 and len(far.body) < 400
    neither = await post("/v1/embeddings", {"input": "x"})
    assert neither.status == 400 and "x-tei-model" in neither.json()["error"]["message"]


def test_openapi_documents_the_routing_headers_where_a_model_is_named() -> None:
    doc = build_openapi()
    paths = doc["paths"]
    for path, method, expected in (
        ("/v1/embeddings", "post", True),
        ("/v1/rerank", "post", True),
        ("/v1/models/{model}", "get", True),
        ("/tei/{model}/embed", "post", True),
        ("/v1/models", "get", False),
    ):
        params = paths[path][method].get("parameters", [])
        headers = {p["name"] for p in params if p["in"] == "header"}
        assert headers == ({"x-tei-model", "x-tei-instance"} if expected else set()), path
    # The header may name the model, so the bodies may leave it out.
    for name in ("EmbeddingsRequest", "RerankRequest"):
        assert "model" not in doc["components"]["schemas"][name]["required"]


@pytest.mark.parametrize(
    ("delay", "header"), [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.2, "2"), (2.5, "3"), (59.01, "60")]
)
def test_retry_after_rounds_up_on_every_path(delay: float, header: str) -> None:
    # A client that waits exactly Retry-After must never come back before the delay
    # is over: the gateway's refusals and the guard's rate limit round up alike.
    gateway = InferenceError(Kind.OVERLOADED, "busy", retry_after=delay)
    assert retry_headers(gateway) == (("Retry-After", header),)
    refusal = Refusal(ErrorCode.OVERLOADED, "slow down", retry_after_secs=delay)
    answer = render_refusal("/v1/embeddings", refusal, bearer=False)
    assert answer.headers["Retry-After"] == header
