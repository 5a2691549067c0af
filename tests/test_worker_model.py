"""Loading real models through the worker's loader, tokenization, and batched forward passes."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from tei_manager.worker.errors import EngineError, ErrorKind, ModelLoadError
from tei_manager.worker.model import (
    PACK_TOKENS,
    Model,
    Row,
    length_groups,
    load_model,
    pack_rows,
    resolve_model_dir,
)
from tei_manager.worker.options import WorkerOptions
from tei_manager.worker.tokenization import MAX_CHARS_PER_TOKEN
from tests import models
from tests.conftest import TinyModels

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A",
    "Embeddings turn sentences into vectors that can be compared with a cosine similarity, "
    "which is what a search engine built on them does for every query it answers.",
]
LONG = " ".join(["river bank money fish water city night"] * 60)  # ~420 MiniLM tokens


def cosine(a: Any, b: Any) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def pooled(
    model: Model, texts: list[str], *, truncate: bool = False, **encode: Any
) -> list[list[float]]:
    rows = [
        Row(model.tokenization.encode(text, truncate=truncate, **encode), "pooled")
        for text in texts
    ]
    return model.forward(rows)  # type: ignore[return-value]


def error_of(call: Any) -> EngineError:
    with pytest.raises(EngineError) as caught:
        call()
    return caught.value


# --- the packaged all-MiniLM-L6-v2 -------------------------------------------------------


def test_minilm_loads_as_a_sentence_transformer(minilm_model: Model) -> None:
    assert minilm_model.model_type == "embedding"
    assert not minilm_model.is_splade
    assert minilm_model.hidden_size == 384
    assert minilm_model.dtype == "float32"
    # sentence_bert_config.json's max_seq_length, not the tokenizer's 512
    assert minilm_model.tokenization.max_input_length == 256
    assert minilm_model.model_sha is None  # a plain folder, not an HF-cache snapshot


def test_minilm_batched_forward_equals_sentence_transformers(
    minilm_model: Model, minilm_st: Any
) -> None:
    # One padded batch of mixed lengths must give what encode() gives for each text.
    expected = minilm_st.encode(TEXTS)
    for got, want in zip(pooled(minilm_model, TEXTS), expected, strict=True):
        assert len(got) == 384
        assert cosine(got, want) >= 0.9999


def test_minilm_packed_batch_equals_sentence_transformers(
    minilm_torch_model: Model, minilm_st: Any
) -> None:
    # Many rows share packed sequences; one row is longer than a packed sequence, one is
    # a single token's worth, and two ask for their token embeddings.
    minilm_model = minilm_torch_model
    assert minilm_model.runs_packed
    texts = [*TEXTS, *(f"sentence number {i} " * (i % 7 + 1) for i in range(20))]
    rows = [Row(minilm_model.tokenization.encode(text, truncate=True), "pooled") for text in texts]
    rows.append(Row(minilm_model.tokenization.encode(LONG, truncate=True), "pooled"))
    assert len(rows[-1].encoding.ids) > PACK_TOKENS
    rows += [
        Row(minilm_model.tokenization.encode(text, truncate=False), "tokens") for text in TEXTS[:2]
    ]
    got = minilm_model.forward(rows)
    pooled_rows = got[: len(texts) + 1]
    for vector, want in zip(pooled_rows, minilm_st.encode([*texts, LONG]), strict=True):
        assert cosine(vector, want) >= 0.9999
    expected_tokens = minilm_st.encode(TEXTS[:2], output_value="token_embeddings")
    for tokens, want in zip(got[-2:], expected_tokens, strict=True):
        assert len(tokens) == len(want)
        for token, token_want in zip(tokens, want, strict=True):
            assert cosine(token, token_want) >= 0.9999


def test_pack_rows_fills_sequences_longest_first() -> None:
    lengths = [30, 10, 64, 20, 34, 5, 40]
    sequences = pack_rows(lengths, 64)
    assert sorted(i for members in sequences for i in members) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in members) <= 64 for members in sequences)
    # 64 | 40+20 | 34+30 | 10+5: first fit, taking the rows longest first
    assert [[lengths[i] for i in members] for members in sequences] == [
        [64],
        [40, 20],
        [34, 30],
        [10, 5],
    ]
    assert pack_rows([7], 64) == [[0]]


def test_truncation_right_equals_sentence_transformers(minilm_model: Model, minilm_st: Any) -> None:
    [got] = pooled(minilm_model, [LONG], truncate=True, direction="right")
    assert cosine(got, minilm_st.encode(LONG)) >= 0.9999


def test_truncation_keeps_special_tokens_and_cuts_the_chosen_side(minilm_model: Model) -> None:
    tokens = minilm_model.tokenization
    full = tokens.encode(LONG + " fox", truncate=True, direction="left").ids
    plain = tokens._plain.encode(LONG + " fox").ids
    assert len(full) == 256
    assert full[0] == plain[0] and full[-1] == plain[-1]  # [CLS] ... [SEP]
    assert full[1:-1] == plain[-255:-1]  # the end of the text survives
    right = tokens.encode(LONG + " fox", truncate=True, direction="right").ids
    assert right[1:-1] == plain[1:255]


def test_too_long_without_truncate_names_the_limit(minilm_model: Model) -> None:
    count = len(minilm_model.tokenization._plain.encode(LONG).ids)
    error = error_of(lambda: minilm_model.tokenization.encode(LONG, truncate=False))
    assert error.kind is ErrorKind.VALIDATION
    assert error.message == f"`inputs` must have less than 256 tokens. Given: {count}"


def test_too_many_characters(minilm_model: Model) -> None:
    huge = "a " * (256 * MAX_CHARS_PER_TOKEN)
    error = error_of(lambda: minilm_model.tokenization.encode(huge, truncate=False))
    assert error.kind is ErrorKind.VALIDATION
    assert f"less than {256 * MAX_CHARS_PER_TOKEN} characters" in error.message
    assert len(minilm_model.tokenization.encode(huge, truncate=True).ids) == 256
    error = error_of(lambda: minilm_model.tokenization.tokenize(huge, add_special_tokens=True))
    assert "characters" in error.message


def test_empty_input_is_refused(minilm_model: Model) -> None:
    tokens = minilm_model.tokenization
    for call in (
        lambda: tokens.encode("", truncate=True),
        lambda: tokens.encode_pair("", "", truncate=True),
        lambda: tokens.tokenize("", add_special_tokens=True),
    ):
        error = error_of(call)
        assert (error.kind, error.message) == (ErrorKind.VALIDATION, "`inputs` cannot be empty")
    error = error_of(lambda: tokens.decode([], skip_special_tokens=True))
    assert error.message == "`input_ids` cannot be empty"


def test_tokenize_reports_offsets_and_special_tokens(minilm_model: Model) -> None:
    tokens = minilm_model.tokenization.tokenize("Hello world!", add_special_tokens=True)
    assert [(t.text, t.special, t.start, t.stop) for t in tokens] == [
        ("[CLS]", True, None, None),
        ("Hello", False, 0, 5),
        ("world", False, 6, 11),
        ("!", False, 11, 12),
        ("[SEP]", True, None, None),
    ]
    plain = minilm_model.tokenization.tokenize("Hello world!", add_special_tokens=False)
    assert [t.text for t in plain] == ["Hello", "world", "!"]
    ids = [t.id for t in tokens]
    decode = minilm_model.tokenization.decode
    assert decode(ids, skip_special_tokens=True) == "hello world!"
    assert decode(ids, skip_special_tokens=False) == "[CLS] hello world! [SEP]"


def test_length_groups_split_a_batch_at_the_least_padding() -> None:
    def cost(groups: list[list[int]], lengths: list[int], overhead: int) -> int:
        return sum(max(lengths[i] for i in g) * len(g) + overhead for g in groups)

    lengths = [11, 27, 12, 26, 11, 25, 13, 27]
    groups = length_groups(lengths, overhead=8)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [[lengths[i] for i in g] for g in groups] == [[11, 11, 12, 13], [25, 26, 27, 27]]
    # No split is cheaper: try every way of cutting the sorted lengths into runs.
    ordered = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = min(
        cost(
            [ordered[a:b] for a, b in zip((0, *cuts), (*cuts, len(ordered)), strict=True)],
            lengths,
            8,
        )
        for n in range(len(ordered))
        for cuts in itertools.combinations(range(1, len(ordered)), n)
    )
    assert cost(groups, lengths, 8) == best
    assert length_groups(lengths, overhead=1000) == [ordered]  # a forward costs too much
    assert length_groups(lengths, overhead=None) == [ordered]  # GPU: always one batch
    assert length_groups([7], overhead=8) == [[0]]


# --- prompts ------------------------------------------------------------------------------

PROMPTS = {"query": "query: ", "passage": "passage: "}


@pytest.fixture(scope="session")
def prompted_minilm_dir(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.with_prompts(minilm_dir, tmp_path_factory.mktemp("prompted"), PROMPTS)


def test_prompt_name_equals_sentence_transformers(prompted_minilm_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(prompted_minilm_dir), device="cpu")
    model = load_model(WorkerOptions(model_id=str(prompted_minilm_dir)))
    assert model.tokenization.prompts["query"] == "query: "
    [got] = pooled(model, ["What is a river bank?"], prompt_name="query")
    want = reference.encode("What is a river bank?", prompt_name="query")
    assert cosine(got, want) >= 0.9999
    [unprompted] = pooled(model, ["What is a river bank?"])
    assert cosine(unprompted, want) < 0.999  # the prompt really changed the input

    tokens = model.tokenization.tokenize("bank", add_special_tokens=False, prompt_name="query")
    assert [t.text for t in tokens] == ["query", ":", "bank"]

    error = error_of(lambda: model.tokenization.encode("x", truncate=False, prompt_name="nope"))
    assert error.kind is ErrorKind.VALIDATION
    assert "'nope'" in error.message and "passage" in error.message


def test_default_prompt_options(prompted_minilm_dir: Path) -> None:
    named = load_model(
        WorkerOptions(model_id=str(prompted_minilm_dir), default_prompt_name="passage")
    ).tokenization
    assert named.encode("bank", truncate=False) == named.encode(
        "bank", truncate=False, prompt_name="passage"
    )
    literal = load_model(
        WorkerOptions(model_id=str(prompted_minilm_dir), default_prompt="query: ")
    ).tokenization
    assert literal.encode("bank", truncate=False) == named.encode(
        "bank", truncate=False, prompt_name="query"
    )
    with pytest.raises(ModelLoadError, match="'missing'"):
        load_model(WorkerOptions(model_id=str(prompted_minilm_dir), default_prompt_name="missing"))


# --- tiny random models of every kind ---------------------------------------------------


def test_tiny_sentence_transformer_and_pooling_override(
    tiny_models: TinyModels, tiny_st_model: Model
) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(tiny_models.sentence_transformer), device="cpu")
    texts = ["the quick brown fox", "a dog"]
    for got, want in zip(pooled(tiny_st_model, texts), reference.encode(texts), strict=True):
        assert cosine(got, want) >= 0.9999

    cls = load_model(WorkerOptions(model_id=str(tiny_models.sentence_transformer), pooling="cls"))
    encoding = cls.tokenization.encode("the quick brown fox", truncate=False)
    pooled_cls, tokens = cls.forward([Row(encoding, "pooled"), Row(encoding, "tokens")])
    assert len(tokens) == len(encoding.ids)
    assert pooled_cls == pytest.approx(tokens[0], abs=1e-6)  # CLS pooling: the first token


def test_packed_model_with_a_dense_head(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    folder = models.save_sentence_transformer(tmp_path / "dense", dense_features=8)
    model = load_model(WorkerOptions(model_id=str(folder), engine="torch"))
    assert model.runs_packed
    assert model.hidden_size == 8
    reference = SentenceTransformer(str(folder), device="cpu")
    texts = ["the quick brown fox", "a dog", "jumps over the lazy dog " * 4]
    for got, want in zip(pooled(model, texts), reference.encode(texts), strict=True):
        assert cosine(got, want) >= 0.9999


def test_dtype_option(tiny_models: TinyModels, tiny_st_model: Model) -> None:
    half = load_model(
        WorkerOptions(model_id=str(tiny_models.sentence_transformer), dtype="bfloat16")
    )
    assert (half.engine, half.dtype) == ("torch", "bfloat16")  # ORT on CPU has no bfloat16
    texts = ["the quick brown fox", "a dog"]
    for got, want in zip(pooled(half, texts), pooled(tiny_st_model, texts), strict=True):
        assert cosine(got, want) >= 0.99


def test_reranker(reranker_model: Model) -> None:
    assert (reranker_model.model_type, reranker_model.labels) == ("reranker", ("LABEL_0",))
    assert reranker_model.tokenization.max_input_length == models.MAX_POSITIONS
    pair = reranker_model.tokenization.encode_pair("what is a bank", "money", truncate=False)
    assert 1 in pair.type_ids  # the second text is segment 1
    [scores] = reranker_model.forward([Row(pair, "scores")])
    assert len(scores) == 1


def test_classifier(classifier_model: Model) -> None:
    assert classifier_model.model_type == "classifier"
    assert classifier_model.labels == models.LABELS
    rows = [
        Row(classifier_model.tokenization.encode(text, truncate=False), "scores")
        for text in ("the dog", "a quick brown fox jumps")
    ]
    outputs = classifier_model.forward(rows)
    assert [len(scores) for scores in outputs] == [3, 3]
    assert outputs[0] != outputs[1]


def test_splade(splade_model: Model) -> None:
    assert splade_model.is_splade and splade_model.model_type == "embedding"
    vocab = splade_model.hidden_size
    encoding = splade_model.tokenization.encode("the river bank", truncate=False)
    sparse, dense = splade_model.forward([Row(encoding, "sparse"), Row(encoding, "pooled")])
    assert sparse and all(0 <= index < vocab and value > 0 for index, value in sparse)
    assert len(dense) == vocab
    assert dict(sparse) == pytest.approx({i: v for i, v in enumerate(dense) if v != 0})


def test_splade_needs_a_masked_lm(minilm_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="ForMaskedLM"):
        load_model(WorkerOptions(model_id=str(minilm_dir), pooling="splade"))


def test_truncation_of_pairs_trims_the_longer_side(reranker_model: Model) -> None:
    tokens = reranker_model.tokenization
    long_text = " ".join(["river"] * 100)
    pair = tokens.encode_pair("what is it", long_text, truncate=True)
    assert len(pair.ids) == models.MAX_POSITIONS
    assert pair.ids[:5] == [*tokens.encode("what is it", truncate=False).ids[:4], 3]
    error = error_of(lambda: tokens.encode_pair("what", long_text, truncate=False))
    assert "less than 64 tokens" in error.message


# --- resolving model ids through the Hugging Face cache ---------------------------------


def test_hub_cache_snapshot_offline(
    tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    models.fake_hub_cache(tiny_models.reranker, tmp_path, "acme/tiny-reranker", commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    options = WorkerOptions(model_id="acme/tiny-reranker", huggingface_hub_cache=str(tmp_path))
    assert resolve_model_dir(options) == tmp_path / "models--acme--tiny-reranker/snapshots" / commit
    model = load_model(options)
    assert (model.model_type, model.model_sha) == ("reranker", commit)

    missing = WorkerOptions(model_id="acme/not-cached", huggingface_hub_cache=str(tmp_path))
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache"):
        resolve_model_dir(missing)
