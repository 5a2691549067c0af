"""The official grpcio client, driven by our MethodSpec tables: the independent reference
client of the tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

from tei_manager.grpc.rpc import GrpcError, MethodSpec, StatusCode


def stub(channel: grpc.Channel, spec: MethodSpec[Any, Any]) -> Any:
    """A grpcio callable for ``spec`` of the right shape, with its message types."""
    return getattr(channel, spec.cardinality.value)(
        spec.path,
        request_serializer=spec.request_type.SerializeToString,
        response_deserializer=spec.response_type.FromString,
    )


def call(port: int, spec: MethodSpec[Any, Any], requests: Sequence[Message]) -> list[Message]:
    """Call ``spec`` on a local ``port``; the replies, or GrpcError for a non-OK status."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = stub(channel, spec)
        try:
            if spec.cardinality.client_streaming:
                result = method(iter(requests), timeout=60)
            else:
                (request,) = requests
                result = method(request, timeout=60)
            return list(result) if spec.cardinality.server_streaming else [result]
        except grpc.RpcError as error:
            raise GrpcError(StatusCode(error.code().value[0]), error.details() or "") from None
