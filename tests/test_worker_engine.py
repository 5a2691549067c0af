"""The engine end to end on real models: tokenize, queue, batch, run and shape the answers."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
import trio.testing

from tei_manager.worker.engine import Engine, EngineError, ErrorKind, ModelLoadError
from tei_manager.worker.model import Model
from tei_manager.worker.options import WorkerOptions
from tests import models
from tests.conftest import TinyModels

TEXTS = [f"sentence number {i} about the river bank and the money in it" for i in range(16)]


@asynccontextmanager
async def running(model: Model, **options: Any) -> AsyncIterator[Engine]:
    """An engine on an already loaded ``model``, its batcher running for the block."""
    engine = Engine(model, WorkerOptions(model_id="test-model", **options))
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        yield engine
        nursery.cancel_scope.cancel()


def cosine(a: Any, b: Any) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


async def refused(call: Any) -> EngineError:
    with pytest.raises(EngineError) as caught:
        await call
    return caught.value


async def test_concurrent_embeds_are_batched_and_equal_encode(
    minilm_model: Model, minilm_st: Any
) -> None:
    expected = minilm_st.encode(TEXTS)
    got: dict[int, list[float]] = {}
    async with running(minilm_model) as engine:

        async def embed(i: int) -> None:
            got[i], _ = await engine.embed(TEXTS[i], truncate=False)

        async with trio.open_nursery() as nursery:
            for i in range(len(TEXTS)):
                nursery.start_soon(embed, i)
        stats = engine.statistics()
    for i, want in enumerate(expected):
        assert cosine(got[i], want) >= 0.9999
        assert sum(v * v for v in got[i]) == pytest.approx(1.0, abs=1e-5)
    assert stats.rows_run == len(TEXTS)
    assert stats.batches_run < len(TEXTS)  # they shared batches
    assert stats.requests_success == len(TEXTS)


async def test_embed_metadata(minilm_model: Model) -> None:
    async with running(minilm_model) as engine:
        _, timings = await engine.embed("Hello world", truncate=False)
    assert timings.compute_chars == len("Hello world")
    assert timings.compute_tokens == 4  # [CLS] hello world [SEP]
    assert timings.inference_time_ns > 0
    assert timings.tokenization_time_ns > 0
    assert timings.total_time_ns >= timings.queue_time_ns + timings.inference_time_ns


async def test_dimensions_and_normalize(minilm_model: Model, minilm_st: Any) -> None:
    text = TEXTS[0]
    async with running(minilm_model) as engine:
        short, _ = await engine.embed(text, truncate=False, dimensions=64)
        raw_short, _ = await engine.embed(text, truncate=False, dimensions=64, normalize=False)
        zero = await refused(engine.embed(text, truncate=False, dimensions=0))
        wide = await refused(engine.embed(text, truncate=False, dimensions=385))
    assert len(short) == 64
    assert math.fsum(v * v for v in short) == pytest.approx(1.0, abs=1e-5)
    # Matryoshka: the leading dimensions of the pooled output, then normalized; as
    # TEI does, the model's own Normalize module is left to `normalize`.
    want = minilm_st.encode(text, truncate_dim=64)
    assert cosine(raw_short, want) >= 0.9999
    assert math.fsum(v * v for v in raw_short) != pytest.approx(1.0, abs=1e-3)
    assert cosine(short, want) >= 0.9999
    assert (zero.kind, zero.message) == (ErrorKind.VALIDATION, "`dimensions` should be positive")
    assert wide.kind is ErrorKind.VALIDATION and "(384). Given: 385" in wide.message


async def test_normalize_off_returns_the_model_output(
    tiny_models: TinyModels, tiny_st_model: Model
) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(tiny_models.sentence_transformer), device="cpu")
    async with running(tiny_st_model) as engine:
        raw, _ = await engine.embed("the quick brown fox", truncate=False, normalize=False)
        unit, _ = await engine.embed("the quick brown fox", truncate=False)
    want = reference.encode("the quick brown fox")
    assert raw == pytest.approx(want.tolist(), abs=1e-5)
    assert math.fsum(v * v for v in raw) != pytest.approx(1.0, abs=1e-3)
    assert math.fsum(v * v for v in unit) == pytest.approx(1.0, abs=1e-5)


async def test_truncation_and_auto_truncate(minilm_model: Model, minilm_st: Any) -> None:
    long = " ".join(["river bank money fish water city night"] * 60)
    async with running(minilm_model) as engine:
        too_long = await refused(engine.embed(long, truncate=False))
        right, timings = await engine.embed(long, truncate=True)
        left, _ = await engine.embed(long + " fox fox fox", truncate=True, direction="left")
        empty = await refused(engine.embed("", truncate=True))
    assert too_long.kind is ErrorKind.VALIDATION
    assert too_long.message.startswith("`inputs` must have less than 256 tokens. Given: ")
    assert timings.compute_tokens == 256
    assert cosine(right, minilm_st.encode(long)) >= 0.9999
    assert cosine(left, right) < 0.9999  # the other end of the text was kept
    assert (empty.kind, empty.message) == (ErrorKind.VALIDATION, "`inputs` cannot be empty")
    async with running(minilm_model, auto_truncate=True) as engine:
        auto, _ = await engine.embed(long, truncate=False)
    assert auto == pytest.approx(right, abs=1e-6)


async def test_embed_all_gives_one_vector_per_token(minilm_model: Model, minilm_st: Any) -> None:
    async with running(minilm_model) as engine:
        tokens, timings = await engine.embed_all("Hello world", truncate=False)
        pooled, _ = await engine.embed("Hello world", truncate=False, normalize=False)
    want = minilm_st.encode("Hello world", output_value="token_embeddings")
    assert (len(tokens), len(tokens[0])) == (4, 384) == tuple(want.shape)
    assert timings.compute_tokens == 4
    for got, expected in zip(tokens, want, strict=True):
        assert cosine(got, expected) >= 0.9999
    mean = torch.tensor(tokens).mean(dim=0)
    assert cosine(mean, pooled) >= 0.9999  # mean pooling of exactly these vectors


async def test_embed_sparse(splade_model: Model) -> None:
    async with running(splade_model) as engine:
        sparse, timings = await engine.embed_sparse("the river bank", truncate=False)
        dense, _ = await engine.embed("the river bank", truncate=False, normalize=False)
        normalized = await refused(engine.embed("the river bank", truncate=False))
        all_tokens = await refused(engine.embed_all("the river bank", truncate=False))
    vocab = engine.info.hidden_size
    assert engine.info.is_splade and engine.info.model_type == "embedding"
    assert sparse and all(0 <= i < vocab and v > 0 for i, v in sparse)
    assert dict(sparse) == pytest.approx({i: v for i, v in enumerate(dense) if v != 0})
    assert timings.compute_tokens == 5
    assert normalized.kind is ErrorKind.UNSUPPORTED and "SPLADE" in normalized.message
    assert all_tokens.kind is ErrorKind.UNSUPPORTED and "SPLADE" in all_tokens.message


async def test_predict_classifier(classifier_model: Model) -> None:
    async with running(classifier_model) as engine:
        predictions, timings = await engine.predict("the quick brown fox", truncate=False)
        raw, _ = await engine.predict("the quick brown fox", truncate=False, raw_scores=True)
        pair, _ = await engine.predict(("what is it", "a dog"), truncate=False)
        rerank = await refused(engine.rerank("q", ["a"], truncate=False))
        embed = await refused(engine.embed("the dog", truncate=False))
    assert sorted(label for _, label in predictions) == sorted(models.LABELS)
    scores = [score for score, _ in predictions]
    assert scores == sorted(scores, reverse=True)
    assert math.fsum(scores) == pytest.approx(1.0)
    # softmax of the raw logits, label by label
    logits = dict((label, score) for score, label in raw)
    total = math.fsum(math.exp(v) for v in logits.values())
    assert {label: score for score, label in predictions} == pytest.approx(
        {label: math.exp(v) / total for label, v in logits.items()}
    )
    assert math.fsum(score for score, _ in raw) != pytest.approx(1.0)
    assert math.fsum(score for score, _ in pair) == pytest.approx(1.0)
    assert timings.compute_tokens == 6
    assert (rerank.kind, rerank.message) == (
        ErrorKind.UNSUPPORTED,
        "Model is not a re-ranker model",
    )
    assert (embed.kind, embed.message) == (ErrorKind.UNSUPPORTED, "Model is not an embedding model")
    assert engine.info.labels == models.LABELS and engine.info.model_type == "classifier"


async def test_rerank(reranker_model: Model) -> None:
    texts = ["money in the bank", "the river bank", "a quick brown fox", "fish"]
    async with running(reranker_model, max_client_batch_size=4) as engine:
        scores, timings = await engine.rerank("what is a bank", texts, truncate=False)
        raw, _ = await engine.rerank("what is a bank", texts, truncate=False, raw_scores=True)
        one = [
            (await engine.predict(("what is a bank", text), truncate=False))[0][0] for text in texts
        ]
        empty = await refused(engine.rerank("q", [], truncate=False))
        too_many = await refused(engine.rerank("q", ["a"] * 5, truncate=False))
        stats = engine.statistics()
    assert len(scores) == len(texts)
    assert all(0 < score < 1 for score in scores)
    assert scores == pytest.approx([1 / (1 + math.exp(-r)) for r in raw])
    assert [score for score, label in one] == pytest.approx(scores)  # input order kept
    assert {label for _, label in one} == {"LABEL_0"}
    assert timings.compute_chars == len("what is a bank") * 4 + sum(map(len, texts))
    assert (empty.kind, empty.message) == (ErrorKind.VALIDATION, "`texts` cannot be empty")
    assert too_many.kind is ErrorKind.VALIDATION
    assert too_many.message == "batch size 5 > maximum allowed batch size 4"
    assert stats.requests_validation == 2 and stats.requests_success == 6


async def test_operations_the_embedding_model_cannot_do(minilm_model: Model) -> None:
    async with running(minilm_model) as engine:
        errors = [
            await refused(engine.predict("text", truncate=False)),
            await refused(engine.rerank("q", ["a"], truncate=False)),
            await refused(engine.embed_sparse("text", truncate=False)),
        ]
    assert [(e.kind, e.message) for e in errors] == [
        (ErrorKind.UNSUPPORTED, "Model is not a classifier model"),
        (ErrorKind.UNSUPPORTED, "Model is not a classifier model"),
        (ErrorKind.UNSUPPORTED, "Model is not an embedding model with SPLADE pooling"),
    ]
    assert engine.statistics().requests_unsupported == 3


async def test_overloaded_fails_fast_and_cancelled_callers_leave_cleanly(
    minilm_model: Model,
) -> None:
    async with running(minilm_model, max_concurrent_requests=1) as engine:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(engine.embed, TEXTS[0], truncate=False))
            await trio.testing.wait_all_tasks_blocked()
            overloaded = await refused(engine.embed(TEXTS[1], truncate=False))
            nursery.cancel_scope.cancel()  # the first caller gives up mid-inference
        # The engine is free again and the batcher still works.
        vector, _ = await engine.embed(TEXTS[2], truncate=False)
        stats = engine.statistics()
    assert (overloaded.kind, overloaded.message) == (ErrorKind.OVERLOADED, "Model is overloaded")
    assert len(vector) == 384
    assert (stats.requests_overloaded, stats.requests_cancelled, stats.in_flight_requests) == (
        1,
        1,
        0,
    )


async def test_tokenize_and_decode(minilm_model: Model) -> None:
    async with running(minilm_model) as engine:
        tokens = engine.tokenize("Hello world", add_special_tokens=True)
        text = engine.decode([t.id for t in tokens], skip_special_tokens=True)
    assert [t.text for t in tokens] == ["[CLS]", "Hello", "world", "[SEP]"]
    assert text == "hello world"


def test_load_reports_the_model(tiny_models: TinyModels) -> None:
    options = WorkerOptions(
        model_id=str(tiny_models.sentence_transformer),
        served_model_name="tiny",
        max_batch_tokens=48,
        max_batch_requests=8,
        max_concurrent_requests=3,
    )
    info = Engine.load(options).info
    assert info.model_id == "tiny"
    assert (info.model_type, info.is_splade, info.hidden_size) == ("embedding", False, 32)
    assert info.model_dtype == "float32"
    assert info.max_input_length == 48  # the model allows 64; a batch holds only 48
    assert (info.max_batch_tokens, info.max_batch_requests) == (48, 8)
    assert info.max_concurrent_requests == 3
    assert info.prompts == {"query": "query: ", "passage": "passage: ", "document": ""}
    assert info.labels == ()


def test_load_errors_are_model_load_errors(tmp_path: Path, tiny_models: TinyModels) -> None:
    with pytest.raises(ModelLoadError):
        Engine.load(WorkerOptions(model_id=str(tmp_path)))  # an empty folder
    with pytest.raises(ModelLoadError, match="no-such-device"):
        Engine.load(WorkerOptions(model_id=str(tiny_models.reranker), device="no-such-device"))
