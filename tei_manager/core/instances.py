"""The in-memory table of instances: who exists, in which order, on which ports.

Pure and synchronous: every decision (name taken? port taken? limit reached? which
port?) happens inside one method call with no await, so callers on the Trio side
need no lock. The supervisor moves an :class:`InstanceRecord` from status to status through its
``mark_*`` methods only (so a status, its pid and its times always agree); the
REST API reads :class:`InstanceInfo` snapshots.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Literal

import msgspec

from tei_manager.config import InstanceConfig
from tei_manager.core.ondemand import StartPolicy
from tei_manager.core.ports import PortAllocator
from tei_manager.errors import ConflictError, ErrorCode, LimitError, NotFoundError, quote

__all__ = [
    "DesiredState",
    "InstanceInfo",
    "InstanceRecord",
    "InstanceStatus",
    "InstanceTable",
    "InstanceTableStatistics",
]


class InstanceStatus(enum.StrEnum):
    """Where an instance's process is: ``starting → running → stopping → stopped``.

    An on-demand instance rests in ``idle`` instead of ``stopped``: no process, but
    its next request starts one. ``stopped`` always means an operator stopped it.
    """

    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    # Startup timeout, spawn error, or a crash loop when crash_loop_restarts is set;
    # last_error says which. A crash-looping instance waiting out its backoff is
    # "starting", with next_restart_at set.
    FAILED = "failed"


class DesiredState(enum.StrEnum):
    """What the user asked for; persisted, and never overridden by the health monitor."""

    RUNNING = "running"
    STOPPED = "stopped"


# Statuses in which a process exists (or is being spawned) for the instance.
_ALIVE = frozenset({InstanceStatus.STARTING, InstanceStatus.RUNNING, InstanceStatus.STOPPING})


class InstanceInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One instance as the REST API shows it."""

    name: str
    model_id: str
    port: int
    status: InstanceStatus
    pid: int | None
    gpu_id: int | Literal["auto"] | None
    created_at: datetime
    uptime_secs: int  # 0 while no process runs
    restarts: int
    health_check_failures: int  # consecutive; reset by a passing check or a restart
    last_health_check: datetime | None
    prometheus_port: int | None
    pooling: str | None
    max_batch_tokens: int | Literal["auto"]
    max_concurrent_requests: int
    last_error: str | None
    # When the supervisor spawns the process again (a crash loop's backoff), else null.
    next_restart_at: datetime | None = None
    start: StartPolicy = StartPolicy.ALWAYS
    idle_timeout_secs: float | None = None
    pinned: bool = False
    # Where the process runs or will ("cpu", "gpu:N"), and the memory it holds there
    # (measured once it runs, estimated before); null while it has no place.
    device: str | None = None
    memory_bytes: int | None = None
    served_model_name: str | None = None


class InstanceRecord(msgspec.Struct, kw_only=True):
    """One registered instance: its config (ports resolved) and its runtime state.

    Mutable on purpose, but only through its methods: ``status``, ``pid``,
    ``started_at``, ``next_restart_at`` and ``restarts`` change together in one
    ``mark_*`` call, so no reader ever sees a status with a stale pid. In particular
    a record whose process has exited is never ``running``.
    """

    config: InstanceConfig
    desired: DesiredState
    created_at: datetime
    status: InstanceStatus = InstanceStatus.STOPPED
    pid: int | None = None
    restarts: int = 0
    health_check_failures: int = 0
    last_health_check: datetime | None = None
    last_error: str | None = None
    started_at: datetime | None = None  # when the current process was spawned
    next_restart_at: datetime | None = None  # set while waiting out a restart backoff
    # Where admission placed the instance, and what it reserves there (None: unplaced).
    device: str | None = None
    reserved_bytes: int | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def port(self) -> int:
        # The registry always stores a resolved port.
        return self.config.port or 0

    def ports(self) -> tuple[int, ...]:
        """Every port this instance holds (its port and, if any, its metrics port)."""
        return tuple(p for p in (self.config.port, self.config.prometheus_port) if p)

    def info(self, now: datetime) -> InstanceInfo:
        """A snapshot for the API; ``now`` is used for ``uptime_secs``."""
        uptime = 0
        if self.status in _ALIVE and self.started_at is not None:
            uptime = max(0, int((now - self.started_at).total_seconds()))
        c = self.config
        return InstanceInfo(
            name=c.name,
            model_id=c.model_id,
            port=self.port,
            status=self.status,
            pid=self.pid,
            gpu_id=c.gpu_id,
            created_at=self.created_at,
            uptime_secs=uptime,
            restarts=self.restarts,
            health_check_failures=self.health_check_failures,
            last_health_check=self.last_health_check,
            prometheus_port=c.prometheus_port,
            pooling=c.pooling,
            max_batch_tokens=c.max_batch_tokens,
            max_concurrent_requests=c.max_concurrent_requests,
            last_error=self.last_error,
            next_restart_at=self.next_restart_at,
            start=c.start,
            idle_timeout_secs=c.idle_timeout_secs,
            pinned=c.pinned,
            device=self.device,
            memory_bytes=self.reserved_bytes,
            served_model_name=c.served_model_name,
        )

    @property
    def on_demand(self) -> bool:
        return self.config.start == StartPolicy.ON_DEMAND

    def launch_config(self) -> InstanceConfig:
        """The config its process is spawned with: ``gpu_id = "auto"`` resolved to
        the GPU admission chose (or no GPU when it chose the CPU)."""
        if self.config.gpu_id != "auto":
            return self.config
        gpu = None
        if self.device is not None and self.device.startswith("gpu:"):
            gpu = int(self.device.removeprefix("gpu:"))
        return msgspec.structs.replace(self.config, gpu_id=gpu)

    # -- transitions: the only places the runtime fields change ------------------------
    def mark_start_requested(self) -> None:
        """A process is wanted and will be spawned as soon as nothing stands in the way."""
        self._no_process(InstanceStatus.STARTING)
        self.last_error = None

    def mark_starting(self, pid: int, now: datetime) -> None:
        """A process was spawned; its readiness is not known yet."""
        self.status = InstanceStatus.STARTING
        self.pid = pid
        self.started_at = now
        self.next_restart_at = None
        self.health_check_failures = 0

    def mark_running(self) -> None:
        """The process answered its first health check."""
        self.status = InstanceStatus.RUNNING
        self.last_error = None

    def mark_exited(self, error: str) -> None:
        """The process ended by itself: not routable from this moment on.

        A starting or running instance turns ``starting`` (the supervisor decides
        next whether to restart it, and when); a stopping one stays ``stopping``.
        """
        status = self.status
        if status in (InstanceStatus.STARTING, InstanceStatus.RUNNING):
            status = InstanceStatus.STARTING
        self._no_process(status)
        self.last_error = error

    def mark_restarting(self, error: str, *, next_restart_at: datetime | None) -> None:
        """The supervisor restarts the instance after a crash or failed checks:
        ``starting`` with no process until ``next_restart_at`` (None: at once)."""
        self._no_process(InstanceStatus.STARTING)
        self.restarts += 1
        self.last_error = error
        self.next_restart_at = next_restart_at

    def mark_restart_requested(self) -> None:
        """The user restarts a live process: it is being ended, and counts as a restart."""
        self.restarts += 1
        self.status = InstanceStatus.STOPPING

    def mark_stopping(self) -> None:
        """The process was asked to exit."""
        self.status = InstanceStatus.STOPPING

    def mark_stopped(self) -> None:
        """No process runs, as wanted."""
        self._no_process(InstanceStatus.STOPPED)
        self.unplace()

    def mark_idle(self) -> None:
        """No process runs; the next request starts one (on-demand instances)."""
        self._no_process(InstanceStatus.IDLE)
        self.unplace()

    def mark_at_rest(self) -> None:
        """No process runs, as wanted: ``idle`` for an on-demand instance still wanted
        available, else ``stopped``."""
        if self.on_demand and self.desired is DesiredState.RUNNING:
            self.mark_idle()
        else:
            self.mark_stopped()

    def place(self, device: str, reserved_bytes: int) -> None:
        """Admission put the instance on ``device``, holding ``reserved_bytes`` there."""
        self.device = device
        self.reserved_bytes = reserved_bytes

    def unplace(self) -> None:
        """The instance holds no memory any more."""
        self.device = None
        self.reserved_bytes = None

    def mark_failed(self, error: str) -> None:
        """No process runs and none will be started again until asked."""
        self._no_process(InstanceStatus.FAILED)
        self.last_error = error
        self.unplace()

    def record_health_check(self, ok: bool, now: datetime) -> None:
        """Count a health check: a pass resets the consecutive failure count."""
        self.last_health_check = now
        self.health_check_failures = 0 if ok else self.health_check_failures + 1

    def _no_process(self, status: InstanceStatus) -> None:
        self.status = status
        self.pid = None
        self.started_at = None
        self.next_restart_at = None


class InstanceTableStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Instance counts by status, for ``/health`` and the metrics collector."""

    total: int
    idle: int
    starting: int
    running: int
    stopping: int
    stopped: int
    failed: int


def _plain(config: InstanceConfig) -> InstanceConfig:
    """``config`` as a plain InstanceConfig (a seed's extra fields dropped)."""
    if type(config) is InstanceConfig:
        return config
    return InstanceConfig(**{f: getattr(config, f) for f in InstanceConfig.__struct_fields__})


class InstanceTable:
    """Instances in creation order, with the name, port and count rules enforced."""

    def __init__(
        self,
        allocator: PortAllocator,
        *,
        max_instances: int | None = None,
        reserved_ports: Iterable[int] = (),
    ) -> None:
        self._allocator = allocator
        self._max_instances = max_instances
        # The manager's own listeners: no instance may take them.
        self._reserved = frozenset(reserved_ports)
        self._records: dict[str, InstanceRecord] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[InstanceRecord]:
        return iter(list(self._records.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def add(
        self,
        config: InstanceConfig,
        *,
        created_at: datetime,
        desired: DesiredState = DesiredState.RUNNING,
    ) -> InstanceRecord:
        """Register a validated ``config``; auto ports (None/0) are allocated here.

        A new instance that should run starts in ``starting`` (the supervisor spawns
        it), one that should not in ``stopped``. Raises INSTANCE_EXISTS,
        MAX_INSTANCES_REACHED, PORT_CONFLICT or PORT_ALLOCATION_FAILED; nothing
        changes when it raises.
        """
        config = _plain(config)
        if config.name in self._records:
            raise ConflictError(
                ErrorCode.INSTANCE_EXISTS, f"instance {quote(config.name)} already exists"
            )
        if self._max_instances is not None and len(self._records) >= self._max_instances:
            raise LimitError(
                ErrorCode.MAX_INSTANCES_REACHED,
                f"max_instances ({self._max_instances}) reached: delete an instance first",
            )
        for field in ("port", "prometheus_port"):
            port = getattr(config, field)
            if port:
                self._check_port_free(field, port)
        used = self.used_ports()
        port = config.port or self._allocator.allocate(used)
        metrics_port = config.prometheus_port
        if metrics_port == 0:
            metrics_port = self._allocator.allocate(used | {port})
        config = msgspec.structs.replace(config, port=port, prometheus_port=metrics_port)
        status = InstanceStatus.STOPPED
        if desired is DesiredState.RUNNING:
            on_demand = config.start == StartPolicy.ON_DEMAND
            status = InstanceStatus.IDLE if on_demand else InstanceStatus.STARTING
        record = InstanceRecord(
            config=config, desired=desired, created_at=created_at, status=status
        )
        self._records[config.name] = record
        return record

    def remove(self, name: str) -> InstanceRecord:
        """Unregister ``name``; its ports are tried last by the allocator from now on."""
        record = self.get(name)
        del self._records[name]
        for port in record.ports():
            self._allocator.release(port)
        return record

    def get(self, name: str) -> InstanceRecord:
        """The instance called ``name``; raises INSTANCE_NOT_FOUND."""
        record = self._records.get(name)
        if record is None:
            raise NotFoundError(ErrorCode.INSTANCE_NOT_FOUND, f"instance {quote(name)} not found")
        return record

    def find(self, name: str) -> InstanceRecord | None:
        """The instance called ``name``, or None."""
        return self._records.get(name)

    def at_index(self, index: int) -> InstanceRecord:
        """The ``index``-th instance in creation order (0-based); raises INSTANCE_NOT_FOUND."""
        if not 0 <= index < len(self._records):
            raise NotFoundError(
                ErrorCode.INSTANCE_NOT_FOUND,
                f"no instance at index {index}: there are {len(self._records)}",
            )
        return list(self._records.values())[index]

    def by_model(self, model_id: str) -> list[InstanceRecord]:
        """Instances serving ``model_id``, in creation order."""
        return [r for r in self._records.values() if r.config.model_id == model_id]

    def by_served_name(self, served_name: str) -> list[InstanceRecord]:
        """Instances whose ``served_model_name`` is ``served_name``, in creation order."""
        return [r for r in self._records.values() if r.config.served_model_name == served_name]

    def used_ports(self) -> set[int]:
        """Ports held by instances plus the manager's own."""
        used = set(self._reserved)
        for record in self._records.values():
            used.update(record.ports())
        return used

    def infos(self, now: datetime) -> list[InstanceInfo]:
        """Snapshots of every instance, in creation order."""
        return [r.info(now) for r in self._records.values()]

    def statistics(self) -> InstanceTableStatistics:
        """Counts by status."""
        counts = dict.fromkeys(InstanceStatus, 0)
        for record in self._records.values():
            counts[record.status] += 1
        S = InstanceStatus
        return InstanceTableStatistics(
            total=len(self._records),
            idle=counts[S.IDLE],
            starting=counts[S.STARTING],
            running=counts[S.RUNNING],
            stopping=counts[S.STOPPING],
            stopped=counts[S.STOPPED],
            failed=counts[S.FAILED],
        )

    def request_start(self, name: str) -> InstanceRecord:
        """The user wants ``name`` running; raises ALREADY_RUNNING if it is.

        A stopped or failed instance turns ``starting`` for the supervisor to spawn;
        one still ``stopping`` is started again once its process is gone.
        """
        record = self.get(name)
        if record.status in (InstanceStatus.STARTING, InstanceStatus.RUNNING):
            raise ConflictError(
                ErrorCode.ALREADY_RUNNING, f"instance {quote(name)} is already {record.status}"
            )
        record.desired = DesiredState.RUNNING
        if record.status is not InstanceStatus.STOPPING:
            record.mark_start_requested()
        return record

    def request_restart(self, name: str) -> InstanceRecord:
        """The user wants ``name`` running afresh, whatever its status (the runner acts)."""
        record = self.get(name)
        record.desired = DesiredState.RUNNING
        return record

    def request_stop(self, name: str) -> InstanceRecord:
        """The user wants ``name`` stopped; raises NOT_RUNNING if it is stopped or stopping.

        A failed instance has no process, so it becomes ``stopped`` at once; for the
        others the supervisor stops the process and marks it stopped.
        """
        record = self.get(name)
        if record.status in (InstanceStatus.STOPPED, InstanceStatus.STOPPING):
            raise ConflictError(
                ErrorCode.NOT_RUNNING, f"instance {quote(name)} is not running ({record.status})"
            )
        record.desired = DesiredState.STOPPED
        if record.status in (InstanceStatus.FAILED, InstanceStatus.IDLE):
            record.mark_stopped()
        return record

    def _check_port_free(self, field: str, port: int) -> None:
        if port in self._reserved:
            raise ConflictError(
                ErrorCode.PORT_CONFLICT, f"{field}: {port} is used by the manager itself"
            )
        for record in self._records.values():
            if port in record.ports():
                raise ConflictError(
                    ErrorCode.PORT_CONFLICT,
                    f"{field}: {port} is already used by instance {quote(record.name)}",
                )
