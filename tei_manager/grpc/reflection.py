"""gRPC server reflection, v1 and v1alpha, so grpcurl and friends can list and call us."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from types import ModuleType
from typing import Any

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor

from tei_manager._proto import _pool
from tei_manager._proto.grpc.reflection.v1 import reflection_grpc as v1_grpc
from tei_manager._proto.grpc.reflection.v1 import reflection_pb2 as v1_pb2
from tei_manager._proto.grpc.reflection.v1alpha import reflection_grpc as v1alpha_grpc
from tei_manager._proto.grpc.reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from tei_manager.grpc.calls import CallContext
from tei_manager.grpc.rpc import Servicer, StatusCode

_POOLS = (descriptor_pool.Default(), _pool.POOL)
REFLECTION_SERVICES = (
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
)


class _Index:
    """File descriptors of the served services, found by file name or symbol."""

    def __init__(self, service_names: Iterable[str]) -> None:
        self.service_names = sorted(set(service_names))
        self._pool_of: dict[str, Any] = {}
        for name in self.service_names:
            self._find(name, "FindServiceByName")

    def _find(self, name: str, finder: str) -> FileDescriptor | None:
        for pool in _POOLS:
            try:
                found = getattr(pool, finder)(name)
            except KeyError:
                continue
            return found if isinstance(found, FileDescriptor) else found.file
        return None

    def by_filename(self, name: str) -> FileDescriptor | None:
        return self._find(name, "FindFileByName")

    def by_symbol(self, symbol: str) -> FileDescriptor | None:
        for finder in ("FindServiceByName", "FindMessageTypeByName", "FindEnumTypeByName"):
            found = self._find(symbol, finder)
            if found is not None:
                return found
        service, _, method = symbol.rpartition(".")
        if service and method:
            svc_file = self._find(service, "FindServiceByName")
            if (
                svc_file is not None
                and method in svc_file.services_by_name[service.rpartition(".")[2]].methods_by_name
            ):
                return svc_file
        return None

    @staticmethod
    def with_dependencies(root: FileDescriptor) -> list[bytes]:
        seen: dict[str, bytes] = {}
        todo = [root]
        while todo:
            file = todo.pop()
            if file.name in seen:
                continue
            seen[file.name] = file.serialized_pb
            todo.extend(file.dependencies)
        return list(seen.values())


def _make_servicer(grpc_module: ModuleType, pb2: ModuleType, index: _Index) -> Servicer:
    base = grpc_module.ServerReflectionServicer

    class _Reflection(base):  # type: ignore[misc, valid-type]
        async def ServerReflectionInfo(
            self, requests: AsyncIterator[Any], context: CallContext
        ) -> AsyncIterator[Any]:
            async for request in requests:
                yield _answer(pb2, index, request)

    servicer: Servicer = _Reflection()
    return servicer


def _answer(pb2: ModuleType, index: _Index, request: Any) -> Any:
    response = pb2.ServerReflectionResponse(valid_host=request.host, original_request=request)
    kind = request.WhichOneof("message_request")
    file: FileDescriptor | None = None
    if kind == "list_services":
        for name in index.service_names:
            response.list_services_response.service.add(name=name)
        return response
    if kind == "file_by_filename":
        file = index.by_filename(request.file_by_filename)
        missing = f"file {request.file_by_filename!r} not found"
    elif kind == "file_containing_symbol":
        file = index.by_symbol(request.file_containing_symbol)
        missing = f"symbol {request.file_containing_symbol!r} not found"
    else:
        missing = "no extensions are defined"
    if file is None:
        response.error_response.error_code = int(StatusCode.NOT_FOUND)
        response.error_response.error_message = missing
        return response
    response.file_descriptor_response.file_descriptor_proto.extend(index.with_dependencies(file))
    return response


def reflection_servicers(service_names: Iterable[str]) -> list[Servicer]:
    """Servicers for reflection v1 and v1alpha describing ``service_names`` (and themselves)."""
    index = _Index([*service_names, *REFLECTION_SERVICES])
    return [
        _make_servicer(v1_grpc, v1_pb2, index),
        _make_servicer(v1alpha_grpc, v1alpha_pb2, index),
    ]
