"""grpc.health.v1: per-service serving status, ``Check`` and ``Watch``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio

from tei_manager._proto.grpc.health.v1 import health_grpc, health_pb2
from tei_manager.grpc.calls import CallContext
from tei_manager.grpc.rpc import GrpcError, StatusCode

ServingStatus = health_pb2.HealthCheckResponse.ServingStatus
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_grpc.HealthServicer):
    """Serving status by service name; "" is the server as a whole."""

    def __init__(self, services: dict[str, ServingStatus] | None = None) -> None:
        self._status: dict[str, ServingStatus] = {"": NOT_SERVING, **(services or {})}
        self._changed = trio.Event()

    def set(self, service: str, status: ServingStatus) -> None:
        self._status[service] = status
        self._changed.set()
        self._changed = trio.Event()

    def set_all(self, status: ServingStatus) -> None:
        """Set every known service (and the server) to ``status``."""
        for service in list(self._status):
            self._status[service] = status
        self._changed.set()
        self._changed = trio.Event()

    def status(self, service: str = "") -> ServingStatus | None:
        return self._status.get(service)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: CallContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            raise GrpcError(StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: CallContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: ServingStatus | None = None
        while True:
            changed = self._changed
            status = self._status.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await changed.wait()
