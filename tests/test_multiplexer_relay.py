"""The relay's edges, against an in-process tei.v1 backend whose behaviour the test controls:
deadlines, cancellation, message size, stream idleness and reconnection."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import pyarrow as pa
import pytest
import trio
from prometheus_client import CollectorRegistry

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tei_manager.config import InstanceConfig, ManagerConfig
from tei_manager.core.instances import InstanceStatus, InstanceTable
from tei_manager.core.ports import PortAllocator
from tei_manager.grpc.calls import CallContext
from tei_manager.grpc.channel import Channel, open_channel
from tei_manager.grpc.rpc import GrpcError, StatusCode
from tei_manager.grpc.server import GrpcServer
from tei_manager.multiplexer.metrics import MultiplexerMetrics
from tei_manager.multiplexer.server import MultiplexerServer
from tei_manager.multiplexer.service import Multiplexer

M = multiplexer_grpc.TeiMultiplexer
mux = multiplexer_pb2


class Backend(tei_grpc.EmbedServicer):
    """Embeds ``hang`` by never answering; records what it was asked and what was cancelled."""

    def __init__(self) -> None:
        self.cancelled = 0
        self.seen: list[str] = []
        self.metadata: list[tuple[tuple[str, str], ...]] = []
        self.timeouts: list[float | None] = []

    async def Embed(
        self, request: tei_pb2.EmbedRequest, context: CallContext
    ) -> tei_pb2.EmbedResponse:
        self.seen.append(request.inputs)
        self.metadata.append(context.metadata)
        self.timeouts.append(context.time_remaining())
        if request.inputs == "hang":
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                self.cancelled += 1
                raise
        return tei_pb2.EmbedResponse(embeddings=[float(len(request.inputs))])

    async def EmbedStream(
        self, requests: AsyncIterator[tei_pb2.EmbedRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.EmbedResponse]:
        self.metadata.append(context.metadata)
        try:
            async for request in requests:
                if request.inputs == "hang":
                    await trio.sleep_forever()
                yield tei_pb2.EmbedResponse(embeddings=[float(len(request.inputs))])
        except (trio.Cancelled, GrpcError):  # a reset arrives as either, whichever is first
            self.cancelled += 1
            raise


class Setup:
    def __init__(self, nursery: trio.Nursery, backend: Backend, config: ManagerConfig) -> None:
        self.nursery = nursery
        self.backend = backend
        self.config = config
        self.registry = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
        self.backend_server: GrpcServer | None = None
        self.mux: MultiplexerServer | None = None
        self.mux_port = 0

    async def start_backend(self) -> int:
        self.backend_server = GrpcServer([self.backend])
        port: int = await self.nursery.start(self.backend_server.run)
        return port

    async def start(self) -> None:
        port = await self.start_backend()
        record = self.registry.add(
            InstanceConfig(name="b", model_id="m/b"), created_at=datetime.now(UTC)
        )
        record.config = msgspec.structs.replace(record.config, port=port)
        record.status = InstanceStatus.RUNNING
        record.pid = 1
        self.mux = MultiplexerServer(
            self.config, self.registry, MultiplexerMetrics(CollectorRegistry())
        )
        self.mux_port = await self.nursery.start(self.mux.run)

    def embed(self, text: str) -> multiplexer_pb2.EmbedRequest:
        return mux.EmbedRequest(
            target=mux.Target(instance_name="b"), request=tei_pb2.EmbedRequest(inputs=text)
        )


async def _setup(nursery: trio.Nursery, **settings: Any) -> Setup:
    config = ManagerConfig(api_host="127.0.0.1", grpc_port=0, **settings)
    setup = Setup(nursery, Backend(), config)
    await setup.start()
    return setup


async def _wait_for(condition: Any) -> None:
    for _ in range(500):
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError("condition not met within 5 s")


async def _warm_up(setup: Setup, channel: Channel, warm: bool) -> None:
    """With ``warm``, one call first: later unary calls then take the task-free path."""
    if warm:
        await channel.unary_unary(M.Embed, setup.embed("warm"))
        assert setup.mux is not None and setup.mux.pool.connected("b")


# Cold: the call connects to the instance (in a task). Warm: it is relayed from
# the connections' readers, with no task of its own.
temperatures = pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])


async def test_warm_unary_calls_take_no_task(monkeypatch: pytest.MonkeyPatch) -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        async with open_channel("127.0.0.1", setup.mux_port) as channel:
            await _warm_up(setup, channel, True)

            async def no_task(*args: Any) -> None:
                raise AssertionError("a task ran the call")

            monkeypatch.setattr(Multiplexer, "_relay_later", no_task)
            monkeypatch.setattr(Multiplexer, "_unary", no_task)
            for text in ("a", "bb", "ccc"):
                reply = await channel.unary_unary(M.Embed, setup.embed(text))
                assert list(reply.embeddings) == [float(len(text))]
            with pytest.raises(GrpcError) as error:
                await channel.unary_unary(
                    M.Embed, mux.EmbedRequest(target=mux.Target(instance_name="nope"))
                )
            assert error.value.code == StatusCode.NOT_FOUND
        nursery.cancel_scope.cancel()


@temperatures
async def test_unary_timeout_is_deadline_exceeded_and_cancels_the_backend(warm: bool) -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery, grpc_request_timeout_secs=0.2)
        async with open_channel("127.0.0.1", setup.mux_port) as channel:
            await _warm_up(setup, channel, warm)
            with pytest.raises(GrpcError) as error:
                await channel.unary_unary(M.Embed, setup.embed("hang"))
            assert error.value.code == StatusCode.DEADLINE_EXCEEDED
            assert "grpc_request_timeout_secs" in error.value.message
            await _wait_for(lambda: setup.backend.cancelled == 1)
            # (The instance may see the propagated deadline first: wait, do not race.)
            await _wait_for(lambda: setup.mux is not None and not setup.mux.router.in_flight("b"))
            # The connection to the instance is still good for the next call.
            reply = await channel.unary_unary(M.Embed, setup.embed("four"))
            assert list(reply.embeddings) == [4.0]
        nursery.cancel_scope.cancel()


@temperatures
async def test_client_deadline_and_metadata_reach_the_backend(warm: bool) -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        async with open_channel("127.0.0.1", setup.mux_port) as channel:
            await _warm_up(setup, channel, warm)
            with trio.move_on_after(5):
                await channel.unary_unary(
                    M.Embed,
                    setup.embed("abc"),
                    metadata=(
                        ("x-request-id", "r-1"),
                        ("authorization", "Bearer secret"),
                        ("x-ssl-client-cert", "-----BEGIN%20CERTIFICATE-----"),
                    ),
                )
            timeout = setup.backend.timeouts[-1]
            assert timeout is not None and 0 < timeout <= 5
            relayed = setup.backend.metadata[-1]
            assert ("x-request-id", "r-1") in relayed
            # The client's credentials are ours to check, never the instance's to see.
            assert not {"authorization", "x-ssl-client-cert"} & {key for key, _ in relayed}
            calls = len(setup.backend.metadata)
            with trio.move_on_after(5):
                async with channel.open_call(
                    M.EmbedStream, metadata=(("authorization", "Bearer secret"),)
                ) as call:
                    await call.send(setup.embed("x"))
                    assert await call.receive() is not None
            assert len(setup.backend.metadata) == calls + 1
            assert "authorization" not in {key for key, _ in setup.backend.metadata[-1]}
        nursery.cancel_scope.cancel()


@temperatures
async def test_client_cancellation_cancels_the_backend_call(warm: bool) -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        async with open_channel("127.0.0.1", setup.mux_port) as channel:
            await _warm_up(setup, channel, warm)
            with trio.move_on_after(0.3):
                await channel.unary_unary(M.Embed, setup.embed("hang"))
            await _wait_for(lambda: setup.backend.cancelled == 1)
            # (The instance may see the propagated deadline first: wait, do not race.)
            await _wait_for(lambda: setup.mux is not None and not setup.mux.router.in_flight("b"))
            with trio.move_on_after(0.3):
                async with channel.open_call(M.EmbedStream) as call:
                    await call.send(setup.embed("x"))
                    assert await call.receive() is not None
                    await call.send(mux.EmbedRequest(request=tei_pb2.EmbedRequest(inputs="hang")))
                    await call.receive()
            await _wait_for(lambda: setup.backend.cancelled == 2)
        nursery.cancel_scope.cancel()


async def test_idle_stream_times_out() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery, grpc_request_timeout_secs=0.2)
        async with open_channel("127.0.0.1", setup.mux_port) as channel:
            async with channel.open_call(M.EmbedStream) as call:
                await call.send(setup.embed("xy"))
                first = await call.receive()
                assert first is not None and list(first.embeddings) == [2.0]
                # Nothing more is sent: after the idle timeout the stream fails.
                with pytest.raises(GrpcError) as error, trio.fail_after(5):
                    await call.receive()
            assert error.value.code == StatusCode.DEADLINE_EXCEEDED
            assert "idle" in error.value.message
            await _wait_for(lambda: setup.backend.cancelled == 1)
        nursery.cancel_scope.cancel()


async def test_message_over_the_limit_is_resource_exhausted() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery, grpc_max_message_size_mb=1)
        async with open_channel(
            "127.0.0.1", setup.mux_port, max_message_bytes=8 * 1024 * 1024
        ) as channel:
            with pytest.raises(GrpcError) as error:
                await channel.unary_unary(M.Embed, setup.embed("x" * (2 * 1024 * 1024)))
            assert error.value.code == StatusCode.RESOURCE_EXHAUSTED
            # The connection survives the refused message.
            reply = await channel.unary_unary(M.Embed, setup.embed("ok"))
            assert list(reply.embeddings) == [2.0]
        assert setup.backend.seen == ["ok"]
        nursery.cancel_scope.cancel()


async def test_backend_restart_fails_the_stream_cleanly_and_the_next_call_reconnects() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        assert setup.mux is not None and setup.backend_server is not None
        async with open_channel("127.0.0.1", setup.mux_port) as channel:
            async with channel.open_call(M.EmbedStream) as call:
                await call.send(setup.embed("one"))
                assert await call.receive() is not None
                assert setup.mux.pool.connected("b")
                # The instance goes away mid-stream (its process died)...
                setup.backend_server.shutdown()
                with pytest.raises(GrpcError) as error, trio.fail_after(5):
                    await call.receive()
            assert error.value.code == StatusCode.UNAVAILABLE
            assert error.value.message.startswith('instance "b"')
            # ...and comes back as a new process on a new port.
            port = await setup.start_backend()
            record = setup.registry.get("b")
            record.config = msgspec.structs.replace(record.config, port=port)
            record.pid = 2
            reply = await channel.unary_unary(M.Embed, setup.embed("again"))
            assert list(reply.embeddings) == [5.0]
        nursery.cancel_scope.cancel()


async def test_instance_lost_under_a_warm_unary_call_fails_it_naming_the_instance() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        assert setup.backend_server is not None
        async with open_channel("127.0.0.1", setup.mux_port) as channel:
            await _warm_up(setup, channel, True)
            async with trio.open_nursery() as calls:

                async def hang() -> None:
                    with pytest.raises(GrpcError) as error, trio.fail_after(5):
                        await channel.unary_unary(M.Embed, setup.embed("hang"))
                    assert error.value.code == StatusCode.UNAVAILABLE
                    assert error.value.message.startswith('instance "b"')

                calls.start_soon(hang)
                await _wait_for(lambda: "hang" in setup.backend.seen)
                setup.backend_server.shutdown()
        nursery.cancel_scope.cancel()


async def test_pool_shares_one_connection_and_sweeps_stopped_instances() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        assert setup.mux is not None
        pool = setup.mux.pool
        async with open_channel("127.0.0.1", setup.mux_port) as channel:

            async def one(i: int) -> None:
                await channel.unary_unary(M.Embed, setup.embed("x" * i))

            async with trio.open_nursery() as calls:
                for i in range(20):
                    calls.start_soon(one, i)
            assert len(pool) == 1
            connection = pool._entries["b"].channel
            assert isinstance(connection, Channel)
            await channel.unary_unary(M.Embed, setup.embed("x"))
            assert pool._entries["b"].channel is connection
            setup.registry.get("b").status = InstanceStatus.STOPPED
            pool.sweep()
            assert not pool.connected("b")
            with pytest.raises(GrpcError) as error:
                await channel.unary_unary(M.Embed, setup.embed("x"))
            assert error.value.code == StatusCode.UNAVAILABLE
            assert "stopped" in error.value.message
        nursery.cancel_scope.cancel()


@temperatures
async def test_metadata_names_the_target_when_the_message_does_not(warm: bool) -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        untargeted = mux.EmbedRequest(request=tei_pb2.EmbedRequest(inputs="abc"))
        async with open_channel("127.0.0.1", setup.mux_port) as channel:
            await _warm_up(setup, channel, warm)
            for key, value in (("x-tei-instance", "b"), ("x-tei-model", "m/b")):
                reply = await channel.unary_unary(M.Embed, untargeted, metadata=((key, value),))
                assert list(reply.embeddings) == [3.0]
            agreeing = await channel.unary_unary(
                M.Embed, setup.embed("ab"), metadata=(("x-tei-instance", "b"),)
            )
            assert list(agreeing.embeddings) == [2.0]
            async with channel.open_call(M.EmbedStream, metadata=(("x-tei-model", "m/b"),)) as call:
                await call.send(untargeted)
                reply = await call.receive()
                assert reply is not None and list(reply.embeddings) == [3.0]
            refused = {
                # The message names an instance, the proxy routed on a model.
                "target.instance_name, x-tei-model": (
                    setup.embed("x"), (("x-tei-model", "m/b"),)
                ),
                "target.instance_name, x-tei-instance": (
                    setup.embed("x"), (("x-tei-instance", "other"),)
                ),
                "x-tei-instance, x-tei-model": (
                    untargeted, (("x-tei-instance", "b"), ("x-tei-model", "m/b"))
                ),
                "x-tei-model: is 5000 characters": (untargeted, (("x-tei-model", "m" * 5000),)),
            }  # fmt: skip
            for expected, (request, metadata) in refused.items():
                with pytest.raises(GrpcError) as error:
                    await channel.unary_unary(M.Embed, request, metadata=metadata)
                assert error.value.code == StatusCode.INVALID_ARGUMENT, expected
                assert error.value.message.startswith(expected), error.value.message
                assert len(error.value.message) < 300  # a value is never echoed whole
            with pytest.raises(GrpcError) as error:
                await channel.unary_unary(M.Embed, untargeted, metadata=(("x-tei-model", "nope"),))
            assert error.value.code == StatusCode.NOT_FOUND
        assert setup.backend.seen.count("abc") == 2  # the unary calls (streams are not logged)
        nursery.cancel_scope.cancel()


async def test_arrow_calls_take_their_target_from_metadata_too() -> None:
    table = pa.table({"text": ["abc", "de"]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    untargeted = mux.EmbedArrowRequest(arrow_ipc=sink.getvalue().to_pybytes())
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        async with open_channel("127.0.0.1", setup.mux_port) as channel:
            reply = await channel.unary_unary(
                M.EmbedArrow, untargeted, metadata=(("x-tei-model", "m/b"),)
            )
            rows = pa.ipc.open_stream(reply.arrow_ipc).read_all().column(0).to_pylist()
            assert rows == [[3.0], [2.0]]
            untargeted.target.CopyFrom(mux.Target(instance_name="b"))
            with pytest.raises(GrpcError) as error:
                await channel.unary_unary(
                    M.EmbedArrow, untargeted, metadata=(("x-tei-instance", "c"),)
                )
            assert error.value.code == StatusCode.INVALID_ARGUMENT
            assert error.value.message.startswith("target.instance_name, x-tei-instance")
        nursery.cancel_scope.cancel()
