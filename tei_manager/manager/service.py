"""The manager: the instance table, the supervisor and the state file behind one facade.

The REST API (and later the gRPC multiplexer) call the methods of :class:`Manager`;
``Manager.run`` is the service that owns the instance processes::

    Manager.run
    └── service nursery
        ├── runtime file writer     (pids of live instance processes, for orphan reaping)
        ├── model registry          (tei_manager.hub: cache scan, downloads, smoke loads)
        └── supervisor nursery
            ├── InstanceRunner "a"  (the instance's nursery: process, checks, restarts)
            └── InstanceRunner "b"

Each facade method decides synchronously (the instance table's rules, then the runner's
request), then acts: saving the desired state, waiting for a spawn. Cancelling
``run`` stops every instance concurrently (SIGTERM → grace → SIGKILL), without
changing what is wanted running, and saves the state for the next start.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import threading
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Final

import msgspec
import trio

from tei_manager import __version__
from tei_manager.config import InstanceConfig, ManagerConfig, validate_instance_config
from tei_manager.core.gpu import (
    DEFAULT_MAX_BATCH_TOKENS,
    DeviceTable,
    auto_max_batch_tokens,
    fallen_back,
    preflight_problems,
)
from tei_manager.core.instances import (
    InstanceInfo,
    InstanceRecord,
    InstanceStatus,
    InstanceTable,
)
from tei_manager.core.logslice import LogSlice, read_log_slice
from tei_manager.core.ports import PortAllocator, PortProbe, probe_bindable
from tei_manager.core.readiness import ReadinessGate
from tei_manager.core.restart import RestartPolicy
from tei_manager.errors import (
    ConfigError,
    ConflictError,
    ErrorCode,
    NotFoundError,
    TeiError,
    ValidationError,
    quote,
)
from tei_manager.hub.cache import local_model_problem, locate
from tei_manager.hub.registry import ModelRegistry, ModelWait
from tei_manager.hub.settings import HubSettings, RegistrySettings
from tei_manager.manager.backup import Backup, BackupModel
from tei_manager.manager.hostports import check_host_ports, port_free_for_instance
from tei_manager.manager.metrics import ManagerMetrics
from tei_manager.manager.ondemand import DevicesReport, Estimator, MemoryReader, OnDemand
from tei_manager.manager.runtime import RuntimeFileWriter
from tei_manager.manager.startup import prepare
from tei_manager.manager.state import (
    PersistedInstance,
    PersistedState,
    StateFileReport,
    merge_seeds,
    save_state,
    state_from_instances,
)
from tei_manager.supervisor.devices import (
    DeviceSource,
    GpuProcessMemory,
    NoDevices,
    detect_devices,
    engine_gpu_build,
    gpu_process_memory,
    host_devices,
    process_tree_peak_rss,
)
from tei_manager.supervisor.footprint import (
    FootprintError,
    cpu_runtime,
    estimate_footprint,
    runtime_bytes,
)
from tei_manager.supervisor.instance import (
    BlockingRunner,
    InstanceRunner,
    ProcessHandle,
    RunnerSettings,
    Spawner,
)
from tei_manager.supervisor.launch import (
    Program,
    instance_log_path,
    launch_spec,
    resolve_program,
    worker_program,
)
from tei_manager.supervisor.orphans import runtime_path
from tei_manager.supervisor.probe import Prober, info_probe
from tei_manager.supervisor.process import spawn
from tei_manager.supervisor.procfs import read_stat

__all__ = ["Manager"]

# How often the readiness gate is looked at until it opens (for the gRPC health).
_READY_GATE_POLL_SECS: Final = 1.0

log = logging.getLogger("tei_manager.manager")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _remove_log(path: Path) -> None:
    """Remove an instance's log file, if any; a failure is logged, not raised."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("cannot remove %s: %s", path, e.strerror or e)


def _on_gpu(record: InstanceRecord) -> bool:
    """The instance asked for a GPU: by index, or "auto" placed on one."""
    gpu_id = record.config.gpu_id
    if isinstance(gpu_id, int):
        return True
    return gpu_id == "auto" and (record.device or "").startswith("gpu:")


class Manager:
    """Instances, their processes and their persisted state; see the module notes.

    ``spawner``, ``prober``, ``gpu_count``, the port probes, ``run_blocking`` and
    ``devices`` replace the real process spawning, Info calls, GPU detection, socket
    probing, worker threads and GPU table (tests). Without a real spawner the
    default device table is empty. ``read_devices`` and ``gpu_memory`` (models on
    demand) default to reading that same table plus the host's RAM.
    """

    def __init__(
        self,
        config: ManagerConfig,
        *,
        spawner: Spawner | None = None,
        prober: Prober | None = None,
        gpu_count: int | None = None,
        port_probe: PortProbe = probe_bindable,
        explicit_port_probe: PortProbe = port_free_for_instance,
        policy: RestartPolicy | None = None,
        settings: RunnerSettings | None = None,
        run_blocking: BlockingRunner = trio.to_thread.run_sync,
        hub: HubSettings | None = None,
        devices: DeviceTable | None = None,
        read_devices: DeviceSource | None = None,
        estimate: Estimator | None = None,
        read_memory: MemoryReader = process_tree_peak_rss,
        gpu_memory: GpuProcessMemory | None = None,
    ) -> None:
        self.config = config
        self.metrics = ManagerMetrics()
        # Resolved once: a configured TEI binary that cannot run is a ConfigError now.
        self.program: Program | None = (
            resolve_program(config.tei_binary_path) if spawner is None else None
        )
        self.instances = InstanceTable(
            PortAllocator(config.instance_port_start, config.instance_port_end, probe=port_probe),
            max_instances=config.max_instances,
            reserved_ports=config.manager_ports(),
        )
        self.metrics.bind_instance_count(lambda: len(self.instances))
        # The Hugging Face cache and Hub (HF_* variables unless given). Instances wait
        # for the registry's downloads only when the manager spawns real processes.
        self.models = ModelRegistry(
            hub=hub or HubSettings.from_env(os.environ),
            settings=RegistrySettings.from_config(config),
            metrics=self.metrics.prometheus,
            log_dir=config.log_dir,
            program=self.program,
            seeds=config.models,
            in_use=lambda model_id: [r.name for r in self.instances.by_model(model_id)],
            gpu_count=lambda: self.gpu_count,
            instance_downloads=spawner is None,
            run_blocking=run_blocking,
        )
        # Scrape-time series for dashboards and alerts (deploy/grafana, deploy/prometheus).
        self.metrics.bind_instance_statuses(
            lambda: [(record.name, str(record.status)) for record in self.instances]
        )
        self.metrics.bind_storage({"logs": config.log_dir, "model_cache": self.models.cache_dir})
        # None until run() counted the GPUs; the REST layer passes it to validation.
        self.gpu_count: int | None = gpu_count
        self.started_at: float = time.time()
        self.startup_complete = False
        # Set when a graceful shutdown begins: the REST server stops accepting,
        # drains in-flight requests and returns.
        self.shutdown_requested = trio.Event()
        # What GPUs exist (NVML, nvidia-smi, or none): preflight, "auto" batch sizes,
        # CPU fallback, and the GPU memory series of /metrics.
        self.devices: DeviceTable = devices or (NoDevices() if spawner else detect_devices())
        self.metrics.bind_gpus(
            lambda: [
                (g.index, g.name, g.memory_free_bytes, g.memory_total_bytes)
                for g in self.devices.gpus()
            ]
        )
        self._spawn_raw: Spawner = spawner or self._spawn_process
        self._spawner: Spawner = self._spawn_with_batch_tokens
        self._prober: Prober = prober or info_probe
        self._explicit_port_probe = explicit_port_probe
        self._policy = policy or RestartPolicy.from_config(config)
        self._settings = settings or RunnerSettings.from_config(config)
        self._run_blocking = run_blocking
        self._started_monotonic = time.monotonic()
        self._restored = False
        self._listening = False
        # ready_requires_instances: the seeds must have run before readiness.
        self._gate = ReadinessGate(
            (seed.name for seed in config.instances),
            self.instances,
            enabled=config.ready_requires_instances,
        )
        # Set once the gate opened (at once when it is off), after the state is
        # restored: the gRPC health service reports SERVING from then on.
        self.instances_ready = trio.Event()
        self._runners: dict[str, InstanceRunner] = {}
        # Set once a runner's process is gone, its log removed if it was deleted, and
        # its name free again.
        self._released: dict[InstanceRunner, trio.Event] = {}
        # Instances waiting for their model's download, to be cancelled on delete.
        self._awaiting_model: dict[str, trio.CancelScope] = {}
        self._supervisor: trio.Nursery | None = None
        self._state_lock = trio.Lock()
        # One reset or import at a time.
        self._bulk_lock = trio.Lock()
        self._runtime = RuntimeFileWriter(
            runtime_path(config.state_file),
            lambda: self._runners.values(),
            run_blocking=run_blocking,
        )
        self.state_save_failures = 0
        # What start-up found in the state file; /health reports it.
        self.state_file_report = StateFileReport(status="ok")
        # Models on demand: admission and placement for every start, cold starts and
        # idle unloads for on-demand instances.
        self.ondemand = OnDemand(
            self.instances,
            self._runners.get,
            devices=config.devices,
            # One reading of the GPUs: the same table as preflight and /metrics.
            read_devices=read_devices or (lambda: host_devices(self.devices)),
            estimate=estimate or self._estimate_footprint,
            read_memory=read_memory,
            gpu_memory=gpu_memory or (lambda pids: gpu_process_memory(pids, self.devices)),
            metrics=self.metrics,
            default_idle_timeout_secs=config.idle_timeout_secs,
            startup_timeout_secs=config.startup_timeout_secs,
            run_blocking=run_blocking,
        )

    # -- readiness -----------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Config loaded, state restored, listeners up, not shutting down and, with
        ``ready_requires_instances``, the declared instances running."""
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        """Why ``/health/ready`` answers 503, or None when it answers 200."""
        if self.shutdown_requested.is_set():
            return "not ready: the manager is shutting down"
        if not (self._restored and self._listening):
            return "not ready: state is being restored or the listeners are not up yet"
        reason = self._gate.check()
        if reason is None:
            self.instances_ready.set()
        return reason

    def mark_listening(self) -> None:
        """The REST server accepts connections (``/health/ready`` may answer 200)."""
        self._listening = True

    def begin_shutdown(self) -> None:
        """A graceful shutdown starts: not ready any more; listeners stop and drain."""
        self.shutdown_requested.set()

    def kill_now(self) -> None:
        """SIGKILL every instance process now (a forced shutdown: no grace left)."""
        for runner in list(self._runners.values()):
            runner.kill_now()

    # -- reading ------------------------------------------------------------------------
    def list_instances(self) -> list[InstanceInfo]:
        """Every instance, in creation order."""
        return self.instances.infos(_utcnow())

    def get_instance(self, name: str) -> InstanceInfo:
        """One instance; raises INSTANCE_NOT_FOUND."""
        return self.instances.get(name).info(_utcnow())

    def log_path(self, name: str) -> Path:
        """Where ``name``'s process output goes."""
        return instance_log_path(self.config.log_dir, name)

    async def instance_logs(self, name: str, start: int | None, end: int | None) -> LogSlice:
        """``lines[start:end]`` of the instance's log; raises INSTANCE_NOT_FOUND.

        Never a deleted instance's: one deleted (or deleted and created again)
        while the file was read is not found, as it would have been a moment later.
        """
        record = self.instances.get(name)
        lines = await self._run_blocking(partial(read_log_slice, self.log_path(name), start, end))
        if self.instances.find(name) is not record:
            self.instances.get(name)  # raises INSTANCE_NOT_FOUND if it is gone
            raise NotFoundError(
                ErrorCode.INSTANCE_NOT_FOUND, f"instance {quote(name)} was deleted: read again"
            )
        return lines

    def health_summary(self) -> dict[str, Any]:
        """The body of ``GET /health`` (the REST layer adds ``storage``)."""
        stats = self.instances.statistics()
        if self.shutdown_requested.is_set():
            status = "shutting_down"
        elif not self.startup_complete:
            status = "starting"
        else:
            status = "healthy"
        return {
            "status": status,
            "version": __version__,
            "uptime_secs": int(time.monotonic() - self._started_monotonic),
            "instances": {
                "total": stats.total,
                "running": stats.running,
                "starting": stats.starting,
                "failed": stats.failed,
                "stopped": stats.stopped + stats.stopping,
                "idle": stats.idle,
            },
            "state": msgspec.to_builtins(self.state_file_report),
            "devices": msgspec.to_builtins(self.ondemand.devices_report().devices),
        }

    def devices_report(self) -> DevicesReport:
        """The body of ``GET /devices``."""
        return self.ondemand.devices_report()

    async def ensure_running(self, record: InstanceRecord, deadline: float = math.inf) -> None:
        """The front doors' hook: see :meth:`OnDemand.ensure_running`."""
        await self.ondemand.ensure_running(record, deadline)

    # -- changing -------------------------------------------------------------------------
    async def create_instance(self, cfg: InstanceConfig) -> InstanceInfo:
        """Register ``cfg`` and spawn its process; the instance is ``starting`` (or
        ``failed`` if it could not be spawned).

        Raises the validation codes, INSTANCE_EXISTS, PORT_CONFLICT,
        MAX_INSTANCES_REACHED, PORT_ALLOCATION_FAILED, NOT_READY while the
        manager starts or stops, or MODEL_NOT_FOUND for a local folder that holds no
        model or a model that is not cached while offline. A model that is not
        cached is downloaded by the model registry first; the instance is
        ``starting`` meanwhile.
        """
        self._require_supervisor()
        validate_instance_config(cfg, gpu_count=self.gpu_count)
        if cfg.model_id.startswith("/"):
            # A local folder (validation allows no other path form; a Hub id has at
            # most one "/" and never starts with one, as in huggingface_hub).
            problem = await self._run_blocking(partial(local_model_problem, cfg.model_id))
            if problem is not None:
                raise NotFoundError(
                    ErrorCode.MODEL_NOT_FOUND, f"model_id: {quote(cfg.model_id)} {problem}"
                )
        # Looks at the model cache on disk; raises MODEL_NOT_FOUND offline.
        fetch_model = await self.models.needs_download(cfg.model_id, cfg.revision)
        supervisor = self._require_supervisor()
        if cfg.name in self._runners and cfg.name not in self.instances:
            raise ConflictError(
                ErrorCode.INSTANCE_EXISTS,
                f"instance {quote(cfg.name)} is still being deleted: try again shortly",
            )
        check_host_ports(cfg, taken=self.instances.used_ports(), probe=self._explicit_port_probe)
        record = self.instances.add(cfg, created_at=_utcnow())
        if record.status is InstanceStatus.STARTING:
            try:
                await self._admit(record)
            except BaseException:
                self.instances.remove(record.name)
                raise
        # A new instance's log starts empty, whatever an earlier instance of that name
        # left (its log is removed on delete, but a crash may have come first). One
        # unlink, synchronous like the spawn, so no other request can interleave.
        _remove_log(self.log_path(record.name))
        self.metrics.instance_created(record.name, record.config.model_id)
        runner = self._new_runner(record)
        log.info(
            "instance %s created (model %s, port %d)",
            record.name,
            record.config.model_id,
            record.port,
            extra={"instance": record.name},
        )
        if fetch_model:
            wait = self.models.download_for_instance(cfg.model_id, cfg.revision)
            supervisor.start_soon(self._run_runner_when_model_ready, runner, wait)
        else:
            # Spawning is synchronous and quick; a caller that goes away meanwhile must
            # not leave a registered instance without its runner.
            with trio.CancelScope(shield=True):
                await supervisor.start(self._run_runner, runner)
        info = record.info(_utcnow())
        await self._save_state()
        return info

    async def delete_instance(self, name: str) -> InstanceInfo:
        """Unregister ``name`` and end its process; returns the instance as it was."""
        record = self.instances.get(name)
        info = record.info(_utcnow())
        self.instances.remove(name)
        self.metrics.instance_deleted(name)
        self.ondemand.activity.forget(name)
        runner = self._runners.get(name)
        if runner is not None:
            runner.cancel()
        awaiting = self._awaiting_model.pop(name, None)
        if awaiting is not None:
            awaiting.cancel()
        log.info("instance %s deleted", name, extra={"instance": name})
        await self._save_state()
        released = self._released.get(runner) if runner is not None else None
        if released is not None:  # else its task ended already
            await released.wait()
        return info

    async def start_instance(self, name: str) -> InstanceInfo:
        """Start a stopped, idle or failed instance; raises ALREADY_RUNNING, or
        INSUFFICIENT_MEMORY when it fits no device even by evicting idle on-demand ones."""
        self._require_supervisor()
        record = self.instances.get(name)
        live = (InstanceStatus.STARTING, InstanceStatus.RUNNING)
        if record.status not in live and record.device is None:  # no memory held yet
            await self._admit(record)
        record = self.instances.request_start(name)
        self.ondemand.activity.touch(name)
        self._runners[name].request_start()
        info = record.info(_utcnow())
        await self._save_state()
        return info

    async def stop_instance(self, name: str) -> InstanceInfo:
        """Stop an instance; returns at once (``stopping``, or ``stopped`` if no process
        ran). Raises NOT_RUNNING."""
        self._require_supervisor()
        record = self.instances.request_stop(name)
        self._runners[name].request_stop()
        info = record.info(_utcnow())
        await self._save_state()
        return info

    async def restart_instance(self, name: str) -> InstanceInfo:
        """End the process (if any) and start a new one, whatever the status; raises
        INSUFFICIENT_MEMORY for one holding no memory that fits nowhere."""
        self._require_supervisor()
        if self.instances.get(name).device is None:
            await self._admit(self.instances.get(name))
        record = self.instances.request_restart(name)
        self.ondemand.activity.touch(name)
        self._runners[name].request_restart()
        info = record.info(_utcnow())
        await self._save_state()
        return info

    # -- reset, backup and restore (POST /state/reset, /state/export, /state/import) ----------
    async def reset_state(self) -> list[InstanceInfo]:
        """Stop and delete every instance, clear the state file, then create the
        configuration's ``[[instances]]`` afresh (``auto_start`` decides each one's run
        state), as the original's ``POST /state/reset`` does."""
        self._require_supervisor()
        async with self._bulk_lock:
            await self._delete_every_instance()
            seeded, added = merge_seeds(PersistedState(), self.config.instances, now=_utcnow())
            await self._register_and_launch(seeded.instances)
            log.info("state reset; seed instances: %s", ", ".join(added) or "none")
        return self.list_instances()

    def export_state(self) -> Backup:
        """The desired state: every instance as the state file has it, and the models."""
        state = state_from_instances(self.instances)
        models = tuple(
            BackupModel(model_id=m.model_id, revision=m.revision) for m in self.models.list_models()
        )
        return Backup(exported_at=_utcnow(), instances=state.instances, models=models)

    async def import_state(self, backup: Backup) -> list[InstanceInfo]:
        """Replace every instance with those of ``backup`` (checked by
        :func:`~tei_manager.manager.backup.decode_backup` before this is called) and
        register its models; instances keep their run state and creation time."""
        self._require_supervisor()
        async with self._bulk_lock:
            await self._delete_every_instance()
            for model in backup.models:
                await self.models.add_model(model.model_id, model.revision)
            await self._register_and_launch(backup.instances)
            log.info("state imported: %d instance(s)", len(backup.instances))
        return self.list_instances()

    async def _delete_every_instance(self) -> None:
        """Delete all instances concurrently; returns once every process is gone."""

        async def delete(name: str) -> None:
            try:
                await self.delete_instance(name)
            except TeiError as e:
                if e.code is not ErrorCode.INSTANCE_NOT_FOUND:  # deleted meanwhile: fine
                    raise

        async with trio.open_nursery() as nursery:
            for record in self.instances:
                nursery.start_soon(delete, record.name)

    async def _register_and_launch(self, instances: tuple[PersistedInstance, ...]) -> None:
        supervisor = self._require_supervisor()
        with trio.CancelScope(shield=True):  # registered instances must get their runner
            for persisted in instances:
                record = self._register_restored(persisted)
                if record is not None:
                    await supervisor.start(self._run_runner, self._new_runner(record))
            await self._save_state()

    # -- GPU sanity: preflight, "auto" batch tokens, CPU fallback (core/gpu.py) ----------
    async def _gpu_preflight(self, state: PersistedState) -> None:
        """``gpu_preflight``: the GPUs instances ask for exist, the engine is a GPU build."""
        mode = self.config.gpu_preflight
        requested = {i.config.name: i.config.gpu_id for i in state.instances}
        for seed in self.config.instances:
            requested.setdefault(seed.name, seed.gpu_id)
        # "auto" names no GPU: admission places it on one that exists, else the CPU.
        wanted = {name: gpu for name, gpu in requested.items() if isinstance(gpu, int)}
        if mode == "off" or not wanted:
            return
        program = self.program or worker_program()
        gpus = await self._run_blocking(self.devices.gpus)
        build = await self._run_blocking(partial(engine_gpu_build, program))
        engine = program.argv[0] if program.is_tei else "the built-in worker's torch"
        problems = preflight_problems(wanted, gpus, engine=engine, engine_gpu_build=build)
        if problems and mode == "fail":
            raise ConfigError(f"gpu_preflight: {'; '.join(problems)}")
        for problem in problems:
            log.warning("gpu_preflight: %s", problem)

    def _spawn_with_batch_tokens(self, cfg: InstanceConfig) -> ProcessHandle:
        """Spawn with ``max_batch_tokens = "auto"`` resolved from the instance's GPU.

        Asks the device table synchronously: NVML answers in microseconds;
        nvidia-smi takes tens of milliseconds, once per spawn of such an instance.
        """
        if cfg.max_batch_tokens == "auto":
            device = None
            if isinstance(cfg.gpu_id, int):  # "auto" is placed on one before the spawn
                device = next((g for g in self.devices.gpus() if g.index == cfg.gpu_id), None)
            tokens = auto_max_batch_tokens(
                device, per_gib=self.config.auto_max_batch_tokens_per_gib
            )
            free = (
                "no GPU known" if device is None else f"{device.memory_free_bytes >> 20} MiB free"
            )
            log.info(
                "instance %s: max_batch_tokens auto = %d (%s)",
                cfg.name,
                tokens,
                free,
                extra={"instance": cfg.name},
            )
            cfg = msgspec.structs.replace(cfg, max_batch_tokens=tokens)
        return self._spawn_raw(cfg)

    def _gpu_process_groups(self) -> set[int] | None:
        """Process groups holding GPU memory; None when the device table cannot tell."""
        processes = self.devices.gpu_processes()
        if processes is None:
            return None
        groups = set()
        for process in processes:
            groups.add(process.pid)  # a group leader: the instance's own process
            stat = read_stat(process.pid)
            if stat is not None:  # a child of it (TEI's Python backend, say)
                groups.add(stat.pgid)
        return groups

    async def _watch_gpu_fallback(self) -> None:
        """``gpu_fallback``: once per process, a running instance with a ``gpu_id`` must
        hold GPU memory (its process group, which is its pid); else warn or fail it."""
        checked: set[int] = set()
        while True:
            await trio.sleep(self.config.health_check_interval_secs)
            running = {
                r.name: r.pid
                for r in self.instances
                if r.status is InstanceStatus.RUNNING
                and _on_gpu(r)
                and r.pid is not None
                and r.pid not in checked
            }
            if not running:
                continue
            groups = await self._run_blocking(self._gpu_process_groups)
            if groups is None:
                continue
            for name in fallen_back(running, groups):
                self._gpu_fell_back(name)
            checked.update(running.values())

    def _gpu_fell_back(self, name: str) -> None:
        runner = self._runners.get(name)
        if runner is None:
            return
        record = runner.record
        gpu = record.config.gpu_id if isinstance(record.config.gpu_id, int) else record.device
        message = f"asked for GPU {gpu} but holds no GPU memory: it runs on the CPU"
        self.metrics.gpu_fallbacks.labels(instance=name).inc()
        if self.config.gpu_fallback == "fail":
            log.error("instance %s: %s; stopping it (gpu_fallback = fail)", name, message)
            runner.request_fail(message)
        else:
            log.warning("instance %s: %s", name, message, extra={"instance": name})

    # -- the service ------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Restore the state, launch the instances, then supervise until cancelled.

        ``started()`` once every restored or seeded instance was launched. On
        cancellation every instance is stopped concurrently and the state saved.
        """
        if self._supervisor is not None or self._restored:
            raise RuntimeError("Manager.run can only be run once")
        if threading.current_thread() is not threading.main_thread():
            # PDEATHSIG fires when the forking *thread* exits, not the process.
            log.warning("the manager runs outside the main thread: instances may die with it")
        prepared = await self._run_blocking(
            partial(prepare, self.config, runtime_file=self._runtime.path, gpu_count=self.gpu_count)
        )
        self.gpu_count = prepared.gpu_count
        await self._gpu_preflight(prepared.loaded.state)
        self._runtime.start_ticks = prepared.start_ticks
        self.state_file_report = prepared.loaded.report()
        runners = self._restore(prepared.loaded.state)
        try:
            async with trio.open_nursery() as service:
                service.start_soon(self._runtime.run)
                if self.config.gpu_fallback != "ignore":
                    service.start_soon(self._watch_gpu_fallback)
                await service.start(self.models.run)
                await service.start(self.ondemand.run)
                async with trio.open_nursery() as supervisor:
                    self._supervisor = supervisor
                    for runner in runners:
                        if runner.record.status is InstanceStatus.STARTING:
                            await self.ondemand.place_anyway(runner.record)
                            self.ondemand.activity.touch(runner.name)
                        await supervisor.start(self._run_runner, runner)
                    await self._save_state()
                    self._restored = True
                    self.startup_complete = True
                    if self._gate.check() is None:  # off, or nothing to wait for
                        self.instances_ready.set()
                    else:
                        service.start_soon(self._open_ready_gate)
                    engine = "built-in worker"
                    if self.program is not None and self.program.is_tei:
                        engine = self.program.argv[0]
                    log.info(
                        "manager started with %d instance(s) from state and seeds; engine: %s",
                        len(runners),
                        engine,
                    )
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._supervisor = None
            # Every runner ended, so every process is gone: record that, shielded,
            # since this runs while being cancelled.
            with trio.CancelScope(shield=True):
                await self._save_state()
                await self._runtime.remove()
            log.info("manager stopped")

    # -- internals --------------------------------------------------------------------------
    async def _open_ready_gate(self) -> None:
        """Set ``instances_ready`` once the readiness gate opens (at once when off).

        Polled, once a second: instance status changes come from many places, and
        a probe (Kubernetes: every 10 s by default) asks the REST route directly.
        """
        while True:
            if self._gate.check() is None:
                self.instances_ready.set()
                return
            await trio.sleep(_READY_GATE_POLL_SECS)

    def _restore(self, state: PersistedState) -> list[InstanceRunner]:
        """Register the persisted instances, then the seeds new to the state."""
        self.ondemand.remember(state.footprints)
        merged, added = merge_seeds(state, self.config.instances, now=_utcnow())
        if added:
            log.info("seed instances added: %s", ", ".join(added))
        runners = []
        for persisted in merged.instances:
            record = self._register_restored(persisted)
            if record is not None:
                runners.append(self._new_runner(record))
        return runners

    def _register_restored(self, persisted: PersistedInstance) -> InstanceRecord | None:
        cfg = persisted.config
        reserved = self.config.manager_ports()
        # The manager's own ports may have changed since the state was written.
        if cfg.port in reserved:
            log.warning("instance %s: port %s is now the manager's; allocating", cfg.name, cfg.port)
            cfg = msgspec.structs.replace(cfg, port=None)
        if cfg.prometheus_port in reserved:
            cfg = msgspec.structs.replace(cfg, prometheus_port=0)
        try:
            record = self.instances.add(
                cfg, created_at=persisted.created_at, desired=persisted.desired_state
            )
        except TeiError as e:
            log.error("cannot restore instance %s: %s", cfg.name, e, extra={"instance": cfg.name})
            return None
        self.metrics.instance_created(record.name, record.config.model_id)
        try:
            validate_instance_config(record.config, gpu_count=self.gpu_count)
        except ValidationError as e:
            # Kept, so the user sees why it does not run and can delete it.
            record.mark_failed(f"cannot start: {e}")
        return record

    def _new_runner(self, record: InstanceRecord) -> InstanceRunner:
        runner = InstanceRunner(
            record,
            spawn=self._spawner,
            probe=self._prober,
            settings=self._settings,
            policy=self._policy,
            metrics=self.metrics,
            on_change=self._note_change,
            log_path=self.log_path(record.name),
            run_blocking=self._run_blocking,
        )
        self._runners[record.name] = runner
        self._released[runner] = trio.Event()
        return runner

    async def _run_runner(
        self, runner: InstanceRunner, *, task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            await runner.run(task_status=task_status)
        finally:
            if self.instances.find(runner.name) is not runner.record:
                # Deleted, and its process is gone: its log goes too, before the name
                # is free again (a create until then is "still being deleted").
                with trio.CancelScope(shield=True):
                    await self._run_blocking(partial(_remove_log, self.log_path(runner.name)))
            self._release(runner)

    def _note_change(self) -> None:
        self._runtime.note_change()
        self.ondemand.note_change()

    async def _admit(self, record: InstanceRecord) -> None:
        """Place ``record`` for a start asked for by hand (or create), evicting idle
        on-demand instances if that makes room; raises INSUFFICIENT_MEMORY."""
        admission = await self.ondemand.admit(record, may_evict=True)
        for victim in admission.evict:
            runner = self._runners.get(victim)
            if runner is not None:
                log.info("instance %s: evicted to make room for %s", victim, record.name)
                self.metrics.evictions.labels(instance=victim, reason="memory").inc()
                runner.request_unload()

    def _estimate_footprint(self, cfg: InstanceConfig, gpu: bool) -> int:
        """Blocking: the memory an instance of ``cfg`` needs, from its model's files.

        A model not on disk yet (being downloaded) or that cannot be sized counts
        for its runtime alone until it has run once and been measured.
        """
        # The worker runs this interpreter, so it has the onnxruntime this process finds.
        runtime = cpu_runtime(
            cfg.engine,
            cfg.extra_args,
            is_tei=self.program is not None and self.program.is_tei,
            onnx_installed=importlib.util.find_spec("onnxruntime") is not None,
        )
        folder: str | None = cfg.model_id
        if not cfg.model_id.startswith("/"):
            snapshot = locate(self.models.cache_dir, cfg.model_id, cfg.revision)
            folder = None if snapshot is None else snapshot.path
        if folder is not None:
            try:
                # "auto" is sized at launch from the GPU's free memory: estimated
                # at TEI's default here, then measured once it runs.
                tokens = (
                    DEFAULT_MAX_BATCH_TOKENS
                    if cfg.max_batch_tokens == "auto"
                    else cfg.max_batch_tokens
                )
                return estimate_footprint(
                    folder, max_batch_tokens=tokens, gpu=gpu, runtime=runtime
                ).total_bytes
            except FootprintError as e:
                log.warning("instance %s: cannot estimate its memory: %s", cfg.name, e)
        return runtime_bytes(runtime, gpu=gpu)

    def _release(self, runner: InstanceRunner) -> None:
        if self._runners.get(runner.name) is runner:
            del self._runners[runner.name]
        released = self._released.pop(runner, None)
        if released is not None:
            released.set()

    def _spawn_process(self, cfg: InstanceConfig) -> ProcessHandle:
        assert self.program is not None
        env = {**os.environ, **self.models.instance_env(cfg.model_id, cfg.revision)}
        spec = launch_spec(
            cfg, self.program, log_dir=self.config.log_dir, base_env=env, otel=self.config.otel
        )
        return spawn(spec)

    async def _run_runner_when_model_ready(self, runner: InstanceRunner, wait: ModelWait) -> None:
        """Start ``runner`` once the model registry downloaded its model.

        The instance stays ``starting`` meanwhile (the progress is in ``GET
        /models/{id}``); a failed download fails it, with the reason.
        """
        record = runner.record
        try:
            with trio.CancelScope() as self._awaiting_model[runner.name]:
                error = await wait()
                if error is not None and record.status is InstanceStatus.STARTING:
                    message = f"model {quote(record.config.model_id)} is not available: {error}"
                    log.error("instance %s: %s", runner.name, message)
                    record.mark_failed(message)
                    runner.request_stop()
        except BaseException:
            # The manager stops before the runner ever ran: no process exists.
            self._release(runner)
            if record.status is not InstanceStatus.FAILED:
                record.mark_at_rest()
            runner.done.set()
            raise
        finally:
            self._awaiting_model.pop(runner.name, None)
        # Deleted meanwhile: the runner was cancelled, and ends at once.
        await self._run_runner(runner, task_status=trio.TASK_STATUS_IGNORED)

    def _require_supervisor(self) -> trio.Nursery:
        if self._supervisor is None or self.shutdown_requested.is_set():
            state = "shutting down" if self._restored else "starting"
            raise TeiError(ErrorCode.NOT_READY, f"the manager is {state}: try again later")
        return self._supervisor

    async def _save_state(self) -> None:
        """Write the desired state of every instance; failures are logged, not raised.

        Shielded: a caller that goes away must not leave the file behind the instance table.
        """
        with trio.CancelScope(shield=True):
            async with self._state_lock:
                # Taken under the lock, so the last write holds the latest state.
                state = state_from_instances(self.instances, self.ondemand.measured())
                try:
                    await self._run_blocking(partial(save_state, self.config.state_file, state))
                except TeiError as e:
                    self.state_save_failures += 1
                    log.error("%s", e)
