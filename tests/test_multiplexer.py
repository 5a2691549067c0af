"""The gRPC multiplexer in front of real worker processes, called with the official grpcio.

The multiplexer runs in-process (in a thread with its own trio loop) over a registry
whose instances are the session's worker processes; every TeiMultiplexer method must
answer what the instance answers when called directly.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
import msgspec
import pytest
import trio
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, generate_latest

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tei_manager.config import InstanceConfig, ManagerConfig
from tei_manager.core.instances import InstanceStatus, InstanceTable
from tei_manager.core.ports import PortAllocator
from tei_manager.grpc.rpc import GrpcError, MethodSpec, StatusCode
from tei_manager.multiplexer.metrics import MultiplexerMetrics
from tei_manager.multiplexer.server import MultiplexerServer
from tests import grpcio_client
from tests.conftest import Workers

pytestmark = pytest.mark.slow

M = multiplexer_grpc.TeiMultiplexer
mux = multiplexer_pb2
tei = tei_pb2
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and abs(a - b) < 1e-4
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (a.keys() | b.keys()) - {"metadata"}
        return all(_close(a.get(k), b.get(k)) for k in keys)
    return bool(a == b)


def _same(a: Sequence[Message], b: Sequence[Message]) -> bool:
    """Equal replies, up to float noise (batch composition changes the last digits)."""
    return _close([MessageToDict(m) for m in a], [MessageToDict(m) for m in b])


_call = grpcio_client.call


class Mux:
    """The multiplexer under test, its registry and its metrics."""

    def __init__(self, port: int, registry: InstanceTable, prometheus: CollectorRegistry) -> None:
        self.port = port
        self.registry = registry
        self.prometheus = prometheus
        self.token: trio.lowlevel.TrioToken | None = None

    def in_loop(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the multiplexer's trio loop (registry changes must happen there)."""
        return trio.from_thread.run_sync(fn, trio_token=self.token)

    def set_status(self, name: str, status: InstanceStatus) -> None:
        def change() -> None:
            self.registry.get(name).status = status

        self.in_loop(change)

    def call(self, spec: MethodSpec[Any, Any], *requests: Message) -> list[Message]:
        return _call(self.port, spec, requests)

    def requests_served(self, instance: str, method: str) -> float:
        text = generate_latest(self.prometheus).decode()
        pattern = (
            rf'tei_manager_grpc_requests_total\{{instance="{instance}",method="{method}"\}} (\S+)'
        )
        found = re.search(pattern, text)
        return float(found.group(1)) if found else 0.0


def _registry(workers: Workers) -> InstanceTable:
    registry = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    now = datetime.now(UTC)

    def add(name: str, model: str, process: Any, status: InstanceStatus) -> None:
        record = registry.add(InstanceConfig(name=name, model_id=model), created_at=now)
        # The record points at an already running worker (ports are taken as they are).
        record.config = msgspec.structs.replace(record.config, port=process.port)
        record.pid = process.process.pid
        record.status = status

    add("dense-a", MODEL, workers.dense, InstanceStatus.RUNNING)
    add("dense-b", MODEL, workers.dense, InstanceStatus.RUNNING)
    add("reranker", "tiny/reranker", workers.reranker, InstanceStatus.RUNNING)
    add("classifier", "tiny/classifier", workers.classifier, InstanceStatus.RUNNING)
    add("splade", "tiny/splade", workers.splade, InstanceStatus.RUNNING)
    add("resting", "tiny/resting", workers.dense, InstanceStatus.STOPPED)
    return registry


@pytest.fixture(scope="module")
def running_mux(workers: Workers) -> Iterator[Mux]:
    registry = _registry(workers)
    prometheus = CollectorRegistry()
    config = ManagerConfig(api_host="127.0.0.1", grpc_port=0)
    started: queue.Queue[Mux | BaseException] = queue.Queue()
    stop = threading.Event()

    async def main() -> None:
        server = MultiplexerServer(config, registry, MultiplexerMetrics(prometheus))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            handle = Mux(port, registry, prometheus)
            handle.token = trio.lowlevel.current_trio_token()
            started.put(handle)
            await trio.to_thread.run_sync(stop.wait, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()

    def thread() -> None:
        try:
            trio.run(main)
        except BaseException as error:
            started.put(error)

    runner = threading.Thread(target=thread, daemon=True)
    runner.start()
    handle = started.get(timeout=60)
    if isinstance(handle, BaseException):
        raise handle
    try:
        yield handle
    finally:
        stop.set()
        runner.join(30)


def by_name(name: str) -> multiplexer_pb2.Target:
    return mux.Target(instance_name=name)


# -- every method answers what the instance answers ---------------------------------------------
def test_unary_methods_equal_direct_calls(running_mux: Mux, workers: Workers) -> None:
    dense, reranker = workers.dense.port, workers.reranker.port
    classifier, splade = workers.classifier.port, workers.splade.port
    E, P, R, T = tei_grpc.Embed, tei_grpc.Predict, tei_grpc.Rerank, tei_grpc.Tokenize
    encode = tei.EncodeRequest(inputs="hello world", add_special_tokens=True)
    cases: list[tuple[MethodSpec[Any, Any], Message, MethodSpec[Any, Any], int, Message]] = [
        (M.Info, mux.InfoRequest(target=by_name("dense-a")), tei_grpc.Info.Info, dense,
         tei.InfoRequest()),
        (M.Embed, mux.EmbedRequest(target=by_name("dense-a"), request=tei.EmbedRequest(
            inputs="hello", dimensions=8)), E.Embed, dense, tei.EmbedRequest(
            inputs="hello", dimensions=8)),
        (M.EmbedAll, mux.EmbedAllRequest(target=by_name("dense-a"), request=tei.EmbedAllRequest(
            inputs="hello")), E.EmbedAll, dense, tei.EmbedAllRequest(inputs="hello")),
        (M.EmbedSparse, mux.EmbedSparseRequest(target=by_name("splade"),
            request=tei.EmbedSparseRequest(inputs="alpha beta")), E.EmbedSparse, splade,
         tei.EmbedSparseRequest(inputs="alpha beta")),
        (M.Predict, mux.PredictRequest(target=by_name("classifier"), request=tei.PredictRequest(
            inputs="alpha")), P.Predict, classifier, tei.PredictRequest(inputs="alpha")),
        (M.PredictPair, mux.PredictPairRequest(target=by_name("classifier"),
            request=tei.PredictPairRequest(inputs=["a", "b"])), P.PredictPair, classifier,
         tei.PredictPairRequest(inputs=["a", "b"])),
        (M.Rerank, mux.RerankRequest(target=by_name("reranker"), request=tei.RerankRequest(
            query="q", texts=["a", "b c"], return_text=True)), R.Rerank, reranker,
         tei.RerankRequest(query="q", texts=["a", "b c"], return_text=True)),
        (M.Tokenize, mux.EncodeRequest(target=by_name("dense-a"), request=encode), T.Tokenize,
         dense, encode),
        (M.Decode, mux.DecodeRequest(target=by_name("dense-a"), request=tei.DecodeRequest(
            ids=[7592, 2088])), T.Decode, dense, tei.DecodeRequest(ids=[7592, 2088])),
    ]  # fmt: skip
    for spec, request, direct_spec, port, direct_request in cases:
        through = running_mux.call(spec, request)
        direct = _call(port, direct_spec, [direct_request])
        assert _same(through, direct), spec.name


def test_stream_methods_equal_direct_calls(running_mux: Mux, workers: Workers) -> None:
    dense, reranker = workers.dense.port, workers.reranker.port
    classifier, splade = workers.classifier.port, workers.splade.port
    E, P, R, T = tei_grpc.Embed, tei_grpc.Predict, tei_grpc.Rerank, tei_grpc.Tokenize
    texts = ["alpha", "beta gamma", "delta"]
    cases: list[tuple[MethodSpec[Any, Any], type[Message], str, MethodSpec[Any, Any], int,
                      list[Message]]] = [
        (M.EmbedStream, mux.EmbedRequest, "dense-a", E.EmbedStream, dense,
         [tei.EmbedRequest(inputs=t) for t in texts]),
        (M.EmbedAllStream, mux.EmbedAllRequest, "dense-a", E.EmbedAllStream, dense,
         [tei.EmbedAllRequest(inputs=t) for t in texts]),
        (M.EmbedSparseStream, mux.EmbedSparseRequest, "splade", E.EmbedSparseStream, splade,
         [tei.EmbedSparseRequest(inputs=t) for t in texts]),
        (M.PredictStream, mux.PredictRequest, "classifier", P.PredictStream, classifier,
         [tei.PredictRequest(inputs=t) for t in texts]),
        (M.PredictPairStream, mux.PredictPairRequest, "classifier", P.PredictPairStream,
         classifier, [tei.PredictPairRequest(inputs=[t, "x"]) for t in texts]),
        (M.RerankStream, mux.RerankStreamRequest, "reranker", R.RerankStream, reranker,
         [tei.RerankStreamRequest(query="q", text=t, return_text=True) for t in texts]),
        (M.TokenizeStream, mux.EncodeRequest, "dense-a", T.TokenizeStream, dense,
         [tei.EncodeRequest(inputs=t) for t in texts]),
        (M.DecodeStream, mux.DecodeRequest, "dense-a", T.DecodeStream, dense,
         [tei.DecodeRequest(ids=[7592 + i]) for i in range(3)]),
    ]  # fmt: skip
    for spec, wrapper, name, direct_spec, port, inner in cases:
        # Only the first message's target counts; later ones may leave it out.
        wrapped = [wrapper(target=by_name(name), request=inner[0])] + [
            wrapper(request=r) for r in inner[1:]
        ]
        through = running_mux.call(spec, *wrapped)
        direct = _call(port, direct_spec, inner)
        assert len(through) == len(direct) > 0, spec.name
        assert _same(through, direct), spec.name


def test_long_stream_keeps_order(running_mux: Mux) -> None:
    texts = [f"text number {i}" for i in range(200)]
    requests = [mux.EncodeRequest(target=by_name("dense-a"), request=tei.EncodeRequest(
        inputs=texts[0]))] + [mux.EncodeRequest(request=tei.EncodeRequest(inputs=t))
                              for t in texts[1:]]  # fmt: skip
    replies = running_mux.call(M.TokenizeStream, *requests)
    assert [r.tokens[-1].text for r in replies] == [str(i) for i in range(200)]


# -- routing ---------------------------------------------------------------------------------
def _embed(target: multiplexer_pb2.Target | None, text: str = "route me") -> Message:
    request = mux.EmbedRequest(request=tei.EmbedRequest(inputs=text))
    if target is not None:
        request.target.CopyFrom(target)
    return request


def test_routing_by_model_balances_across_running_replicas(running_mux: Mux) -> None:
    before = {n: running_mux.requests_served(n, "Embed") for n in ("dense-a", "dense-b")}
    for _ in range(6):
        (reply,) = running_mux.call(M.Embed, _embed(mux.Target(model_id=MODEL)))
        assert len(reply.embeddings) == 384
    served = {n: running_mux.requests_served(n, "Embed") - before[n] for n in before}
    assert served == {"dense-a": 3, "dense-b": 3}
    running_mux.set_status("dense-b", InstanceStatus.STARTING)
    try:
        for _ in range(2):
            running_mux.call(M.Embed, _embed(mux.Target(model_id=MODEL)))
        assert running_mux.requests_served("dense-a", "Embed") - before["dense-a"] == 5
    finally:
        running_mux.set_status("dense-b", InstanceStatus.RUNNING)


def test_routing_by_index_in_creation_order(running_mux: Mux) -> None:
    (info,) = running_mux.call(M.Info, mux.InfoRequest(target=mux.Target(instance_index=2)))
    assert info.model_type == tei.MODEL_TYPE_RERANKER
    (info,) = running_mux.call(M.Info, mux.InfoRequest(target=mux.Target(instance_index=0)))
    assert info.model_type == tei.MODEL_TYPE_EMBEDDING


@pytest.mark.parametrize(
    ("target", "code", "message"),
    [
        (None, StatusCode.INVALID_ARGUMENT, "target: required"),
        (mux.Target(instance_name=""), StatusCode.INVALID_ARGUMENT, "target.instance_name"),
        (mux.Target(instance_name="nope"), StatusCode.NOT_FOUND, 'instance "nope" not found'),
        (mux.Target(model_id="no/model"), StatusCode.NOT_FOUND, 'model "no/model"'),
        (mux.Target(instance_index=99), StatusCode.NOT_FOUND, "no instance at index 99"),
        (mux.Target(instance_name="resting"), StatusCode.UNAVAILABLE, "is stopped"),
        (mux.Target(model_id="tiny/resting"), StatusCode.UNAVAILABLE, '"resting" is stopped'),
    ],
)
def test_routing_errors(
    running_mux: Mux, target: multiplexer_pb2.Target | None, code: StatusCode, message: str
) -> None:
    with pytest.raises(GrpcError) as unary:
        running_mux.call(M.Embed, _embed(target))
    assert (unary.value.code, message in unary.value.message) == (code, True), unary.value
    with pytest.raises(GrpcError) as stream:
        running_mux.call(M.EmbedStream, _embed(target), _embed(target))
    assert stream.value.code == code


def test_instance_statuses_pass_through(running_mux: Mux) -> None:
    with pytest.raises(GrpcError) as wrong_kind:
        running_mux.call(
            M.Rerank,
            mux.RerankRequest(
                target=by_name("dense-a"), request=tei.RerankRequest(query="q", texts=["a"])
            ),
        )
    assert wrong_kind.value.code == StatusCode.FAILED_PRECONDITION
    with pytest.raises(GrpcError) as empty:
        running_mux.call(M.Embed, _embed(by_name("dense-a"), text=""))
    assert empty.value.code == StatusCode.INVALID_ARGUMENT
    with pytest.raises(GrpcError) as mid_stream:
        running_mux.call(M.EmbedStream, _embed(by_name("dense-a"), "ok"), _embed(None, ""))
    assert mid_stream.value.code == StatusCode.INVALID_ARGUMENT


def test_malformed_request_is_invalid_argument(running_mux: Mux) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{running_mux.port}") as channel:
        embed = channel.unary_unary(M.Embed.path)
        with pytest.raises(grpc.RpcError) as error:
            embed(b"\x0a\x05ab", timeout=10)  # a length running past the end
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "could not decode the request" in (error.value.details() or "")


# -- health, reflection, metrics ---------------------------------------------------------------
def test_health_and_reflection(running_mux: Mux) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(f"127.0.0.1:{running_mux.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", M.NAME):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        database = ProtoReflectionDescriptorDatabase(channel)
        assert M.NAME in set(database.get_services())
        file = database.FindFileContainingSymbol(M.NAME)
        assert file.package == "tei_multiplexer.v1"
        service = file.service[0]
        assert len(service.method) == 20
        assert "EmbedArrowStream" in {m.name for m in service.method}
        assert "tei/v1/tei.proto" in file.dependency
        assert database.FindFileByName("tei/v1/tei.proto").package == "tei.v1"


def test_metrics_count_requests_errors_and_latency(running_mux: Mux) -> None:
    tokenize = mux.EncodeRequest(target=by_name("dense-a"), request=tei.EncodeRequest(inputs="x"))
    running_mux.call(M.Tokenize, tokenize)
    with pytest.raises(GrpcError):
        running_mux.call(M.Tokenize, mux.EncodeRequest(target=by_name("nope")))
    text = generate_latest(running_mux.prometheus).decode()
    assert 'tei_manager_grpc_requests_total{instance="dense-a",method="Tokenize"}' in text
    assert 'tei_manager_grpc_errors_total{code="NOT_FOUND",instance="",method="Tokenize"}' in text
    assert 'tei_manager_grpc_request_duration_seconds_bucket{instance="dense-a",le=' in text
    assert 'tei_manager_grpc_requests_in_flight{instance="dense-a",method="Tokenize"} 0.0' in text


# -- Arrow -------------------------------------------------------------------------------------
def _arrow_call(
    running_mux: Mux, spec: MethodSpec[Any, Any], batches: list[list[str | None]], **fields: Any
) -> Any:
    import pyarrow as pa

    schema = pa.schema([("text", pa.string())])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(pa.record_batch([pa.array(batch, pa.string())], schema=schema))
    request = spec.request_type(arrow_ipc=sink.getvalue().to_pybytes(), **fields)
    (reply,) = running_mux.call(spec, request)
    with pa.ipc.open_stream(reply.arrow_ipc) as reader:
        return reader.read_all()


def test_embed_arrow_reads_every_batch_and_keeps_null_rows(
    running_mux: Mux, workers: Workers
) -> None:
    batches: list[list[str | None]] = [["alpha", None, "beta gamma"], ["delta"], [None, "eps"]]
    table = _arrow_call(
        running_mux, M.EmbedArrow, batches, target=mux.Target(model_id=MODEL), normalize=True
    )
    rows = table.column("embeddings").to_pylist()
    flat = [t for batch in batches for t in batch]
    assert len(rows) == len(flat) == 6
    assert str(table.schema.field("embeddings").type) == "fixed_size_list<item: float>[384]"
    for text, row in zip(flat, rows, strict=True):
        if text is None:
            assert row is None
            continue
        (direct,) = _call(workers.dense.port, tei_grpc.Embed.Embed, [tei.EmbedRequest(inputs=text)])
        assert _close(list(direct.embeddings), row)


def test_embed_sparse_arrow_and_noop(running_mux: Mux, workers: Workers) -> None:
    table = _arrow_call(
        running_mux, M.EmbedSparseArrow, [["alpha beta", None]], target=by_name("splade")
    )
    rows = table.column("sparse_embeddings").to_pylist()
    (direct,) = _call(
        workers.splade.port,
        tei_grpc.Embed.EmbedSparse,
        [tei.EmbedSparseRequest(inputs="alpha beta")],
    )
    assert rows[1] is None
    assert [(v["index"], round(v["value"], 4)) for v in rows[0]] == [
        (v.index, round(v.value, 4)) for v in direct.sparse_embeddings
    ]
    noop = _arrow_call(running_mux, M.EmbedArrow, [["a", None, "b"]], noop=True)
    assert noop.column("embeddings").null_count == 1
    assert len(noop.column("embeddings")[0].as_py()) == 384


def test_arrow_errors(running_mux: Mux) -> None:
    bad = mux.EmbedArrowRequest(target=by_name("dense-a"), arrow_ipc=b"not arrow at all")
    with pytest.raises(GrpcError) as garbage:
        running_mux.call(M.EmbedArrow, bad)
    assert garbage.value.code == StatusCode.INVALID_ARGUMENT
    assert garbage.value.message.startswith("arrow_ipc: ")
    with pytest.raises(GrpcError) as stopped:
        _arrow_call(running_mux, M.EmbedArrow, [["x"]], target=by_name("resting"))
    assert stopped.value.code == StatusCode.UNAVAILABLE
    with pytest.raises(GrpcError) as wrong_kind:
        _arrow_call(running_mux, M.EmbedSparseArrow, [["x"]], target=by_name("dense-a"))
    assert wrong_kind.value.code == StatusCode.FAILED_PRECONDITION


def test_embed_arrow_stream_v017_client_against_the_worker(
    running_mux: Mux, workers: Workers
) -> None:
    import pyarrow as pa

    from tei_manager.multiplexer.arrow import NULL_TEXT, write_texts

    first = mux.EmbedArrowRequest(
        target=mux.Target(model_id=MODEL),
        arrow_ipc=write_texts(["alpha", "", None]),
        normalize=True,
        dimensions=16,
        output_dtype=mux.OUTPUT_DTYPE_F16,
        compression=mux.ARROW_COMPRESSION_LZ4,
    )
    later = mux.EmbedArrowRequest(arrow_ipc=write_texts(["beta gamma"]))
    replies = running_mux.call(M.EmbedArrowStream, first, later)
    tables = [pa.ipc.open_stream(r.arrow_ipc).read_all() for r in replies]  # type: ignore[attr-defined]
    assert [t.num_rows for t in tables] == [3, 1]
    assert tables[0].schema.field("embeddings").type == pa.list_(pa.float16(), 16)
    errors = tables[0].column("error").to_pylist()
    assert errors[0] is None and errors[2] == NULL_TEXT
    assert "cannot be empty" in errors[1]
    for text, row in [("alpha", tables[0].column(0)[0]), ("beta gamma", tables[1].column(0)[0])]:
        (direct,) = _call(
            workers.dense.port,
            tei_grpc.Embed.Embed,
            [tei.EmbedRequest(inputs=text, normalize=True, dimensions=16)],
        )
        assert all(abs(a - b) < 2e-3 for a, b in zip(row.as_py(), direct.embeddings, strict=True))
