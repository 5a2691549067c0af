"""The manager's Prometheus metrics, on a registry of their own.

The names are a contract (dashboards and alerts use them, see the REST contract).
Events that must be counted as they happen (an instance created, a restart, a failed
health check) increment counters here; values that are state (how many instances
exist) are read from their owner at scrape time through a callback.

:meth:`ManagerMetrics.render` is synchronous and walks every series: call it through
``trio.to_thread.run_sync`` from async code.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final, Literal

import msgspec
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from tei_manager.listener_metrics import ListenerCollector

__all__ = [
    "CONTENT_TYPE",
    "INSTANCE_STATUSES",
    "ColdStartFailure",
    "EvictionReason",
    "ManagerMetrics",
    "MemorySnapshot",
    "MetricsStatistics",
    "RestartReason",
]

# prometheus_client adds a `<name>_created` timestamp series to every counter and
# histogram child: one more series per instance and label set that no dashboard
# reads (Prometheus itself spots counter resets). The switch is process-wide, so
# it is thrown here, where the manager's metrics are defined.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

RestartReason = Literal["crash", "health", "manual"]
EvictionReason = Literal["memory"]
ColdStartFailure = Literal["memory", "failed", "refused"]

#: Every value of the ``status`` label of ``tei_manager_instance_status``.
INSTANCE_STATUSES: Final = ("idle", "starting", "running", "stopping", "stopped", "failed")

#: Series of ``tei_manager_http_request_duration_seconds`` whose child is kept at
#: hand (see ``ManagerMetrics.observe_http``); all dropped when this many are.
_HTTP_CHILDREN_KEPT: Final = 1024

# Model loading takes from a second (tiny models) to minutes (large ones, first download).
_STARTUP_BUCKETS: Final = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, float("inf"))
# A health check is one Info call over loopback: milliseconds, unless the instance hangs.
_HEALTH_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2,
    5,
    float("inf"),
)


class MemorySnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Memory as the on-demand controller sees it, read at scrape time."""

    instances: list[tuple[str, str, int]]  # (instance, device, bytes)
    devices: list[tuple[str, int, int, int]]  # (device, total, free, reserved)


class _MemoryCollector(Collector):
    def __init__(self, read: Callable[[], MemorySnapshot]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        snapshot = self._read()
        per_instance = GaugeMetricFamily(
            "tei_manager_instance_memory_bytes",
            "Memory an instance holds on its device: measured once it runs, estimated before",
            labels=["instance", "device"],
        )
        for instance, device, count in snapshot.instances:
            per_instance.add_metric([instance, device], count)
        per_device = GaugeMetricFamily(
            "tei_manager_device_memory_bytes",
            "Each device's memory: total, free (as it reports), reserved by our instances",
            labels=["device", "kind"],
        )
        for device, total, free, reserved in snapshot.devices:
            per_device.add_metric([device, "total"], total)
            per_device.add_metric([device, "free"], free)
            per_device.add_metric([device, "reserved"], reserved)
        yield per_instance
        yield per_device

    def describe(self) -> Iterator[Metric]:
        return iter(())


class MetricsStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Totals since start, for tests and diagnostics (Prometheus has the detail)."""

    instances_created: int
    instances_deleted: int
    restarts: dict[str, int]  # by reason
    health_check_failures: int
    health_checks: int
    startups: int


class ManagerMetrics:
    """Every ``tei_manager_*`` series; one object per manager."""

    def __init__(self) -> None:
        self.prometheus = CollectorRegistry(auto_describe=True)
        r = self.prometheus
        #: The REST port's connections (``serve_api`` points it at its accept loop).
        self.http_listener = ListenerCollector("tei_manager_http", "REST")
        r.register(self.http_listener)
        self.instances_count = Gauge(
            "tei_manager_instances_count", "Instances registered with the manager", registry=r
        )
        self.instances_created = Counter(
            "tei_manager_instances_created",
            "Instances created (REST, seeds, restored state)",
            ["instance", "model"],
            registry=r,
        )
        self.instances_deleted = Counter(
            "tei_manager_instances_deleted", "Instances deleted", ["instance"], registry=r
        )
        self.health_check_failures = Counter(
            "tei_manager_health_check_failures",
            "Health checks of running instances that failed",
            ["instance"],
            registry=r,
        )
        self.instance_restarts = Counter(
            "tei_manager_instance_restarts",
            "Instance processes restarted, by reason (crash, health, manual)",
            ["instance", "reason"],
            registry=r,
        )
        self.instance_startup_seconds = Histogram(
            "tei_manager_instance_startup_seconds",
            "Time from spawning an instance process to its first answered Info call",
            buckets=_STARTUP_BUCKETS,
            registry=r,
        )
        self.health_check_seconds = Histogram(
            "tei_manager_health_check_seconds",
            "Duration of instance health checks (Info calls)",
            buckets=_HEALTH_BUCKETS,
            registry=r,
        )
        self.http_request_duration_seconds = Histogram(
            "tei_manager_http_request_duration_seconds",
            "REST API request duration",
            ["route", "method", "status"],
            registry=r,
        )
        # (route, method, status) -> its child: ``labels()`` costs more than the
        # observation itself, and this is paid by every REST request.
        self._http_children: dict[tuple[str, str, int], Histogram] = {}
        self.cold_starts = Counter(
            "tei_manager_cold_starts",
            "On-demand instances started by a request",
            ["instance"],
            registry=r,
        )
        self.cold_start_seconds = Histogram(
            "tei_manager_cold_start_seconds",
            "From the request that started an on-demand instance to the instance ready",
            buckets=_STARTUP_BUCKETS,
            registry=r,
        )
        self.cold_start_failures = Counter(
            "tei_manager_cold_start_failures",
            "On-demand starts that did not bring the instance up, by reason (memory: no"
            " device could take it even by eviction; failed: it ended failed; refused:"
            " not startable now)",
            ["instance", "reason"],
            registry=r,
        )
        self.evictions = Counter(
            "tei_manager_evictions",
            "On-demand instances stopped to make room for another",
            ["instance", "reason"],
            registry=r,
        )
        self.idle_unloads = Counter(
            "tei_manager_idle_unloads",
            "On-demand instances stopped after idle_timeout_secs without a request",
            registry=r,
        )
        self.gpu_fallbacks = Counter(
            "tei_manager_gpu_fallbacks",
            "Instances found running on the CPU although they asked for a GPU",
            ["instance"],
            registry=r,
        )
        self._created = 0
        self._deleted = 0
        self._restarts: dict[str, int] = {"crash": 0, "health": 0, "manual": 0}
        self._health_checks = 0
        self._health_failures = 0
        self._startups = 0

    # -- state read at scrape time ------------------------------------------------
    def bind_instance_count(self, count: Callable[[], int]) -> None:
        """Read ``tei_manager_instances_count`` from ``count`` at every scrape."""
        self.instances_count.set_function(lambda: float(count()))

    def bind_memory(self, read: Callable[[], MemorySnapshot]) -> None:
        """Read the memory gauges from ``read`` at every scrape."""
        self.prometheus.register(_MemoryCollector(read))

    def bind_instance_statuses(self, statuses: Callable[[], Iterable[tuple[str, str]]]) -> None:
        """Read ``tei_manager_instance_status`` from ``(name, status)`` pairs at every scrape."""
        self.prometheus.register(_InstanceStatusCollector(statuses))

    def bind_gpus(self, gpus: Callable[[], Iterable[tuple[int, str, int, int]]]) -> None:
        """Export ``(index, name, free, total)`` of each GPU at every scrape."""
        self.prometheus.register(_GpuCollector(gpus))

    def bind_storage(self, volumes: Mapping[str, str]) -> None:
        """Export free and total bytes of each ``{volume: path}`` at every scrape."""
        self.prometheus.register(_StorageCollector(dict(volumes)))

    # -- events -----------------------------------------------------------------------
    def instance_created(self, instance: str, model: str) -> None:
        self._created += 1
        self.instances_created.labels(instance=instance, model=model).inc()

    def instance_deleted(self, instance: str) -> None:
        self._deleted += 1
        self.instances_deleted.labels(instance=instance).inc()

    def instance_restarted(self, instance: str, reason: RestartReason) -> None:
        self._restarts[reason] += 1
        self.instance_restarts.labels(instance=instance, reason=reason).inc()

    def instance_started(self, seconds: float) -> None:
        """An instance answered its first Info call ``seconds`` after it was spawned."""
        self._startups += 1
        self.instance_startup_seconds.observe(seconds)

    def health_checked(self, instance: str, *, ok: bool, seconds: float) -> None:
        self._health_checks += 1
        self.health_check_seconds.observe(seconds)
        if not ok:
            self._health_failures += 1
            self.health_check_failures.labels(instance=instance).inc()

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        """One REST request; ``route`` is the route template, never the raw path."""
        key = (route, method, status)
        child = self._http_children.get(key)
        if child is None:
            children = self._http_children
            if len(children) >= _HTTP_CHILDREN_KEPT:
                children.clear()  # a client's made-up methods cannot grow it
            child = children[key] = self.http_request_duration_seconds.labels(
                route=route, method=method, status=str(status)
            )
        child.observe(seconds)

    # -- reading ------------------------------------------------------------------------
    def statistics(self) -> MetricsStatistics:
        return MetricsStatistics(
            instances_created=self._created,
            instances_deleted=self._deleted,
            restarts=dict(self._restarts),
            health_check_failures=self._health_failures,
            health_checks=self._health_checks,
            startups=self._startups,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition; blocking, so run it in a worker thread."""
        return generate_latest(self.prometheus)


class _InstanceStatusCollector(Collector):
    """``tei_manager_instance_status{instance, status}``: 1 for the instance's status,
    0 for the others (as kube-state-metrics does for pod phases), so an alert on a
    status holds its ``for`` clause across scrapes."""

    def __init__(self, statuses: Callable[[], Iterable[tuple[str, str]]]) -> None:
        self._statuses = statuses

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "tei_manager_instance_status",
            "1 for the status each instance is in, 0 for the other statuses",
            labels=["instance", "status"],
        )
        for name, current in self._statuses():
            for status in INSTANCE_STATUSES:
                family.add_metric([name, status], 1.0 if status == current else 0.0)
        yield family


def _existing_ancestor(path: str) -> str:
    current = os.path.abspath(path)
    while not os.path.exists(current) and os.path.dirname(current) != current:
        current = os.path.dirname(current)
    return current


class _StorageCollector(Collector):
    """``tei_manager_storage_{free,total}_bytes{volume}`` of the log folder and the
    model cache, read at scrape time (``/metrics`` renders in a worker thread)."""

    def __init__(self, volumes: dict[str, str]) -> None:
        self._volumes = volumes

    def collect(self) -> Iterator[Metric]:
        free = GaugeMetricFamily(
            "tei_manager_storage_free_bytes",
            "Bytes free on the file system of each volume (logs, model_cache)",
            labels=["volume"],
        )
        total = GaugeMetricFamily(
            "tei_manager_storage_total_bytes",
            "Size of the file system of each volume (logs, model_cache)",
            labels=["volume"],
        )
        for volume, path in self._volumes.items():
            try:
                usage = shutil.disk_usage(_existing_ancestor(path))
            except OSError:
                continue  # no sample: the series going absent is the signal
            free.add_metric([volume], float(usage.free))
            total.add_metric([volume], float(usage.total))
        yield free
        yield total


class _GpuCollector(Collector):
    """``tei_manager_gpu_memory_{free,total}_bytes{gpu, name}``, read from the device
    table at scrape time (no GPU, no samples)."""

    def __init__(self, gpus: Callable[[], Iterable[tuple[int, str, int, int]]]) -> None:
        self._gpus = gpus

    def collect(self) -> Iterator[Metric]:
        free = GaugeMetricFamily(
            "tei_manager_gpu_memory_free_bytes", "GPU memory free", labels=["gpu", "name"]
        )
        total = GaugeMetricFamily(
            "tei_manager_gpu_memory_total_bytes", "GPU memory in total", labels=["gpu", "name"]
        )
        for index, name, free_bytes, total_bytes in self._gpus():
            free.add_metric([str(index), name], float(free_bytes))
            total.add_metric([str(index), name], float(total_bytes))
        yield free
        yield total
