"""Counters of refused requests, on the manager's Prometheus registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from tei_manager.auth.identity import Refusal

__all__ = ["AuthMetrics"]


class AuthMetrics:
    """``tei_manager_auth_rejections_total{port,code,identity}``: every refusal,
    rate limits (code OVERLOADED) included; ``identity`` is empty when unknown."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.rejections = Counter(
            "tei_manager_auth_rejections_total",
            "Requests refused by authentication, authorization or rate limits",
            ["port", "code", "identity"],
            registry=registry,
        )

    def rejected(self, port: str, refusal: Refusal) -> None:
        self.rejections.labels(port, refusal.code.value, refusal.identity).inc()
