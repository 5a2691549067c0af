"""The model registry's Prometheus series, on the manager's registry.

Outcomes are counted as they happen; how many models are registered and how many
downloads run are read from the model registry at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["DownloadOutcome", "HubMetrics", "SmokeOutcome"]

DownloadOutcome = Literal["success", "failed", "cancelled"]
SmokeOutcome = Literal["verified", "failed"]

# From a few kilobytes of config to tens of gigabytes of weights.
_DOWNLOAD_BUCKETS: Final = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, float("inf"))


class HubMetrics:
    """Every ``tei_manager_model*`` series."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.downloads = Counter(
            "tei_manager_model_downloads",
            "Model downloads by outcome (success, failed, cancelled)",
            ["outcome"],
            registry=registry,
        )
        self.download_seconds = Histogram(
            "tei_manager_model_download_duration_seconds",
            "Duration of model downloads, from start (queueing included) to outcome",
            ["outcome"],
            buckets=_DOWNLOAD_BUCKETS,
            registry=registry,
        )
        self.download_bytes = Counter(
            "tei_manager_model_download_bytes",
            "Bytes of model files received from the Hub",
            registry=registry,
        )
        self.smoke_loads = Counter(
            "tei_manager_model_smoke_loads",
            "Smoke loads by outcome (verified, failed)",
            ["outcome"],
            registry=registry,
        )
        self.downloads_active = Gauge(
            "tei_manager_model_downloads_active",
            "Model downloads running or queued",
            registry=registry,
        )
        self.models_count = Gauge(
            "tei_manager_models_count", "Models registered with the manager", registry=registry
        )
        # Every outcome is a series from the start, so rates work before the first event.
        for outcome in ("success", "failed", "cancelled"):
            self.downloads.labels(outcome=outcome)
        for outcome in ("verified", "failed"):
            self.smoke_loads.labels(outcome=outcome)

    def bind(self, *, models: Callable[[], int], active_downloads: Callable[[], int]) -> None:
        """Read the gauges from the model registry at every scrape."""
        self.models_count.set_function(lambda: float(models()))
        self.downloads_active.set_function(lambda: float(active_downloads()))

    def download_finished(self, outcome: DownloadOutcome, seconds: float) -> None:
        self.downloads.labels(outcome=outcome).inc()
        self.download_seconds.labels(outcome=outcome).observe(seconds)

    def bytes_received(self, count: int) -> None:
        """Called from download threads; prometheus_client counters are thread-safe."""
        self.download_bytes.inc(count)

    def smoke_loaded(self, outcome: SmokeOutcome) -> None:
        self.smoke_loads.labels(outcome=outcome).inc()
