"""The gRPC door shares each instance's admission (limit, FIFO queue) with HTTP.

One instance takes one request at a time (``max_concurrent_requests = 1``) and one
may wait (``max_queued_requests = 1``); a call beyond that is refused with
RESOURCE_EXHAUSTED and ``grpc-retry-pushback-ms``, read here by grpcio itself.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import grpc
import msgspec
import pytest
import trio
from prometheus_client import CollectorRegistry

from tei_manager._proto.tei.v1 import tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_pb2
from tei_manager.config import InstanceConfig, ManagerConfig
from tei_manager.core.instances import InstanceTable
from tei_manager.core.ports import PortAllocator
from tei_manager.gateway.errors import InferenceError, Kind
from tei_manager.gateway.relay import create_gateway
from tei_manager.grpc.channel import Channel, open_channel
from tei_manager.grpc.rpc import GrpcError, StatusCode
from tei_manager.grpc.server import GrpcServer
from tei_manager.multiplexer.metrics import MultiplexerMetrics
from tei_manager.multiplexer.server import MultiplexerServer, SharedRouting, shared_routing
from tests.test_multiplexer_relay import Backend, M, _wait_for

mux = multiplexer_pb2


class Door:
    """A multiplexer in front of instance "b" (a :class:`Backend`: "hang" never answers)."""

    def __init__(
        self,
        shared: SharedRouting,
        table: InstanceTable,
        port: int,
        backend: Backend,
        prometheus: CollectorRegistry,
    ) -> None:
        self.prometheus = prometheus
        self.shared = shared
        self.table = table
        self.port = port
        self.backend = backend

    def stats(self) -> tuple[int, int]:
        found = self.shared.admission.statistics().get("b")
        return (0, 0) if found is None else (found.in_flight, found.queued)


@pytest.fixture
async def door(nursery: trio.Nursery, tmp_path: Path) -> Door:
    config = ManagerConfig(
        api_host="127.0.0.1", grpc_port=0, max_queued_requests=1, queue_timeout_secs=30.0,
        state_file=str(tmp_path / "state.toml"), log_dir=str(tmp_path / "logs"),
    )  # fmt: skip
    backend = Backend()
    backend_port = await nursery.start(GrpcServer([backend]).run)
    table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    now = datetime.now(UTC)
    record = table.add(
        InstanceConfig(name="b", model_id="m/b", max_concurrent_requests=1), created_at=now
    )
    record.config = msgspec.structs.replace(record.config, port=backend_port)
    record.mark_starting(pid=1, now=now)
    record.mark_running()
    shared = shared_routing(config, table)
    await nursery.start(shared.pool.run)
    prometheus = CollectorRegistry()
    server = MultiplexerServer(config, table, MultiplexerMetrics(prometheus), shared=shared)
    port = await nursery.start(server.run)
    return Door(shared, table, port, backend, prometheus)


def embed(text: str) -> multiplexer_pb2.EmbedRequest:
    return mux.EmbedRequest(
        target=mux.Target(instance_name="b"), request=tei_pb2.EmbedRequest(inputs=text)
    )


def refused_by_grpcio(port: int) -> tuple[grpc.StatusCode, dict[str, str]]:
    """One Embed from the real gRPC client (in a thread): its status and trailers."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            "/tei_multiplexer.v1.TeiMultiplexer/Embed",
            request_serializer=mux.EmbedRequest.SerializeToString,
            response_deserializer=tei_pb2.EmbedResponse.FromString,
        )
        try:
            call(embed("late"), timeout=10)
        except grpc.RpcError as error:
            trailers = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
            return error.code(), trailers  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, {}


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_a_full_instance_queues_then_refuses_with_pushback(door: Door, warm: bool) -> None:
    async with open_channel("127.0.0.1", door.port) as channel:
        if warm:  # the connection to the instance is up: unary calls take no task
            await channel.unary_unary(M.Embed, embed("warm"))
        answers: list[str] = []

        async def call(text: str) -> None:
            try:
                reply = await channel.unary_unary(M.Embed, embed(text))
                answers.append(f"{text}={reply.embeddings[0]:g}")
            except GrpcError as error:
                answers.append(f"{text}:{error.code.name}")

        async with trio.open_nursery() as calls:
            hanging = trio.CancelScope()

            async def hang() -> None:
                with hanging:
                    await call("hang")

            calls.start_soon(hang)
            await _wait_for(lambda: "hang" in door.backend.seen)
            assert door.stats() == (1, 0)
            calls.start_soon(call, "queued")
            await _wait_for(lambda: door.stats() == (1, 1))
            code, trailers = await trio.to_thread.run_sync(refused_by_grpcio, door.port)
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert 1 <= int(trailers["grpc-retry-pushback-ms"]) <= 60_000
            assert "queued" not in door.backend.seen  # still waiting its turn
            hanging.cancel()  # the client gives up: its slot goes to the queued call
        assert answers == ["queued=6"]
        waited = door.prometheus.get_sample_value(
            "tei_manager_grpc_queued_seconds_count", {"method": "Embed"}
        )
        assert waited == 1
        assert door.backend.cancelled == 1
        assert door.stats() == (0, 0)


async def test_http_and_grpc_share_the_slot(door: Door) -> None:
    config = ManagerConfig(max_queued_requests=0)
    shared = door.shared
    gateway = create_gateway(
        config,
        door.table,
        CollectorRegistry(),
        shared,
    )
    async with open_channel("127.0.0.1", door.port) as channel, trio.open_nursery() as calls:

        async def hang(channel: Channel) -> None:
            await channel.unary_unary(M.Embed, embed("hang"))

        calls.start_soon(hang, channel)
        await _wait_for(lambda: "hang" in door.backend.seen)
        # The HTTP door waits in the same queue (room for one) ...
        with trio.move_on_after(0.2):
            async with gateway.session("/v1/embeddings", "b"):
                raise AssertionError("admitted past a busy instance")
        assert door.stats() == (1, 0)
        # ... and is refused once the queue is full.
        door.shared.admission.gate("b", 1).max_queued = 0
        with pytest.raises(InferenceError) as refused:
            async with gateway.session("/v1/embeddings", "b"):
                pass
        assert refused.value.kind is Kind.OVERLOADED
        calls.cancel_scope.cancel()


async def test_streams_hold_a_slot_too(door: Door) -> None:
    async with open_channel("127.0.0.1", door.port) as channel, trio.open_nursery() as calls:

        async def hang() -> None:
            await channel.unary_unary(M.Embed, embed("hang"))

        calls.start_soon(hang)
        await _wait_for(lambda: "hang" in door.backend.seen)
        door.shared.admission.gate("b", 1).max_queued = 0
        with pytest.raises(GrpcError) as refused:
            async with channel.open_call(M.EmbedStream) as stream:
                await stream.send(embed("s"))
                await stream.done_writing()
                await stream.receive()
        assert refused.value.code is StatusCode.RESOURCE_EXHAUSTED
        assert "overloaded" in refused.value.message
        calls.cancel_scope.cancel()
