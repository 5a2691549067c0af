"""Every tei.v1 RPC of real worker processes, through grpcio and through our channel.

Worker processes are started once per session: the packaged all-MiniLM-L6-v2 (dense)
and tiny random reranker, classifier and SPLADE models created by fixtures.
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import pytest
import trio
from google.protobuf.message import Message

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.grpc.channel import open_channel
from tei_manager.grpc.rpc import GrpcError, MethodSpec, StatusCode
from tests import grpcio_client
from tests.conftest import Workers

pytestmark = pytest.mark.slow


# -- two independent clients behind one interface ------------------------------------------
Reply = list[Message]


def _channel_call(port: int, spec: MethodSpec[Any, Any], requests: Sequence[Message]) -> Reply:
    async def run() -> Reply:
        async with open_channel("127.0.0.1", port) as channel:
            with trio.fail_after(60):
                async with channel.open_call(spec) as call:
                    for request in requests:
                        await call.send(request)
                    await call.done_writing()
                    return [reply async for reply in call]

    return trio.run(run)


Client = Callable[[int, MethodSpec[Any, Any], Sequence[Message]], Reply]


@pytest.fixture(params=["grpcio", "channel"])
def client(request: pytest.FixtureRequest) -> Client:
    return grpcio_client.call if request.param == "grpcio" else _channel_call


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


TEXTS = ["The quick brown fox jumps over the lazy dog.", "Embeddings map text to vectors.", "hi"]
E = tei_grpc.Embed
P = tei_grpc.Predict
R = tei_grpc.Rerank
T = tei_grpc.Tokenize


# -- dense -----------------------------------------------------------------------------------
def test_info(workers: Workers, client: Client) -> None:
    (info,) = client(workers.dense.port, tei_grpc.Info.Info, [tei_pb2.InfoRequest()])
    assert info.model_type == tei_pb2.MODEL_TYPE_EMBEDDING
    assert info.max_input_length == 256
    assert info.max_concurrent_requests == 512
    (info,) = client(workers.reranker.port, tei_grpc.Info.Info, [tei_pb2.InfoRequest()])
    assert info.model_type == tei_pb2.MODEL_TYPE_RERANKER
    (info,) = client(workers.classifier.port, tei_grpc.Info.Info, [tei_pb2.InfoRequest()])
    assert info.model_type == tei_pb2.MODEL_TYPE_CLASSIFIER


def test_embed_equals_sentence_transformers(
    workers: Workers, client: Client, minilm_st: Any
) -> None:
    expected = minilm_st.encode(TEXTS, normalize_embeddings=True)
    for text, want in zip(TEXTS, expected, strict=True):
        (reply,) = client(workers.dense.port, E.Embed, [tei_pb2.EmbedRequest(inputs=text)])
        assert len(reply.embeddings) == 384
        assert _cosine(reply.embeddings, want) >= 0.9999
        assert reply.metadata.compute_tokens > 0 and reply.metadata.total_time_ns > 0


def test_embed_stream_is_ordered(workers: Workers, client: Client, minilm_st: Any) -> None:
    texts = [f"sentence number {i} about topic {i % 3}" for i in range(20)]
    replies = client(
        workers.dense.port, E.EmbedStream, [tei_pb2.EmbedRequest(inputs=t) for t in texts]
    )
    expected = minilm_st.encode(texts, normalize_embeddings=True)
    assert len(replies) == 20
    for reply, want in zip(replies, expected, strict=True):
        assert _cosine(reply.embeddings, want) >= 0.9999


def test_embed_options(workers: Workers, client: Client) -> None:
    port = workers.dense.port
    (raw,) = client(port, E.Embed, [tei_pb2.EmbedRequest(inputs=TEXTS[0], normalize=False)])
    assert abs(math.sqrt(sum(x * x for x in raw.embeddings)) - 1) > 1e-3
    (short,) = client(port, E.Embed, [tei_pb2.EmbedRequest(inputs=TEXTS[0], dimensions=64)])
    assert len(short.embeddings) == 64
    assert abs(math.sqrt(sum(x * x for x in short.embeddings)) - 1) < 1e-4


def test_input_rules(workers: Workers, client: Client) -> None:
    port = workers.dense.port
    with pytest.raises(GrpcError) as empty:
        client(port, E.Embed, [tei_pb2.EmbedRequest(inputs="")])
    assert empty.value.code == StatusCode.INVALID_ARGUMENT
    # In a stream, the bad message's status ends the call (not INTERNAL).
    with pytest.raises(GrpcError) as in_stream:
        client(port, E.EmbedStream, [tei_pb2.EmbedRequest(inputs=t) for t in ("ok", "")])
    assert in_stream.value.code == StatusCode.INVALID_ARGUMENT
    assert "`inputs` cannot be empty" in in_stream.value.message
    long_text = "word " * 400
    with pytest.raises(GrpcError) as too_long:
        client(port, E.Embed, [tei_pb2.EmbedRequest(inputs=long_text)])
    assert too_long.value.code == StatusCode.INVALID_ARGUMENT
    assert "256" in too_long.value.message
    (right,) = client(port, E.Embed, [tei_pb2.EmbedRequest(inputs=long_text, truncate=True)])
    left_request = tei_pb2.EmbedRequest(
        inputs="start " + long_text,
        truncate=True,
        truncation_direction=tei_pb2.TRUNCATION_DIRECTION_LEFT,
    )
    (left,) = client(port, E.Embed, [left_request])
    assert len(right.embeddings) == len(left.embeddings) == 384


def test_embed_all(workers: Workers, client: Client) -> None:
    (reply,) = client(
        workers.dense.port, E.EmbedAll, [tei_pb2.EmbedAllRequest(inputs="hello world")]
    )
    assert len(reply.token_embeddings) == 4  # [CLS] hello world [SEP]
    assert all(len(t.embeddings) == 384 for t in reply.token_embeddings)
    replies = client(
        workers.dense.port,
        E.EmbedAllStream,
        [tei_pb2.EmbedAllRequest(inputs=t) for t in TEXTS],
    )
    assert len(replies) == 3


def test_tokenize_and_decode(workers: Workers, client: Client) -> None:
    port = workers.dense.port
    (reply,) = client(
        port, T.Tokenize, [tei_pb2.EncodeRequest(inputs="hello world", add_special_tokens=True)]
    )
    tokens = [(t.text, t.special) for t in reply.tokens]
    assert tokens == [("[CLS]", True), ("hello", False), ("world", False), ("[SEP]", True)]
    assert (reply.tokens[1].start, reply.tokens[1].stop) == (0, 5)
    ids = [t.id for t in reply.tokens]
    (decoded,) = client(port, T.Decode, [tei_pb2.DecodeRequest(ids=ids, skip_special_tokens=True)])
    assert decoded.text == "hello world"
    streamed = client(
        port, T.TokenizeStream, [tei_pb2.EncodeRequest(inputs=t) for t in ("a", "b c")]
    )
    assert [len(r.tokens) for r in streamed] == [1, 2]
    decoded_stream = client(
        port,
        T.DecodeStream,
        [tei_pb2.DecodeRequest(ids=ids[1:2]), tei_pb2.DecodeRequest(ids=ids[2:3])],
    )
    assert [r.text for r in decoded_stream] == ["hello", "world"]


def test_wrong_model_kind_is_a_clear_error(workers: Workers, client: Client) -> None:
    with pytest.raises(GrpcError) as sparse:
        client(workers.dense.port, E.EmbedSparse, [tei_pb2.EmbedSparseRequest(inputs="x")])
    assert sparse.value.code == StatusCode.FAILED_PRECONDITION
    with pytest.raises(GrpcError) as rerank:
        client(workers.dense.port, R.Rerank, [tei_pb2.RerankRequest(query="q", texts=["a"])])
    assert rerank.value.code == StatusCode.FAILED_PRECONDITION
    with pytest.raises(GrpcError) as embed:
        client(workers.reranker.port, E.Embed, [tei_pb2.EmbedRequest(inputs="x")])
    assert embed.value.code == StatusCode.FAILED_PRECONDITION
    assert "model" in embed.value.message


# -- reranker, classifier, splade -------------------------------------------------------------
def test_rerank(workers: Workers, client: Client) -> None:
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]
    request = tei_pb2.RerankRequest(query="alpha", texts=texts, return_text=True)
    (reply,) = client(workers.reranker.port, R.Rerank, [request])
    assert sorted(r.index for r in reply.ranks) == [0, 1, 2]
    scores = [r.score for r in reply.ranks]
    assert scores == sorted(scores, reverse=True)
    assert all(0 < s < 1 for s in scores)
    assert {r.text for r in reply.ranks} == set(texts)
    streamed = [
        tei_pb2.RerankStreamRequest(query="alpha", text=t, return_text=(i == 0))
        for i, t in enumerate(texts)
    ]
    (from_stream,) = client(workers.reranker.port, R.RerankStream, streamed)
    assert [(r.index, round(r.score, 5)) for r in from_stream.ranks] == [
        (r.index, round(r.score, 5)) for r in reply.ranks
    ]
    # A stream is not bound by --max-client-batch-size (32), as in TEI.
    many = [tei_pb2.RerankStreamRequest(query="alpha", text=f"text {i}") for i in range(40)]
    (long_stream,) = client(workers.reranker.port, R.RerankStream, many)
    assert sorted(r.index for r in long_stream.ranks) == list(range(40))
    raw_request = tei_pb2.RerankRequest(query="alpha", texts=texts, raw_scores=True)
    (raw,) = client(workers.reranker.port, R.Rerank, [raw_request])
    assert [r.index for r in raw.ranks] == [r.index for r in reply.ranks]


def test_predict(workers: Workers, client: Client) -> None:
    port = workers.classifier.port
    (reply,) = client(port, P.Predict, [tei_pb2.PredictRequest(inputs="alpha beta")])
    assert len(reply.predictions) == 3
    assert abs(sum(p.score for p in reply.predictions) - 1) < 1e-4
    (pair,) = client(port, P.PredictPair, [tei_pb2.PredictPairRequest(inputs=["alpha", "beta"])])
    assert len(pair.predictions) == 3
    streamed = client(port, P.PredictStream, [tei_pb2.PredictRequest(inputs=t) for t in ("a", "b")])
    assert len(streamed) == 2
    pairs = client(
        port, P.PredictPairStream, [tei_pb2.PredictPairRequest(inputs=["alpha", "gamma"])]
    )
    assert len(pairs) == 1
    with pytest.raises(GrpcError) as bad_pair:
        client(port, P.PredictPair, [tei_pb2.PredictPairRequest(inputs=["only one"])])
    assert bad_pair.value.code == StatusCode.INVALID_ARGUMENT


def test_embed_sparse(workers: Workers, client: Client) -> None:
    port = workers.splade.port
    (reply,) = client(port, E.EmbedSparse, [tei_pb2.EmbedSparseRequest(inputs="alpha beta")])
    assert reply.sparse_embeddings
    assert all(v.value > 0 for v in reply.sparse_embeddings)
    streamed = client(
        port, E.EmbedSparseStream, [tei_pb2.EmbedSparseRequest(inputs=t) for t in ("a", "b")]
    )
    assert len(streamed) == 2


def test_overload_is_resource_exhausted_at_once(workers: Workers) -> None:
    """The classifier worker runs with --max-concurrent-requests 2, which is also the
    stream limit it advertises: one connection's calls queue in the client, and only
    calls from several connections at once overload the engine."""
    request = tei_pb2.PredictRequest(inputs="alpha " * 30)
    target = f"127.0.0.1:{workers.classifier.port}"
    with grpc.insecure_channel(target) as channel:
        predict = grpcio_client.stub(channel, P.Predict)
        futures = [predict.future(request) for _ in range(16)]
        assert all(future.code() == grpc.StatusCode.OK for future in futures)
    # A channel of its own each (not grpcio's shared subchannel): 8 connections.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(target, options=options) for _ in range(8)]
    try:
        futures = [
            grpcio_client.stub(channel, P.Predict).future(request)
            for channel in channels
            for _ in range(8)
        ]
        codes = []
        for future in futures:
            try:
                future.result(timeout=60)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "overloaded" in (error.details() or "")
    finally:
        for channel in channels:
            channel.close()
    assert grpc.StatusCode.OK in codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_health_and_reflection(workers: Workers) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(f"127.0.0.1:{workers.dense.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="tei.v1.Embed")).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"tei.v1.Embed", "tei.v1.Info", "grpc.health.v1.Health"} <= services
        file = database.FindFileContainingSymbol("tei.v1.Embed")
        assert file.package == "tei.v1"


def test_prometheus_metrics(workers: Workers) -> None:
    grpcio_client.call(workers.dense.port, E.Embed, [tei_pb2.EmbedRequest(inputs="count me")])
    with urllib.request.urlopen(
        f"http://127.0.0.1:{workers.metrics_port}/metrics", timeout=10
    ) as page:
        text = page.read().decode()
    assert 'te_request_count_total{method="Embed"}' in text
    assert "te_request_duration_bucket" in text
    assert "te_engine_" in text
