"""Every error code of the instance and operations routes, from a real request.

A real :class:`~tei_manager.manager.service.Manager` behind the real REST server on a
loopback port, with real port probing and real files; only the instance processes
are fakes (:class:`~tests.fake_processes.FakeHost`), since no process is the subject
here. Each answer is checked for its status, code, timestamp and a message that
names what was wrong; at the end, every code the routes declare must have been seen.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tei_manager.api import serve_api
from tei_manager.api.routes import MAX_BODY_BYTES, OPERATIONS
from tei_manager.config import InstanceConfig, ManagerConfig
from tei_manager.core.ports import probe_bindable
from tei_manager.errors import ERROR_TABLE, ErrorCode
from tei_manager.manager.service import Manager
from tests.fake_processes import FakeHost
from tests.httpclient import HttpResponse, http_request

E = ErrorCode
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
RANGE_SIZE = 2  # instance ports: two auto-allocated instances exhaust the range
MAX_INSTANCES = 3


def _free_port_range(size: int) -> int:
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            start = int(sock.getsockname()[1])
        if start + size <= 65535 and all(probe_bindable(p) for p in range(start, start + size)):
            return start
    raise RuntimeError("no free port range")


class Stack(NamedTuple):
    manager: Manager
    host: FakeHost
    port: int  # the REST API's


class Client:
    """Requests to the API; :meth:`error` checks an error answer and notes its code."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: set[ErrorCode] = set()

    async def __call__(self, method: str, path: str, body: object = None) -> HttpResponse:
        raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        return await http_request(self.port, method, path, body=raw)

    async def ok(self, method: str, path: str, body: object = None, status: int = 200) -> Any:
        response = await self(method, path, body)
        assert response.status == status, response.body
        return response.json()

    async def error(
        self, code: ErrorCode, method: str, path: str, body: object = None, *, names: str
    ) -> HttpResponse:
        """The answer is ``code`` in the contract's shape, and its message contains ``names``."""
        response = await self(method, path, body)
        assert response.status == ERROR_TABLE[code].http_status, response.body
        assert response.headers["content-type"] == "application/json"
        body_json = response.json()
        assert set(body_json) == {"error", "code", "timestamp"}
        assert body_json["code"] == code.value
        assert RFC3339_UTC.fullmatch(body_json["timestamp"]), body_json["timestamp"]
        stamped = datetime.strptime(body_json["timestamp"], "%Y-%m-%dT%H:%M:%SZ")
        assert abs(stamped.replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(seconds=5)
        assert names in body_json["error"], body_json["error"]
        self.seen.add(code)
        return response


@pytest.fixture
def config(tmp_path: Path) -> ManagerConfig:
    start = _free_port_range(RANGE_SIZE)
    return ManagerConfig(
        api_host="127.0.0.1",
        api_port=0,
        grpc_enabled=False,
        state_file=str(tmp_path / "state" / "state.toml"),
        log_dir=str(tmp_path / "logs"),
        instance_port_start=start,
        instance_port_end=start + RANGE_SIZE - 1,
        max_instances=MAX_INSTANCES,
        health_check_interval_secs=60,
        graceful_shutdown_timeout_secs=1,
    )


@pytest.fixture
async def stack(nursery: trio.Nursery, config: ManagerConfig) -> AsyncIterator[Stack]:
    """The API served before the manager runs: the test starts ``manager.run`` itself."""
    host = FakeHost(nursery, ready_after=0.0)
    manager = Manager(
        config, spawner=host.spawn, prober=host.probe, gpu_count=0, estimate=_estimate
    )
    port = await nursery.start(serve_api, manager, "127.0.0.1", 0)
    yield Stack(manager, host, port)


def _estimate(config: InstanceConfig, gpu: bool) -> int:
    """Memory an instance needs: a model named "huge" fits no host."""
    return 1 << 60 if config.model_id == "org/huge" else 1 << 20


def _declared_codes() -> set[ErrorCode]:
    """What the instance and operations routes can answer, as the OpenAPI document says."""
    codes = {code for op in OPERATIONS if not op.path.startswith("/models") for code in op.errors}
    # The model registry's codes (MODEL_NOT_FOUND from POST /instances when offline, ...)
    # come from real requests in tests/e2e/test_models.py and tests/test_hub_api.py.
    codes = {code for code in codes if not code.startswith("MODEL_")}
    # Any route: an unknown path, a wrong method. INTERNAL_ERROR is a bug's answer.
    return codes | {E.NOT_FOUND, E.METHOD_NOT_ALLOWED}


async def test_every_error_code_from_a_real_request(
    nursery: trio.Nursery, stack: Stack, config: ManagerConfig
) -> None:
    api = Client(stack.port)
    create = "POST", "/instances"

    # -- not ready: the API listens, the manager has not restored its state yet -----------
    await api.error(E.NOT_READY, "GET", "/health/ready", names="state is being restored")
    await api.error(E.NOT_READY, "GET", "/health/startup", names="restoring state")
    await api.error(
        E.NOT_READY, *create, {"name": "a", "model_id": "org/m"}, names="manager is starting"
    )
    await nursery.start(stack.manager.run)
    await api.ok("GET", "/health/ready")

    # -- the request itself is wrong --------------------------------------------------------
    await api.error(E.MALFORMED_JSON, *create, b'{"name": "a", ', names="body: invalid JSON")
    await api.error(
        E.PAYLOAD_TOO_LARGE, *create, b" " * (MAX_BODY_BYTES + 1), names=str(MAX_BODY_BYTES)
    )
    await api.error(
        E.VALIDATION_ERROR, *create, {"name": "a", "model_id": "org/m", "colour": "blue"},
        names='unknown field "colour"',
    )  # fmt: skip
    await api.error(
        E.VALIDATION_ERROR, *create, {"name": "a", "model_id": "org/m", "max_batch_tokens": 0},
        names="max_batch_tokens: 0 is invalid",
    )  # fmt: skip
    await api.error(E.VALIDATION_ERROR, *create, {"name": "a"}, names="model_id: required")
    await api.error(
        E.VALIDATION_ERROR, *create, {"name": "a", "model_id": "org/m", "pooling": "max"},
        names="pooling:",
    )  # fmt: skip
    await api.error(E.INVALID_NAME, *create, {"name": "a/../b", "model_id": "org/m"}, names="name:")
    await api.error(
        E.INVALID_MODEL_ID, *create, {"name": "a", "model_id": "a/b/c"}, names="model_id:"
    )
    await api.error(
        E.INVALID_PORT, *create, {"name": "a", "model_id": "org/m", "port": 80},
        names="port: 80 is privileged",
    )  # fmt: skip
    await api.error(
        E.INVALID_PORT, *create, {"name": "a", "model_id": "org/m", "prometheus_port": 70000},
        names="prometheus_port: 70000 is out of range",
    )  # fmt: skip
    await api.error(
        E.INVALID_GPU_ID, *create, {"name": "a", "model_id": "org/m", "gpu_id": 0},
        names="gpu_id: 0 does not exist",
    )  # fmt: skip
    await api.error(E.NOT_FOUND, "GET", "/no/such/route", names="GET /no/such/route")
    response = await api.error(
        E.METHOD_NOT_ALLOWED, "PUT", "/instances", names="PUT is not allowed on /instances"
    )
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD", "OPTIONS", "POST"}
    await api.error(E.METHOD_NOT_ALLOWED, "POST", "/health", names="POST is not allowed")
    assert await api.ok("GET", "/instances") == []  # nothing above created anything

    # -- the instance does not exist ---------------------------------------------------------
    for method, path in (
        ("GET", "/instances/ghost"),
        ("DELETE", "/instances/ghost"),
        ("POST", "/instances/ghost/start"),
        ("POST", "/instances/ghost/stop"),
        ("POST", "/instances/ghost/restart"),
        ("GET", "/instances/ghost/logs"),
    ):
        await api.error(E.INSTANCE_NOT_FOUND, method, path, names='"ghost"')

    # -- clashes with what exists ------------------------------------------------------------
    a = await api.ok(*create, {"name": "a", "model_id": "org/m"}, status=201)
    assert a["port"] == config.instance_port_start
    await api.error(
        E.INSUFFICIENT_MEMORY, *create, {"name": "h", "model_id": "org/huge"},
        names="GiB but cpu has",
    )  # fmt: skip
    await api.error(E.INSTANCE_EXISTS, *create, {"name": "a", "model_id": "org/x"}, names='"a"')
    await api.error(
        E.PORT_CONFLICT, *create, {"name": "b", "model_id": "org/m", "port": a["port"]},
        names=f'port: {a["port"]} is already used by instance "a"',
    )  # fmt: skip
    with socket.socket() as other_program:
        other_program.bind(("127.0.0.1", 0))
        other_program.listen()
        taken = other_program.getsockname()[1]
        await api.error(
            E.PORT_CONFLICT, *create, {"name": "b", "model_id": "org/m", "port": taken},
            names=f"port: {taken} is in use on this host",
        )  # fmt: skip
    await api.error(E.ALREADY_RUNNING, "POST", "/instances/a/start", names='instance "a"')
    await api.ok("POST", "/instances/a/stop")
    await api.error(E.NOT_RUNNING, "POST", "/instances/a/stop", names='instance "a"')
    await api.error(
        E.VALIDATION_ERROR, "GET", "/instances/a/logs?start=x", names='start: "x" is not'
    )

    # -- limits ------------------------------------------------------------------------------------
    await api.ok(*create, {"name": "b", "model_id": "org/m"}, status=201)  # the range's last port
    await api.error(
        E.PORT_ALLOCATION_FAILED, *create, {"name": "c", "model_id": "org/m"},
        names=f"no free port in {config.instance_port_start}-{config.instance_port_end}",
    )  # fmt: skip
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        outside = probe.getsockname()[1]
    await api.ok(*create, {"name": "c", "model_id": "org/m", "port": outside}, status=201)
    await api.error(
        E.MAX_INSTANCES_REACHED, *create, {"name": "d", "model_id": "org/m"},
        names=f"max_instances ({MAX_INSTANCES})",
    )  # fmt: skip

    # -- the host fails: the log cannot be read ------------------------------------------------
    stack.manager.log_path("c").mkdir(parents=True)
    response = await api.error(E.IO_ERROR, "GET", "/instances/c/logs", names="Is a directory")
    assert str(config.log_dir).encode() not in response.body

    # -- not ready again: shutting down ---------------------------------------------------------
    stack.manager.begin_shutdown()
    await api.error(E.NOT_READY, "GET", "/health/ready", names="shutting down")
    await api.error(
        E.NOT_READY, *create, {"name": "d", "model_id": "org/m"}, names="manager is shutting down"
    )

    missing = _declared_codes() - api.seen
    assert not missing, f"declared but never produced: {sorted(missing)}"
    assert api.seen - _declared_codes() == {E.IO_ERROR}  # a failure of the host, not a route's


async def test_metrics_over_http_have_the_contract_series_and_no_created(
    nursery: trio.Nursery, stack: Stack
) -> None:
    api = Client(stack.port)
    await nursery.start(stack.manager.run)
    await api.ok("POST", "/instances", {"name": "a", "model_id": "org/m"}, status=201)
    await api.ok("POST", "/instances", {"name": "b", "model_id": "org/m"}, status=201)
    await api.ok("POST", "/instances/a/restart")
    await api.ok("DELETE", "/instances/b")
    response = await api("GET", "/metrics")
    assert response.status == 200
    text = response.body.decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("tei_manager_instances_count", ())] == 1
    assert samples[("tei_manager_instances_created_total", (("instance", "a"), ("model", "org/m")))]
    assert samples[("tei_manager_instances_deleted_total", (("instance", "b"),))] == 1
    key = ("tei_manager_instance_restarts_total", (("instance", "a"), ("reason", "manual")))
    assert samples[key] == 1
    # No failed check yet, but the family is there for dashboards to find.
    assert "# TYPE tei_manager_health_check_failures_total counter" in text
    assert [name for name, _ in samples if name.endswith("_created")] == []
