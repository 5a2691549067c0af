"""``tei-manager worker``: serve one model over tei.v1 gRPC, like text-embeddings-router.

Start-up binds the port first and answers health NOT_SERVING (and UNAVAILABLE
to model calls) while the model loads; then SERVING. SIGTERM/SIGINT: health goes
NOT_SERVING, new calls are refused, running calls finish (up to the grace
period), exit 0. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
from typing import Any

import trio
from prometheus_client import start_http_server

from tei_manager.grpc.health import NOT_SERVING, SERVING, HealthServicer
from tei_manager.grpc.limits import Limits
from tei_manager.grpc.reflection import reflection_servicers
from tei_manager.grpc.rpc import MethodSpec, StatusCode
from tei_manager.grpc.server import GrpcServer
from tei_manager.worker.engine import Engine
from tei_manager.worker.metrics import WorkerMetrics
from tei_manager.worker.options import WorkerOptions, options_from_namespace
from tei_manager.worker.priority import lower_other_threads
from tei_manager.worker.service import EngineHolder, tei_servicers

log = logging.getLogger("tei_manager.worker")

SHUTDOWN_GRACE_SECS = 30.0


class Worker:
    """One worker process: gRPC server, health, metrics and the engine."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.holder = EngineHolder()
        services = tei_servicers(self.holder)
        names = [s.SERVICE for s in services]
        self.health = HealthServicer({name: NOT_SERVING for name in names})
        self.metrics = WorkerMetrics(
            lambda: None if self.holder.engine is None else self.holder.engine.statistics()
        )
        self.server = GrpcServer(
            [*services, self.health, *reflection_servicers([*names, self.health.SERVICE])],
            host=options.hostname,
            port=options.port,
            # The engine refuses more anyway; more streams would only hold memory.
            limits=Limits(max_concurrent_streams=options.max_concurrent_requests),
            on_call=self._observe,
        )

    def _observe(self, spec: MethodSpec[Any, Any], seconds: float, code: StatusCode) -> None:
        if spec.service.startswith("tei.v1."):
            error = None if code == StatusCode.OK else code.name.lower()
            self.metrics.observe(spec.name, seconds, error)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``shutdown`` finishes draining (or cancellation)."""
        options = self.options
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(self._serve_grpc, nursery)
            log.info("gRPC server listening", extra={"port": port, "host": options.hostname})
            if options.prometheus_port is not None:
                start_http_server(options.prometheus_port, registry=self.metrics.registry)
                log.info("metrics listening", extra={"port": options.prometheus_port})
            log.info("loading model", extra={"model_id": options.model_id})
            started = trio.current_time()
            engine = await trio.to_thread.run_sync(Engine.load, options, abandon_on_cancel=True)
            await nursery.start(engine.run)
            lower_other_threads()
            self.holder.engine = engine
            self.health.set_all(SERVING)
            log.info(
                "Ready",
                extra={
                    "port": port,
                    "model_id": engine.info.model_id,
                    "model_type": engine.info.model_type,
                    "load_secs": round(trio.current_time() - started, 3),
                },
            )
            task_status.started(port)

    async def _serve_grpc(
        self, nursery: trio.Nursery, *, task_status: trio.TaskStatus[int]
    ) -> None:
        await self.server.run(task_status=task_status)
        # The server returns once a shutdown has drained: stop the engine too.
        nursery.cancel_scope.cancel()

    def shutdown(self, grace: float = SHUTDOWN_GRACE_SECS) -> None:
        """Refuse new calls, let running ones finish, then stop."""
        self.health.set_all(NOT_SERVING)
        self.server.shutdown(grace)


async def run_worker(options: WorkerOptions) -> None:
    """Run a worker until SIGTERM/SIGINT, draining on the first, stopping on the second."""
    worker = Worker(options)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                await worker.run()
                nursery.cancel_scope.cancel()

            nursery.start_soon(serve)
            first = True
            async for signum in signals:
                if first:
                    log.info("shutting down", extra={"signal": signal.Signals(signum).name})
                    worker.shutdown()
                    first = False
                else:
                    log.info("second signal: stopping now")
                    nursery.cancel_scope.cancel()
    log.info("stopped")


def run_worker_from_args(args: argparse.Namespace) -> int:
    """Run a worker from parsed command-line flags; the process exit status."""
    options = options_from_namespace(args)
    try:
        trio.run(run_worker, options)
    except Exception:
        log.exception("worker failed")
        return 1
    return 0
