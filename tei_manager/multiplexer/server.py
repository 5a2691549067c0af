"""The multiplexer's gRPC server: TeiMultiplexer, health and reflection on ``grpc_port``.

The one place the server is built, so transport options (message size, stream
limits, and TLS when configured) apply to every service on the port alike.
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from tei_manager.config import ManagerConfig
from tei_manager.core.instances import InstanceTable
from tei_manager.core.routing import Router
from tei_manager.grpc.health import NOT_SERVING, SERVING, HealthServicer
from tei_manager.grpc.reflection import reflection_servicers
from tei_manager.grpc.server import GrpcServer
from tei_manager.multiplexer.metrics import MultiplexerMetrics
from tei_manager.multiplexer.pool import ConnectionPool
from tei_manager.multiplexer.service import Multiplexer
from tei_manager.supervisor.launch import INSTANCE_HOST

__all__ = ["MultiplexerServer", "instance_pool", "serve_multiplexer"]

log = logging.getLogger(__name__)

_MIB: Final = 1024 * 1024


class MultiplexerServer:
    """The multiplexer service with its connection pool, health and reflection."""

    def __init__(
        self,
        config: ManagerConfig,
        instances: InstanceTable,
        metrics: MultiplexerMetrics,
        *,
        router: Router | None = None,
        pool: ConnectionPool | None = None,
    ) -> None:
        """``router`` and ``pool``, when given, are shared with the HTTP inference
        routes; a given pool is run by its owner, one made here by :meth:`run`."""
        max_message_bytes = config.grpc_max_message_size_mb * _MIB
        self.router = Router(instances) if router is None else router
        self._owns_pool = pool is None
        self.pool = instance_pool(config, instances) if pool is None else pool
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
            max_concurrent_streams=config.grpc_max_parallel_streams,
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
            if self._owns_pool:
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


def instance_pool(config: ManagerConfig, instances: InstanceTable) -> ConnectionPool:
    """The pool of HTTP/2 connections to the instances, one per instance process."""
    return ConnectionPool(
        INSTANCE_HOST, instances.find, max_message_bytes=config.grpc_max_message_size_mb * _MIB
    )


async def serve_multiplexer(
    config: ManagerConfig,
    instances: InstanceTable,
    metrics: MultiplexerMetrics,
    *,
    router: Router | None = None,
    pool: ConnectionPool | None = None,
    shutdown: trio.Event | None = None,
    drain_timeout_secs: float = 0.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the multiplexer on ``config.grpc_port``; hands back the bound port."""
    server = MultiplexerServer(config, instances, metrics, router=router, pool=pool)
    await server.run(
        shutdown=shutdown, drain_timeout_secs=drain_timeout_secs, task_status=task_status
    )
