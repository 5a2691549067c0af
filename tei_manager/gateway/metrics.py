"""Metrics of the inference front doors, per route and model.

``route`` is a route template (``/v1/embeddings``, ``/tei/{model}/embed``) and
``model`` the model id of the instance that served the request ("" when none was
found), never the client's raw string: the label sets stay bounded whatever
clients send. Queue depth and in-flight counts per instance are read from the
admission gates at scrape time.

Requests, latency, tokens and queued time are counted in plain numbers per (route,
model) and exposed at scrape time as the counters and histograms prometheus_client
would (same names, help, labels, buckets): its per-observation lock and checks cost
more than the rest of a request's bookkeeping together. The manager turns off
prometheus_client's ``_created`` series process-wide, so these have none either.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from tei_manager.gateway.gate import AdmissionStatistics

__all__ = ["LATENCY_BUCKETS", "QUEUE_BUCKETS", "GatewayMetrics", "RouteMetrics"]

#: Seconds an inference request took, queueing included.
LATENCY_BUCKETS: Final = (
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


class _Buckets:
    """A histogram's bucket bounds, and their ``le`` label values."""

    __slots__ = ("bounds", "les")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.les = tuple(floatToGoString(b) for b in bounds)  # type: ignore[no-untyped-call]


class _Histogram:
    """One histogram series: counts per bucket (not cumulative) and the sum."""

    __slots__ = ("_bounds", "_les", "counts", "sum")

    def __init__(self, buckets: _Buckets) -> None:
        self._bounds = buckets.bounds
        self._les = buckets.les
        self.counts = [0] * len(buckets.bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # The first bucket whose bound is >= value, as prometheus_client's ``le``.
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts by ``le``, as the exposition wants them."""
        out: list[tuple[str, float]] = []
        total = 0.0
        for le, count in zip(self._les, list(self.counts), strict=True):
            total += count
            out.append((le, total))
        return out


_LATENCY: Final = _Buckets(LATENCY_BUCKETS)
_QUEUED: Final = _Buckets(QUEUE_BUCKETS)


class RouteMetrics:
    """The series of one (route, model) pair."""

    __slots__ = ("_errors", "_model", "_route", "duration", "queued", "requests", "tokens")

    def __init__(self, metrics: GatewayMetrics, route: str, model: str) -> None:
        self._errors = metrics.errors
        self._route = route
        self._model = model
        self.requests = 0
        self.tokens = 0
        self.duration = _Histogram(_LATENCY)
        self.queued = _Histogram(_QUEUED)

    def finished(self, status: int, seconds: float, tokens: int, queued: float | None) -> None:
        self.requests += 1
        self.duration.observe(seconds)
        if tokens:
            self.tokens += tokens
        if queued is not None:
            self.queued.observe(queued)
        if status >= 400:
            self._errors.labels(route=self._route, model=self._model, status=str(status)).inc()


class _RouteCollector(Collector):
    """Requests, latency, tokens and queued time of every (route, model), at scrape time."""

    def __init__(self, children: Mapping[tuple[str, str], RouteMetrics]) -> None:
        self._children = children

    def collect(self) -> Iterator[Metric]:
        labels = ["route", "model"]
        requests = CounterMetricFamily(
            "tei_manager_inference_requests",
            "Inference requests, by route and model",
            labels=labels,
        )
        duration = HistogramMetricFamily(
            "tei_manager_inference_request_duration_seconds",
            "Duration of inference requests, queueing included",
            labels=labels,
        )
        tokens = CounterMetricFamily(
            "tei_manager_inference_input_tokens",
            "Input tokens the instances computed for inference requests",
            labels=labels,
        )
        queued = HistogramMetricFamily(
            "tei_manager_inference_queued_seconds",
            "Time inference requests waited for a slot on their instance",
            labels=labels,
        )
        # A copy: a scrape may run in a worker thread while requests add series.
        for (route, model), child in list(self._children.items()):
            values = [route, model]
            requests.add_metric(values, float(child.requests))
            duration.add_metric(values, child.duration.buckets(), child.duration.sum)
            tokens.add_metric(values, float(child.tokens))
            queued.add_metric(values, child.queued.buckets(), child.queued.sum)
        yield requests
        yield duration
        yield tokens
        yield queued


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
        self._children: dict[tuple[str, str], RouteMetrics] = {}
        registry.register(_RouteCollector(self._children))
        self.errors = Counter(
            "tei_manager_inference_errors",
            "Inference requests answered with an error, by HTTP status",
            ["route", "model", "status"],
            registry=registry,
        )
        self.retries = Counter(
            "tei_manager_inference_retries",
            "Inference calls sent again to another replica after the first never got an"
            " answer, by route and reason (connect, closed, refused, lost)",
            ["route", "reason"],
            registry=registry,
        )

    def route(self, route: str, model: str) -> RouteMetrics:
        key = (route, model)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = RouteMetrics(self, route, model)
        return found

    def watch_admission(self, statistics: Callable[[], Mapping[str, AdmissionStatistics]]) -> None:
        """Expose the gates' queue depth and in-flight counts at scrape time."""
        self._registry.register(_AdmissionCollector(statistics))
