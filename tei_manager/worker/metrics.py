"""Prometheus metrics of the worker, named like text-embeddings-router's (``te_*``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _StatisticsCollector:
    """Turns a ``statistics()`` snapshot (a Struct of numbers) into gauges at scrape time."""

    def __init__(self, prefix: str, snapshot: Callable[[], msgspec.Struct | None]) -> None:
        self._prefix = prefix
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        stats = self._snapshot()
        if stats is None:
            return
        for name in stats.__struct_fields__:
            value = getattr(stats, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            yield GaugeMetricFamily(f"{self._prefix}{name}", name.replace("_", " "), value=value)


class WorkerMetrics:
    """Request counters and latency by method, and engine gauges read at scrape time."""

    def __init__(self, engine_statistics: Callable[[], msgspec.Struct | None]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "te_request_count", "Requests received", ["method"], registry=self.registry
        )
        self.successes = Counter(
            "te_request_success", "Requests that succeeded", ["method"], registry=self.registry
        )
        self.failures = Counter(
            "te_request_failure", "Requests that failed", ["method", "err"], registry=self.registry
        )
        self.duration = Histogram(
            "te_request_duration",
            "Request duration in seconds",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StatisticsCollector("te_engine_", engine_statistics))

    def observe(self, method: str, seconds: float, error: str | None) -> None:
        self.requests.labels(method).inc()
        self.duration.labels(method).observe(seconds)
        if error is None:
            self.successes.labels(method).inc()
        else:
            self.failures.labels(method, error).inc()
