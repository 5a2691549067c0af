"""The model registry in a real manager: from a local Hub to a verified model to an
instance serving it, over the REST API, with real worker processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tei_manager.api import serve_api
from tei_manager.config import ManagerConfig
from tei_manager.core.instances import InstanceStatus
from tei_manager.hub.settings import HubSettings
from tei_manager.manager.service import Manager
from tests.conftest import TinyModels
from tests.e2e.test_manager_processes import READY_TIMEOUT, _embed, manager_config
from tests.hubserver import HubServer
from tests.test_api import Api, assert_error
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TINY_ST = "acme/tiny-sentence-transformer"


@pytest.fixture
def hub(minilm_dir: Path, tiny_models: TinyModels) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(MINILM, minilm_dir)
        server.add_repo(TINY_ST, tiny_models.sentence_transformer)
        yield server


@pytest.fixture
def config(tmp_path: Path) -> ManagerConfig:
    return manager_config(tmp_path, api_port=0, grpc_port=0)


@asynccontextmanager
async def serving(manager: Manager) -> AsyncIterator[Api]:
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        yield Api(await nursery.start(serve_api, manager, "127.0.0.1", 0))
        nursery.cancel_scope.cancel()


async def _running(manager: Manager, name: str) -> int:
    def probe() -> int | None:
        info = manager.get_instance(name)
        return info.port if info.status is InstanceStatus.RUNNING else None

    try:
        return await wait_for(probe, within=READY_TIMEOUT, what=f"{name} running")
    except AssertionError as e:
        log = manager.log_path(name).read_text(errors="replace")[-3000:]
        raise AssertionError(f"{e}: {manager.get_instance(name)}\n{log}") from None


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)
    return dict(pairs)  # type: ignore[arg-type]


async def test_available_to_verified_then_an_instance_serves_it(
    config: ManagerConfig, hub: HubServer, tmp_path: Path
) -> None:
    cache = tmp_path / "hf-cache"
    manager = Manager(config, hub=HubSettings(cache_dir=str(cache), endpoint=hub.url))
    async with serving(manager) as api:
        added = await api("POST", "/models", {"model_id": MINILM})
        assert added.status == 201 and added.json()["status"] == "available"

        hold = hub.hold(MINILM, "model.safetensors", after=8_000_000)
        started = await api("POST", "/models/sentence-transformers%2Fall-MiniLM-L6-v2/download")
        assert started.status == 202 and started.json()["status"] == "downloading"
        await trio.to_thread.run_sync(hold.reached.wait)
        progress = (await api("GET", f"/models/{MINILM}")).json()["download"]
        assert 0 < progress["bytes_done"] < progress["bytes_total"]
        hold.release()
        await manager.models.settled(MINILM)
        downloaded = (await api("GET", f"/models/{MINILM}")).json()
        assert downloaded["status"] == "downloaded", downloaded["verification_error"]

        loading = await api("POST", f"/models/{MINILM}/load")
        assert loading.status == 202 and loading.json()["status"] == "loading"
        await manager.models.settled(MINILM)
        verified = (await api("GET", f"/models/{MINILM}")).json()
        assert verified["status"] == "verified", verified["verification_error"]
        assert verified["smoke_load"]["output_size"] == 384
        assert verified["last_verified"] is not None

        created = await api("POST", "/instances", {"name": "minilm", "model_id": MINILM})
        assert created.status == 201, created.body
        port = await _running(manager, "minilm")
        assert len(await _embed(port, "What is the capital of France?")) == 384
        # The instance reads the verified files from the registry's cache, offline.
        env = _environ(manager.get_instance("minilm").pid or 0)
        assert env["HF_HUB_CACHE"] == str(cache)
        assert env["HF_HUB_OFFLINE"] == "1"
        assert_error(await api("DELETE", f"/models/{MINILM}"), 409, "MODEL_IN_USE", "minilm")


async def test_an_instance_of_an_uncached_model_waits_for_its_download(
    config: ManagerConfig, hub: HubServer, tmp_path: Path
) -> None:
    manager = Manager(config, hub=HubSettings(cache_dir=str(tmp_path / "c"), endpoint=hub.url))
    async with serving(manager) as api:
        hold = hub.hold(TINY_ST, "model.safetensors", after=1000)
        created = await api("POST", "/instances", {"name": "tiny", "model_id": TINY_ST})
        assert created.status == 201, created.body
        assert created.json()["status"] == "starting"
        await trio.to_thread.run_sync(hold.reached.wait)
        model = (await api("GET", f"/models/{TINY_ST}")).json()
        assert model["status"] == "downloading"
        assert 0 < model["download"]["bytes_done"] < model["download"]["bytes_total"]
        assert manager.get_instance("tiny").pid is None  # nothing runs before the files are in
        hold.release()
        port = await _running(manager, "tiny")
        assert len(await _embed(port, "the quick brown fox")) == 32
        assert (await api("GET", f"/models/{TINY_ST}")).json()["status"] == "downloaded"


async def test_offline_an_uncached_model_is_refused(
    config: ManagerConfig, hub: HubServer, tmp_path: Path
) -> None:
    offline = HubSettings(cache_dir=str(tmp_path / "c"), endpoint=hub.url, offline=True)
    async with serving(Manager(config, hub=offline)) as api:
        response = await api("POST", "/instances", {"name": "tiny", "model_id": TINY_ST})
        assert_error(response, 404, "MODEL_NOT_FOUND", TINY_ST, "HF_HUB_OFFLINE")
        assert (await api("GET", "/instances")).json() == []
    assert hub.requests == []
