"""The multiplexer's on-demand hook: a request to an idle instance starts it and is answered.

The starter here brings up an in-process tei.v1 backend after a delay, as a
process would load its model; the manager's own starter is tested in
``test_manager_ondemand.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import msgspec
import pytest
import trio
from prometheus_client import CollectorRegistry

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tei_manager.config import InstanceConfig, ManagerConfig
from tei_manager.core.instances import InstanceRecord, InstanceStatus, InstanceTable
from tei_manager.core.ondemand import Activity, StartPolicy
from tei_manager.core.ports import PortAllocator
from tei_manager.errors import ErrorCode, TeiError
from tei_manager.grpc.channel import open_channel
from tei_manager.grpc.rpc import GrpcError, StatusCode
from tei_manager.grpc.server import CallContext, GrpcServer
from tei_manager.multiplexer.metrics import MultiplexerMetrics
from tei_manager.multiplexer.server import MultiplexerServer

M = multiplexer_grpc.TeiMultiplexer
mux = multiplexer_pb2
LOAD_SECS = 0.3


class Backend(tei_grpc.EmbedServicer):
    def __init__(self, activity: Activity) -> None:
        self.activity = activity
        self.held: list[int] = []

    async def Embed(
        self, request: tei_pb2.EmbedRequest, context: CallContext
    ) -> tei_pb2.EmbedResponse:
        return tei_pb2.EmbedResponse(embeddings=[float(len(request.inputs))])

    async def EmbedStream(
        self, requests: AsyncIterator[tei_pb2.EmbedRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.EmbedResponse]:
        async for request in requests:
            self.held.append(self.activity.in_flight("od"))
            yield tei_pb2.EmbedResponse(embeddings=[float(len(request.inputs))])


class Starter:
    """Starts the backend once, however many requests wait; refuses when ``refuse`` is set."""

    def __init__(self, nursery: trio.Nursery, backend: Backend) -> None:
        self.nursery = nursery
        self.backend = backend
        self.starts = 0
        self.refuse: str | None = None
        self._started: trio.Event | None = None

    async def __call__(self, record: InstanceRecord, deadline: float) -> None:
        if self.refuse is not None:
            raise TeiError(ErrorCode.CAPACITY_EXHAUSTED, self.refuse)
        if self._started is None:
            self._started = trio.Event()
            self.starts += 1
            record.mark_start_requested()
            await trio.sleep(LOAD_SECS)
            port = await self.nursery.start(GrpcServer([self.backend]).run)
            record.config = msgspec.structs.replace(record.config, port=port)
            record.mark_starting(4242, datetime.now(UTC))
            record.mark_running()
            self._started.set()
        await self._started.wait()


@pytest.fixture
async def setup(
    nursery: trio.Nursery,
) -> tuple[MultiplexerServer, Starter, InstanceTable, int]:
    table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    for name, start in (("od", StartPolicy.ON_DEMAND), ("off", StartPolicy.ON_DEMAND)):
        table.add(
            InstanceConfig(name=name, model_id=f"m/{name}", start=start),
            created_at=datetime.now(UTC),
        )
    table.request_stop("off")
    activity = Activity(trio.current_time)
    starter = Starter(nursery, Backend(activity))
    server = MultiplexerServer(
        ManagerConfig(api_host="127.0.0.1", grpc_port=0),
        table,
        MultiplexerMetrics(CollectorRegistry()),
        activity=activity,
        starter=starter,
    )
    port = await nursery.start(server.run)
    return server, starter, table, port


def _embed(target: multiplexer_pb2.Target, text: str = "abc") -> multiplexer_pb2.EmbedRequest:
    return mux.EmbedRequest(target=target, request=tei_pb2.EmbedRequest(inputs=text))


async def test_concurrent_first_requests_share_one_start_and_all_get_answers(
    setup: tuple[MultiplexerServer, Starter, InstanceTable, int],
) -> None:
    _server, starter, table, port = setup
    assert table.get("od").status is InstanceStatus.IDLE
    answers: list[float] = []
    began = trio.current_time()
    async with open_channel("127.0.0.1", port) as channel:

        async def call(target: multiplexer_pb2.Target) -> None:
            reply = await channel.unary_unary(M.Embed, _embed(target))
            answers.append(reply.embeddings[0])

        async with trio.open_nursery() as calls:
            for _ in range(4):
                calls.start_soon(call, mux.Target(instance_name="od"))
            calls.start_soon(call, mux.Target(model_id="m/od"))
            calls.start_soon(call, mux.Target(instance_index=0))
        assert answers == [3.0] * 6
        assert starter.starts == 1
        assert trio.current_time() - began >= LOAD_SECS
        # Warm now: the task-free path, no start.
        reply = await channel.unary_unary(M.Embed, _embed(mux.Target(instance_name="od")))
        assert reply.embeddings == [3.0] and starter.starts == 1


async def test_a_stream_starts_the_instance_and_holds_it_while_open(
    setup: tuple[MultiplexerServer, Starter, InstanceTable, int],
) -> None:
    server, starter, _table, port = setup
    async with open_channel("127.0.0.1", port) as channel:
        replies = []
        async with channel.open_call(M.EmbedStream) as call:
            for n in (1, 2, 3):
                await call.send(_embed(mux.Target(instance_name="od"), "x" * n))
                reply = await call.receive()
                assert reply is not None
                replies.append(reply.embeddings[0])
            await call.done_writing()
            assert await call.receive() is None
    assert replies == [1.0, 2.0, 3.0]
    assert starter.starts == 1
    assert starter.backend.held == [1, 1, 1]  # counted in flight throughout
    assert server.router.in_flight("od") == 0


async def test_stopped_instances_and_refused_starts_fail_fast_with_their_reason(
    setup: tuple[MultiplexerServer, Starter, InstanceTable, int],
) -> None:
    _server, starter, _table, port = setup
    async with open_channel("127.0.0.1", port) as channel:
        with pytest.raises(GrpcError) as stopped:
            await channel.unary_unary(M.Embed, _embed(mux.Target(instance_name="off")))
        assert stopped.value.code is StatusCode.UNAVAILABLE
        assert "is stopped by an operator" in stopped.value.message
        starter.refuse = 'instance "od" needs 1.0 GiB but cpu has 0.5 GiB left'
        with pytest.raises(GrpcError) as refused:
            await channel.unary_unary(M.Embed, _embed(mux.Target(instance_name="od")))
        assert refused.value.code is StatusCode.RESOURCE_EXHAUSTED
        assert "needs 1.0 GiB but cpu has 0.5 GiB left" in refused.value.message
    assert starter.starts == 0
