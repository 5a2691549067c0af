"""The /models routes over a real socket: the REST contract's Models table, with the real
model registry downloading from a local Hub (``tests/hubserver.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from tei_manager.api import serve_api
from tei_manager.hub.retry import RetryPolicy
from tei_manager.hub.settings import HubSettings, RegistrySettings
from tests.conftest import TinyModels
from tests.fake_manager import FakeManager
from tests.hubserver import HubServer
from tests.test_api import Api, assert_error, make_manager

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TINY = "acme/tiny-reranker"
MODEL_FIELDS = [
    "model_id", "status", "revision", "downloaded", "added_at", "cache_path",
    "cache_size_bytes", "download", "last_verified", "verification_error", "metadata",
    "smoke_load",
]  # fmt: skip


@pytest.fixture
def hub(minilm_dir: Path, tiny_models: TinyModels) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(MINILM, minilm_dir)
        server.add_repo(TINY, tiny_models.reranker)
        yield server


@pytest.fixture
async def manager(
    tmp_path: Path, hub: HubServer, nursery: trio.Nursery
) -> AsyncIterator[FakeManager]:
    config = make_manager(tmp_path).config
    manager = FakeManager(
        config,
        gpu_count=1,
        hub=HubSettings(cache_dir=str(tmp_path / "cache"), endpoint=hub.url),
        model_settings=RegistrySettings(retry=RetryPolicy(max_retries=2, initial_delay_secs=0.01)),
    )
    await nursery.start(manager.models.run)
    yield manager


@pytest.fixture
async def api(nursery: trio.Nursery, manager: FakeManager) -> Api:
    return Api(await nursery.start(serve_api, manager, "127.0.0.1", 0))


async def test_add_list_and_get_raw_or_encoded(api: Api) -> None:
    assert (await api("GET", "/models")).json() == []
    created = await api("POST", "/models", {"model_id": TINY})
    assert created.status == 201
    body = created.json()
    assert list(body) == MODEL_FIELDS
    assert (body["model_id"], body["status"], body["revision"]) == (TINY, "available", "main")
    known = await api("POST", "/models", {"model_id": TINY})
    assert known.status == 200
    assert known.json()["added_at"] == body["added_at"]
    assert [m["model_id"] for m in (await api("GET", "/models")).json()] == [TINY]
    raw = await api("GET", "/models/acme/tiny-reranker")
    encoded = await api("GET", "/models/acme%2Ftiny-reranker")
    assert raw.status == encoded.status == 200
    assert raw.json() == encoded.json()


async def test_download_answers_at_once_and_shows_progress(
    api: Api, hub: HubServer, manager: FakeManager
) -> None:
    await api("POST", "/models", {"model_id": MINILM})
    hold = hub.hold(MINILM, "model.safetensors", after=3_000_000)
    started = await api("POST", "/models/sentence-transformers%2Fall-MiniLM-L6-v2/download")
    assert started.status == 202
    assert started.json()["status"] == "downloading"
    await trio.to_thread.run_sync(hold.reached.wait)
    during = (await api("GET", f"/models/{MINILM}")).json()
    assert during["status"] == "downloading"
    progress = during["download"]
    assert 0 < progress["bytes_done"] < progress["bytes_total"]
    assert 0 < progress["files_done"] < progress["files_total"] == 10
    for action in ("download", "load"):
        assert_error(
            await api("POST", f"/models/{MINILM}/{action}"), 409, "MODEL_BUSY", "downloading"
        )
    hold.release()
    await manager.models.settled(MINILM)
    done = (await api("GET", f"/models/{MINILM}")).json()
    assert (done["status"], done["downloaded"]) == ("downloaded", True)
    assert done["metadata"]["hidden_size"] == 384
    assert done["cache_path"].endswith(hub.repos[MINILM].commit)
    text = (await api("GET", "/metrics")).body.decode()
    assert 'tei_manager_model_downloads_total{outcome="success"} 1.0' in text
    assert "tei_manager_model_download_bytes_total" in text
    assert 'tei_manager_model_download_duration_seconds_count{outcome="success"} 1.0' in text


async def test_delete_while_downloading_cancels_and_removes(
    api: Api, hub: HubServer, manager: FakeManager, tmp_path: Path
) -> None:
    await api("POST", "/models", {"model_id": MINILM})
    hold = hub.hold(MINILM, "model.safetensors", after=2_000_000)
    await api("POST", f"/models/{MINILM}/download")
    await trio.to_thread.run_sync(hold.reached.wait)
    async with trio.open_nursery() as nursery:
        answers: list[int] = []

        async def delete() -> None:
            answers.append((await api("DELETE", f"/models/{MINILM}")).status)

        nursery.start_soon(delete)
        await trio.testing.wait_all_tasks_blocked()
        hold.release()  # the transfer notices the cancellation at its next chunk
    assert answers == [200]
    assert_error(await api("GET", f"/models/{MINILM}"), 404, "MODEL_NOT_FOUND", MINILM)
    assert not (tmp_path / "cache" / "models--sentence-transformers--all-MiniLM-L6-v2").exists()


async def test_delete_refuses_while_an_instance_uses_the_model(
    api: Api, manager: FakeManager
) -> None:
    await api("POST", "/models", {"model_id": TINY})
    await api.create("rr", model_id=TINY)
    assert_error(await api("DELETE", f"/models/{TINY}"), 409, "MODEL_IN_USE", "rr")
    await api("DELETE", "/instances/rr")
    assert (await api("DELETE", f"/models/{TINY}")).status == 200


async def test_load_needs_the_files(api: Api) -> None:
    await api("POST", "/models", {"model_id": TINY})
    assert_error(await api("POST", f"/models/{TINY}/load"), 409, "MODEL_BUSY", "not downloaded")


@pytest.mark.parametrize(
    ("method", "suffix"),
    [("GET", ""), ("DELETE", ""), ("POST", "/download"), ("POST", "/load")],
)
async def test_unknown_model_is_404(api: Api, method: str, suffix: str) -> None:
    assert_error(
        await api(method, f"/models/acme/ghost{suffix}"), 404, "MODEL_NOT_FOUND", "acme/ghost"
    )


@pytest.mark.parametrize(
    "target",
    [
        "/models/..%2F..%2Fetc%2Fpasswd",
        "/models/../../etc/passwd",
        "/models/%2Fetc%2Fpasswd",
        "/models//etc/passwd",
        "/models/org/..%2F..%2Fx/download",
        "/models/a/b/c",
    ],
)
async def test_model_ids_that_are_paths_are_refused(api: Api, target: str) -> None:
    method = "POST" if target.endswith("/download") else "GET"
    assert_error(await api(method, target), 400, "INVALID_MODEL_ID", "model_id")


@pytest.mark.parametrize(
    ("body", "code", "says"),
    [
        (b'{"model_id": "../etc"}', "INVALID_MODEL_ID", "model_id: \"../etc\" contains a '..'"),
        (b'{"model_id": "/data/models/bge"}', "INVALID_MODEL_ID", "model_id: \"/data/models/bge\""),
        (b'{"model_id": "acme/x", "revision": "../../r"}', "VALIDATION_ERROR", "revision:"),
        (b'{"model_id": "acme/x", "gpu": 0}', "VALIDATION_ERROR", 'unknown field "gpu"'),
        (b'{"revision": "main"}', "VALIDATION_ERROR", "model_id: required field is missing"),
        (b'{"model_id": 7}', "VALIDATION_ERROR", "model_id: expected str"),
        (b'{"model_id": ', "MALFORMED_JSON", "body: invalid JSON"),
    ],
)  # fmt: skip
async def test_bad_add_requests(api: Api, body: bytes, code: str, says: str) -> None:
    assert_error(await api("POST", "/models", body), 400, code, says)


async def test_health_reports_the_model_cache(api: Api, manager: FakeManager) -> None:
    storage = (await api("GET", "/health")).json()["storage"]
    cache = storage["model_cache"]
    assert cache["path"] == manager.models.cache_dir
    assert cache["status"] in {"ok", "warning", "unhealthy"}
    assert 0 < cache["free_bytes"] <= cache["total_bytes"]
    order = ["ok", "warning", "unhealthy"]
    inner = max(order.index(cache["status"]), order.index(storage["status"]))
    assert order.index(storage["status"]) == inner


async def test_openapi_documents_the_model_routes(api: Api) -> None:
    doc = (await api("GET", "/openapi.json")).json()
    download = doc["paths"]["/models/{model_id}/download"]["post"]
    assert set(download["responses"]) == {"202", "400", "404", "409", "500", "503"}
    assert [p["name"] for p in download["parameters"]] == ["model_id"]
    assert (
        "MODEL_IN_USE"
        in doc["paths"]["/models/{model_id}"]["delete"]["responses"]["409"]["description"]
    )
    add = doc["paths"]["/models"]["post"]
    assert add["requestBody"]["content"]["application/json"]["schema"]
    schemas = doc["components"]["schemas"]
    assert list(schemas["ModelInfo"]["properties"]) == MODEL_FIELDS
