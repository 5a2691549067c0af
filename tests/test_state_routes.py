"""``POST /state/reset``, ``GET /state/export``, ``POST /state/import`` on a real manager
(fake instance processes) over a real socket, with API keys on."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
import tomli_w
import trio

from tei_manager.api.auth import scope_for
from tei_manager.api.openapi import build_openapi
from tei_manager.api.server import serve_api
from tei_manager.auth.identity import Scope
from tei_manager.auth.settings import ApiKeyConfig, ApiKeyEntry, AuthConfig
from tei_manager.config import InstanceConfig, ManagerConfig, SeedInstance
from tei_manager.core.instances import DesiredState, InstanceStatus
from tei_manager.core.restart import RestartPolicy
from tei_manager.manager.backup import decode_backup
from tei_manager.manager.service import Manager
from tei_manager.manager.state import load_state
from tests.fake_processes import FakeHost, run_inline
from tests.httpclient import HttpResponse, http_request
from tests.waiting import wait_for

CREATED = datetime(2026, 1, 1, tzinfo=UTC)
ADMIN, READER = "admin-key-0123456789", "read-key-0123456789"


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture
def config(tmp_path: Path) -> ManagerConfig:
    keys = (
        ApiKeyEntry(name="ops", scopes=("admin", "read"), sha256=_sha(ADMIN)),
        ApiKeyEntry(name="viewer", scopes=("read",), sha256=_sha(READER)),
    )
    return ManagerConfig(
        state_file=str(tmp_path / "state.toml"),
        log_dir=str(tmp_path / "logs"),
        api_host="127.0.0.1",
        api_port=0,
        grpc_port=0,
        instance_port_start=20000,
        instance_port_end=20009,
        instances=(
            SeedInstance(name="seed-on", model_id="org/seed"),
            SeedInstance(name="seed-off", model_id="org/seed", auto_start=False),
        ),
        auth=AuthConfig(enabled=True, providers=("api_key",), api_key=ApiKeyConfig(keys=keys)),
    )


class Node:
    def __init__(self, manager: Manager, host: FakeHost, port: int) -> None:
        self.manager, self.host, self.port = manager, host, port

    async def call(
        self, method: str, path: str, body: bytes | None = None, key: str = ADMIN
    ) -> HttpResponse:
        headers = [("Authorization", f"Bearer {key}")]
        return await http_request(self.port, method, path, body=body, headers=headers)

    async def running(self, name: str) -> None:
        await wait_for(
            lambda: self.manager.get_instance(name).status is InstanceStatus.RUNNING,
            within=10,
            what=f"{name} running",
        )


@asynccontextmanager
async def node(config: ManagerConfig) -> AsyncIterator[Node]:
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery, ready_after=0.01)
        manager = Manager(
            config,
            spawner=host.spawn,
            prober=host.probe,
            gpu_count=1,
            port_probe=lambda port: True,
            explicit_port_probe=lambda port: True,
            policy=RestartPolicy.from_config(config),
            run_blocking=run_inline,
        )
        await nursery.start(manager.run)
        port = await nursery.start(serve_api, manager, "127.0.0.1", 0)
        yield Node(manager, host, port)
        nursery.cancel_scope.cancel()


def test_state_routes_need_the_admin_scope_whatever_the_method() -> None:
    assert scope_for("POST", "/state/reset") is Scope.ADMIN
    assert scope_for("GET", "/state/export") is Scope.ADMIN
    assert scope_for("GET", "/stateful") is Scope.READ
    assert scope_for("GET", "/instances") is Scope.READ


def test_openapi_documents_the_state_routes() -> None:
    paths = build_openapi()["paths"]
    assert set(paths["/state/reset"]) == {"post"}
    assert "application/toml" in paths["/state/export"]["get"]["responses"]["200"]["content"]
    body = paths["/state/import"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/toml"}


async def test_reset_deletes_everything_and_reseeds(config: ManagerConfig) -> None:
    async with node(config) as n:
        await n.manager.create_instance(InstanceConfig(name="extra", model_id="org/x"))
        await n.manager.stop_instance("seed-on")
        seed_pid = n.host.processes["seed-on"][-1].pid
        assert (await n.call("POST", "/state/reset", key=READER)).status == 403
        answer = await n.call("POST", "/state/reset")
        assert answer.status == 200, answer.body
        listed = {i["name"]: i["status"] for i in answer.json()}
        assert set(listed) == {"seed-on", "seed-off"} and listed["seed-off"] == "stopped"
        # Every old process ended; the seed runs again in a new one.
        assert all(p.returncode is not None for p in n.host.processes["extra"])
        await n.running("seed-on")
        assert n.host.processes["seed-on"][-1].pid != seed_pid
        persisted = load_state(config.state_file).state
        assert [(i.config.name, i.desired_state) for i in persisted.instances] == [
            ("seed-on", DesiredState.RUNNING),
            ("seed-off", DesiredState.STOPPED),
        ]


async def test_export_then_import_restores_instances_run_states_and_models(
    config: ManagerConfig, tmp_path: Path
) -> None:
    async with node(config) as n:
        await n.manager.create_instance(InstanceConfig(name="bge", model_id="org/bge", port=20005))
        await n.manager.stop_instance("seed-on")
        await n.manager.models.add_model("org/registered", None)
        assert (await n.call("GET", "/state/export", key=READER)).status == 403
        exported = await n.call("GET", "/state/export")
        assert exported.status == 200
        assert exported.headers["content-type"].startswith("application/toml")
        backup = decode_backup(exported.body, config, gpu_count=1)
        wanted = {i.config.name: i.desired_state for i in backup.instances}
        assert wanted == {
            "seed-on": DesiredState.STOPPED,
            "seed-off": DesiredState.STOPPED,
            "bge": DesiredState.RUNNING,
        }
        assert "org/registered" in {m.model_id for m in backup.models}
    # A new node with another state file: import the export there.
    other = ManagerConfig(**{**_fields(config), "state_file": str(tmp_path / "b" / "s.toml")})
    async with node(other) as n:
        answer = await n.call("POST", "/state/import", body=exported.body)
        assert answer.status == 200, answer.body
        assert [i["name"] for i in answer.json()] == ["seed-on", "seed-off", "bge"]
        await n.running("bge")
        assert n.manager.get_instance("bge").port == 20005
        assert n.manager.get_instance("seed-on").status is InstanceStatus.STOPPED
        assert "org/registered" in {m.model_id for m in n.manager.models.list_models()}
        assert load_state(other.state_file).state.instances == backup.instances


async def test_a_bad_import_is_a_400_naming_the_field_and_changes_nothing(
    config: ManagerConfig,
) -> None:
    async with node(config) as n:
        await n.running("seed-on")
        pid = n.host.processes["seed-on"][-1].pid
        before = load_state(config.state_file).state
        document = {
            "kind": "tei-manager-state",
            "version": 1,
            "instances": [
                {"config": {"name": "ok", "model_id": "org/m"}, "desired_state": "running",
                 "created_at": CREATED},
                {"config": {"name": "gpu", "model_id": "org/m", "gpu_id": 3},
                 "desired_state": "running", "created_at": CREATED},
            ],
        }  # fmt: skip
        answer = await n.call("POST", "/state/import", body=tomli_w.dumps(document).encode())
        assert answer.status == 400
        assert answer.json()["code"] == "INVALID_GPU_ID", answer.json()
        assert answer.json()["error"].startswith("instances[1].config.gpu_id: 3 does not exist")
        answer = await n.call("POST", "/state/import", body=b"not toml [")
        assert (answer.status, answer.json()["code"]) == (400, "VALIDATION_ERROR")
        assert n.host.processes["seed-on"][-1].pid == pid
        assert n.manager.get_instance("seed-on").status is InstanceStatus.RUNNING
        assert load_state(config.state_file).state == before


def _fields(config: ManagerConfig) -> dict[str, object]:
    import msgspec

    return msgspec.structs.asdict(config)
