"""An in-memory manager for driving the REST layer: real registry rules, no processes.

It keeps real :class:`~tei_manager.core.instances.InstanceTable` records and the real
:class:`~tei_manager.manager.metrics.ManagerMetrics`, so the errors it raises
(INSTANCE_EXISTS, PORT_CONFLICT, MAX_INSTANCES_REACHED, ALREADY_RUNNING, ...) and
the series it exposes are the real manager's, from the same code. Tests steer it
through plain attributes: ``gate`` holds operations in flight, ``fail_with`` makes
the next operation raise.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
import trio

from tei_manager import __version__
from tei_manager.config import InstanceConfig, ManagerConfig, validate_instance_config
from tei_manager.core.instances import InstanceInfo, InstanceStatus, InstanceTable
from tei_manager.core.logslice import LogSlice, resolve_slice
from tei_manager.core.ports import PortAllocator
from tei_manager.core.readiness import ReadinessGate
from tei_manager.hub.registry import ModelRegistry
from tei_manager.hub.settings import HubSettings, RegistrySettings
from tei_manager.manager.backup import Backup, BackupModel
from tei_manager.manager.metrics import ManagerMetrics
from tei_manager.manager.ondemand import DevicesReport, DeviceView
from tei_manager.manager.state import (
    PersistedInstance,
    PersistedState,
    merge_seeds,
    state_from_instances,
)

__all__ = ["FakeManager", "http_count"]


def http_count(metrics: ManagerMetrics, route: str, method: str, status: int) -> float:
    """How many requests ``metrics`` observed with these labels."""
    value = metrics.prometheus.get_sample_value(
        "tei_manager_http_request_duration_seconds_count",
        {"route": route, "method": method, "status": str(status)},
    )
    return value or 0.0


class FakeManager:
    """Satisfies :class:`~tei_manager.api.facade.ManagerFacade` in memory."""

    def __init__(
        self,
        config: ManagerConfig,
        *,
        gpu_count: int | None = None,
        hub: HubSettings | None = None,
        model_settings: RegistrySettings | None = None,
    ) -> None:
        self.config = config
        self.metrics = ManagerMetrics()
        self.gpu_count = gpu_count
        self.started_at = time.time()
        self.state_restored = False
        self.listening = False
        self.startup_complete = False
        # Lines of each instance's log, appended to by tests.
        self.logs: dict[str, list[str]] = {}
        # While set to an unset Event, every async operation waits for it
        # (``entered`` tells the test it is waiting): a request held in flight.
        self.gate: trio.Event | None = None
        self.entered = trio.Event()
        # Raised by the next async operation: an unexpected failure.
        self.fail_with: BaseException | None = None
        allocator = PortAllocator(
            config.instance_port_start, config.instance_port_end, probe=lambda port: True
        )
        self._registry = InstanceTable(
            allocator,
            max_instances=config.max_instances,
            reserved_ports=config.manager_ports(),
        )
        self._gate = ReadinessGate(
            (seed.name for seed in config.instances),
            self._registry,
            enabled=config.ready_requires_instances,
        )
        # The real model registry; by default on a cache beside the state file, offline.
        # Tests of /models give a local Hub and run it (``models.run``).
        cache_dir = os.path.join(os.path.dirname(config.state_file), "hub")
        offline = HubSettings(cache_dir=cache_dir, endpoint="http://127.0.0.1:9", offline=True)
        self.models = ModelRegistry(
            hub=hub or offline,
            settings=model_settings or RegistrySettings(),
            metrics=self.metrics.prometheus,
            log_dir=config.log_dir,
            in_use=lambda model_id: [r.name for r in self._registry.by_model(model_id)],
        )

    def not_ready_reason(self) -> str | None:
        if not (self.state_restored and self.listening):
            return "not ready: state is being restored or the listeners are not up yet"
        return self._gate.check()

    def mark_listening(self) -> None:
        self.listening = True

    def list_instances(self) -> list[InstanceInfo]:
        return self._registry.infos(_now())

    def get_instance(self, name: str) -> InstanceInfo:
        return self._registry.get(name).info(_now())

    async def create_instance(self, cfg: InstanceConfig) -> InstanceInfo:
        await self._operation()
        validate_instance_config(cfg, gpu_count=self.gpu_count)
        record = self._registry.add(cfg, created_at=_now())
        self.logs.setdefault(cfg.name, [])
        return record.info(_now())

    async def delete_instance(self, name: str) -> InstanceInfo:
        await self._operation()
        info = self._registry.get(name).info(_now())
        self._registry.remove(name)
        self.logs.pop(name, None)
        return info

    async def start_instance(self, name: str) -> InstanceInfo:
        await self._operation()
        return self._registry.request_start(name).info(_now())

    async def stop_instance(self, name: str) -> InstanceInfo:
        await self._operation()
        record = self._registry.request_stop(name)
        record.mark_stopped()  # no process to wait for
        return record.info(_now())

    async def restart_instance(self, name: str) -> InstanceInfo:
        await self._operation()
        record = self._registry.request_restart(name)
        record.mark_restart_requested()  # counted; no process to wait for
        record.mark_start_requested()
        return record.info(_now())

    async def instance_logs(self, name: str, start: int | None, end: int | None) -> LogSlice:
        await self._operation()
        self._registry.get(name)
        lines = self.logs.get(name, [])
        first, stop = resolve_slice(len(lines), start, end)
        return LogSlice(lines=lines[first:stop], start=first, end=stop, total_lines=len(lines))

    def health_summary(self) -> dict[str, Any]:
        stats = self._registry.statistics()
        return {
            "status": "healthy",
            "version": __version__,
            "uptime_secs": int(time.time() - self.started_at),
            "instances": {
                "total": stats.total,
                "running": stats.running,
                "starting": stats.starting,
                "failed": stats.failed,
                "stopped": stats.stopped,
                "idle": stats.idle,
            },
            "state": {"status": "ok", "moved_aside_to": None, "error": None},
            "devices": msgspec.to_builtins(self.devices_report().devices),
        }

    def devices_report(self) -> DevicesReport:
        """One CPU device of 64 GiB, with every instance starting or running."""
        live = (InstanceStatus.STARTING, InstanceStatus.RUNNING)
        alive = [r.name for r in self._registry if r.status in live]
        return DevicesReport(
            devices=[
                DeviceView(
                    device="cpu",
                    total_bytes=64 << 30,
                    free_bytes=32 << 30,
                    cap_bytes=32 << 30,
                    reserved_bytes=0,
                    instances=alive,
                )
            ]
        )

    async def reset_state(self) -> list[InstanceInfo]:
        await self._operation()
        seeded, _ = merge_seeds(PersistedState(), self.config.instances, now=_now())
        self._replace(seeded.instances)
        return self.list_instances()

    def export_state(self) -> Backup:
        state = state_from_instances(self._registry)
        models = tuple(
            BackupModel(model_id=m.model_id, revision=m.revision) for m in self.models.list_models()
        )
        return Backup(exported_at=_now(), instances=state.instances, models=models)

    async def import_state(self, backup: Backup) -> list[InstanceInfo]:
        await self._operation()
        self._replace(backup.instances)
        return self.list_instances()

    def _replace(self, instances: tuple[PersistedInstance, ...]) -> None:
        """Every instance gone, then ``instances`` registered (no processes to stop)."""
        for info in self.list_instances():
            self._registry.remove(info.name)
            self.logs.pop(info.name, None)
        for persisted in instances:
            self._registry.add(
                persisted.config, created_at=persisted.created_at, desired=persisted.desired_state
            )
            self.logs.setdefault(persisted.config.name, [])

    def set_status(self, name: str, status: InstanceStatus) -> None:
        """Move an instance as the supervisor would."""
        self._registry.get(name).status = status

    async def _operation(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()


def _now() -> datetime:
    return datetime.now(UTC)
