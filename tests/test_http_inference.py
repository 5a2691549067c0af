"""The HTTP inference routes in front of real worker processes, with the clients people use.

The REST app (with its gateway) runs in-process, in a thread with its own trio loop,
over a table whose instances are the session's worker processes. The OpenAI SDK and
``huggingface_hub.InferenceClient`` talk to it as they would to OpenAI or to a TEI;
plain httpx does the rest. Embeddings must equal sentence-transformers' own.
"""

from __future__ import annotations

import base64
import queue
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import openai
import pytest
import trio
from huggingface_hub import InferenceClient

from tei_manager.api import serve_api
from tei_manager.config import InstanceConfig, ManagerConfig
from tei_manager.core.instances import InstanceTable
from tei_manager.core.ports import PortAllocator
from tei_manager.gateway.relay import create_gateway
from tei_manager.multiplexer.server import shared_routing
from tests.conftest import Workers
from tests.fake_manager import FakeManager

pytestmark = pytest.mark.slow

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A river bank is where the water meets the land.",
    "Vector search finds documents near a query.",
]


class Served:
    def __init__(self, port: int, model_id: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.model_id = model_id
        self.http = httpx.Client(base_url=self.base, timeout=60)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0)


def _table(workers: Workers, minilm: str) -> InstanceTable:
    table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    now = datetime.now(UTC)

    def add(name: str, model: str, process: Any, **extra: Any) -> None:
        record = table.add(InstanceConfig(name=name, model_id=model, **extra), created_at=now)
        record.config = msgspec.structs.replace(record.config, port=process.port)
        record.mark_starting(pid=process.process.pid, now=now)
        record.mark_running()

    add("dense", minilm, workers.dense, served_model_name="minilm")
    add("reranker", "tiny/reranker", workers.reranker)
    add("classifier", "tiny/classifier", workers.classifier)
    add("splade", "tiny/splade", workers.splade, pooling="splade")
    return table


@pytest.fixture(scope="module")
def served(
    workers: Workers, minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("http-inference")
    config = ManagerConfig(
        api_host="127.0.0.1", api_port=0, grpc_port=0,
        state_file=str(tmp / "state.toml"), log_dir=str(tmp / "logs"),
    )  # fmt: skip
    manager = FakeManager(config)
    table = _table(workers, str(minilm_dir))
    started: queue.Queue[int | BaseException] = queue.Queue()
    stop = threading.Event()

    async def main() -> None:
        shared = shared_routing(config, table)
        gateway = create_gateway(
            config,
            table,
            manager.metrics.prometheus,
            shared,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(shared.pool.run)
            port = await nursery.start(partial(serve_api, manager, "127.0.0.1", 0, gateway=gateway))
            started.put(port)
            await trio.to_thread.run_sync(stop.wait, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()

    def thread() -> None:
        try:
            trio.run(main)
        except BaseException as error:
            started.put(error)

    runner = threading.Thread(target=thread, daemon=True)
    runner.start()
    port = started.get(timeout=60)
    if isinstance(port, BaseException):
        raise port
    handle = Served(port, str(minilm_dir))
    try:
        yield handle
    finally:
        handle.http.close()
        stop.set()
        runner.join(30)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


# --- OpenAI --------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
@pytest.mark.parametrize("name", ["model_id", "dense", "minilm"])
def test_openai_sdk_embeds_like_sentence_transformers(
    served: Served, minilm_st: Any, name: str, encoding_format: Any
) -> None:
    model = served.model_id if name == "model_id" else name
    reply = served.openai().embeddings.create(
        model=model, input=TEXTS, encoding_format=encoding_format
    )
    got = (
        np.array([d.embedding for d in reply.data], dtype=np.float32)
        if encoding_format == "float"
        else np.array(
            [np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in reply.data]  # type: ignore[arg-type]
        )
    )
    want = minilm_st.encode(TEXTS, convert_to_numpy=True)
    assert [d.index for d in reply.data] == [0, 1, 2]
    assert np.all(_cosines(got, want) >= 0.9999)
    assert reply.model == model
    tokens = sum(len(minilm_st.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == tokens


def test_openai_sdk_single_string_and_default_format(served: Served, minilm_st: Any) -> None:
    reply = served.openai().embeddings.create(model="dense", input=TEXTS[0])
    assert len(reply.data) == 1
    want = minilm_st.encode([TEXTS[0]])
    assert _cosines(np.array([reply.data[0].embedding]), want)[0] >= 0.9999


def test_openai_dimensions_truncate_and_renormalise(served: Served, minilm_st: Any) -> None:
    reply = served.openai().embeddings.create(model="dense", input=TEXTS, dimensions=64)
    got = np.array([d.embedding for d in reply.data])
    assert got.shape == (3, 64)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    want = minilm_st.encode(TEXTS)[:, :64]
    assert np.all(_cosines(got, want) >= 0.9999)


def test_openai_token_id_inputs_embed_their_text(served: Served, minilm_st: Any) -> None:
    ids = [minilm_st.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:2]]
    reply = served.openai().embeddings.create(model="dense", input=ids)
    got = np.array([d.embedding for d in reply.data])
    want = minilm_st.encode([minilm_st.tokenizer.decode(i) for i in ids])
    assert np.all(_cosines(got, want) >= 0.9999)
    single = served.openai().embeddings.create(model="dense", input=ids[0])
    assert _cosines(np.array([single.data[0].embedding]), want[:1])[0] >= 0.9999


def test_openai_models_list_every_name(served: Served) -> None:
    models = served.openai().models.list()
    ids = [m.id for m in models.data]
    assert ids[:3] == ["dense", "minilm", served.model_id]
    assert {"reranker", "tiny/reranker", "classifier", "splade"} <= set(ids)
    one = served.http.get("/v1/models/tiny/reranker")
    assert one.status_code == 200 and one.json()["id"] == "tiny/reranker"
    missing = served.http.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "MODEL_NOT_FOUND"


def test_openai_errors(served: Served) -> None:
    client = served.openai()
    with pytest.raises(openai.NotFoundError) as unknown:
        client.embeddings.create(model="no-such-model", input="x")
    assert unknown.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as wrong_kind:
        client.embeddings.create(model="reranker", input="x")
    assert "reranker model" in wrong_kind.value.message
    with pytest.raises(openai.BadRequestError) as empty:
        client.embeddings.create(model="dense", input=[])
    assert empty.value.body["param"] == "input"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.embeddings.create(model="dense", input="word " * 2000)
    assert too_long.value.status_code == 400
    body = served.http.post("/v1/embeddings", content=b"{").json()
    assert body["error"]["type"] == "invalid_request_error"
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_v1_rerank_sorts_and_keeps_indices(served: Served) -> None:
    docs = ["fish in the river", {"text": "money in the bank"}, "a quick fox"]
    reply = served.http.post(
        "/v1/rerank",
        json={"model": "reranker", "query": "river bank", "documents": docs,
              "top_n": 2, "return_documents": True},
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    body = reply.json()
    results = body["results"]
    assert len(results) == 2
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]
    texts = ["fish in the river", "money in the bank", "a quick fox"]
    assert all(r["document"]["text"] == texts[r["index"]] for r in results)
    assert body["usage"]["total_tokens"] > 0
    full = served.http.post(
        "/tei/reranker/rerank", json={"query": "river bank", "texts": texts}
    ).json()
    assert [r["index"] for r in full][:2] == [r["index"] for r in results]
    wrong = served.http.post(
        "/v1/rerank", json={"model": "dense", "query": "q", "documents": ["d"]}
    )
    assert wrong.status_code == 400 and "embedding model" in wrong.json()["error"]["message"]


# --- TEI's HTTP API ---------------------------------------------------------------------------


def test_inference_client_feature_extraction(served: Served, minilm_st: Any) -> None:
    client = InferenceClient(base_url=f"{served.base}/tei/dense")
    got = client.feature_extraction(TEXTS[0])
    want = minilm_st.encode([TEXTS[0]])
    assert np.asarray(got).shape == (1, 384)
    assert _cosines(np.asarray(got, dtype=np.float32), want)[0] >= 0.9999
    scores = client.sentence_similarity(TEXTS[0], other_sentences=TEXTS[1:])
    vectors = minilm_st.encode(TEXTS)
    assert np.allclose(scores, _cosines(vectors[1:], np.repeat(vectors[:1], 2, axis=0)), atol=1e-4)


def test_inference_client_text_classification(served: Served) -> None:
    client = InferenceClient(base_url=f"{served.base}/tei/classifier")
    answer = client.text_classification("a quick brown fox")
    # The client reads TEI's answer to one text as its top prediction.
    top = answer[0] if isinstance(answer, list) else answer
    direct = served.http.post("/tei/classifier/predict", json={"inputs": "a quick brown fox"})
    assert direct.status_code == 200, direct.text
    best = direct.json()[0]
    assert top.label == best["label"]
    assert top.score == pytest.approx(best["score"], abs=1e-5)


def test_tei_routes(served: Served, minilm_st: Any) -> None:
    http = served.http
    embed = http.post("/tei/minilm/embed", json={"inputs": TEXTS})
    assert embed.status_code == 200
    assert np.all(_cosines(np.array(embed.json()), minilm_st.encode(TEXTS)) >= 0.9999)
    by_id = http.post(f"/tei/{served.model_id}/embed", json={"inputs": TEXTS[0]})
    assert by_id.status_code == 200 and len(by_id.json()) == 1
    sparse = http.post("/tei/splade/embed_sparse", json={"inputs": ["fish", "river bank"]})
    assert sparse.status_code == 200
    assert all({"index", "value"} == set(v) for row in sparse.json() for v in row)
    every = http.post("/tei/dense/embed_all", json={"inputs": "quick fox"}).json()
    assert len(every) == 1 and len(every[0][0]) == 384
    pair = http.post("/tei/classifier/predict", json={"inputs": ["a", "b"]}).json()
    assert {p["label"] for p in pair} == {"negative", "neutral", "positive"}
    batch = http.post("/tei/classifier/predict", json={"inputs": [["a"], ["a", "b"]]}).json()
    assert len(batch) == 2 and all(len(b) == 3 for b in batch)
    tokens = http.post("/tei/dense/tokenize", json={"inputs": "quick fox"}).json()
    ids = [t["id"] for t in tokens[0]]
    assert ids == minilm_st.tokenizer("quick fox")["input_ids"]
    text = http.post("/tei/dense/decode", json={"ids": ids}).json()
    assert text == ["quick fox"]
    info = http.get("/tei/dense/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "default"}}
    assert info["served_model_name"] == "minilm"
    assert http.get("/tei/dense/health").status_code == 200


def test_tei_errors(served: Served) -> None:
    http = served.http

    def error(method: str, path: str, body: object = None) -> tuple[int, dict[str, Any]]:
        reply = http.request(method, path, json=body)
        return reply.status_code, reply.json()

    assert error("POST", "/tei/reranker/embed", {"inputs": "x"})[0] == 424
    status, body = error("POST", "/tei/dense/rerank", {"query": "q", "texts": ["t"]})
    assert (status, body) == (
        424,
        {"error": "model is not a re-ranker model", "error_type": "Backend"},
    )
    assert error("POST", "/tei/dense/embed", {"inputs": []}) == (
        400, {"error": "`inputs` cannot be empty", "error_type": "Empty"},
    )  # fmt: skip
    status, body = error("POST", "/tei/dense/embed", {"inputs": "word " * 2000})
    assert status == 422 and body["error_type"] == "Validation"
    status, body = error("POST", "/tei/dense/embed", {"inputs": ["x"] * 1000})
    assert status == 422 and "maximum allowed batch size" in body["error"]
    assert error("GET", "/tei/nope/info")[0] == 404
    assert error("POST", "/tei/dense/embed", {"inputs": 5})[0] == 422
