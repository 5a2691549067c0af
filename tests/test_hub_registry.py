"""The model registry service: cache scan, downloads as jobs, deletes, instances' needs,
and smoke loads (real worker processes for those marked slow)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from tei_manager.errors import ErrorCode, TeiError
from tei_manager.hub.download import Downloader
from tei_manager.hub.registry import ModelRegistry
from tei_manager.hub.retry import RetryPolicy
from tei_manager.hub.settings import HubSettings, RegistrySettings
from tei_manager.hub.smoke import SmokeLoadError
from tei_manager.hub.state import ModelStatus, SmokeLoad, TransferProgress
from tei_manager.supervisor.launch import Program
from tests.conftest import TinyModels
from tests.hubserver import HubServer

S = ModelStatus
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TINY = "acme/tiny-reranker"
CLASSIFIER = "acme/tiny-classifier"
BROKEN = "acme/broken"
FAST = RetryPolicy(max_retries=2, initial_delay_secs=0.01)


@pytest.fixture
def hub(minilm_dir: Path, tiny_models: TinyModels) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(MINILM, minilm_dir)
        server.add_repo(TINY, tiny_models.reranker)
        server.add_repo(CLASSIFIER, tiny_models.classifier)
        # Whole and checked, but not loadable: the weights are no safetensors file.
        server.add_repo(
            BROKEN, tiny_models.reranker, files={"model.safetensors": b"not safetensors" * 64}
        )
        yield server


def _registry(
    hub: HubServer, tmp_path: Path, *, offline: bool = False, **options: Any
) -> ModelRegistry:
    settings = options.pop("settings", RegistrySettings(retry=FAST, smoke_load_timeout_secs=120))
    return ModelRegistry(
        hub=HubSettings(cache_dir=str(tmp_path / "cache"), endpoint=hub.url, offline=offline),
        settings=settings,
        metrics=options.pop("metrics", CollectorRegistry()),
        log_dir=str(tmp_path / "logs"),
        **options,
    )


@pytest.fixture
async def registry(
    hub: HubServer, tmp_path: Path, nursery: trio.Nursery
) -> AsyncIterator[ModelRegistry]:
    models = _registry(hub, tmp_path)
    await nursery.start(models.run)
    yield models


def _code(call: Any, *args: Any) -> ErrorCode:
    with pytest.raises(TeiError) as error:
        call(*args)
    return error.value.code


async def _download(hub: HubServer, tmp_path: Path, model_id: str) -> None:
    settings = HubSettings(cache_dir=str(tmp_path / "cache"), endpoint=hub.url)
    await Downloader(settings, FAST).download(model_id, None, TransferProgress())


# --- start-up ----------------------------------------------------------------------------


async def test_start_registers_the_cache_and_the_configured_models(
    hub: HubServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    await _download(hub, tmp_path, TINY)
    models = _registry(hub, tmp_path, seeds=("acme/not-yet", TINY))
    await nursery.start(models.run)
    listed = {m.model_id: m for m in models.list_models()}
    assert set(listed) == {TINY, "acme/not-yet"}
    tiny = listed[TINY]
    assert (tiny.status, tiny.downloaded, tiny.revision) == (S.DOWNLOADED, True, "main")
    assert tiny.cache_path is not None and tiny.cache_path.endswith(hub.repos[TINY].commit)
    assert tiny.cache_size_bytes > 0
    assert tiny.metadata is not None and tiny.metadata.model_type == "bert"
    assert listed["acme/not-yet"].status is S.AVAILABLE


# --- downloads --------------------------------------------------------------------------------


async def test_download_shows_progress_then_is_downloaded(
    registry: ModelRegistry, hub: HubServer
) -> None:
    info, created = await registry.add_model(MINILM, None)
    assert created and info.status is S.AVAILABLE
    hold = hub.hold(MINILM, "model.safetensors", after=4_000_000)
    started = registry.start_download(MINILM)
    assert started.status is S.DOWNLOADING
    await trio.to_thread.run_sync(hold.reached.wait)
    assert _code(registry.start_download, MINILM) is ErrorCode.MODEL_BUSY
    assert _code(registry.start_load, MINILM) is ErrorCode.MODEL_BUSY
    during = registry.get_model(MINILM).download
    assert during.files_total == 10
    assert 0 < during.files_done < during.files_total
    assert 0 < during.bytes_done < during.bytes_total
    assert registry.statistics().downloading == 1
    hold.release()
    done = await registry.settled(MINILM)
    assert done is not None
    assert (done.status, done.downloaded) == (S.DOWNLOADED, True)
    assert done.download.bytes_done == done.download.bytes_total == done.cache_size_bytes
    assert done.metadata is not None and done.metadata.hidden_size == 384
    metrics = registry.metrics
    assert metrics.downloads.labels(outcome="success")._value.get() == 1
    assert metrics.download_bytes._value.get() >= done.download.bytes_total


async def test_a_failed_download_says_why(registry: ModelRegistry, hub: HubServer) -> None:
    hub.tamper(TINY, "model.safetensors")
    await registry.add_model(TINY, None)
    registry.start_download(TINY)
    failed = await registry.settled(TINY)
    assert failed is not None
    assert failed.status is S.FAILED
    assert not failed.downloaded
    assert failed.verification_error is not None
    assert failed.verification_error.startswith("download failed: model.safetensors: sha256")
    assert registry.metrics.downloads.labels(outcome="failed")._value.get() == 1


async def test_downloads_wait_for_a_free_slot(
    hub: HubServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    models = _registry(
        hub, tmp_path, settings=RegistrySettings(retry=FAST, max_concurrent_downloads=1)
    )
    await nursery.start(models.run)
    hold = hub.hold(MINILM, "model.safetensors", after=1_000_000)
    await models.add_model(MINILM, None)
    await models.add_model(TINY, None)
    models.start_download(MINILM)
    await trio.to_thread.run_sync(hold.reached.wait)
    models.start_download(TINY)
    await trio.testing.wait_all_tasks_blocked()
    queued = models.get_model(TINY)
    assert queued.status is S.DOWNLOADING and queued.download.files_total == 0
    assert not hub.gets(TINY)
    hold.release()
    assert (await models.settled(TINY)) is not None
    assert models.get_model(TINY).status is S.DOWNLOADED


async def test_delete_cancels_a_download_and_removes_the_files(
    registry: ModelRegistry, hub: HubServer, tmp_path: Path
) -> None:
    hold = hub.hold(MINILM, "model.safetensors", after=2_000_000)
    await registry.add_model(MINILM, None)
    registry.start_download(MINILM)
    await trio.to_thread.run_sync(hold.reached.wait)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(registry.delete_model, MINILM)
        await trio.testing.wait_all_tasks_blocked()
        # Forgotten at once; the transfer ends at its next chunk.
        assert _code(registry.get_model, MINILM) is ErrorCode.MODEL_NOT_FOUND
        hold.release()
    assert not (tmp_path / "cache" / "models--sentence-transformers--all-MiniLM-L6-v2").exists()
    assert registry.metrics.downloads.labels(outcome="cancelled")._value.get() == 1


async def test_delete_removes_a_cached_model_unless_an_instance_uses_it(
    hub: HubServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    await _download(hub, tmp_path, TINY)
    users: list[str] = ["bge"]
    models = _registry(hub, tmp_path, in_use=lambda model_id: list(users))
    await nursery.start(models.run)
    with pytest.raises(TeiError, match="used by instance") as refused:
        await models.delete_model(TINY)
    assert refused.value.code is ErrorCode.MODEL_IN_USE
    users.clear()
    deleted = await models.delete_model(TINY)
    assert deleted.status is S.DOWNLOADED  # as it was
    assert not (tmp_path / "cache" / "models--acme--tiny-reranker").exists()
    assert models.list_models() == []
    with pytest.raises(TeiError) as unknown:
        await models.delete_model(TINY)
    assert unknown.value.code is ErrorCode.MODEL_NOT_FOUND


async def test_bad_ids_and_revisions(registry: ModelRegistry) -> None:
    for bad in ("../etc/passwd", "/abs/path", "a/b/c"):
        assert _code(registry.get_model, bad) is ErrorCode.INVALID_MODEL_ID
        assert _code(registry.start_download, bad) is ErrorCode.INVALID_MODEL_ID
        with pytest.raises(TeiError) as error:
            await registry.add_model(bad, None)
        assert error.value.code is ErrorCode.INVALID_MODEL_ID
    with pytest.raises(TeiError, match=r"revision: .* is not a valid revision"):
        await registry.add_model(TINY, "../../x")


async def test_not_running_yet(hub: HubServer, tmp_path: Path) -> None:
    models = _registry(hub, tmp_path)
    await models.add_model(TINY, None)
    assert _code(models.start_download, TINY) is ErrorCode.NOT_READY


# --- instances ------------------------------------------------------------------------------


async def test_instances_wait_for_the_registrys_download(
    registry: ModelRegistry, hub: HubServer
) -> None:
    assert await registry.needs_download(TINY, None)
    assert not await registry.needs_download("/models/local", None)
    hold = hub.hold(TINY, "model.safetensors", after=10_000)
    wait = registry.download_for_instance(TINY, None)
    again = registry.download_for_instance(TINY, None)  # a second instance joins it
    assert registry.statistics().downloading == 1
    assert registry.get_model(TINY).status is S.DOWNLOADING
    env = registry.instance_env(TINY, None)
    assert env["HF_HUB_CACHE"] == registry.cache_dir and "HF_HUB_OFFLINE" not in env
    hold.release()
    assert await wait() is None
    assert await again() is None
    assert not await registry.needs_download(TINY, None)
    # Downloaded whole by the registry: instances run offline on exactly these files.
    assert registry.instance_env(TINY, None)["HF_HUB_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in registry.instance_env(TINY, "v2")


async def test_a_failed_download_is_reported_to_the_instance(
    registry: ModelRegistry, hub: HubServer
) -> None:
    hub.tamper(TINY, "tokenizer.json")
    error = await registry.download_for_instance(TINY, None)()
    assert error is not None and "git blob id mismatch" in error


async def test_offline(hub: HubServer, tmp_path: Path, nursery: trio.Nursery) -> None:
    await _download(hub, tmp_path, TINY)
    asked = len(hub.requests)
    models = _registry(hub, tmp_path, offline=True)
    await nursery.start(models.run)
    assert not await models.needs_download(TINY, None)
    with pytest.raises(TeiError, match='model_id: "acme/other" is not in the model cache') as e:
        await models.needs_download("acme/other", None)
    assert e.value.code is ErrorCode.MODEL_NOT_FOUND
    assert "HF_HUB_OFFLINE" in e.value.message
    assert _code(models.start_download, TINY) is ErrorCode.BACKEND_UNAVAILABLE
    assert len(hub.requests) == asked  # the Hub was never asked


# --- smoke loads --------------------------------------------------------------------------


class _HeldSmokeLoads:
    """A stand-in for the real smoke load that holds each until released."""

    def __init__(self) -> None:
        self.running: list[tuple[str, int | None]] = []
        self.release: dict[str, trio.Event] = {}
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, model_id: str, revision: str | None, **kw: Any) -> SmokeLoad:
        self.calls.append({"model_id": model_id, "revision": revision, **kw})
        self.running.append((model_id, kw["gpu_id"]))
        self.release[model_id] = trio.Event()
        try:
            await self.release[model_id].wait()
        finally:
            self.running.remove((model_id, kw["gpu_id"]))
        if model_id == BROKEN:
            raise SmokeLoadError("the model server exited with code 1 before it answered")
        return SmokeLoad(
            model_kind="reranker",
            model_dtype="float32",
            model_sha=revision,
            max_input_length=64,
            output_size=1,
            load_secs=0.0,
            gpu_id=kw["gpu_id"],
        )


@pytest.mark.parametrize(("gpus", "together"), [(0, 1), (1, 1), (2, 2)])
async def test_one_smoke_load_per_gpu_at_a_time(
    hub: HubServer, tmp_path: Path, nursery: trio.Nursery, gpus: int, together: int
) -> None:
    for model_id in (TINY, CLASSIFIER, BROKEN):
        await _download(hub, tmp_path, model_id)
    smoke = _HeldSmokeLoads()
    program = Program(argv=("/opt/tei/text-embeddings-router",), is_tei=True)
    models = _registry(hub, tmp_path, gpu_count=lambda: gpus, smoke=smoke, program=program)
    await nursery.start(models.run)
    assert _code(models.start_load, "acme/unknown") is ErrorCode.MODEL_NOT_FOUND
    for model_id in (TINY, CLASSIFIER, BROKEN):
        assert models.start_load(model_id).status is S.LOADING
    await trio.testing.wait_all_tasks_blocked()
    assert len(smoke.running) == together
    assert {gpu for _, gpu in smoke.running} == ({None} if gpus == 0 else set(range(together)))
    while smoke.running:
        smoke.release[smoke.running[0][0]].set()
        await trio.testing.wait_all_tasks_blocked()
    verified = models.get_model(TINY)
    assert verified.status is S.VERIFIED and verified.last_verified is not None
    assert verified.smoke_load is not None and verified.smoke_load.model_kind == "reranker"
    broken = models.get_model(BROKEN)
    assert broken.status is S.FAILED
    assert broken.verification_error == "the model server exited with code 1 before it answered"
    assert models.metrics.smoke_loads.labels(outcome="failed")._value.get() == 1
    # The configured backend, on the exact commit downloaded, offline, on this cache.
    call = smoke.calls[0]
    assert call["program"] is program
    assert call["revision"] == hub.repos[call["model_id"]].commit
    assert call["env"]["HF_HUB_OFFLINE"] == "1"
    assert call["env"]["HF_HUB_CACHE"] == models.cache_dir


@pytest.mark.slow
async def test_smoke_load_of_a_real_model(registry: ModelRegistry) -> None:
    await registry.add_model(MINILM, None)
    registry.start_download(MINILM)
    await registry.settled(MINILM)
    assert registry.start_load(MINILM).status is S.LOADING
    info = await registry.settled(MINILM)
    assert info is not None
    assert info.status is S.VERIFIED, info.verification_error
    smoke = info.smoke_load
    assert smoke is not None
    assert (smoke.model_kind, smoke.output_size, smoke.model_dtype) == ("embedding", 384, "float32")
    assert smoke.model_sha == info.cache_path.rsplit("/", 1)[-1] if info.cache_path else False
    assert smoke.max_input_length == 256
    assert smoke.load_secs > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_id", "kind", "size"), [(TINY, "reranker", 1), (CLASSIFIER, "classifier", 3)]
)
async def test_smoke_load_asks_what_fits_the_model(
    registry: ModelRegistry, model_id: str, kind: str, size: int
) -> None:
    await registry.add_model(model_id, None)
    registry.start_download(model_id)
    await registry.settled(model_id)
    registry.start_load(model_id)
    info = await registry.settled(model_id)
    assert info is not None and info.status is S.VERIFIED, info and info.verification_error
    assert info.smoke_load is not None
    assert (info.smoke_load.model_kind, info.smoke_load.output_size) == (kind, size)


@pytest.mark.slow
async def test_smoke_load_of_a_broken_model_fails_with_the_reason(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    await registry.add_model(BROKEN, None)
    registry.start_download(BROKEN)
    downloaded = await registry.settled(BROKEN)
    assert downloaded is not None and downloaded.status is S.DOWNLOADED
    registry.start_load(BROKEN)
    info = await registry.settled(BROKEN)
    assert info is not None
    assert info.status is S.FAILED
    assert info.downloaded
    error = info.verification_error or ""
    assert error.startswith("the model server exited with code 1 before it answered")
    assert "last log lines:\n" in error
    # The worker's JSON log line, made readable: the exception that stopped it.
    assert "ERROR worker failed: tei_manager.worker.errors.ModelLoadError: cannot load" in error
    assert "Error while deserializing header" in error
    assert (tmp_path / "logs" / "models" / "models--acme--broken.log").exists()
