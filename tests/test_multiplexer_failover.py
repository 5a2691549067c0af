"""Failover to a live replica and Arrow pacing, against in-process tei.v1 replicas
that the test can kill.

Each replica is reached through a TCP relay of its own; killing it closes the
relay's listener and every connection through it at once, with no HTTP/2 frame
(no GOAWAY, no RST_STREAM): what the multiplexer sees when a process dies.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import pyarrow as pa
import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest

from tei_manager._proto.tei.v1 import tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_pb2
from tei_manager.config import InstanceConfig, ManagerConfig
from tei_manager.core.instances import InstanceRecord, InstanceStatus, InstanceTable
from tei_manager.core.ports import PortAllocator
from tei_manager.grpc.calls import CallContext
from tei_manager.grpc.channel import Channel, open_channel
from tei_manager.grpc.rpc import GrpcError, StatusCode
from tei_manager.grpc.server import GrpcServer
from tei_manager.multiplexer.arrow import write_texts
from tei_manager.multiplexer.failover import call_failure, retry_model
from tei_manager.multiplexer.metrics import MultiplexerMetrics
from tei_manager.multiplexer.server import MultiplexerServer
from tests.test_multiplexer_relay import Backend, M, _wait_for

mux = multiplexer_pb2
MODEL = "m/replicated"
OVERLOADED = "Model is overloaded"


class Replica(Backend):
    """A tei.v1 backend that runs until :meth:`kill` drops its listener and connections.

    ``fail`` answers with a status of its own (UNAVAILABLE, as an overloaded TEI
    might); ``slow`` takes a moment; ``stall`` never gets an answer while
    ``stalling``; the streams admit at most ``limit`` messages in
    flight across all calls, refusing more with RESOURCE_EXHAUSTED as TEI does.
    """

    def __init__(self, limit: int = 512) -> None:
        super().__init__()
        self.limit = limit
        self.admitted = 0
        self.peak = 0
        self.overloaded = 0
        self.stalling = False
        self._scope: trio.CancelScope | None = None

    async def run(self, *, task_status: trio.TaskStatus[int]) -> None:
        """Serve until cancelled; the port handed back is the relay's."""
        async with trio.open_nursery() as nursery:
            backend_port = await nursery.start(GrpcServer([self]).run)

            async def relay(client: trio.SocketStream) -> None:
                up = await trio.open_tcp_stream("127.0.0.1", backend_port)
                async with client, up, trio.open_nursery() as pumps:
                    pumps.start_soon(_pump, client, up, pumps.cancel_scope)
                    pumps.start_soon(_pump, up, client, pumps.cancel_scope)

            with trio.CancelScope() as self._scope:
                listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
                task_status.started(listeners[0].socket.getsockname()[1])
                await trio.serve_listeners(relay, listeners)
            nursery.cancel_scope.cancel()

    def kill(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    async def Embed(
        self, request: tei_pb2.EmbedRequest, context: CallContext
    ) -> tei_pb2.EmbedResponse:
        if request.inputs == "fail":
            self.seen.append(request.inputs)
            raise GrpcError(StatusCode.UNAVAILABLE, "busy")
        if request.inputs == "stall" and self.stalling:
            self.seen.append(request.inputs)
            await trio.sleep_forever()
        if request.inputs.startswith("slow"):
            self.seen.append(request.inputs)
            await trio.sleep(0.002)
            return tei_pb2.EmbedResponse(embeddings=[float(len(request.inputs))])
        return await super().Embed(request, context)

    async def EmbedStream(
        self, requests: AsyncIterator[tei_pb2.EmbedRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.EmbedResponse]:
        assert context.nursery is not None
        send, receive = trio.open_memory_channel[tei_pb2.EmbedRequest | None](math.inf)

        async def admit() -> None:
            async for request in requests:
                if self.admitted >= self.limit:
                    self.overloaded += 1
                    send.send_nowait(None)
                    return
                self.admitted += 1
                self.peak = max(self.peak, self.admitted)
                send.send_nowait(request)
            send.close()

        context.nursery.start_soon(admit)
        async for request in receive:
            if request is None:
                raise GrpcError(StatusCode.RESOURCE_EXHAUSTED, OVERLOADED)
            await trio.sleep(0.001)
            self.admitted -= 1
            yield tei_pb2.EmbedResponse(embeddings=[float(len(request.inputs)), 1.0])


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        async for data in source:
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    done.cancel()  # either side closing closes both


class Replicas:
    """Replicas ``a`` and ``b`` of one model behind a multiplexer."""

    def __init__(self, nursery: trio.Nursery, limit: int = 512) -> None:
        self.nursery = nursery
        self.table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
        self.replicas = {"a": Replica(limit), "b": Replica(limit)}
        self.limit = limit
        self.prometheus = CollectorRegistry()
        self.mux: MultiplexerServer | None = None
        self.port = 0

    async def start(self, **settings: Any) -> None:
        for pid, (name, replica) in enumerate(self.replicas.items(), start=1):
            port = await self.nursery.start(replica.run)
            config = InstanceConfig(name=name, model_id=MODEL, max_concurrent_requests=self.limit)
            record = self.table.add(config, created_at=datetime.now(UTC))
            record.config = msgspec.structs.replace(record.config, port=port)
            record.status = InstanceStatus.RUNNING
            record.pid = pid
        config = ManagerConfig(api_host="127.0.0.1", grpc_port=0, **settings)
        self.mux = MultiplexerServer(config, self.table, MultiplexerMetrics(self.prometheus))
        self.port = await self.nursery.start(self.mux.run)

    def record(self, name: str) -> InstanceRecord:
        return self.table.get(name)

    def retries(self, reason: str | None = None) -> float:
        text = generate_latest(self.prometheus).decode()
        found = re.findall(
            r'tei_manager_grpc_retries_total\{method="\w+",reason="(\w+)"\} (\S+)', text
        )
        return sum(float(n) for r, n in found if reason is None or r == reason)


def by_model(text: str) -> multiplexer_pb2.EmbedRequest:
    return mux.EmbedRequest(
        target=mux.Target(model_id=MODEL), request=tei_pb2.EmbedRequest(inputs=text)
    )


def by_name(name: str, text: str) -> multiplexer_pb2.EmbedRequest:
    return mux.EmbedRequest(
        target=mux.Target(instance_name=name), request=tei_pb2.EmbedRequest(inputs=text)
    )


async def _embed(channel: Channel, request: multiplexer_pb2.EmbedRequest) -> float:
    with trio.fail_after(5):
        reply = await channel.unary_unary(M.Embed, request)
    return float(reply.embeddings[0])


# Warm: both connections are up, so calls take the task-free path. Cold: the
# first call to each replica connects, in a task.
temperatures = pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])


async def _warm_up(setup: Replicas, channel: Channel, warm: bool) -> None:
    if warm:
        for name in setup.replicas:
            await _embed(channel, by_name(name, "warm"))
        assert setup.mux is not None and len(setup.mux.pool) == 2


@temperatures
async def test_killing_a_replica_under_load_fails_no_call_routed_by_model(warm: bool) -> None:
    async with trio.open_nursery() as nursery:
        setup = Replicas(nursery)
        await setup.start()
        assert setup.mux is not None
        failures: list[GrpcError] = []
        answered = 0
        async with open_channel("127.0.0.1", setup.port) as channel:
            await _warm_up(setup, channel, warm)

            async def client(index: int) -> None:
                nonlocal answered
                for round_ in range(40):
                    text = f"slow-{index}-{round_}"
                    try:
                        assert await _embed(channel, by_model(text)) == len(text)
                        answered += 1
                    except GrpcError as error:
                        failures.append(error)

            async with trio.open_nursery() as clients:
                for index in range(8):
                    clients.start_soon(client, index)
                await _wait_for(lambda: answered >= 40)
                # The process dies; its record still says running (the supervisor
                # has not seen the exit yet).
                setup.replicas["a"].kill()
            assert not failures, failures[:3]
            assert answered == 8 * 40
            # The router heard of the lost connection at once and passes "a" over.
            assert setup.mux.router.suspected("a")
            seen_after = len(setup.replicas["a"].seen)
            assert await _embed(channel, by_model("after")) == 5
            assert len(setup.replicas["a"].seen) == seen_after
        nursery.cancel_scope.cancel()


@temperatures
async def test_call_in_flight_when_its_replica_dies_is_answered_by_the_other(warm: bool) -> None:
    async with trio.open_nursery() as nursery:
        setup = Replicas(nursery)
        await setup.start()
        a = setup.replicas["a"]
        a.stalling = True
        async with open_channel("127.0.0.1", setup.port) as channel:
            await _warm_up(setup, channel, warm)
            answer: list[float] = []

            async def call() -> None:
                answer.append(await _embed(channel, by_model("stall")))

            async with trio.open_nursery() as calls:
                calls.start_soon(call)
                # The first call routed by model goes to the first replica.
                await _wait_for(lambda: "stall" in a.seen)
                a.kill()
            assert answer == [5.0]
            assert setup.replicas["b"].seen == [*(["warm"] if warm else []), "stall"]
            assert setup.retries("lost") == 1
        nursery.cancel_scope.cancel()


async def test_dead_replica_is_skipped_after_one_connect_retry() -> None:
    async with trio.open_nursery() as nursery:
        setup = Replicas(nursery)
        await setup.start()
        setup.replicas["a"].kill()  # dead before any call: nothing listens on its port
        async with open_channel("127.0.0.1", setup.port) as channel:
            for i in range(6):
                assert await _embed(channel, by_model("x" * (i + 1))) == i + 1
            assert setup.retries("connect") == 1
            assert len(setup.replicas["b"].seen) == 6
        nursery.cancel_scope.cancel()


@temperatures
@pytest.mark.parametrize("kind", ["instance_name", "instance_index"])
async def test_call_routed_by_name_or_index_to_a_dead_replica_fails_cleanly(
    warm: bool, kind: str
) -> None:
    async with trio.open_nursery() as nursery:
        setup = Replicas(nursery)
        await setup.start()
        async with open_channel("127.0.0.1", setup.port) as channel:
            await _warm_up(setup, channel, warm)
            setup.replicas["a"].kill()
            target = mux.Target(instance_name="a") if kind == "instance_name" else mux.Target()
            if kind == "instance_index":
                target.instance_index = 0  # "a", the first created
            request = mux.EmbedRequest(target=target, request=tei_pb2.EmbedRequest(inputs="x"))
            for _ in range(2):  # a closed connection, then no connection at all
                with pytest.raises(GrpcError) as error:
                    await _embed(channel, request)
                assert error.value.code == StatusCode.UNAVAILABLE
                assert error.value.message.startswith('instance "a"')
            assert setup.retries() == 0
            assert "x" not in setup.replicas["b"].seen
        nursery.cancel_scope.cancel()


@temperatures
async def test_a_status_from_the_instance_is_never_retried(warm: bool) -> None:
    async with trio.open_nursery() as nursery:
        setup = Replicas(nursery)
        await setup.start()
        async with open_channel("127.0.0.1", setup.port) as channel:
            await _warm_up(setup, channel, warm)
            for _ in range(2):  # once to each replica
                with pytest.raises(GrpcError) as error:
                    await _embed(channel, by_model("fail"))
                assert error.value.code == StatusCode.UNAVAILABLE
                assert error.value.message == "busy"
            assert setup.replicas["a"].seen.count("fail") == 1
            assert setup.replicas["b"].seen.count("fail") == 1
            assert setup.retries() == 0
        nursery.cancel_scope.cancel()


async def test_no_other_replica_running_fails_with_the_first_error() -> None:
    async with trio.open_nursery() as nursery:
        setup = Replicas(nursery)
        await setup.start()
        setup.record("b").status = InstanceStatus.STOPPED
        setup.replicas["a"].kill()
        async with open_channel("127.0.0.1", setup.port) as channel:
            with pytest.raises(GrpcError) as error:
                await _embed(channel, by_model("x"))
            assert error.value.code == StatusCode.UNAVAILABLE
            assert error.value.message.startswith('instance "a"')
            assert setup.retries() == 0
        nursery.cancel_scope.cancel()


# -- Arrow pacing ----------------------------------------------------------------------------------
async def test_arrow_keeps_at_most_the_instance_limit_in_flight() -> None:
    async with trio.open_nursery() as nursery:
        setup = Replicas(nursery, limit=8)
        await setup.start()
        a = setup.replicas["a"]
        texts = [f"text {i}" for i in range(50)]
        rows: list[int] = []
        async with open_channel("127.0.0.1", setup.port) as channel:

            async def one() -> None:
                request = mux.EmbedArrowRequest(
                    target=mux.Target(instance_name="a"), arrow_ipc=write_texts(texts)
                )
                with trio.fail_after(10):
                    reply = await channel.unary_unary(M.EmbedArrow, request)
                rows.append(pa.ipc.open_stream(reply.arrow_ipc).read_all().num_rows)

            async with trio.open_nursery() as calls:
                for _ in range(4):  # 200 texts at once at an instance that accepts 8
                    calls.start_soon(one)
        assert rows == [50] * 4
        assert a.overloaded == 0
        assert a.peak == 8  # as much as it accepts, never more
        assert setup.mux is not None
        assert setup.mux.pool.pacer(setup.record("a")).in_flight == 0
        nursery.cancel_scope.cancel()


async def test_streams_are_not_retried() -> None:
    async with trio.open_nursery() as nursery:
        setup = Replicas(nursery)
        await setup.start()
        setup.replicas["a"].kill()
        async with open_channel("127.0.0.1", setup.port) as channel:
            with pytest.raises(GrpcError) as error, trio.fail_after(5):
                async with channel.open_call(M.EmbedStream) as call:
                    await call.send(by_model("x"))  # the first by model goes to "a"
                    await call.receive()
            assert error.value.code == StatusCode.UNAVAILABLE
            assert error.value.message.startswith('instance "a"')
            assert setup.retries() == 0
            assert "x" not in setup.replicas["b"].seen
        nursery.cancel_scope.cancel()


def test_what_may_be_retried() -> None:
    lost = GrpcError(StatusCode.UNAVAILABLE, "connection closed")
    assert call_failure(lost, replied=False, connection_usable=False) == "lost"
    assert call_failure(lost, replied=False, connection_usable=True) == "refused"
    assert call_failure(lost, replied=True, connection_usable=False) is None
    other = GrpcError(StatusCode.CANCELLED, "stream reset by peer")
    assert call_failure(other, replied=False, connection_usable=False) is None
    assert retry_model(("model_id", "m")) == "m"
    assert retry_model(("instance_name", "a")) is None
    assert retry_model(("instance_index", 0)) is None
    assert retry_model(None) is None
