"""The REST API, driven over a real socket through ``serve_api`` with an in-memory manager.

Requests go through Hypercorn and Quart-Trio exactly as a client's would (the
small h11 client in ``tests/httpclient.py``); a few checks use Quart's test
client where the socket adds nothing.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from tei_manager.api import create_app, serve_api
from tei_manager.api.app import NO_RESPONSE_STATUS, UNMATCHED_ROUTE
from tei_manager.api.openapi import build_openapi
from tei_manager.api.routes import MAX_BODY_BYTES, OPERATIONS, PROMETHEUS_TEXT, quart_rule
from tei_manager.api.storage import classify, read_storage
from tei_manager.config import ManagerConfig, SeedInstance
from tei_manager.core.instances import InstanceStatus
from tei_manager.errors import ErrorCode, NotFoundError
from tests.fake_manager import FakeManager, http_count
from tests.httpclient import HttpResponse, http_request

# The contract's InstanceInfo fields, in its order, then ours (next_restart_at).
INSTANCE_FIELDS = [
    "name",
    "model_id",
    "port",
    "status",
    "pid",
    "gpu_id",
    "created_at",
    "uptime_secs",
    "restarts",
    "health_check_failures",
    "last_health_check",
    "prometheus_port",
    "pooling",
    "max_batch_tokens",
    "max_concurrent_requests",
    "last_error",
    "next_restart_at",
    "start",
    "idle_timeout_secs",
    "pinned",
    "device",
    "memory_bytes",
    "served_model_name",
]
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def make_manager(tmp_path: Path, **overrides: Any) -> FakeManager:
    gpu_count = overrides.pop("gpu_count", 1)
    settings: dict[str, Any] = {
        "state_file": str(tmp_path / "state.toml"),
        "log_dir": str(tmp_path / "logs"),
        "api_port": 0,
        "grpc_port": 0,
        "instance_port_start": 20000,
        "instance_port_end": 20009,
        **overrides,
    }
    config = ManagerConfig(**settings)
    return FakeManager(config, gpu_count=gpu_count)


@pytest.fixture
def manager(tmp_path: Path) -> FakeManager:
    return make_manager(tmp_path)


@pytest.fixture
async def port(nursery: trio.Nursery, manager: FakeManager) -> AsyncIterator[int]:
    yield await nursery.start(serve_api, manager, "127.0.0.1", 0)


class Api:
    """Requests against the served API, with JSON bodies."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def __call__(
        self, method: str, path: str, body: object = None, **kwargs: Any
    ) -> HttpResponse:
        raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        return await http_request(self.port, method, path, body=raw, **kwargs)

    async def create(self, name: str, **fields: Any) -> HttpResponse:
        return await self("POST", "/instances", {"name": name, "model_id": "BAAI/bge", **fields})


@pytest.fixture
def api(port: int) -> Api:
    return Api(port)


def assert_error(response: HttpResponse, status: int, code: str, *mentions: str) -> None:
    """``response`` is the contract's error body with this status and code."""
    assert response.status == status, response.body
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "code", "timestamp"}
    assert body["code"] == code
    assert RFC3339_UTC.fullmatch(body["timestamp"])
    for text in mentions:
        assert text in body["error"]


# --- serving -------------------------------------------------------------------------


async def test_serve_hands_back_the_listening_port(
    nursery: trio.Nursery, manager: FakeManager
) -> None:
    port = await nursery.start(serve_api, manager, "127.0.0.1", 0)
    assert port > 0
    assert manager.listening  # readiness learns the listener is up
    # Listening already: a connection succeeds without waiting.
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.aclose()


async def test_a_taken_port_fails_before_serving(
    nursery: trio.Nursery, manager: FakeManager
) -> None:
    port = await nursery.start(serve_api, manager, "127.0.0.1", 0)
    other = FakeManager(manager.config)
    with pytest.raises(OSError, match="in use"):
        await serve_api(other, "127.0.0.1", port)
    assert not other.listening


# --- instances -----------------------------------------------------------------------


async def test_create_answers_201_with_the_instance(api: Api) -> None:
    response = await api.create("bge", pooling="cls", max_batch_tokens=8192)
    assert response.status == 201
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == INSTANCE_FIELDS
    assert body["name"] == "bge"
    assert body["status"] == "starting"
    assert body["port"] == 20000  # allocated from the range
    assert body["pooling"] == "cls"
    assert body["max_batch_tokens"] == 8192
    assert body["max_concurrent_requests"] == 512


async def test_create_takes_json_whatever_the_content_type(api: Api) -> None:
    # The original's runbooks use `curl -d '{...}'`: a form content type.
    response = await api(
        "POST",
        "/instances",
        b'{"name": "model-0", "model_id": "BAAI/bge", "gpu_id": 0}',
        headers=[("Content-Type", "application/x-www-form-urlencoded")],
    )
    assert response.status == 201
    assert response.json()["gpu_id"] == 0


async def test_instances_are_listed_in_creation_order(api: Api) -> None:
    assert (await api("GET", "/instances")).json() == []
    for name in ("zeta", "alpha", "mid"):
        assert (await api.create(name)).status == 201
    response = await api("GET", "/instances")
    assert response.status == 200
    assert [i["name"] for i in response.json()] == ["zeta", "alpha", "mid"]


async def test_get_and_delete_an_instance(api: Api) -> None:
    await api.create("bge", port=20005)
    got = await api("GET", "/instances/bge")
    assert got.status == 200
    assert got.json()["port"] == 20005
    deleted = await api("DELETE", "/instances/bge")
    assert deleted.status == 200
    assert deleted.json()["name"] == "bge"  # as it was
    assert_error(await api("GET", "/instances/bge"), 404, "INSTANCE_NOT_FOUND", '"bge"')
    assert (await api("GET", "/instances")).json() == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/instances/ghost"),
        ("DELETE", "/instances/ghost"),
        ("POST", "/instances/ghost/start"),
        ("POST", "/instances/ghost/stop"),
        ("POST", "/instances/ghost/restart"),
        ("GET", "/instances/ghost/logs"),
    ],
)
async def test_unknown_instance_is_404(api: Api, method: str, path: str) -> None:
    assert_error(await api(method, path), 404, "INSTANCE_NOT_FOUND", "ghost")


async def test_start_stop_restart(api: Api, manager: FakeManager) -> None:
    await api.create("bge")
    assert_error(await api("POST", "/instances/bge/start"), 409, "ALREADY_RUNNING")
    stopped = await api("POST", "/instances/bge/stop")
    assert stopped.status == 200
    assert stopped.json()["status"] == "stopped"
    assert_error(await api("POST", "/instances/bge/stop"), 409, "NOT_RUNNING")
    started = await api("POST", "/instances/bge/start")
    assert started.status == 200
    assert started.json()["status"] == "starting"
    manager.set_status("bge", InstanceStatus.RUNNING)
    restarted = await api("POST", "/instances/bge/restart")
    assert restarted.status == 200
    assert restarted.json()["restarts"] == 1


# --- create validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code", "mentions"),
    [
        (b"{bad json", 400, "MALFORMED_JSON", ["invalid JSON"]),
        (b"", 400, "MALFORMED_JSON", []),
        (b"\xff\xfe", 400, "MALFORMED_JSON", []),
        (b"[1, 2]", 400, "VALIDATION_ERROR", ["object"]),
        (b'"bge"', 400, "VALIDATION_ERROR", []),
        ({"name": "a", "model_id": "BAAI/bge", "colour": "red"}, 400, "VALIDATION_ERROR",
         ["colour"]),
        ({"name": "a"}, 400, "VALIDATION_ERROR", ["model_id"]),
        ({"name": "a", "model_id": "BAAI/bge", "port": "x"}, 400, "VALIDATION_ERROR", ["port"]),
        ({"name": "a", "model_id": "BAAI/bge", "pooling": "max"}, 400, "VALIDATION_ERROR",
         ["pooling", "cls|mean|splade|last-token"]),
        ({"name": "a", "model_id": "BAAI/bge", "port": 80}, 400, "INVALID_PORT",
         ["port", "80 is privileged: use 1024-65535"]),
        ({"name": "../etc", "model_id": "BAAI/bge"}, 400, "INVALID_NAME", ["name"]),
        ({"name": "a", "model_id": "not a model"}, 400, "INVALID_MODEL_ID", ["model_id"]),
        ({"name": "a", "model_id": "BAAI/bge", "gpu_id": 3}, 400, "INVALID_GPU_ID",
         ["gpu_id", "3 does not exist"]),
    ],
)  # fmt: skip
async def test_create_rejects_bad_bodies(
    api: Api, body: object, status: int, code: str, mentions: list[str]
) -> None:
    assert_error(await api("POST", "/instances", body), status, code, *mentions)
    assert (await api("GET", "/instances")).json() == []


async def test_create_conflicts(api: Api) -> None:
    await api.create("bge", port=20003)
    assert_error(await api.create("bge"), 409, "INSTANCE_EXISTS", "bge")
    assert_error(await api.create("other", port=20003), 409, "PORT_CONFLICT", "20003")


async def test_create_limits(tmp_path: Path, nursery: trio.Nursery) -> None:
    limited = make_manager(tmp_path, max_instances=1)
    api = Api(await nursery.start(serve_api, limited, "127.0.0.1", 0))
    await api.create("one")
    assert_error(await api.create("two"), 422, "MAX_INSTANCES_REACHED")

    narrow = make_manager(tmp_path, instance_port_start=21000, instance_port_end=21000)
    api = Api(await nursery.start(serve_api, narrow, "127.0.0.1", 0))
    await api.create("one")
    assert_error(await api.create("two"), 422, "PORT_ALLOCATION_FAILED")


async def test_payload_too_large(api: Api) -> None:
    body = b" " * (MAX_BODY_BYTES + 1)
    # Announced by Content-Length: refused before the body is read.
    assert_error(await api("POST", "/instances", body), 413, "PAYLOAD_TOO_LARGE", "1048576")
    # Chunked, with no length announced: refused once the limit is crossed.
    assert_error(await api("POST", "/instances", body, chunked=True), 413, "PAYLOAD_TOO_LARGE")
    # Exactly at the limit is read and judged on its content.
    at_limit = b" " * (MAX_BODY_BYTES - 2) + b"[]"
    assert_error(await api("POST", "/instances", at_limit), 400, "VALIDATION_ERROR")


# --- logs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "lines", "start", "end"),
    [
        ("", list(range(10)), 0, 10),
        ("?start=-3", [7, 8, 9], 7, 10),
        ("?start=2&end=4", [2, 3], 2, 4),
        ("?end=-8", [0, 1], 0, 2),
        ("?start=50", [], 10, 10),
        ("?start=-100&end=2", [0, 1], 0, 2),
        ("?start=5&end=3", [], 5, 5),
        ("?start=&end=", list(range(10)), 0, 10),
    ],
)
async def test_logs_slice_like_python(
    api: Api, manager: FakeManager, query: str, lines: list[int], start: int, end: int
) -> None:
    await api.create("bge")
    manager.logs["bge"] = [f"line {i}" for i in range(10)]
    response = await api("GET", f"/instances/bge/logs{query}")
    assert response.status == 200
    assert response.json() == {
        "lines": [f"line {i}" for i in lines],
        "start": start,
        "end": end,
        "total_lines": 10,
    }


@pytest.mark.parametrize(
    ("query", "field"),
    [("?start=abc", "start"), ("?end=1.5", "end"), ("?start=1_000", "start"),
     ("?end=" + "9" * 40, "end")],
)  # fmt: skip
async def test_logs_bounds_must_be_integers(api: Api, query: str, field: str) -> None:
    await api.create("bge")
    response = await api("GET", f"/instances/bge/logs{query}")
    assert_error(response, 400, "VALIDATION_ERROR", f"{field}: ", "is not an integer")
    assert len(response.body) < 300  # a long value is not echoed whole


# --- errors that are not the manager's ----------------------------------------------


async def test_unknown_path_is_404_in_the_error_shape(api: Api) -> None:
    assert_error(await api("GET", "/nowhere"), 404, "NOT_FOUND", "GET /nowhere")
    assert_error(await api("GET", "/instances/a/b/c"), 404, "NOT_FOUND")
    assert_error(await api("GET", "/instances/"), 404, "NOT_FOUND")


async def test_wrong_method_is_405_with_allow(api: Api) -> None:
    response = await api("PUT", "/instances")
    assert_error(response, 405, "METHOD_NOT_ALLOWED", "PUT", "/instances")
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD", "OPTIONS", "POST"}
    assert_error(await api("POST", "/health"), 405, "METHOD_NOT_ALLOWED")
    assert_error(await api("GET", "/instances/bge/start"), 405, "METHOD_NOT_ALLOWED")


async def test_unexpected_error_is_500_without_details(
    api: Api, manager: FakeManager, caplog: pytest.LogCaptureFixture
) -> None:
    await api.create("bge")
    manager.fail_with = RuntimeError("secret detail at /srv/private")
    with caplog.at_level(logging.ERROR, logger="tei_manager.api"):
        response = await api("POST", "/instances/bge/restart")
    assert_error(response, 500, "INTERNAL_ERROR")
    assert b"secret" not in response.body
    assert b"Traceback" not in response.body
    # The details are in the server's log, with the traceback.
    record = next(r for r in caplog.records if "POST /instances/bge/restart" in r.getMessage())
    assert record.exc_info is not None
    assert "secret detail" in str(record.exc_info[1])


async def test_os_error_is_io_error(api: Api, manager: FakeManager) -> None:
    await api.create("bge")
    manager.fail_with = OSError(28, "No space left on device", "/srv/private/state.toml")
    response = await api("POST", "/instances/bge/stop")
    assert_error(response, 500, "IO_ERROR", "No space left on device")
    assert b"/srv/private" not in response.body


async def test_errors_inside_exception_groups(api: Api, manager: FakeManager) -> None:
    # A manager running work in a nursery raises its errors wrapped in groups.
    await api.create("bge")
    not_found = NotFoundError(ErrorCode.INSTANCE_NOT_FOUND, 'instance "x" not found')
    manager.fail_with = ExceptionGroup("from a nursery", [not_found])
    assert_error(await api("POST", "/instances/bge/restart"), 404, "INSTANCE_NOT_FOUND")
    manager.fail_with = ExceptionGroup("from a nursery", [ValueError("boom")])
    assert_error(await api("POST", "/instances/bge/restart"), 500, "INTERNAL_ERROR")


# --- health, probes, metrics, OpenAPI ------------------------------------------------


async def test_health(api: Api, manager: FakeManager, tmp_path: Path) -> None:
    await api.create("a")
    await api.create("b")
    await api("POST", "/instances/b/stop")
    response = await api("GET", "/health")
    assert response.status == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert body["instances"] == {"total": 2, "running": 0, "starting": 1, "failed": 0,
                                 "stopped": 1, "idle": 0}  # fmt: skip
    assert [d["device"] for d in body["devices"]] == ["cpu"]
    storage = body["storage"]
    assert storage["path"] == str(tmp_path / "logs")  # not created yet: its parent is measured
    assert storage["status"] in {"ok", "warning", "unhealthy"}
    assert 0 < storage["free_bytes"] <= storage["total_bytes"]
    assert storage["free_ratio"] == pytest.approx(storage["free_bytes"] / storage["total_bytes"])
    assert storage["status"] == classify(storage["free_ratio"])


def test_storage_thresholds() -> None:
    assert classify(0.5) == "ok"
    assert classify(0.10) == "ok"
    assert classify(0.0999) == "warning"
    assert classify(0.05) == "warning"
    assert classify(0.0499) == "unhealthy"
    assert classify(0.0) == "unhealthy"


def test_storage_of_a_path_not_created_yet(tmp_path: Path) -> None:
    health = read_storage(str(tmp_path / "not" / "yet" / "logs"))
    assert health.path == str(tmp_path / "not" / "yet" / "logs")
    assert health.free_bytes is not None
    assert health.total_bytes is not None
    assert health.error is None


def test_storage_that_cannot_be_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A dead network mount: statvfs fails. (No portable way to make a real one.)
    def broken_mount(path: str) -> None:
        raise OSError(5, "Input/output error", path)

    monkeypatch.setattr("shutil.disk_usage", broken_mount)
    health = read_storage(str(tmp_path))
    assert health.status == "unhealthy"
    assert health.free_bytes is None
    assert health.free_ratio is None
    assert health.error == "Input/output error"
    # Serialised, the error says why and the numbers are null.
    assert msgspec.json.decode(msgspec.json.encode(health))["error"] == "Input/output error"


async def test_probes(api: Api, manager: FakeManager) -> None:
    live = await api("GET", "/health/live")
    assert (live.status, live.json()) == (200, {"status": "ok"})
    assert_error(await api("GET", "/health/ready"), 503, "NOT_READY")
    assert_error(await api("GET", "/health/startup"), 503, "NOT_READY")
    manager.state_restored = True  # listening was marked by serve_api
    manager.startup_complete = True
    assert (await api("GET", "/health/ready")).status == 200
    assert (await api("GET", "/health/startup")).status == 200


async def test_ready_requires_instances_holds_readiness_until_the_seeds_run(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    seeds = (SeedInstance(name="a", model_id="BAAI/bge"), SeedInstance(name="b", model_id="x/y"))
    manager = make_manager(tmp_path, instances=seeds, ready_requires_instances=True)
    api = Api(await nursery.start(serve_api, manager, "127.0.0.1", 0))
    await manager.reset_state()  # the seeds, registered as a restore would
    manager.state_restored = True
    ready = await api("GET", "/health/ready")
    assert_error(ready, 503, "NOT_READY", "declared instances not running yet: a (starting), b")
    manager.set_status("a", InstanceStatus.RUNNING)
    assert_error(await api("GET", "/health/ready"), 503, "NOT_READY", "b (starting)")
    manager.set_status("b", InstanceStatus.RUNNING)
    assert (await api("GET", "/health/ready")).status == 200
    manager.set_status("b", InstanceStatus.STARTING)  # a crash once open
    assert (await api("GET", "/health/ready")).status == 200
    assert (await api("GET", "/health/live")).status == 200


async def test_metrics_time_every_request_by_route_template(api: Api, manager: FakeManager) -> None:
    await api.create("bge")
    await api("GET", "/instances/bge")
    await api("GET", "/instances/ghost")
    await api("GET", "/instances/ghost")
    await api("GET", "/no/such/path")
    await api("PUT", "/instances")
    await api("POST", "/instances", b" " * (MAX_BODY_BYTES + 1))
    # A request is observed once its exchange is over, which on the server side can
    # be just after the client has read the last byte.
    await trio.testing.wait_all_tasks_blocked()
    metrics = manager.metrics
    assert http_count(metrics, "/instances", "POST", 201) == 1
    assert http_count(metrics, "/instances/{name}", "GET", 200) == 1
    assert http_count(metrics, "/instances/{name}", "GET", 404) == 2
    assert http_count(metrics, UNMATCHED_ROUTE, "GET", 404) == 1
    assert http_count(metrics, UNMATCHED_ROUTE, "PUT", 405) == 1
    assert http_count(metrics, "/instances", "POST", 413) == 1

    response = await api("GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"] == PROMETHEUS_TEXT
    text = response.body.decode()
    assert (
        'tei_manager_http_request_duration_seconds_count{method="GET",'
        'route="/instances/{name}",status="404"} 2.0'
    ) in text
    assert "/no/such/path" not in text


async def test_devices(api: Api) -> None:
    await api("POST", "/instances", b'{"name": "a", "model_id": "org/a"}')
    response = await api("GET", "/devices")
    assert response.status == 200
    (cpu,) = response.json()["devices"]
    assert (cpu["device"], cpu["cap_bytes"], cpu["instances"]) == ("cpu", 32 << 30, ["a"])


async def test_openapi_document(api: Api) -> None:
    response = await api("GET", "/openapi.json")
    assert response.status == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.1")
    # The inference routes (tests/test_inference_routes.py) are documented too.
    assert {p for p in doc["paths"] if not p.startswith(("/v1/", "/tei/"))} == {
        "/instances",
        "/instances/{name}",
        "/instances/{name}/start",
        "/instances/{name}/stop",
        "/instances/{name}/restart",
        "/instances/{name}/logs",
        "/health",
        "/devices",
        "/health/live",
        "/health/ready",
        "/health/startup",
        "/metrics",
        "/openapi.json",
        "/models",
        "/models/{model_id}",
        "/models/{model_id}/download",
        "/models/{model_id}/load",
        "/state/reset",
        "/state/export",
        "/state/import",
    }
    schemas = doc["components"]["schemas"]
    assert list(schemas["InstanceInfo"]["properties"]) == INSTANCE_FIELDS
    assert schemas["InstanceConfig"]["required"] == ["name", "model_id"]
    assert set(schemas["ErrorBody"]["required"]) == {"error", "code", "timestamp"}
    create = doc["paths"]["/instances"]["post"]
    # 404: a model that is not in the cache while offline.
    assert set(create["responses"]) == {"201", "400", "404", "409", "413", "422", "500"}
    assert "INSTANCE_EXISTS" in create["responses"]["409"]["description"]
    logs = doc["paths"]["/instances/{name}/logs"]["get"]
    assert [p["name"] for p in logs["parameters"]] == ["name", "start", "end"]
    # Every reference resolves.
    refs = re.findall(r'"\$ref":\s*"#/components/schemas/([^"]+)"', response.body.decode())
    assert refs
    assert set(refs) <= set(schemas)


async def test_every_route_is_documented_and_served(manager: FakeManager) -> None:
    app = create_app(manager)
    served = {
        (rule.rule, method)
        for rule in app.url_map.iter_rules()
        for method in rule.methods or ()
        if method not in {"HEAD", "OPTIONS"}
    }
    documented = {
        (quart_rule(path), method.upper())
        for path, item in build_openapi()["paths"].items()
        for method, op in item.items()
        if "inference" not in op.get("tags", ())  # served only with a gateway
    }
    assert served == documented
    assert len(documented) == len(OPERATIONS)


async def test_with_quarts_test_client(manager: FakeManager) -> None:
    # The app also works without a socket, e.g. for handler-level tests.
    client = create_app(manager).test_client()
    response = await client.get("/health/live")
    assert response.status_code == 200
    response = await client.post("/instances", data=b'{"name": "x"')
    assert response.status_code == 400
    assert (await response.get_json())["code"] == "MALFORMED_JSON"
    await trio.testing.wait_all_tasks_blocked()
    assert http_count(manager.metrics, "/instances", "POST", 400) == 1


def test_error_body_is_the_contracts() -> None:
    body = msgspec.json.decode(
        msgspec.json.encode(build_openapi()["components"]["schemas"]["ErrorBody"])
    )
    assert set(body["properties"]) == {"error", "code", "timestamp"}


# --- graceful shutdown ---------------------------------------------------------------


async def test_shutdown_drains_requests_in_flight(manager: FakeManager) -> None:
    shutdown = trio.Event()
    served = trio.Event()
    results: list[HttpResponse] = []

    async def serve(task_status: trio.TaskStatus[int]) -> None:
        await serve_api(
            manager, "127.0.0.1", 0, shutdown=shutdown, drain_timeout_secs=10,
            task_status=task_status,
        )  # fmt: skip
        served.set()

    async def slow_request(port: int) -> None:
        results.append(await http_request(port, "POST", "/instances/bge/restart"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve)
            api = Api(port)
            await api.create("bge")
            manager.gate = trio.Event()
            nursery.start_soon(slow_request, port)
            await manager.entered.wait()

            shutdown.set()
            await trio.testing.wait_all_tasks_blocked()
            # No longer accepting...
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)
            # ...but the request in flight is still being served.
            assert not served.is_set()
            assert not results

            manager.gate.set()
        assert served.is_set()
    assert len(results) == 1
    assert results[0].status == 200
    assert results[0].json()["restarts"] == 1


async def test_shutdown_cancels_what_outlives_the_drain_deadline(manager: FakeManager) -> None:
    shutdown = trio.Event()
    outcome: list[BaseException | HttpResponse] = []

    async def stuck_request(port: int) -> None:
        try:
            outcome.append(await http_request(port, "POST", "/instances/bge/stop"))
        except ConnectionError as error:
            outcome.append(error)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: serve_api(
                manager, "127.0.0.1", 0, shutdown=shutdown, drain_timeout_secs=0.2,
                task_status=task_status,
            )
        )  # fmt: skip
        await Api(port).create("bge")
        manager.gate = trio.Event()  # never set: the request would wait forever
        nursery.start_soon(stuck_request, port)
        await manager.entered.wait()
        started = trio.current_time()
        shutdown.set()
    # serve_api returned after the deadline; the request was cut off without an answer.
    assert 0.15 <= trio.current_time() - started < 5
    assert len(outcome) == 1
    assert isinstance(outcome[0], ConnectionError)
    assert http_count(manager.metrics, "/instances/{name}/stop", "POST", NO_RESPONSE_STATUS) == 1


async def test_cancelling_the_server_is_quiet(
    manager: FakeManager, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_api, manager, "127.0.0.1", 0)
            assert (await http_request(port, "GET", "/health/live")).status == 200
            nursery.cancel_scope.cancel()
    # Hypercorn 0.17 logged a cancelled Quart-Trio lifespan as a broken app (with a
    # traceback) and swallowed the cancellation; 0.18 lets it through, and so must we.
    assert [r.getMessage() for r in caplog.records] == []
