"""Metrics of the inference front doors, per route and model.

``route`` is a route template (``/v1/embeddings``, ``/tei/{model}/embed``) and
``model`` the model id of the instance that served the request ("" when none was
found), never the client's raw string: the label sets stay bounded whatever
clients send. Queue depth and in-flight counts per instance are read from the
admission gates at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tei_manager.gateway.gate import AdmissionStatistics

__all__ = ["QUEUE_BUCKETS", "GatewayMetrics", "RouteMetrics"]

_LATENCY_BUCKETS: Final = (
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
#: Seconds waited in an instance's admission queue, on either door.
QUEUE_BUCKETS: Final = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, float("inf"))


class RouteMetrics:
    """The series of one (route, model) pair."""

    __slots__ = ("_errors", "_model", "_route", "duration", "queued", "requests", "tokens")

    def __init__(self, metrics: GatewayMetrics, route: str, model: str) -> None:
        self._errors = metrics.errors
        self._route = route
        self._model = model
        self.requests = metrics.requests.labels(route=route, model=model)
        self.duration = metrics.duration.labels(route=route, model=model)
        self.tokens = metrics.tokens.labels(route=route, model=model)
        self.queued = metrics.queued.labels(route=route, model=model)

    def finished(self, status: int, seconds: float, tokens: int, queued: float | None) -> None:
        self.requests.inc()
        self.duration.observe(seconds)
        if tokens:
            self.tokens.inc(tokens)
        if queued is not None:
            self.queued.observe(queued)
        if status >= 400:
            self._errors.labels(route=self._route, model=self._model, status=str(status)).inc()


class _AdmissionCollector(Collector):
    def __init__(self, statistics: Callable[[], Mapping[str, AdmissionStatistics]]) -> None:
        self._statistics = statistics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "tei_manager_inference_queue_depth",
            "Inference requests waiting for a slot on the instance",
            labels=["instance"],
        )
        in_flight = GaugeMetricFamily(
            "tei_manager_inference_in_flight",
            "Inference requests holding a slot on the instance",
            labels=["instance"],
        )
        for name, stats in sorted(self._statistics().items()):
            depth.add_metric([name], stats.queued)
            in_flight.add_metric([name], stats.in_flight)
        yield depth
        yield in_flight


class GatewayMetrics:
    """``tei_manager_inference_*``: requests, errors by status, latency, tokens, queueing."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        labels = ["route", "model"]
        self.requests = Counter(
            "tei_manager_inference_requests",
            "Inference requests, by route and model",
            labels,
            registry=registry,
        )
        self.errors = Counter(
            "tei_manager_inference_errors",
            "Inference requests answered with an error, by HTTP status",
            [*labels, "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "tei_manager_inference_request_duration_seconds",
            "Duration of inference requests, queueing included",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "tei_manager_inference_input_tokens",
            "Input tokens the instances computed for inference requests",
            labels,
            registry=registry,
        )
        self.queued = Histogram(
            "tei_manager_inference_queued_seconds",
            "Time inference requests waited for a slot on their instance",
            labels,
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "tei_manager_inference_retries",
            "Inference calls sent again to another replica after the first never got an"
            " answer, by route and reason (connect, closed, refused, lost)",
            ["route", "reason"],
            registry=registry,
        )
        self._children: dict[tuple[str, str], RouteMetrics] = {}

    def route(self, route: str, model: str) -> RouteMetrics:
        key = (route, model)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = RouteMetrics(self, route, model)
        return found

    def watch_admission(self, statistics: Callable[[], Mapping[str, AdmissionStatistics]]) -> None:
        """Expose the gates' queue depth and in-flight counts at scrape time."""
        self._registry.register(_AdmissionCollector(statistics))
