"""The inference metrics, counted in plain numbers, read as prometheus_client's own
counters and histograms would: the same series, labels and values."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tei_manager.gateway.metrics import LATENCY_BUCKETS, QUEUE_BUCKETS, GatewayMetrics

Series = set[tuple[str, tuple[tuple[str, str], ...], float]]

# (route, model, status, seconds, tokens, queued): on bucket bounds, between them,
# past the last finite one; none queued; no tokens; an error.
REQUESTS = [
    ("/v1/embeddings", "m/a", 200, 0.001, 9, 0.0),
    ("/v1/embeddings", "m/a", 200, 0.0025, 0, None),
    ("/v1/embeddings", "m/a", 429, 0.0003, 0, 0.01),
    ("/v1/embeddings", "m/b", 200, 31.0, 4, 45.0),
    ("/tei/{model}/embed", "m/a", 200, 0.7, 1, 0.26),
    ("/tei/{model}/embed", "", 404, 0.0001, 0, None),
]
NAMES = (
    "tei_manager_inference_requests",
    "tei_manager_inference_request_duration_seconds",
    "tei_manager_inference_input_tokens",
    "tei_manager_inference_queued_seconds",
    "tei_manager_inference_errors",
)


def series(registry: CollectorRegistry) -> tuple[Series, dict[str, str]]:
    """The samples of the inference families (``_created`` aside), and their help."""
    found: Series = set()
    helps: dict[str, str] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if family.name in NAMES:
            helps[family.name] = f"{family.type}: {family.documentation}"
            found |= {
                (s.name, tuple(sorted(s.labels.items())), s.value)
                for s in family.samples
                if not s.name.endswith("_created")
            }
    return found, helps


def test_the_series_are_prometheus_clients_own() -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    reference = CollectorRegistry()
    labels = ["route", "model"]
    requests = Counter(
        "tei_manager_inference_requests",
        "Inference requests, by route and model",
        labels,
        registry=reference,
    )
    errors = Counter(
        "tei_manager_inference_errors",
        "Inference requests answered with an error, by HTTP status",
        [*labels, "status"],
        registry=reference,
    )
    duration = Histogram(
        "tei_manager_inference_request_duration_seconds",
        "Duration of inference requests, queueing included",
        labels,
        buckets=LATENCY_BUCKETS,
        registry=reference,
    )
    tokens = Counter(
        "tei_manager_inference_input_tokens",
        "Input tokens the instances computed for inference requests",
        labels,
        registry=reference,
    )
    queued = Histogram(
        "tei_manager_inference_queued_seconds",
        "Time inference requests waited for a slot on their instance",
        labels,
        buckets=QUEUE_BUCKETS,
        registry=reference,
    )
    for route, model, status, seconds, count, waited in REQUESTS:
        metrics.route(route, model).finished(status, seconds, count, waited)
        for family in (requests, duration, tokens, queued):
            family.labels(route, model)  # every series of a pair, from its first request
        requests.labels(route, model).inc()
        duration.labels(route, model).observe(seconds)
        if count:
            tokens.labels(route, model).inc(count)
        if waited is not None:
            queued.labels(route, model).observe(waited)
        if status >= 400:
            errors.labels(route, model, str(status)).inc()
    got, got_help = series(registry)
    want, want_help = series(reference)
    assert got == want
    assert got_help == want_help and set(got_help) == set(NAMES)
    assert (
        "tei_manager_inference_requests_total",
        (("model", "m/a"), ("route", "/v1/embeddings")),
        3.0,
    ) in got
    # As with prometheus_client's once the manager turned ``_created`` off.
    text = generate_latest(registry).decode()
    assert all(f"{name}_created" not in text for name in NAMES[:4])
