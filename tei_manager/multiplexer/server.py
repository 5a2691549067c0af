"""The multiplexer's gRPC server: TeiMultiplexer, health and reflection on ``grpc_port``.

The one place the server is built, so transport options (message size, stream
limits, and TLS when configured) apply to every service on the port alike.
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from tei_manager.config import ManagerConfig
from tei_manager.core.registry import Registry
from tei_manager.core.routing import Router
from tei_manager.grpc.health import NOT_SERVING, SERVING, HealthServicer
from tei_manager.grpc.reflection import reflection_servicers
from tei_manager.grpc.server import GrpcServer
from tei_manager.multiplexer.metrics import MultiplexerMetrics
from tei_manager.multiplexer.pool import ConnectionPool
from tei_manager.multiplexer.service import Multiplexer
from tei_manager.supervisor.launch import INSTANCE_HOST

__all__ = ["MultiplexerServer", "serve_multiplexer"]

log = logging.getLogger(__name__)

_MIB: Final = 1024 * 1024


class MultiplexerServer:
    """The multiplexer service with its connection pool, health and reflection."""

    def __init__(
        self, config: ManagerConfig, registry: Registry, metrics: MultiplexerMetrics
    ) -> None:
        max_message_bytes = config.grpc_max_message_size_mb * _MIB
        self.router = Router(registry)
        # The public port's limits; the pool's connections to instances use the
        # same settings (keepalive pings included, when configured).
        limits = config.grpc.limits(max_concurrent_streams=config.grpc_max_parallel_streams)
        self.pool = ConnectionPool(
            INSTANCE_HOST, registry.find, max_message_bytes=max_message_bytes, limits=limits
        )
        self.service = Multiplexer(
            self.router,
            self.pool,
            metrics,
            request_timeout=config.grpc_request_timeout_secs,
            stream_idle_timeout=config.grpc_request_timeout_secs,
        )
        names = [Multiplexer.SERVICE]
        self.health = HealthServicer({name: NOT_SERVING for name in ["", *names]})
        self.server = GrpcServer(
            [self.service, self.health, *reflection_servicers([*names, self.health.SERVICE])],
            host=config.api_host,
            port=config.grpc_port,
            max_message_bytes=max_message_bytes,
            limits=limits,
        )

    async def run(
        self,
        *,
        shutdown: trio.Event | None = None,
        drain_timeout_secs: float = 0.0,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled, or until ``shutdown``: then drain for up to the timeout."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.pool.run)
            async with trio.open_nursery() as serving:
                port: int = await serving.start(self.server.run)
                self.health.set_all(SERVING)
                log.info("gRPC multiplexer listening on %s port %d", self.server.host, port)
                task_status.started(port)
                if shutdown is not None:
                    await shutdown.wait()
                    self.health.set_all(NOT_SERVING)
                    self.server.shutdown(drain_timeout_secs)
            nursery.cancel_scope.cancel()


async def serve_multiplexer(
    config: ManagerConfig,
    registry: Registry,
    metrics: MultiplexerMetrics,
    *,
    shutdown: trio.Event | None = None,
    drain_timeout_secs: float = 0.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the multiplexer on ``config.grpc_port``; hands back the bound port."""
    server = MultiplexerServer(config, registry, metrics)
    await server.run(
        shutdown=shutdown, drain_timeout_secs=drain_timeout_secs, task_status=task_status
    )
