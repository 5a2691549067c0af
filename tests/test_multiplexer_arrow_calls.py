"""The original's later Arrow API through the multiplexer, against an in-process tei.v1
backend whose behaviour the test controls: the new request fields, per-row errors,
f16, compression, EmbedArrowStream's ordering, concurrency, back-pressure and failures.
Called with our Channel and with the official grpcio client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import pyarrow as pa
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tei_manager.config import InstanceConfig, ManagerConfig
from tei_manager.core.instances import InstanceStatus, InstanceTable
from tei_manager.core.ports import PortAllocator
from tei_manager.grpc.calls import CallContext
from tei_manager.grpc.channel import Channel, open_channel
from tei_manager.grpc.rpc import GrpcError, StatusCode
from tei_manager.grpc.server import GrpcServer
from tei_manager.multiplexer import arrow
from tei_manager.multiplexer.arrow_relay import MAX_RESTARTS
from tei_manager.multiplexer.metrics import MultiplexerMetrics
from tei_manager.multiplexer.server import MultiplexerServer
from tests import grpcio_client
from tests.test_multiplexer_relay import _wait_for

M = multiplexer_grpc.TeiMultiplexer
mux = multiplexer_pb2
LZ4_FRAME_MAGIC = b"\x04\x22\x4d\x18"


class Backend(tei_grpc.EmbedServicer):
    """Embeds a text as ``[len(text), 1, 2, ...]`` (``dimensions`` wide, else 4).

    ``""`` and texts starting with ``bad`` are refused (INVALID_ARGUMENT, as TEI
    refuses an empty or too long input); ``gone`` fails its call UNAVAILABLE;
    ``hold`` waits until ``release`` is set. Records what it was asked.
    """

    def __init__(self) -> None:
        self.requests: list[tei_pb2.EmbedRequest | tei_pb2.EmbedSparseRequest] = []
        self.streams = 0
        self.unary = 0
        self.release = trio.Event()

    async def _embed(self, request: tei_pb2.EmbedRequest) -> tei_pb2.EmbedResponse:
        self.requests.append(request)
        text = request.inputs
        if text == "" or text.startswith("bad"):
            raise GrpcError(StatusCode.INVALID_ARGUMENT, f"refused {text!r}")
        if text == "gone":
            raise GrpcError(StatusCode.UNAVAILABLE, "model unloaded")
        if text.startswith("hold"):
            await self.release.wait()
        width = request.dimensions if request.HasField("dimensions") else 4
        return tei_pb2.EmbedResponse(embeddings=[float(len(text))] + [1.0 / 3] * (width - 1))

    async def Embed(
        self, request: tei_pb2.EmbedRequest, context: CallContext
    ) -> tei_pb2.EmbedResponse:
        self.unary += 1
        return await self._embed(request)

    async def EmbedStream(
        self, requests: AsyncIterator[tei_pb2.EmbedRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.EmbedResponse]:
        self.streams += 1
        async for request in requests:
            yield await self._embed(request)

    async def _sparse(self, request: tei_pb2.EmbedSparseRequest) -> tei_pb2.EmbedSparseResponse:
        self.requests.append(request)
        if request.inputs.startswith("bad"):
            raise GrpcError(StatusCode.INVALID_ARGUMENT, "not a word")
        value = tei_pb2.SparseValue(index=len(request.inputs), value=0.5)
        return tei_pb2.EmbedSparseResponse(sparse_embeddings=[value])

    async def EmbedSparse(
        self, request: tei_pb2.EmbedSparseRequest, context: CallContext
    ) -> tei_pb2.EmbedSparseResponse:
        self.unary += 1
        return await self._sparse(request)

    async def EmbedSparseStream(
        self, requests: AsyncIterator[tei_pb2.EmbedSparseRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.EmbedSparseResponse]:
        self.streams += 1
        async for request in requests:
            yield await self._sparse(request)


class Setup:
    def __init__(self, backend: Backend, mux_port: int, prometheus: CollectorRegistry) -> None:
        self.backend = backend
        self.port = mux_port
        self.prometheus = prometheus

    def texts_seen(self) -> list[str]:
        return [r.inputs for r in self.backend.requests]


async def _setup(nursery: trio.Nursery, backend: Backend | None = None, **settings: Any) -> Setup:
    backend = backend or Backend()
    port = await nursery.start(GrpcServer([backend]).run)
    registry = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    record = registry.add(InstanceConfig(name="b", model_id="m/b"), created_at=datetime.now(UTC))
    record.config = msgspec.structs.replace(record.config, port=port)
    record.status = InstanceStatus.RUNNING
    record.pid = 1
    config = ManagerConfig(api_host="127.0.0.1", grpc_port=0, **settings)
    prometheus = CollectorRegistry()
    server = MultiplexerServer(config, registry, MultiplexerMetrics(prometheus))
    return Setup(backend, await nursery.start(server.run), prometheus)


def request(texts: list[str | None], **fields: Any) -> multiplexer_pb2.EmbedArrowRequest:
    return mux.EmbedArrowRequest(
        target=mux.Target(instance_name="b"), arrow_ipc=arrow.write_texts(texts), **fields
    )


def later(texts: list[str | None]) -> multiplexer_pb2.EmbedArrowRequest:
    """A stream's later request: arrow_ipc only, as the original's clients send it."""
    return mux.EmbedArrowRequest(arrow_ipc=arrow.write_texts(texts))


def table(reply: Any) -> pa.Table:
    return pa.ipc.open_stream(reply.arrow_ipc).read_all()


def compressed(reply: Any) -> bool:
    body = list(pa.ipc.MessageReader.open_stream(reply.arrow_ipc))[1].body.to_pybytes()
    return LZ4_FRAME_MAGIC in body


async def _stream(channel: Channel, requests: list[Any]) -> list[Any]:
    async with channel.open_call(M.EmbedArrowStream) as call:
        for item in requests:
            await call.send(item)
        await call.done_writing()
        return [reply async for reply in call]


# -- the new fields ------------------------------------------------------------------
async def test_new_fields_reach_the_instance_and_shape_the_answer() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        async with open_channel("127.0.0.1", setup.port) as channel:
            reply = await channel.unary_unary(
                M.EmbedArrow,
                request(
                    ["hello", "hi"],
                    normalize=True,
                    truncate=True,
                    truncation_direction=tei_pb2.TRUNCATION_DIRECTION_LEFT,
                    prompt_name="query",
                    dimensions=2,
                    output_dtype=mux.OUTPUT_DTYPE_F16,
                    compression=mux.ARROW_COMPRESSION_LZ4,
                ),
            )
        sent = setup.backend.requests
        assert [r.inputs for r in sent] == ["hello", "hi"]
        for r in sent:
            assert isinstance(r, tei_pb2.EmbedRequest)
            assert r.truncate and r.normalize
            assert r.truncation_direction == tei_pb2.TRUNCATION_DIRECTION_LEFT
            assert r.prompt_name == "query"
            assert r.dimensions == 2
        answer = table(reply)
        assert answer.schema.field("embeddings").type == pa.list_(pa.float16(), 2)
        assert answer.column("embeddings").to_pylist() == [
            [5.0, 0.333251953125],
            [2.0, 0.333251953125],
        ]
        assert answer.column("error").to_pylist() == [None, None]
        assert compressed(reply)
        nursery.cancel_scope.cancel()


async def test_defaults_are_uncompressed_f32_and_unset_options_stay_unset() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        async with open_channel("127.0.0.1", setup.port) as channel:
            reply = await channel.unary_unary(M.EmbedArrow, request(["abc"]))
        (sent,) = setup.backend.requests
        assert isinstance(sent, tei_pb2.EmbedRequest)
        assert not sent.HasField("prompt_name") and not sent.HasField("dimensions")
        answer = table(reply)
        assert answer.schema.field("embeddings").type == pa.list_(pa.float32(), 4)
        assert answer.column(0).to_pylist() == [[3.0] + [pytest.approx(1 / 3)] * 3]
        assert not compressed(reply)
        nursery.cancel_scope.cancel()


async def test_config_output_dtype_applies_when_unspecified() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery, arrow_output_dtype="f16")
        async with open_channel("127.0.0.1", setup.port) as channel:
            default = await channel.unary_unary(M.EmbedArrow, request(["abc"]))
            f32 = await channel.unary_unary(
                M.EmbedArrow, request(["abc"], output_dtype=mux.OUTPUT_DTYPE_F32)
            )
            [streamed] = await _stream(channel, [request(["abc"])])
        assert table(default).schema.field("embeddings").type == pa.list_(pa.float16(), 4)
        assert table(streamed).schema.field("embeddings").type == pa.list_(pa.float16(), 4)
        assert table(f32).schema.field("embeddings").type == pa.list_(pa.float32(), 4)
        nursery.cancel_scope.cancel()


async def test_unknown_enum_values_are_invalid_argument() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        async with open_channel("127.0.0.1", setup.port) as channel:
            for fields, name in [
                ({"compression": 7}, "compression"),
                ({"output_dtype": 9}, "output_dtype"),
            ]:
                with pytest.raises(GrpcError) as error:
                    await channel.unary_unary(M.EmbedArrow, request(["a"], **fields))
                assert error.value.code is StatusCode.INVALID_ARGUMENT
                assert error.value.message.startswith(f"{name}: ")
        assert setup.backend.requests == []
        nursery.cancel_scope.cancel()


# -- per-row failures ------------------------------------------------------------------
async def test_null_and_refused_rows_fail_alone_and_later_rows_still_embed() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        texts: list[str | None] = ["a", None, "", "bb", "bad one", "ccc", None, "dddd"]
        async with open_channel("127.0.0.1", setup.port) as channel:
            reply = await channel.unary_unary(M.EmbedArrow, request(texts))
        answer = table(reply)
        assert answer.num_rows == len(texts)
        assert [row and row[0] for row in answer.column("embeddings").to_pylist()] == [
            1.0,
            None,
            None,
            2.0,
            None,
            3.0,
            None,
            4.0,
        ]
        assert answer.column("error").to_pylist() == [
            None,
            arrow.NULL_TEXT,
            "refused ''",
            None,
            "refused 'bad one'",
            None,
            arrow.NULL_TEXT,
            None,
        ]
        assert None not in setup.texts_seen()  # a null text is never sent
        nursery.cancel_scope.cancel()


class EagerBackend(Backend):
    """An instance that fails a stream as soon as any of its texts fails, before
    answering the ones before it (out of order)."""

    async def EmbedStream(
        self, requests: AsyncIterator[tei_pb2.EmbedRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.EmbedResponse]:
        self.streams += 1
        replies = [await self._embed(request) async for request in requests]
        for reply in replies:
            yield reply


async def test_rows_are_isolated_when_the_instance_fails_out_of_order() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery, EagerBackend())
        async with open_channel("127.0.0.1", setup.port) as channel:
            reply = await channel.unary_unary(M.EmbedArrow, request(["a", "bb", "bad", "cccc"]))
        answer = table(reply)
        assert [row and row[0] for row in answer.column(0).to_pylist()] == [1.0, 2.0, None, 4.0]
        assert answer.column("error").to_pylist() == [None, None, "refused 'bad'", None]
        nursery.cancel_scope.cancel()


async def test_many_refused_rows_cost_one_call_each_not_a_restart_each() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        texts: list[str | None] = [f"bad {i}" if i % 2 else f"ok {i}" for i in range(60)]
        async with open_channel("127.0.0.1", setup.port) as channel:
            reply = await channel.unary_unary(M.EmbedArrow, request(texts))
        errors = table(reply).column("error").to_pylist()
        assert errors == [f"refused 'bad {i}'" if i % 2 else None for i in range(60)]
        backend = setup.backend
        assert backend.streams == MAX_RESTARTS + 1
        assert backend.unary <= 60
        nursery.cancel_scope.cancel()


async def test_sparse_new_fields_and_per_row_errors() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        sparse = mux.EmbedSparseArrowRequest(
            target=mux.Target(instance_name="b"),
            arrow_ipc=arrow.write_texts(["ab", "bad", None, "abcd"]),
            truncation_direction=tei_pb2.TRUNCATION_DIRECTION_LEFT,
            prompt_name="doc",
            compression=mux.ARROW_COMPRESSION_LZ4,
        )
        async with open_channel("127.0.0.1", setup.port) as channel:
            reply = await channel.unary_unary(M.EmbedSparseArrow, sparse)
        for sent in setup.backend.requests:
            assert isinstance(sent, tei_pb2.EmbedSparseRequest)
            assert sent.prompt_name == "doc"
            assert sent.truncation_direction == tei_pb2.TRUNCATION_DIRECTION_LEFT
        answer = table(reply)
        assert answer.schema.field("sparse_embeddings").type == arrow.SPARSE_TYPE
        assert answer.column(0).to_pylist() == [
            [{"index": 2, "value": 0.5}],
            None,
            None,
            [{"index": 4, "value": 0.5}],
        ]
        assert answer.column("error").to_pylist() == [None, "not a word", arrow.NULL_TEXT, None]
        assert compressed(reply)
        nursery.cancel_scope.cancel()


async def test_a_failure_that_is_not_one_rows_fails_the_call() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        async with open_channel("127.0.0.1", setup.port) as channel:
            with pytest.raises(GrpcError) as error:
                await channel.unary_unary(M.EmbedArrow, request(["a", "gone", "b"]))
        assert error.value.code is StatusCode.UNAVAILABLE
        assert error.value.message == "model unloaded"
        nursery.cancel_scope.cancel()


# -- EmbedArrowStream --------------------------------------------------------------------
async def test_stream_answers_each_batch_in_order_with_batches_side_by_side() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        backend = setup.backend
        async with (
            open_channel("127.0.0.1", setup.port) as channel,
            channel.open_call(M.EmbedArrowStream) as call,
        ):
            await call.send(request(["hold", "x"], dimensions=2))
            await call.send(later(["yy", None]))
            await call.send(later(["zzz"]))
            await call.done_writing()
            # The later batches reach the instance while the first is held.
            await _wait_for(lambda: set(setup.texts_seen()) == {"hold", "yy", "zzz"})
            await trio.testing.wait_all_tasks_blocked(0.05)
            backend.release.set()
            replies = [reply async for reply in call]
        firsts = [[row and row[0] for row in table(r).column(0).to_pylist()] for r in replies]
        assert firsts == [[4.0, 1.0], [2.0, None], [3.0]]
        # Every batch keeps the first request's options.
        assert all(table(r).schema.field(0).type.list_size == 2 for r in replies)
        assert table(replies[1]).column("error").to_pylist() == [None, arrow.NULL_TEXT]
        metrics = generate_latest(setup.prometheus).decode()
        assert (
            'tei_manager_grpc_requests_total{instance="b",method="EmbedArrowStream"} 1.0' in metrics
        )
        nursery.cancel_scope.cancel()


async def test_stream_reads_no_further_ahead_than_its_concurrency() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery, grpc_stream_max_concurrent_batches=2)
        async with (
            open_channel("127.0.0.1", setup.port) as channel,
            channel.open_call(M.EmbedArrowStream) as call,
        ):
            await call.send(request(["hold 0"]))
            for i in range(1, 8):  # small: all fit in the flow-control window
                await call.send(later([f"hold {i}"]))
            await trio.testing.wait_all_tasks_blocked(0.1)
            # Two batches run; the rest wait unread in the client's window.
            assert sorted(setup.texts_seen()) == ["hold 0", "hold 1"]
            setup.backend.release.set()
            await call.done_writing()
            replies = [reply async for reply in call]
        assert [table(r).column(0).to_pylist()[0][0] for r in replies] == [6.0] * 8
        assert sorted(setup.texts_seen()) == [f"hold {i}" for i in range(8)]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("bad", "code", "message"),
    [
        (mux.EmbedArrowRequest(arrow_ipc=b"not arrow"), StatusCode.INVALID_ARGUMENT, "arrow_ipc: "),
        (later(["gone"]), StatusCode.UNAVAILABLE, "model unloaded"),
    ],
    ids=["bad-ipc", "instance-failure"],
)
async def test_a_batch_failure_ends_the_stream_after_the_answers_before_it(
    bad: Any, code: StatusCode, message: str
) -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        async with (
            open_channel("127.0.0.1", setup.port) as channel,
            channel.open_call(M.EmbedArrowStream) as call,
        ):
            await call.send(request(["one"]))
            await call.send(bad)
            await call.send(later(["three"]))
            await call.done_writing()
            first = await call.receive()
            with pytest.raises(GrpcError) as error:
                await call.receive()
        assert first is not None and table(first).column(0).to_pylist()[0][0] == 3.0
        assert error.value.code is code
        assert error.value.message.startswith(message)
        nursery.cancel_scope.cancel()


async def test_stream_noop_and_empty_stream() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        async with open_channel("127.0.0.1", setup.port) as channel:
            replies = await _stream(channel, [request(["a", None], noop=True), later(["b"])])
            with pytest.raises(GrpcError) as error:
                await _stream(channel, [])
        assert [table(r).num_rows for r in replies] == [2, 1]
        assert table(replies[0]).column("error").to_pylist() == [None, arrow.NULL_TEXT]
        assert setup.backend.requests == []
        assert error.value.code is StatusCode.INVALID_ARGUMENT
        nursery.cancel_scope.cancel()


async def test_a_silent_stream_times_out_once_nothing_is_in_progress() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery, grpc_request_timeout_secs=0.3)
        async with (
            open_channel("127.0.0.1", setup.port) as channel,
            channel.open_call(M.EmbedArrowStream) as call,
        ):
            await call.send(request(["a"]))
            assert await call.receive() is not None
            with trio.fail_after(5), pytest.raises(GrpcError) as error:
                await call.receive()
        assert error.value.code is StatusCode.DEADLINE_EXCEEDED
        nursery.cancel_scope.cancel()


# -- with the official grpcio client ------------------------------------------------------
async def test_grpcio_client_streams_batches_and_old_requests_still_work() -> None:
    async with trio.open_nursery() as nursery:
        setup = await _setup(nursery)
        streamed = await trio.to_thread.run_sync(
            grpcio_client.call,
            setup.port,
            M.EmbedArrowStream,
            [
                request(["a", None], output_dtype=mux.OUTPUT_DTYPE_F16, prompt_name="q"),
                later(["bad", "bb"]),
                later(["ccc"]),
            ],
        )
        # Today's clients: no new field; they read column 0 or "embeddings".
        [old] = await trio.to_thread.run_sync(
            grpcio_client.call,
            setup.port,
            M.EmbedArrow,
            [
                mux.EmbedArrowRequest(
                    target=mux.Target(model_id="m/b"), arrow_ipc=arrow.write_texts(["xy", None])
                )
            ],
        )
        assert [table(r).column("embeddings").to_pylist() for r in streamed] == [
            [[1.0, 0.333251953125, 0.333251953125, 0.333251953125], None],
            [None, [2.0, 0.333251953125, 0.333251953125, 0.333251953125]],
            [[3.0, 0.333251953125, 0.333251953125, 0.333251953125]],
        ]
        assert table(streamed[1]).column("error").to_pylist() == ["refused 'bad'", None]
        assert {r.prompt_name for r in setup.backend.requests[:5]} == {"q"}
        old_table = table(old)
        assert old_table.column(0).type == pa.list_(pa.float32(), 4)
        assert old_table.column(0).to_pylist()[0][0] == 2.0
        assert old_table.column(0).to_pylist()[1] is None
        nursery.cancel_scope.cancel()


def test_every_multiplexer_method_needs_inference_and_the_stream_is_served() -> None:
    from tei_manager.auth.identity import Scope
    from tei_manager.multiplexer.auth import scope_for_method
    from tei_manager.multiplexer.service import Multiplexer

    names = {spec.name for spec in M.__dict__.values() if hasattr(spec, "path")}
    assert "EmbedArrowStream" in names
    for spec in multiplexer_grpc.TeiMultiplexerServicer.METHODS:
        assert scope_for_method(spec.path) is Scope.INFERENCE
        # Overridden by the relay, not the generated UNIMPLEMENTED base.
        assert getattr(Multiplexer, spec.name) is not getattr(
            multiplexer_grpc.TeiMultiplexerServicer, spec.name
        )
