"""What the REST layer needs from the manager, as Protocols.

The API codes against these rather than the concrete ``Manager`` so it can be
driven by an in-memory fake in tests, and so the dependency points one way:
the manager knows nothing about HTTP.
"""

from __future__ import annotations

from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from tei_manager.config import InstanceConfig, ManagerConfig
from tei_manager.core.instances import InstanceInfo
from tei_manager.core.logslice import LogSlice
from tei_manager.hub.state import ModelInfo
from tei_manager.listener_metrics import ListenerCollector
from tei_manager.manager.backup import Backup
from tei_manager.manager.ondemand import DevicesReport

__all__ = ["HttpMetrics", "ManagerFacade", "ModelsFacade"]


class HttpMetrics(Protocol):
    """The manager's Prometheus metrics, as far as the REST layer uses them."""

    @property
    def prometheus(self) -> CollectorRegistry:
        """The Prometheus registry ``GET /metrics`` exposes."""
        ...

    @property
    def http_listener(self) -> ListenerCollector:
        """``tei_manager_http_connections*``: pointed at the REST port's accept loop."""
        ...

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        """Record one request in ``tei_manager_http_request_duration_seconds``.

        ``route`` is the route template (``/instances/{name}``), never the raw path,
        so the label set stays bounded whatever clients send.
        """
        ...


class ModelsFacade(Protocol):
    """The model registry behind the ``/models`` routes (see :mod:`tei_manager.hub`)."""

    @property
    def cache_dir(self) -> str:
        """The Hugging Face cache models are downloaded into (its free space is in /health)."""
        ...

    def list_models(self) -> list[ModelInfo]: ...

    def get_model(self, model_id: str) -> ModelInfo: ...

    async def add_model(self, model_id: str, revision: str | None) -> tuple[ModelInfo, bool]:
        """The model, and whether it was new."""
        ...

    def start_download(self, model_id: str) -> ModelInfo: ...

    def start_load(self, model_id: str) -> ModelInfo: ...

    async def delete_model(self, model_id: str) -> ModelInfo: ...


class ManagerFacade(Protocol):
    """The manager operations behind the REST routes.

    Data members are read-only properties so that a plain attribute and a
    computed property both satisfy the protocol. Failures are
    :class:`~tei_manager.errors.TeiError`; the API turns them into responses.
    """

    @property
    def config(self) -> ManagerConfig: ...

    @property
    def metrics(self) -> HttpMetrics: ...

    @property
    def models(self) -> ModelsFacade: ...

    def not_ready_reason(self) -> str | None:
        """None when ready (config loaded, state restored, listeners up and, with
        ``ready_requires_instances``, the declared instances running), else why not."""
        ...

    @property
    def startup_complete(self) -> bool:
        """Restore and seed launches finished."""
        ...

    def list_instances(self) -> list[InstanceInfo]:
        """Every instance, in creation order."""
        ...

    def get_instance(self, name: str) -> InstanceInfo:
        """One instance; raises INSTANCE_NOT_FOUND."""
        ...

    async def create_instance(self, cfg: InstanceConfig) -> InstanceInfo: ...

    async def delete_instance(self, name: str) -> InstanceInfo: ...

    async def start_instance(self, name: str) -> InstanceInfo: ...

    async def stop_instance(self, name: str) -> InstanceInfo: ...

    async def restart_instance(self, name: str) -> InstanceInfo: ...

    async def instance_logs(self, name: str, start: int | None, end: int | None) -> LogSlice: ...

    def devices_report(self) -> DevicesReport:
        """``GET /devices``."""
        ...

    def health_summary(self) -> dict[str, Any]:
        """``{status, version, uptime_secs, instances: {total, running, ...}}``."""
        ...

    def mark_listening(self) -> None:
        """The REST listener accepts connections (one of the readiness conditions)."""
        ...

    # -- /state: reset, backup and restore --
    @property
    def gpu_count(self) -> int | None:
        """GPUs on this host once counted (None before), for checking ``gpu_id``."""
        ...

    async def reset_state(self) -> list[InstanceInfo]: ...

    def export_state(self) -> Backup: ...

    async def import_state(self, backup: Backup) -> list[InstanceInfo]: ...
