"""The model registry service: what is cached, downloads and smoke loads, as tasks.

::

    ModelRegistry.run
    ├── start-up: scan the Hugging Face cache, register every model in it and the
    │   configured ``models``
    └── job nursery
        ├── download "org/a"     (at most max_concurrent_downloads at a time)
        └── smoke load "org/b"   (one per GPU at a time; one on the CPU without GPUs)

Requests decide synchronously through :class:`~tei_manager.hub.state.ModelTable`
(busy? known?), start a job and return at once: the REST API answers 202 and the
progress is visible in ``GET /models/{id}``. Each job has its own cancel scope:
``DELETE /models/{id}`` cancels it, waits for it to end, then removes the files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import partial

import msgspec
import trio
from prometheus_client import CollectorRegistry

from tei_manager.errors import ConflictError, ErrorCode, NotFoundError, TeiError, quote
from tei_manager.hub.cache import locate, remove_model, scan_cache
from tei_manager.hub.download import Downloader, DownloadError
from tei_manager.hub.jobs import GpuSlots, Job
from tei_manager.hub.metrics import DownloadOutcome, HubMetrics, SmokeOutcome
from tei_manager.hub.paths import validate_hub_model_id, validate_revision
from tei_manager.hub.settings import HubSettings, RegistrySettings
from tei_manager.hub.smoke import SmokeLoadError, SmokeRunner, smoke_load
from tei_manager.hub.state import (
    CachedSnapshot,
    ModelInfo,
    ModelRecord,
    ModelStatus,
    ModelTable,
)
from tei_manager.supervisor.instance import BlockingRunner
from tei_manager.supervisor.launch import Program, worker_program

__all__ = ["ModelRegistry", "ModelRegistryStatistics", "ModelWait"]

log = logging.getLogger("tei_manager.models")

ModelWait = Callable[[], Awaitable["str | None"]]
"""Waits for a model an instance needs: None once it is in the cache, else why not."""


class ModelRegistryStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Counts for metrics and diagnostics."""

    models: int
    downloading: int
    loading: int


def _utcnow() -> datetime:
    return datetime.now(UTC)


class ModelRegistry:
    """Models known to the manager; see the module notes.

    ``run_blocking`` runs file-system work (cache scans, removals) off the event
    loop; ``downloader`` and ``smoke`` replace the real transfer and smoke load.
    """

    def __init__(
        self,
        *,
        hub: HubSettings,
        settings: RegistrySettings,
        metrics: CollectorRegistry,
        log_dir: str,
        program: Program | None = None,
        seeds: Sequence[str] = (),
        in_use: Callable[[str], list[str]] = lambda model_id: [],
        gpu_count: Callable[[], int | None] = lambda: 0,
        instance_downloads: bool = True,
        run_blocking: BlockingRunner = trio.to_thread.run_sync,
        downloader: Downloader | None = None,
        smoke: SmokeRunner = smoke_load,
    ) -> None:
        self.hub = hub
        self.settings = settings
        self.metrics = HubMetrics(metrics)
        self._log_dir = log_dir
        self._program = program or worker_program()
        self._seeds = tuple(seeds)
        self._in_use = in_use
        self._gpu_count = gpu_count
        self._instance_downloads = instance_downloads
        self._run_blocking = run_blocking
        self._downloader = downloader or Downloader(
            hub, settings.retry, on_bytes=self.metrics.bytes_received
        )
        self._smoke = smoke
        self._table = ModelTable()
        self._jobs: dict[str, Job] = {}
        self._deleting: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._download_limit = trio.CapacityLimiter(settings.max_concurrent_downloads)
        self._slots = GpuSlots(0)
        self.metrics.bind(
            models=lambda: len(self._table),
            active_downloads=lambda: self.statistics().downloading,
        )

    @property
    def cache_dir(self) -> str:
        """The Hugging Face cache the registry reads and downloads into."""
        return self.hub.cache_dir

    async def settled(self, model_id: str) -> ModelInfo | None:
        """Wait until no download or smoke load of ``model_id`` runs; the model then
        (None if it is not registered any more)."""
        job = self._jobs.get(model_id)
        while job is not None:
            await job.done.wait()
            job = self._jobs.get(model_id)
        record = self._table.find(model_id)
        return None if record is None else record.info()

    def statistics(self) -> ModelRegistryStatistics:
        kinds = [job.kind for job in self._jobs.values()]
        return ModelRegistryStatistics(
            models=len(self._table),
            downloading=kinds.count("download"),
            loading=kinds.count("load"),
        )

    # -- the service ----------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Register what the cache holds and the configured models, then serve jobs.

        ``started()`` once registered; cancelling it cancels every job (partial
        downloads are kept, and resumed by the next download).
        """
        if self._nursery is not None:
            raise RuntimeError("ModelRegistry.run is already running")
        found = await self._run_blocking(self._scan)
        now = _utcnow()
        for snapshot in found:
            revision = None if snapshot.revision == "main" else snapshot.revision
            self._table.add(snapshot.model_id, revision, now=now, snapshot=snapshot)
        for model_id in self._seeds:
            if model_id not in self._table:
                self._table.add(model_id, None, now=now, snapshot=None)
        self._slots = GpuSlots(self._gpu_count() or 0)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                log.info(
                    "model registry: %d model(s), %d in the cache %s",
                    len(self._table),
                    len(found),
                    self.cache_dir,
                )
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def _scan(self) -> list[CachedSnapshot]:
        try:
            found = scan_cache(self.cache_dir)
        except OSError as e:
            log.warning("cannot scan the model cache %s: %s", self.cache_dir, e)
            found = []
        known = {s.model_id for s in found}
        for model_id in self._seeds:
            if model_id not in known:
                snapshot = locate(self.cache_dir, model_id, None)
                if snapshot is not None:
                    found.append(snapshot)
        return found

    # -- reading --------------------------------------------------------------------------
    def list_models(self) -> list[ModelInfo]:
        """Every registered model, in registration order."""
        return [record.info() for record in self._table]

    def get_model(self, model_id: str) -> ModelInfo:
        """One model; raises INVALID_MODEL_ID or MODEL_NOT_FOUND."""
        validate_hub_model_id(model_id)
        return self._table.get(model_id).info()

    # -- changing -------------------------------------------------------------------------
    async def add_model(self, model_id: str, revision: str | None) -> tuple[ModelInfo, bool]:
        """Register ``model_id`` (True) or refresh the known one (False) from the cache."""
        validate_hub_model_id(model_id)
        if revision is not None:
            validate_revision(revision)
        self._check_not_deleting(model_id)
        snapshot = await self._run_blocking(partial(locate, self.cache_dir, model_id, revision))
        self._check_not_deleting(model_id)
        record, created = self._table.add(model_id, revision, now=_utcnow(), snapshot=snapshot)
        if created:
            log.info("model %s registered (%s)", model_id, record.status)
        return record.info(), created

    def start_download(self, model_id: str) -> ModelInfo:
        """Start downloading ``model_id``; returns it ``downloading``.

        Raises INVALID_MODEL_ID, MODEL_NOT_FOUND, MODEL_BUSY, NOT_READY, or
        BACKEND_UNAVAILABLE in offline mode.
        """
        validate_hub_model_id(model_id)
        nursery = self._require_running()
        self._table.get(model_id)
        if self.hub.offline:
            raise TeiError(
                ErrorCode.BACKEND_UNAVAILABLE,
                f"cannot download {quote(model_id)}: offline mode (HF_HUB_OFFLINE) is on",
            )
        self._check_not_deleting(model_id)
        record = self._table.begin_download(model_id)
        self._start(nursery, Job("download", record.revision), record, self._download)
        log.info("model %s: download started", model_id)
        return record.info()

    def start_load(self, model_id: str) -> ModelInfo:
        """Start a smoke load of ``model_id``; returns it ``loading``.

        Raises INVALID_MODEL_ID, MODEL_NOT_FOUND, MODEL_BUSY (busy, or not
        downloaded) or NOT_READY.
        """
        validate_hub_model_id(model_id)
        nursery = self._require_running()
        self._check_not_deleting(model_id)
        record = self._table.begin_load(model_id)
        self._start(nursery, Job("load", record.revision), record, self._load)
        log.info("model %s: smoke load started", model_id)
        return record.info()

    async def delete_model(self, model_id: str) -> ModelInfo:
        """Cancel what runs for ``model_id``, forget it and remove it from the cache.

        Returns the model as it was. Raises INVALID_MODEL_ID, MODEL_NOT_FOUND,
        MODEL_IN_USE while an instance uses it, IO_ERROR if the files cannot go.
        """
        validate_hub_model_id(model_id)
        record = self._table.get(model_id)
        users = self._in_use(model_id)
        if users:
            raise ConflictError(
                ErrorCode.MODEL_IN_USE,
                f"model {quote(model_id)} is used by instance(s) {', '.join(users)}: "
                "delete them first",
            )
        info = record.info()
        self._table.remove(model_id)
        self._deleting.add(model_id)
        # Whoever asked may go away; the files must still go, or stay registered.
        with trio.CancelScope(shield=True):
            try:
                job = self._jobs.get(model_id)
                if job is not None:
                    job.scope.cancel()
                    await job.done.wait()
                await self._run_blocking(partial(remove_model, self.cache_dir, model_id))
            except OSError as e:
                self._table.add(model_id, record.revision, now=record.added_at, snapshot=None)
                raise TeiError(
                    ErrorCode.IO_ERROR,
                    f"cannot remove {quote(model_id)} from the model cache: {e.strerror or e}",
                ) from None
            finally:
                self._deleting.discard(model_id)
        log.info("model %s deleted", model_id)
        return info

    # -- instances ------------------------------------------------------------------------
    async def needs_download(self, model_id: str, revision: str | None) -> bool:
        """Whether an instance of ``model_id`` must wait for the registry to download it.

        False for a local folder or a model in the cache. Offline, a model that is
        not in the cache raises MODEL_NOT_FOUND naming it.
        """
        if not self._instance_downloads or model_id.startswith("/"):
            return False
        found = await self._run_blocking(partial(locate, self.cache_dir, model_id, revision))
        if found is not None:
            return False
        if self.hub.offline:
            at = f" at revision {quote(revision)}" if revision else ""
            raise NotFoundError(
                ErrorCode.MODEL_NOT_FOUND,
                f"model_id: {quote(model_id)}{at} is not in the model cache ({self.cache_dir}) "
                "and HF_HUB_OFFLINE is set, so it cannot be downloaded: put it in the cache "
                f"first (tei-manager models pull {model_id})",
            )
        return True

    def download_for_instance(self, model_id: str, revision: str | None) -> ModelWait:
        """Start (or join) the download an instance waits for; see :data:`ModelWait`."""
        job = self._jobs.get(model_id)
        if job is not None and job.kind == "download" and job.revision == revision:
            return job.wait
        try:
            nursery = self._require_running()
            self._check_not_deleting(model_id)
            self._table.add(model_id, revision, now=_utcnow(), snapshot=None)
            record = self._table.begin_download(model_id)
        except TeiError as e:
            return partial(_immediately, e.message)
        job = Job("download", record.revision)
        self._start(nursery, job, record, self._download)
        log.info("model %s: download started for an instance", model_id)
        return job.wait

    def instance_env(self, model_id: str, revision: str | None) -> dict[str, str]:
        """Environment for an instance of ``model_id``: this registry's cache and Hub.

        A model the registry downloaded whole (or verified) runs offline: the
        instance reads exactly the files that were checked, and asks the Hub nothing.
        """
        env = {
            "HF_HUB_CACHE": self.cache_dir,
            "HUGGINGFACE_HUB_CACHE": self.cache_dir,  # TEI's name for it
            "HF_ENDPOINT": self.hub.endpoint,
        }
        record = self._table.find(model_id)
        if (
            record is not None
            and record.complete
            and record.status not in (ModelStatus.DOWNLOADING, ModelStatus.LOADING)
            and (record.revision or "main") == (revision or "main")
        ):
            env["HF_HUB_OFFLINE"] = "1"
        return env

    # -- jobs -----------------------------------------------------------------------------
    def _start(
        self,
        nursery: trio.Nursery,
        job: Job,
        record: ModelRecord,
        body: Callable[[ModelRecord, Job], Awaitable[None]],
    ) -> None:
        self._jobs[record.model_id] = job
        nursery.start_soon(body, record, job)

    def _finish(self, record: ModelRecord, job: Job) -> None:
        if self._jobs.get(record.model_id) is job:
            del self._jobs[record.model_id]
        job.done.set()

    async def _download(self, record: ModelRecord, job: Job) -> None:
        started = trio.current_time()
        outcome: DownloadOutcome = "cancelled"
        try:
            with job.scope:
                async with self._download_limit:
                    try:
                        snapshot = await self._downloader.download(
                            record.model_id, record.revision, record.progress
                        )
                    except DownloadError as e:
                        outcome = "failed"
                        job.error = str(e)
                        ModelTable.download_failed(record, str(e))
                        log.warning("model %s: download failed: %s", record.model_id, e)
                    else:
                        outcome = "success"
                        ModelTable.download_succeeded(record, snapshot)
                        log.info(
                            "model %s: downloaded %d files, %d bytes, to %s",
                            record.model_id,
                            record.progress.files_total,
                            record.progress.bytes_total,
                            snapshot.path,
                        )
        finally:
            if outcome == "cancelled":
                job.error = "the download was cancelled"
                ModelTable.download_stopped(record)
            self.metrics.download_finished(outcome, trio.current_time() - started)
            self._finish(record, job)

    async def _load(self, record: ModelRecord, job: Job) -> None:
        outcome: SmokeOutcome | None = None
        env = {**os.environ, **self.instance_env(record.model_id, record.revision)}
        env["HF_HUB_OFFLINE"] = "1"  # the files on disk, and nothing else, are tested
        try:
            with job.scope:
                async with self._slots.take() as gpu_id:
                    try:
                        result = await self._smoke(
                            record.model_id,
                            record.commit or record.revision,
                            gpu_id=gpu_id,
                            program=self._program,
                            log_dir=self._log_dir,
                            env=env,
                            settings=self.settings,
                        )
                    except SmokeLoadError as e:
                        outcome = "failed"
                        job.error = str(e)
                        ModelTable.load_failed(record, str(e))
                        log.warning("model %s: smoke load failed: %s", record.model_id, e)
                    else:
                        outcome = "verified"
                        ModelTable.load_succeeded(record, result, _utcnow())
                        log.info(
                            "model %s: verified (%s, %.1f s)",
                            record.model_id,
                            result.model_kind,
                            result.load_secs,
                        )
        finally:
            if outcome is None:
                job.error = "the smoke load was cancelled"
                ModelTable.load_stopped(record)
            else:
                self.metrics.smoke_loaded(outcome)
            self._finish(record, job)

    # -- checks ---------------------------------------------------------------------------
    def _require_running(self) -> trio.Nursery:
        if self._nursery is None:
            raise TeiError(
                ErrorCode.NOT_READY, "the model registry is starting or stopping: try again later"
            )
        return self._nursery

    def _check_not_deleting(self, model_id: str) -> None:
        if model_id in self._deleting:
            raise ConflictError(
                ErrorCode.MODEL_BUSY, f"model {quote(model_id)} is being deleted: try again shortly"
            )


async def _immediately(error: str) -> str | None:
    await trio.lowlevel.checkpoint()
    return error
