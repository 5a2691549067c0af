"""Models on demand, the actions: cold starts, idle unloads, admission and memory accounting.

:class:`OnDemand` is a trio service the manager runs beside its supervisor::

    OnDemand.run
    ├── the loop        devices and instance memory re-read every REFRESH_SECS;
    │                   idle on-demand instances unloaded when their timer runs out
    └── cold starts     one task per instance being started by traffic

:meth:`OnDemand.ensure_running` is the one hook every front door calls when the
instance it routed a request to is not running: the gRPC multiplexer does (through
its connection pool), and so can an HTTP gateway. Concurrent first requests share
one start; each waits within its own deadline, bounded by the instance's
``startup_timeout_secs``. The decisions are the pure ones of
:mod:`tei_manager.core.ondemand`; this module reads devices, measures processes and
drives the instance runners.

An instance's memory is what admission reserved for it: the figure measured for
its model and configuration on an earlier run if there was one, else the estimate
from its weight files; once it runs, the measured peak (``VmHWM`` of its process
tree, or its GPU memory through NVML) replaces it and is remembered.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Final, Literal

import msgspec
import trio

from tei_manager.config import DevicesConfig, Engine, InstanceConfig, Pooling
from tei_manager.core.instances import DesiredState, InstanceRecord, InstanceStatus, InstanceTable
from tei_manager.core.ondemand import (
    CPU_DEVICE,
    Activity,
    Admission,
    DeviceMemory,
    Refusal,
    Resident,
    admit,
    gpu_device,
    idle_expired,
    next_idle_check,
)
from tei_manager.errors import ConflictError, ErrorCode, TeiError, quote
from tei_manager.manager.metrics import ManagerMetrics, MemorySnapshot
from tei_manager.manager.state import MeasuredFootprint
from tei_manager.supervisor.devices import DeviceReading, DeviceSource, GpuProcessMemory
from tei_manager.supervisor.instance import BlockingRunner, InstanceRunner

__all__ = ["REFRESH_SECS", "DeviceView", "DevicesReport", "OnDemand"]

log = logging.getLogger("tei_manager.ondemand")

#: Devices and instance memory are re-read this often: free memory moves with other
#: programs, and an instance's peak grows with its first large batches.
REFRESH_SECS: Final = 5.0

# Statuses in which an instance holds its reservation.
_HOLDING = frozenset({InstanceStatus.STARTING, InstanceStatus.RUNNING, InstanceStatus.STOPPING})
# The cap of a device we cannot read: larger than any sum of reservations.
_UNACCOUNTED: Final = 1 << 62

FootprintKey = tuple[
    str, str | None, int | Literal["auto"], Pooling | None, tuple[str, ...], bool, Engine | None
]
Estimator = Callable[[InstanceConfig, bool], int]
"""The estimated bytes of an instance of ``config`` (on a GPU if the flag says so); blocking."""
MemoryReader = Callable[[int], int]
"""The peak resident memory of a process tree, by its leader's pid; blocking."""


def footprint_key(config: InstanceConfig, gpu: bool) -> FootprintKey:
    """What decides an instance's memory: the model and how it is served (the engine too:
    the worker on torch holds twice what it holds on ONNX Runtime)."""
    return (
        config.model_id,
        config.revision,
        config.max_batch_tokens,
        config.pooling,
        config.extra_args,
        gpu,
        config.engine,
    )


class DeviceView(msgspec.Struct, frozen=True, kw_only=True):
    """One device in ``GET /devices``."""

    device: str
    total_bytes: int
    free_bytes: int
    cap_bytes: int
    reserved_bytes: int
    instances: list[str]


class DevicesReport(msgspec.Struct, frozen=True, kw_only=True):
    """The body of ``GET /devices``."""

    devices: list[DeviceView]


class _Start:
    """One cold start, shared by every request waiting for it."""

    __slots__ = ("error", "started_at")

    def __init__(self, started_at: float) -> None:
        self.started_at = started_at
        self.error: TeiError | None = None


class OnDemand:
    """Admission, placement, cold starts and idle unloads for the manager's instances."""

    def __init__(
        self,
        instances: InstanceTable,
        runners: Callable[[str], InstanceRunner | None],
        *,
        devices: DevicesConfig,
        read_devices: DeviceSource,
        estimate: Estimator,
        read_memory: MemoryReader,
        gpu_memory: GpuProcessMemory,
        metrics: ManagerMetrics,
        default_idle_timeout_secs: float,
        startup_timeout_secs: float,
        run_blocking: BlockingRunner = trio.to_thread.run_sync,
    ) -> None:
        self.activity = Activity(trio.current_time)
        self._instances = instances
        self._runners = runners
        self._config = devices
        self._read_devices = read_devices
        self._estimate = estimate
        self._read_memory = read_memory
        self._gpu_memory = gpu_memory
        self._metrics = metrics
        self._default_idle = default_idle_timeout_secs
        self._startup_timeout = startup_timeout_secs
        self._run_blocking = run_blocking
        self._readings: list[DeviceReading] = []
        self._cpu_cap: int | None = devices.cpu_memory_limit_bytes
        self._measured: dict[FootprintKey, int] = {}
        self._estimates: dict[FootprintKey, int] = {}
        self._starts: dict[str, _Start] = {}
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        metrics.bind_memory(self.memory_snapshot)

    # -- the service ------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the devices, then keep them and the idle timers current until cancelled."""
        await self.refresh()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            next_refresh = trio.current_time() + REFRESH_SECS
            while True:
                now = trio.current_time()
                self._unload_idle(now)
                if now >= next_refresh:
                    await self.refresh()
                    next_refresh = trio.current_time() + REFRESH_SECS
                wake = next_idle_check(self._idle_candidates(), self.activity, now)
                with trio.move_on_at(min(next_refresh, math.inf if wake is None else wake)):
                    await self._changed.wait()

    def note_change(self) -> None:
        """An instance changed status (runners call this): waiters look again."""
        self._changed.set()
        self._changed = trio.Event()

    async def refresh(self) -> None:
        """Re-read every device, and measure every running instance's memory."""
        self._readings = await self._run_blocking(self._read_devices)
        if self._cpu_cap is None:
            # Default: what the host had available when we started.
            self._cpu_cap = next((r.free_bytes for r in self._readings if r.device == "cpu"), 0)
        running = [
            r for r in self._instances if r.status is InstanceStatus.RUNNING and r.pid is not None
        ]
        if not running:
            return
        on_gpu = [r.pid for r in running if r.device not in (None, CPU_DEVICE) and r.pid]
        gpu_used = await self._run_blocking(partial(self._gpu_memory, on_gpu)) if on_gpu else {}
        for record in running:
            pid = record.pid
            assert pid is not None
            if record.device in (None, CPU_DEVICE):
                used = await self._run_blocking(partial(self._read_memory, pid))
            else:
                used = gpu_used.get(pid, 0)
            if used <= 0 or record.status is not InstanceStatus.RUNNING or record.pid != pid:
                continue  # gone meanwhile, or nothing to read (no NVML)
            key = footprint_key(record.config, record.device not in (None, CPU_DEVICE))
            peak = max(used, self._measured.get(key, 0))
            self._measured[key] = peak
            record.place(record.device or CPU_DEVICE, used)

    def measured(self) -> list[MeasuredFootprint]:
        """Every measured footprint, for the state file."""
        return [
            MeasuredFootprint(
                model_id=model_id,
                revision=revision,
                max_batch_tokens=tokens,
                pooling=pooling,
                extra_args=extra,
                gpu=gpu,
                engine=engine,
                bytes=size,
            )
            for (
                (model_id, revision, tokens, pooling, extra, gpu, engine),
                size,
            ) in self._measured.items()
        ]

    def remember(self, footprints: Iterable[MeasuredFootprint]) -> None:
        """Take footprints measured by an earlier run (from the state file)."""
        for f in footprints:
            key = (
                f.model_id,
                f.revision,
                f.max_batch_tokens,
                f.pooling,
                f.extra_args,
                f.gpu,
                f.engine,
            )
            self._measured[key] = max(f.bytes, self._measured.get(key, 0))

    # -- the hook -----------------------------------------------------------------------
    async def ensure_running(self, record: InstanceRecord, deadline: float = math.inf) -> None:
        """Return once ``record`` runs, starting it if it is an idle on-demand instance.

        Waits until ``deadline`` (trio time) at most, and at most the instance's
        startup timeout. Raises BACKEND_UNAVAILABLE (stopped by an operator,
        failed, deleted), CAPACITY_EXHAUSTED (no memory can be made for it) or
        TIMEOUT.
        """
        if record.status is InstanceStatus.RUNNING:
            return
        timeout = record.config.startup_timeout_secs or self._startup_timeout
        start: _Start | None = None
        with trio.move_on_at(min(deadline, trio.current_time() + timeout)):
            while True:
                status = _status(record)
                if status is InstanceStatus.RUNNING:
                    return
                if self._instances.find(record.name) is not record:
                    raise TeiError(
                        ErrorCode.BACKEND_UNAVAILABLE, f"instance {quote(record.name)} was deleted"
                    )
                start = self._starts.get(record.name, start)
                if start is not None and start.error is not None:
                    raise start.error
                if status is InstanceStatus.IDLE and record.name not in self._starts:
                    start = self._begin_cold_start(record)
                    continue
                _refuse_if_not_startable(record)
                await self._changed.wait()
        raise TeiError(
            ErrorCode.TIMEOUT,
            f"instance {quote(record.name)} was not ready in time (it is {record.status.value})",
        )

    def _begin_cold_start(self, record: InstanceRecord) -> _Start:
        nursery = self._nursery
        if nursery is None:
            raise TeiError(ErrorCode.NOT_READY, "the manager is not running: try again later")
        start = self._starts[record.name] = _Start(trio.current_time())
        self._metrics.cold_starts.labels(instance=record.name).inc()
        nursery.start_soon(self._cold_start, record, start)
        return start

    async def _cold_start(self, record: InstanceRecord, start: _Start) -> None:
        name = record.name
        try:
            try:
                admission = await self.admit(record, may_evict=True)
            except TeiError as e:
                start.error = (
                    TeiError(ErrorCode.CAPACITY_EXHAUSTED, e.message)
                    if e.code is ErrorCode.INSUFFICIENT_MEMORY
                    else e
                )
                log.warning("instance %s: not started on demand: %s", name, e.message)
                reason = "memory" if e.code is ErrorCode.INSUFFICIENT_MEMORY else "refused"
                self._metrics.cold_start_failures.labels(instance=name, reason=reason).inc()
                return
            # Start once the evicted processes are gone (their memory is free): a
            # victim's pid changes then, even if a request has started it again.
            victims = [(v, v.pid) for v in self._evict(admission.evict, record)]
            while any(v.pid is not None and v.pid == pid for v, pid in victims):
                await self._changed.wait()
            runner = self._runners(name)
            if (
                runner is None
                or self._instances.find(name) is not record
                or record.status is not InstanceStatus.IDLE
            ):
                return  # deleted or stopped meanwhile: the waiters see it
            self._instances.request_start(name)  # keeps the placement
            runner.request_start()
            self.activity.touch(name)
            self.note_change()
            while _status(record) is InstanceStatus.STARTING:
                await self._changed.wait()
            status = _status(record)
            if status is InstanceStatus.RUNNING:
                seconds = trio.current_time() - start.started_at
                self._metrics.cold_start_seconds.observe(seconds)
                log.info("instance %s: started on demand in %.2f s", name, seconds)
            elif status is InstanceStatus.FAILED:
                # A start that keeps crashing stays "starting" (restart backoff): the
                # crash-loop and stuck-starting alerts see that one.
                self._metrics.cold_start_failures.labels(instance=name, reason="failed").inc()
        finally:
            if self._starts.get(name) is start:
                del self._starts[name]
            self.note_change()

    def _evict(self, names: tuple[str, ...], reason_for: InstanceRecord) -> list[InstanceRecord]:
        victims = []
        for victim_name in names:
            victim = self._instances.find(victim_name)
            runner = self._runners(victim_name)
            if victim is None or runner is None:
                continue
            log.info(
                "instance %s: evicted (least recently used) to make room for %s",
                victim_name,
                reason_for.name,
                extra={"instance": victim_name},
            )
            self._metrics.evictions.labels(instance=victim_name, reason="memory").inc()
            runner.request_unload()
            victims.append(victim)
        return victims

    # -- admission ----------------------------------------------------------------------
    async def admit(self, record: InstanceRecord, *, may_evict: bool) -> Admission:
        """Decide where ``record`` runs and place it there; evictions are for the caller.

        Raises INSUFFICIENT_MEMORY naming the need and what each device has left.
        """
        sizes = await self.need(record.config)
        # Decided and placed with no await in between, so two starts cannot both
        # count the same free memory.
        candidates = self.candidate_devices(record.config)
        need = sizes[candidates[0].device != CPU_DEVICE]
        residents = self._residents(exclude=record.name)
        decision = admit(need, candidates, residents, may_evict=may_evict)
        if isinstance(decision, Refusal):
            raise ConflictError(
                ErrorCode.INSUFFICIENT_MEMORY,
                f"instance {quote(record.name)} {decision.describe()}",
            )
        record.place(decision.device, need)
        return decision

    async def place_anyway(self, record: InstanceRecord) -> None:
        """Place ``record`` for a start nobody can refuse (restored at start-up): where
        admission says, else on its first candidate device, with a warning."""
        try:
            await self.admit(record, may_evict=False)
        except TeiError as e:
            device = self.candidate_devices(record.config)[0].device
            sizes = await self.need(record.config)
            record.place(device, sizes[device != CPU_DEVICE])
            log.warning("instance %s: started although %s", record.name, e.message)

    async def need(self, config: InstanceConfig) -> dict[bool, int]:
        """Bytes an instance of ``config`` needs, on the CPU (False) and on a GPU (True)."""
        sizes: dict[bool, int] = {}
        for gpu in (False, True):
            key = footprint_key(config, gpu)
            known = self._measured.get(key) or self._estimates.get(key)
            if known is None:
                known = await self._run_blocking(partial(self._estimate, config, gpu))
                self._estimates[key] = known
            sizes[gpu] = known
        return sizes

    def candidate_devices(self, config: InstanceConfig) -> list[DeviceMemory]:
        """The devices ``config`` may run on: its GPU, every GPU (auto), or the CPU."""
        devices = self.device_memory()
        gpus = [d for d in devices if d.device != CPU_DEVICE]
        if isinstance(config.gpu_id, int):
            wanted = gpu_device(config.gpu_id)
            found = [d for d in gpus if d.device == wanted]
            return found or [_unknown(wanted)]
        if config.gpu_id == "auto" and gpus:
            return gpus
        return [d for d in devices if d.device == CPU_DEVICE] or [_unknown(CPU_DEVICE)]

    def device_memory(self) -> list[DeviceMemory]:
        """Every device with our cap on it."""
        devices = []
        for r in self._readings:
            if r.device == CPU_DEVICE:
                cap = self._cpu_cap if self._cpu_cap is not None else r.free_bytes
            else:
                cap = int(r.total_bytes * self._config.gpu_memory_fraction)
            devices.append(
                DeviceMemory(
                    device=r.device,
                    total_bytes=r.total_bytes,
                    free_bytes=r.free_bytes,
                    cap_bytes=cap,
                )
            )
        return devices

    def _residents(self, *, exclude: str | None = None) -> list[Resident]:
        residents = []
        for r in self._instances:
            if r.device is None or r.reserved_bytes is None or r.name == exclude:
                continue
            if r.status not in _HOLDING and r.status is not InstanceStatus.IDLE:
                continue
            residents.append(
                Resident(
                    name=r.name,
                    device=r.device,
                    reserved_bytes=r.reserved_bytes,
                    evictable=(
                        r.on_demand
                        and not r.config.pinned
                        and r.status is InstanceStatus.RUNNING
                        and r.name not in self._starts
                    ),
                    in_flight=self.activity.in_flight(r.name),
                    last_used=self.activity.last_used(r.name) or 0.0,
                )
            )
        return residents

    # -- idle unloads -------------------------------------------------------------------
    def _idle_timeout(self, record: InstanceRecord) -> float:
        own = record.config.idle_timeout_secs
        return self._default_idle if own is None else own

    def _idle_candidates(self) -> list[tuple[str, float]]:
        return [
            (r.name, self._idle_timeout(r))
            for r in self._instances
            if r.on_demand and r.status is InstanceStatus.RUNNING and r.name not in self._starts
        ]

    def _unload_idle(self, now: float) -> None:
        for name in idle_expired(self._idle_candidates(), self.activity, now):
            runner = self._runners(name)
            if runner is None:
                continue
            log.info("instance %s: unloaded after its idle timeout", name, extra={"instance": name})
            self._metrics.idle_unloads.inc()
            runner.request_unload()
            self.activity.forget(name)

    # -- reading ------------------------------------------------------------------------
    def devices_report(self) -> DevicesReport:
        """``GET /devices``: each device, our cap, what we reserve and who sits there."""
        residents = self._residents()
        views = []
        for d in self.device_memory():
            here = [r for r in residents if r.device == d.device]
            views.append(
                DeviceView(
                    device=d.device,
                    total_bytes=d.total_bytes,
                    free_bytes=d.free_bytes,
                    cap_bytes=d.cap_bytes,
                    reserved_bytes=sum(r.reserved_bytes for r in here),
                    instances=[r.name for r in here],
                )
            )
        return DevicesReport(devices=views)

    def memory_snapshot(self) -> MemorySnapshot:
        report = self.devices_report()
        return MemorySnapshot(
            instances=[
                (r.name, r.device, r.reserved_bytes)
                for r in self._instances
                if r.device is not None and r.reserved_bytes is not None
            ],
            devices=[
                (d.device, d.total_bytes, d.free_bytes, d.reserved_bytes) for d in report.devices
            ],
        )


def _status(record: InstanceRecord) -> InstanceStatus:
    """``record.status`` now (a call, so type narrowing from an earlier read does not stick)."""
    return record.status


def _unknown(device: str) -> DeviceMemory:
    """A device we could not read (no NVML, no nvidia-smi): not accounted, so never
    the reason for a refusal; the instance's own start says whether it fits."""
    return DeviceMemory(device=device, total_bytes=0, free_bytes=0, cap_bytes=_UNACCOUNTED)


def _refuse_if_not_startable(record: InstanceRecord) -> None:
    """Raise what a request to ``record`` gets when traffic may not start it."""
    status = record.status
    name = quote(record.name)
    if status is InstanceStatus.STOPPED or (
        status is InstanceStatus.STOPPING and record.desired is DesiredState.STOPPED
    ):
        raise TeiError(
            ErrorCode.BACKEND_UNAVAILABLE,
            f"instance {name} is stopped by an operator: start it with POST /instances/"
            f"{record.name}/start",
        )
    if status is InstanceStatus.FAILED:
        raise TeiError(
            ErrorCode.BACKEND_UNAVAILABLE,
            f"instance {name} failed: {record.last_error or 'see its logs'}",
        )
    if not record.on_demand:
        # Traffic never waits for an always instance (restarting, say): a call by
        # model_id fails over to another replica instead.
        raise TeiError(
            ErrorCode.BACKEND_UNAVAILABLE, f"instance {name} is {status.value}, not running"
        )
