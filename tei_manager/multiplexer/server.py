"""The multiplexer's gRPC server: TeiMultiplexer, health and reflection on ``grpc_port``.

The one place the server is built, so transport options (message size, stream
limits, and TLS when configured) apply to every service on the port alike.
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from tei_manager.auth.security import Security, build_security
from tei_manager.config import ManagerConfig
from tei_manager.core.instances import InstanceRecord, InstanceTable
from tei_manager.core.ondemand import Activity
from tei_manager.core.routing import Router, Starter
from tei_manager.errors import TeiError
from tei_manager.grpc.health import NOT_SERVING, SERVING, HealthServicer
from tei_manager.grpc.reflection import reflection_servicers
from tei_manager.grpc.rpc import GrpcError
from tei_manager.grpc.server import GrpcServer
from tei_manager.multiplexer.auth import grpc_authorizer
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
        self,
        config: ManagerConfig,
        instances: InstanceTable,
        metrics: MultiplexerMetrics,
        security: Security | None = None,
        *,
        activity: Activity | None = None,
        starter: Starter | None = None,
    ) -> None:
        if security is None:  # counters on no registry: serve() passes the shared one
            security = build_security(config, None)
        max_message_bytes = config.grpc_max_message_size_mb * _MIB
        # activity and starter: the manager's, for models on demand (its idle timers
        # and eviction see the calls in flight here).
        self.router = Router(instances, clock=trio.current_time, activity=activity, starter=starter)
        # A connection that fails makes the router pass its replica over at once.
        self.pool = ConnectionPool(
            INSTANCE_HOST,
            instances.find,
            max_message_bytes=max_message_bytes,
            on_lost=self.router.suspect,
            on_connected=self.router.cleared,
            before_connect=self._ensure_running,
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
            max_concurrent_streams=config.grpc_max_parallel_streams,
            ssl_context=security.tls.grpc_context if security.tls is not None else None,
            authorize=grpc_authorizer(security),
        )

    async def _ensure_running(self, record: InstanceRecord) -> None:
        """Start an on-demand instance within the calling request's deadline."""
        try:
            await self.router.ensure_running(record, trio.current_effective_deadline())
        except TeiError as error:
            raise GrpcError(error.grpc_status, error.message) from None

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
                log.info(
                    "gRPC multiplexer listening on %s port %d%s",
                    self.server.host,
                    port,
                    " (TLS)" if self.server.ssl_context is not None else "",
                )
                task_status.started(port)
                if shutdown is not None:
                    await shutdown.wait()
                    self.health.set_all(NOT_SERVING)
                    self.server.shutdown(drain_timeout_secs)
            nursery.cancel_scope.cancel()


async def serve_multiplexer(
    config: ManagerConfig,
    instances: InstanceTable,
    metrics: MultiplexerMetrics,
    *,
    shutdown: trio.Event | None = None,
    drain_timeout_secs: float = 0.0,
    security: Security | None = None,
    activity: Activity | None = None,
    starter: Starter | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the multiplexer on ``config.grpc_port``; hands back the bound port."""
    server = MultiplexerServer(
        config, instances, metrics, security, activity=activity, starter=starter
    )
    await server.run(
        shutdown=shutdown, drain_timeout_secs=drain_timeout_secs, task_status=task_status
    )
