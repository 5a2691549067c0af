"""Per-instance, per-method metrics of the gRPC multiplexer.

Registered on the manager's own Prometheus registry, so ``GET /metrics`` shows
them next to the instance metrics. The labelled children are cached per
(instance, method): looking them up through ``labels()`` on every call would be a
measurable part of a relayed call's cost.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tei_manager.grpc.rpc import StatusCode

__all__ = ["UNROUTED", "CallMetrics", "MultiplexerMetrics"]

#: ``instance`` label of a call that could not be routed to any instance.
UNROUTED: Final = ""

# A relayed call: a tokenization takes well under a millisecond, a large batch
# on a busy CPU instance seconds.
_QUEUE_BUCKETS: Final = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, float("inf"))
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

    __slots__ = ("_errors", "_instance", "_method", "duration", "in_flight", "requests")

    def __init__(self, metrics: MultiplexerMetrics, instance: str, method: str) -> None:
        self._errors = metrics.errors
        self._instance = instance
        self._method = method
        self.requests = metrics.requests.labels(instance=instance, method=method)
        self.duration = metrics.duration.labels(instance=instance, method=method)
        self.in_flight = metrics.in_flight.labels(instance=instance, method=method)

    def finished(self, seconds: float, code: StatusCode) -> None:
        self.requests.inc()
        self.duration.observe(seconds)
        if code is not StatusCode.OK:
            self._errors.labels(instance=self._instance, method=self._method, code=code.name).inc()


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
        self.in_flight = Gauge(
            "tei_manager_grpc_requests_in_flight",
            "Multiplexer calls in progress",
            labels,
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
            buckets=_QUEUE_BUCKETS,
            registry=registry,
        )
        self._children: dict[tuple[str, str], CallMetrics] = {}

    def retried(self, method: str, reason: str) -> None:
        self.retries.labels(method=method, reason=reason).inc()

    def call(self, instance: str, method: str) -> CallMetrics:
        key = (instance, method)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = CallMetrics(self, instance, method)
        return found
