"""Finished spans to an OTLP/gRPC collector, from a trio task on our own gRPC channel.

Imported only when tracing is on (:func:`tei_manager.tracing.install`): it needs the
OpenTelemetry SDK and ``opentelemetry-exporter-otlp-proto-common`` (span encoding),
the ``otel`` extra. The SDK's own OTLP/gRPC exporter would bring grpcio and a thread;
this sends the same ``ExportTraceServiceRequest`` over :mod:`tei_manager.grpc`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Final, NamedTuple
from urllib.parse import urlsplit

import trio
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tei_manager.grpc.channel import client_ssl_context, open_channel
from tei_manager.grpc.rpc import Cardinality, MethodSpec

__all__ = ["EXPORT", "ExportStatistics", "OtlpExporter"]

log = logging.getLogger(__name__)

#: How long the last batch may take at shutdown (within the drain deadline's slack).
FINAL_FLUSH_SECS: Final = 2.0

#: OTLP's trace export RPC.
EXPORT: Final = MethodSpec(
    "opentelemetry.proto.collector.trace.v1.TraceService",
    "Export",
    Cardinality.UNARY_UNARY,
    trace_service_pb2.ExportTraceServiceRequest,
    trace_service_pb2.ExportTraceServiceResponse,
)


class ExportStatistics(NamedTuple):
    queued: int  # finished spans waiting for the next batch
    sent: int  # spans the collector accepted
    dropped: int  # spans lost: the queue was full, or their batch could not be sent


class OtlpExporter(SpanProcessor):
    """A span processor that sends finished, sampled spans over OTLP/gRPC in batches.

    Spans are queued as they end (at most ``max_queue``; more are dropped and
    counted) and sent by :meth:`run`, a trio task, every ``interval`` seconds or as
    soon as ``batch`` are waiting, each batch on a new connection (a collector that
    restarts costs one batch). A failed batch is logged and dropped, as the SDK's
    exporters do once their retries are spent. On cancellation the queue is sent
    one last time, for at most ``final_timeout`` seconds.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        batch: int = 512,
        max_queue: int = 2048,
        interval: float = 5.0,
        timeout: float = 10.0,
        final_timeout: float = FINAL_FLUSH_SECS,
    ) -> None:
        url = urlsplit(endpoint.strip())
        self.host = url.hostname or ""
        self.port = url.port or 4317
        self.tls = url.scheme == "https"
        self._batch = batch
        self._max_queue = max_queue
        self._interval = interval
        self._timeout = timeout
        self._final_timeout = final_timeout
        self._spans: list[ReadableSpan] = []
        self._wake = trio.Event()
        self.dropped = 0  # see ExportStatistics
        self.sent = 0

    def statistics(self) -> ExportStatistics:
        return ExportStatistics(len(self._spans), self.sent, self.dropped)

    def watch(self, registry: CollectorRegistry) -> None:
        """Expose :meth:`statistics` on ``registry`` at scrape time."""
        registry.register(_ExportCollector(self))

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return
        if len(self._spans) >= self._max_queue:
            self.dropped += 1
            return
        self._spans.append(span)
        if len(self._spans) >= self._batch:
            self._wake.set()

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send queued spans until cancelled, then once more."""
        log.info(
            "OpenTelemetry: exporting spans over OTLP/gRPC to %s:%d%s",
            self.host,
            self.port,
            " (TLS)" if self.tls else "",
        )
        task_status.started()
        try:
            while True:
                with trio.move_on_after(self._interval):
                    await self._wake.wait()
                self._wake = trio.Event()
                await self.flush()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self._final_timeout):
                await self.flush()

    async def flush(self) -> None:
        """Send the spans queued now, in batches (spans that end meanwhile wait for the
        next round: a busy manager sends full batches, not a stream of small ones)."""
        spans, self._spans = self._spans, []
        done = 0
        try:
            for start in range(0, len(spans), self._batch):
                await self._send(spans[start : start + self._batch])
                done = min(len(spans), start + self._batch)
        finally:
            self.dropped += len(spans) - done  # cut short: shutdown's time ran out

    async def _send(self, batch: list[ReadableSpan]) -> None:
        # Some 15 µs a span: a full batch in a thread, not on the loop the relays share.
        request = await trio.to_thread.run_sync(encode_spans, batch)
        context = client_ssl_context() if self.tls else None
        try:
            with trio.fail_after(self._timeout):
                async with open_channel(self.host, self.port, ssl_context=context) as channel:
                    await channel.unary_unary(EXPORT, request)
        except Exception as error:  # tracing never takes the manager down
            self.dropped += len(batch)
            log.warning(
                "OpenTelemetry: %d spans not exported to %s:%d: %s",
                len(batch),
                self.host,
                self.port,
                getattr(error, "message", None) or str(error) or type(error).__name__,
            )
            return
        self.sent += len(batch)


class _ExportCollector(Collector):
    def __init__(self, exporter: OtlpExporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._exporter.statistics()
        yield GaugeMetricFamily(
            "tei_manager_otel_spans_queued", "Finished spans waiting to be exported", stats.queued
        )
        yield CounterMetricFamily(
            "tei_manager_otel_spans_exported",
            "Spans the OTLP collector accepted",
            stats.sent,
        )
        yield CounterMetricFamily(
            "tei_manager_otel_spans_dropped",
            "Spans not exported: the queue was full, or the collector could not be reached",
            stats.dropped,
        )
