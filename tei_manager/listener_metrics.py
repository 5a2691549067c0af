"""What each port's accept loop sees, as Prometheus series read at scrape time.

Both ports cap the connections they serve at once (``api_max_connections``,
``[grpc] max_connections``) by closing the ones accepted over the cap; an operator
needs to see that happening, and how close to the cap a port runs, without a log
line per refused connection. Each port's loop keeps plain counts
(:meth:`GrpcServer.statistics <tei_manager.grpc.server.GrpcServer.statistics>`, the
REST port's own) and a :class:`ListenerCollector` turns them into series:

- ``<prefix>_connections``: open now;
- ``<prefix>_connections_refused_total``: closed at once, over the cap;
- ``<prefix>_accept_errors_total``: ``accept()`` failures (out of descriptors or
  memory) that the loop backed off from;
- ``<prefix>_queued_output_bytes`` where the port reports it (gRPC: answers
  written but not yet taken by slow readers, summed over connections).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["ListenerCollector", "Statistics"]

#: A port's counts: ``connections``, ``connections_refused``, ``accept_errors``, and
#: optionally ``queued_output_bytes``.
Statistics = Callable[[], Mapping[str, int]]


class ListenerCollector(Collector):
    """One port's connection series (see the module docstring).

    :meth:`watch` points it at the port's counts: a port that is served again (a
    test, a restart within one process) replaces them, so the series never repeat.
    """

    def __init__(self, prefix: str, port: str) -> None:
        self._prefix = prefix
        self._port = port
        self._statistics: Statistics | None = None

    def watch(self, statistics: Statistics) -> None:
        self._statistics = statistics

    def collect(self) -> Iterator[Metric]:
        if self._statistics is None:
            return
        stats = self._statistics()
        prefix, port = self._prefix, self._port
        yield GaugeMetricFamily(
            f"{prefix}_connections", f"Connections open on the {port} port", stats["connections"]
        )
        yield CounterMetricFamily(
            f"{prefix}_connections_refused",
            f"Connections the {port} port closed at once, being at its connection limit",
            stats["connections_refused"],
        )
        yield CounterMetricFamily(
            f"{prefix}_accept_errors",
            f"accept() failures on the {port} port (out of descriptors or memory), backed off",
            stats["accept_errors"],
        )
        if "queued_output_bytes" in stats:
            yield GaugeMetricFamily(
                f"{prefix}_queued_output_bytes",
                f"Bytes written to {port} connections and not yet taken by their peers",
                stats["queued_output_bytes"],
            )

    def describe(self) -> Iterator[Metric]:
        return iter(())
