"""The multiplexer's gRPC server: TeiMultiplexer, health and reflection on ``grpc_port``.

The one place the server is built, so transport options (message size, stream
limits, and TLS when configured) apply to every service on the port alike.
"""

from __future__ import annotations

import logging
from typing import Final, NamedTuple

import trio

from tei_manager.auth.security import Security, build_security
from tei_manager.config import ManagerConfig
from tei_manager.core.instances import InstanceRecord, InstanceTable
from tei_manager.core.ondemand import Activity
from tei_manager.core.routing import Router, Starter
from tei_manager.errors import TeiError
from tei_manager.gateway.admission import Admission
from tei_manager.grpc.health import NOT_SERVING, SERVING, HealthServicer
from tei_manager.grpc.reflection import reflection_servicers
from tei_manager.grpc.rpc import GrpcError
from tei_manager.grpc.server import GrpcServer
from tei_manager.multiplexer.auth import grpc_authorizer
from tei_manager.multiplexer.metrics import MultiplexerMetrics
from tei_manager.multiplexer.pool import ConnectionPool
from tei_manager.multiplexer.service import Multiplexer
from tei_manager.supervisor.launch import INSTANCE_HOST

__all__ = ["MultiplexerServer", "SharedRouting", "serve_multiplexer", "shared_routing"]

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
        shared: SharedRouting | None = None,
        activity: Activity | None = None,
        starter: Starter | None = None,
    ) -> None:
        """``shared`` (router, pool and admission), when given, is shared with the
        HTTP inference routes (see :func:`shared_routing`); a given pool is run by its
        owner, one made here by :meth:`run`. Without it, ``activity`` and ``starter``
        (models on demand) go to the one made here."""
        if security is None:  # counters on no registry: serve() passes the shared one
            security = build_security(config, None)
        max_message_bytes = config.grpc_max_message_size_mb * _MIB
        limits = config.grpc_limits()
        self._owns_pool = shared is None
        if shared is None:
            shared = shared_routing(config, instances, activity=activity, starter=starter)
        self.router = shared.router
        self.pool = shared.pool
        self.admission = shared.admission
        self.service = Multiplexer(
            self.router,
            self.pool,
            metrics,
            admission=self.admission,
            request_timeout=config.grpc_request_timeout_secs,
            stream_idle_timeout=config.grpc_request_timeout_secs,
            arrow_dtype=config.arrow_output_dtype,
            stream_batches=config.stream_batch_concurrency(),
        )
        if config.stream_batch_concurrency() != config.grpc_stream_max_concurrent_batches:
            log.warning(
                "grpc_stream_max_concurrent_batches = %d is outside 1-64: using %d",
                config.grpc_stream_max_concurrent_batches,
                config.stream_batch_concurrency(),
            )
        names = [Multiplexer.SERVICE]
        self.health = HealthServicer({name: NOT_SERVING for name in ["", *names]})
        self.server = GrpcServer(
            [self.service, self.health, *reflection_servicers([*names, self.health.SERVICE])],
            host=config.api_host,
            port=config.grpc_port,
            max_message_bytes=max_message_bytes,
            limits=limits,
            ssl_context=security.tls.grpc_context if security.tls is not None else None,
            authorize=grpc_authorizer(security),
        )
        metrics.listener.watch(self.server.statistics)

    async def run(
        self,
        *,
        shutdown: trio.Event | None = None,
        drain_timeout_secs: float = 0.0,
        ready: trio.Event | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled, or until ``shutdown``: then drain for up to the timeout.

        Health reports SERVING once listening and ``ready`` is set (the manager's
        readiness gate, ``ready_requires_instances``; None: at once), as
        ``/health/ready`` does; NOT_SERVING again from ``shutdown`` on.
        """
        async with trio.open_nursery() as nursery:
            if self._owns_pool:
                await nursery.start(self.pool.run)
            async with trio.open_nursery() as serving:
                port: int = await serving.start(self.server.run)
                announce = trio.CancelScope()
                if ready is None or ready.is_set():
                    self.health.set_all(SERVING)
                else:
                    serving.start_soon(self._serving_when, ready, announce)
                log.info(
                    "gRPC multiplexer listening on %s port %d%s",
                    self.server.host,
                    port,
                    " (TLS)" if self.server.ssl_context is not None else "",
                )
                task_status.started(port)
                if shutdown is not None:
                    await shutdown.wait()
                    announce.cancel()
                    self.health.set_all(NOT_SERVING)
                    self.server.shutdown(drain_timeout_secs)
            nursery.cancel_scope.cancel()

    async def _serving_when(self, ready: trio.Event, scope: trio.CancelScope) -> None:
        with scope:
            await ready.wait()
            self.health.set_all(SERVING)


class SharedRouting(NamedTuple):
    """What every front door shares: the router (in-flight counts, suspects), the
    pool of HTTP/2 connections to the instances (one per instance process) and the
    per-instance admission (limit, queue)."""

    router: Router
    pool: ConnectionPool
    admission: Admission


def shared_routing(
    config: ManagerConfig,
    instances: InstanceTable,
    *,
    activity: Activity | None = None,
    starter: Starter | None = None,
) -> SharedRouting:
    """The :class:`SharedRouting` of ``instances``, set up from ``config``.

    ``activity`` and ``starter``: the manager's, for models on demand (its idle
    timers and eviction see the calls in flight on every door; a call to an idle
    on-demand instance starts it through :meth:`Router.ensure_running`, which the
    pool awaits before it connects).
    """
    router = Router(instances, clock=trio.current_time, activity=activity, starter=starter)

    async def ensure_running(record: InstanceRecord) -> None:
        # Within the calling request's deadline; the refusal as a gRPC status.
        try:
            await router.ensure_running(record, trio.current_effective_deadline())
        except TeiError as error:
            raise GrpcError(error.grpc_status, error.message) from None

    # The public port's limits; the pool's connections to instances use the
    # same settings (keepalive pings included, when configured).
    limits = config.grpc_limits()
    # A connection that fails makes the router pass its replica over at once.
    pool = ConnectionPool(
        INSTANCE_HOST,
        instances.find,
        max_message_bytes=config.grpc_max_message_size_mb * _MIB,
        limits=limits,
        on_lost=router.suspect,
        on_connected=router.cleared,
        before_connect=ensure_running,
    )
    admission = Admission(
        max_queued=config.max_queued_requests, queue_timeout=config.queue_timeout_secs
    )
    return SharedRouting(router, pool, admission)


async def serve_multiplexer(
    config: ManagerConfig,
    instances: InstanceTable,
    metrics: MultiplexerMetrics,
    *,
    shared: SharedRouting | None = None,
    shutdown: trio.Event | None = None,
    drain_timeout_secs: float = 0.0,
    security: Security | None = None,
    activity: Activity | None = None,
    starter: Starter | None = None,
    ready: trio.Event | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the multiplexer on ``config.grpc_port``; hands back the bound port.
    Health is SERVING once ``ready`` is set (see :meth:`MultiplexerServer.run`)."""
    server = MultiplexerServer(
        config, instances, metrics, security, shared=shared, activity=activity, starter=starter
    )
    await server.run(
        shutdown=shutdown,
        drain_timeout_secs=drain_timeout_secs,
        ready=ready,
        task_status=task_status,
    )
