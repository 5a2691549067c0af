"""The ONNX Runtime engine: same outputs as torch, the graph cache, and choosing the engine."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tei_manager.worker.errors import ModelLoadError
from tei_manager.worker.model import Model, Row, ignored_files, load_model
from tei_manager.worker.onnx_graph import CACHE_ENV, cache_key, onnx_cache_dir
from tei_manager.worker.options import WorkerOptions, parse_options
from tests import models
from tests.conftest import TinyModels

TEXTS = ["the quick brown fox", "a dog", "jumps over the lazy dog " * 5, "what is a river bank"]


def cosine(a: Any, b: Any) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def load(folder: Path, **options: Any) -> Model:
    return load_model(WorkerOptions(model_id=str(folder), **options))


def rows(model: Model, task: str, texts: list[str] = TEXTS) -> list[Row]:
    return [Row(model.tokenization.encode(t, truncate=True), task) for t in texts]  # type: ignore[arg-type]


def assert_same(model: Model, reference: Model, batch: list[Row]) -> None:
    got, want = model.forward(batch), reference.forward(batch)
    for one, other in zip(got, want, strict=True):
        assert len(one) == len(other)
        assert cosine(one, other) >= 0.9999


def test_dense_models_equal_torch(tiny_models: TinyModels, tmp_path: Path) -> None:
    # Mean pooling, then a model with a Dense head, then CLS pooling; tokens too.
    with_dense = models.save_sentence_transformer(tmp_path / "dense", dense_features=8)
    for folder, pooling in [
        (tiny_models.sentence_transformer, None),
        (with_dense, None),
        (tiny_models.sentence_transformer, "cls"),
    ]:
        model = load(folder, pooling=pooling)
        reference = load(folder, pooling=pooling, engine="torch")
        assert (model.engine, reference.engine) == ("onnx", "torch")
        assert model.hidden_size == reference.hidden_size
        batch = rows(model, "pooled") + rows(model, "tokens")[:2]
        assert_same(model, reference, batch)


def test_prompts_reach_the_onnx_model(tiny_models: TinyModels) -> None:
    model = load(tiny_models.sentence_transformer)
    reference = load(tiny_models.sentence_transformer, engine="torch")
    encoding = model.tokenization.encode("a dog", truncate=False, prompt_name="query")
    plain = model.tokenization.encode("a dog", truncate=False)
    assert encoding != plain
    assert_same(model, reference, [Row(encoding, "pooled"), Row(plain, "pooled")])


def test_classifier_reranker_and_splade_equal_torch(tiny_models: TinyModels) -> None:
    for folder, task, options in [
        (tiny_models.classifier, "scores", {}),
        (tiny_models.reranker, "scores", {}),
        (tiny_models.masked_lm, "sparse", {"pooling": "splade"}),
        (tiny_models.masked_lm, "pooled", {"pooling": "splade"}),
    ]:
        model = load(folder, **options)
        reference = load(folder, engine="torch", **options)
        assert model.engine == "onnx"
        if task == "sparse":
            for got, want in zip(
                model.forward(rows(model, task)), reference.forward(rows(model, task)), strict=True
            ):
                assert dict(got) == pytest.approx(dict(want), rel=1e-4, abs=1e-5)  # type: ignore[arg-type]
        else:
            assert_same(model, reference, rows(model, task))
    pair = model.tokenization.encode_pair("what is a bank", "money", truncate=False)
    reranker = load(tiny_models.reranker)
    [score] = reranker.forward([Row(pair, "scores")])
    [want] = load(tiny_models.reranker, engine="torch").forward([Row(pair, "scores")])
    assert score == pytest.approx(want, abs=1e-5)  # token type ids of the pair reach the graph


def test_the_graph_is_exported_once_and_a_corrupt_one_is_replaced(
    tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    folder = tiny_models.classifier
    first = load(folder)
    [graph] = (tmp_path / "cache").glob("*/model.float32.*.onnx")
    assert graph.parent.name == cache_key(folder, None, "classifier")
    written, size = graph.stat().st_mtime_ns, graph.stat().st_size
    load(folder)
    assert graph.stat().st_mtime_ns == written  # read from the cache, not exported again

    graph.write_bytes(graph.read_bytes()[:-100])  # a partial file under the final name
    again = load(folder)
    [regraph] = (tmp_path / "cache").glob("*/model.float32.*.onnx")
    assert regraph.name == graph.name  # exported again, to the same bytes
    assert regraph.stat().st_size == size
    batch = rows(first, "scores")
    assert again.forward(batch) == first.forward(batch)
    assert not list((tmp_path / "cache").glob("*/.export-*"))  # no scratch left behind


def test_a_graph_shipped_with_the_model_is_used(
    tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    load(tiny_models.sentence_transformer)
    [exported] = cache.glob("*/model.float32.*.onnx")
    shipped = tmp_path / "shipped"
    shutil.copytree(tiny_models.sentence_transformer, shipped)
    (shipped / "onnx").mkdir()
    shutil.copyfile(exported, shipped / "onnx" / "model.onnx")
    shutil.rmtree(cache)
    model = load(shipped)
    assert model.engine == "onnx"
    assert not cache.exists()  # nothing exported: the model's own graph runs
    assert_same(model, load(shipped, engine="torch"), rows(model, "pooled"))


def test_int8_is_close_to_float32(tiny_models: TinyModels) -> None:
    model = load(tiny_models.sentence_transformer, dtype="int8")
    assert (model.engine, model.dtype) == ("onnx", "int8")
    reference = load(tiny_models.sentence_transformer)
    for got, want in zip(
        model.forward(rows(model, "pooled")), reference.forward(rows(model, "pooled")), strict=True
    ):
        assert 0.95 <= cosine(got, want) < 1.0  # close, and really quantised


def test_engine_choice(tiny_models: TinyModels, caplog: pytest.LogCaptureFixture) -> None:
    folder = tiny_models.sentence_transformer
    with caplog.at_level(logging.INFO, logger="tei_manager.worker.model"):
        half = load(folder, dtype="bfloat16")
    assert half.engine == "torch"
    [line] = [r.getMessage() for r in caplog.records if "running the model on torch" in r.message]
    assert "bfloat16" in line
    with pytest.raises(ModelLoadError, match="--engine onnx: --dtype bfloat16"):
        load(folder, dtype="bfloat16", engine="onnx")
    with pytest.raises(ModelLoadError, match="--dtype int8 needs ONNX Runtime"):
        load(folder, dtype="int8", engine="torch")
    assert load(folder, engine="torch").engine == "torch"


def test_engine_flag_and_cache_location(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_options(["--model-id", "m"]).engine == "auto"
    assert parse_options(["--model-id", "m", "--engine", "onnx", "--dtype", "int8"]).dtype == "int8"
    with pytest.raises(SystemExit):
        parse_options(["--model-id", "m", "--engine", "tensorrt"])
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", "/var/cache/x")
    assert onnx_cache_dir() == Path("/var/cache/x/tei-manager/onnx")
    monkeypatch.setenv(CACHE_ENV, "/srv/graphs")
    assert onnx_cache_dir() == Path("/srv/graphs")


def test_downloads_fetch_the_shipped_graph_only_for_the_onnx_engine() -> None:
    import fnmatch

    def fetched(name: str, *, onnx: bool) -> bool:
        return not any(fnmatch.fnmatch(name, p) for p in ignored_files(onnx=onnx))

    assert fetched("onnx/model.onnx", onnx=True)
    assert fetched("onnx/model.onnx_data", onnx=True)  # a big graph's weights
    assert not fetched("onnx/model_O4.onnx", onnx=True)
    assert not fetched("onnx/model_qint8_avx512.onnx", onnx=True)
    assert not fetched("onnx/model.onnx", onnx=False)
    assert not fetched("model.onnx", onnx=False)
    for onnx in (True, False):
        assert fetched("model.safetensors", onnx=onnx)
        assert not fetched("openvino/openvino_model.bin", onnx=onnx)
