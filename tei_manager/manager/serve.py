"""``tei-manager serve``: the manager, its REST API and (later) its gRPC multiplexer.

The root of the nursery tree::

    serve
    └── root nursery            (SIGTERM/SIGINT: graceful shutdown; a second one forces)
        ├── Manager.run         supervisor: instance processes, state file
        ├── ServerTls.run       TLS certificate reload on SIGHUP or file change (with TLS)
        ├── OtlpExporter.run    spans to the OTLP collector (with [otel] endpoint)
        ├── ConnectionPool.run  HTTP/2 connections to the instances, shared by the two below
        ├── serve_api           REST API, with the HTTP inference routes (gateway)
        └── serve_multiplexer   gRPC multiplexer (when grpc_enabled), stopped with the API

Both listeners share one :class:`~tei_manager.auth.security.Security` (authenticator,
rate-limit buckets, TLS contexts), built before anything starts so that a bad key,
certificate or CA file is a start-up error.

Graceful shutdown, within ``graceful_shutdown_timeout_secs`` (T):

1. ``manager.begin_shutdown()``: readiness answers 503 and the listeners (REST and
   gRPC) stop accepting and drain in-flight requests (each returns once drained);
   after T/2 they are cancelled whatever is still running.
2. The manager is cancelled: every instance gets SIGTERM at once, SIGKILL after its
   grace period (at most 10 s); the state is saved for the next start.
3. At T, whatever still runs is SIGKILLed. Exit status 0.

A second signal skips the waiting: listeners cancelled, instances SIGKILLed.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Final

import trio

from tei_manager import tracing
from tei_manager.auth.security import Security, build_security
from tei_manager.config import ConfigError, ManagerConfig, load_config
from tei_manager.logs import configure_logging
from tei_manager.manager.service import Manager

if TYPE_CHECKING:
    from tei_manager.otlp import OtlpExporter

__all__ = ["main", "serve"]

log = logging.getLogger("tei_manager.manager.serve")

# Share of the shutdown timeout given to draining requests; the rest is for instances.
_DRAIN_SHARE: Final = 0.5


async def serve(
    manager: Manager, security: Security | None = None, exporter: OtlpExporter | None = None
) -> None:
    """Run the manager and its listeners until a signal, then shut down gracefully.

    With an ``exporter`` (tracing on, :func:`tracing.install`) its task sends spans.
    """
    from tei_manager.api.server import serve_api
    from tei_manager.gateway.relay import create_gateway
    from tei_manager.multiplexer.server import shared_routing

    config = manager.config
    if security is None:
        security = build_security(config, manager.metrics.prometheus)
    # One router (in-flight counts, failover suspects), one connection per instance
    # and one admission (limit, queue) per instance for both doors; a call on either
    # to an idle on-demand instance starts it (the manager's activity and starter).
    shared = shared_routing(
        config,
        manager.instances,
        activity=manager.ondemand.activity,
        starter=manager.ensure_running,
    )
    gateway = create_gateway(
        config,
        manager.instances,
        manager.metrics.prometheus,
        shared,
    )
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as root:
            manager_task = _Service(manager.run)
            await root.start(manager_task.run)
            if security.tls is not None:
                await root.start(security.tls.run)
            if exporter is not None:
                exporter.watch(manager.metrics.prometheus)
                await root.start(exporter.run)
            await root.start(shared.pool.run)

            async def api(*, task_status: trio.TaskStatus[int]) -> None:
                await serve_api(
                    manager,
                    config.api_host,
                    config.api_port,
                    shutdown=manager.shutdown_requested,
                    drain_timeout_secs=config.graceful_shutdown_timeout_secs * _DRAIN_SHARE,
                    gateway=gateway,
                    security=security,
                    task_status=task_status,
                )

            listeners = [_Service(api)]
            if config.grpc_enabled:
                from tei_manager.multiplexer.metrics import MultiplexerMetrics
                from tei_manager.multiplexer.server import serve_multiplexer

                metrics = MultiplexerMetrics(manager.metrics.prometheus)

                async def grpc(*, task_status: trio.TaskStatus[int]) -> None:
                    await serve_multiplexer(
                        config,
                        manager.instances,
                        metrics,
                        shared=shared,
                        shutdown=manager.shutdown_requested,
                        drain_timeout_secs=config.graceful_shutdown_timeout_secs * _DRAIN_SHARE,
                        security=security,
                        ready=manager.instances_ready,
                        task_status=task_status,
                    )

                listeners.append(_Service(grpc))
            stop = trio.Event()
            for listener in listeners:
                await root.start(listener.run)
                listener.on_exit(stop.set)  # a listener that ends by itself ends the manager

            def force() -> None:
                log.warning("second signal: stopping now")
                manager.begin_shutdown()
                for listener in listeners:
                    listener.cancel()
                manager_task.cancel()
                manager.kill_now()

            root.start_soon(_watch_signals, signals, stop.set, force)
            await stop.wait()
            await _shutdown(manager, config, listeners, manager_task)
            root.cancel_scope.cancel()


async def _watch_signals(
    signals: AsyncIterator[int], first: Callable[[], None], again: Callable[[], None]
) -> None:
    seen = False
    async for signum in signals:
        if not seen:
            log.info("%s received: shutting down", signal.Signals(signum).name)
            seen = True
            first()
        else:
            again()


async def _shutdown(
    manager: Manager, config: ManagerConfig, listeners: list[_Service], manager_task: _Service
) -> None:
    timeout = config.graceful_shutdown_timeout_secs
    deadline = trio.current_time() + timeout
    manager.begin_shutdown()
    with trio.move_on_at(trio.current_time() + timeout * _DRAIN_SHARE):
        for listener in listeners:
            await listener.done.wait()
    for listener in listeners:
        listener.cancel()
        await listener.done.wait()
    manager_task.cancel()
    with trio.move_on_at(deadline):
        await manager_task.done.wait()
    if not manager_task.done.is_set():
        log.warning("instances still running after %g s: killing them", timeout)
        manager.kill_now()
        await manager_task.done.wait()
    log.info("shutdown complete")


class _Service:
    """A long-running service in its own cancel scope, with an event set when it ends."""

    def __init__(self, fn: Callable[..., Awaitable[object]]) -> None:
        self._fn = fn
        self._scope = trio.CancelScope()
        self.done = trio.Event()
        self._on_exit: list[Callable[[], None]] = []

    def on_exit(self, callback: Callable[[], None]) -> None:
        self._on_exit.append(callback)

    def cancel(self) -> None:
        self._scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._scope:
                await self._fn(task_status=task_status)
        finally:
            self.done.set()
            for callback in self._on_exit:
                callback()


def main(config_path: str | None, *, log_level: str = "info", log_format: str = "text") -> int:
    """Load the config, run the service; the process exit status.

    2 with one line on stderr for a configuration that cannot be used.
    """
    configure_logging(log_level, json_output=log_format == "json")
    try:
        config = load_config(config_path)
        manager = Manager(config)
        security = build_security(config, manager.metrics.prometheus)
        exporter = tracing.install(config.otel) if config.otel.enabled else None
    except ConfigError as e:
        print(f"tei-manager: {e}", file=sys.stderr)
        return 2
    status = 0
    try:
        trio.run(serve, manager, security, exporter)
    except* ConfigError as group:  # found at start-up, e.g. another manager on the state file
        print(f"tei-manager: {_first(group)}", file=sys.stderr)
        status = 2
    except* Exception:
        log.exception("tei-manager failed")
        status = 1
    finally:
        tracing.uninstall()
    return status


def _first(group: BaseExceptionGroup[ConfigError]) -> ConfigError:
    first = group.exceptions[0]
    return first if isinstance(first, ConfigError) else _first(first)
