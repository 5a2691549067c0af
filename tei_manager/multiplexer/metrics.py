"""Per-instance, per-method metrics of the gRPC multiplexer.

Registered on the manager's own Prometheus registry, so ``GET /metrics`` shows
them next to the instance metrics. The labelled children are cached per
(instance, method): looking them up through ``labels()`` on every call would be a
measurable part of a relayed call's cost. Calls in flight are a plain count per
(instance, method), read at scrape time: a gauge's locked ``inc``/``dec`` on every
call cost more than the rest of the call's metrics bookkeeping together.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tei_manager.gateway.metrics import QUEUE_BUCKETS
from tei_manager.grpc.rpc import StatusCode
from tei_manager.listener_metrics import ListenerCollector

__all__ = ["UNROUTED", "CallMetrics", "MultiplexerMetrics"]

#: ``instance`` label of a call that could not be routed to any instance.
UNROUTED: Final = ""

# A relayed call: a tokenization takes well under a millisecond, a large batch
# on a busy CPU instance seconds.
_LATENCY_BUCKETS: Final = (
    0.0005,
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
    2.5,
    5,
    10,
    30,
    float("inf"),
)


class CallMetrics:
    """The series of one (instance, method) pair."""

    __slots__ = ("_errors", "duration", "in_flight", "instance", "method", "requests")

    def __init__(self, metrics: MultiplexerMetrics, instance: str, method: str) -> None:
        self._errors = metrics.errors
        self.instance = instance
        self.method = method
        self.requests = metrics.requests.labels(instance=instance, method=method)
        self.duration = metrics.duration.labels(instance=instance, method=method)
        #: Calls in flight now (the caller counts them; read at scrape time).
        self.in_flight = 0

    def finished(self, seconds: float, code: StatusCode) -> None:
        self.requests.inc()
        self.duration.observe(seconds)
        if code is not StatusCode.OK:
            self._errors.labels(instance=self.instance, method=self.method, code=code.name).inc()


class _InFlightCollector(Collector):
    """``tei_manager_grpc_requests_in_flight``, from the series' counts at scrape time."""

    def __init__(self, children: dict[tuple[str, str], CallMetrics]) -> None:
        self._children = children

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tei_manager_grpc_requests_in_flight",
            "Multiplexer calls in progress",
            labels=["instance", "method"],
        )
        for series in list(self._children.values()):
            family.add_metric([series.instance, series.method], series.in_flight)
        yield family


class MultiplexerMetrics:
    """``tei_manager_grpc_*``: requests, errors by status code, latency, in flight, retries."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["instance", "method"]
        self.requests = Counter(
            "tei_manager_grpc_requests",
            "Calls to the gRPC multiplexer, by instance and method",
            labels,
            registry=registry,
        )
        self.errors = Counter(
            "tei_manager_grpc_errors",
            "Multiplexer calls that ended with a non-OK status, by status code",
            [*labels, "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "tei_manager_grpc_request_duration_seconds",
            "Duration of multiplexer calls, from the request headers to the status",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "tei_manager_grpc_retries",
            "Calls sent again to another replica after the first one never answered, "
            "by method and why (connect, refused, lost)",
            ["method", "reason"],
            registry=registry,
        )
        self.queued = Histogram(
            "tei_manager_grpc_queued_seconds",
            "Time calls that found their instance full waited in its admission queue"
            " (shared with the HTTP inference routes), by method",
            ["method"],
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self._children: dict[tuple[str, str], CallMetrics] = {}
        registry.register(_InFlightCollector(self._children))
        #: The gRPC port's connections (``MultiplexerServer`` points it at its server).
        self.listener = ListenerCollector("tei_manager_grpc", "gRPC")
        registry.register(self.listener)

    def retried(self, method: str, reason: str) -> None:
        self.retries.labels(method=method, reason=reason).inc()

    def call(self, instance: str, method: str) -> CallMetrics:
        key = (instance, method)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = CallMetrics(self, instance, method)
        return found
