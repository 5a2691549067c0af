"""Tiny random models in the standard on-disk layouts, for loading through the real loader.

Each helper writes one model folder (``save_pretrained`` layout, plus the
sentence-transformers files where that kind needs them) and returns its path. The
models are a few hundred kilobytes and load in milliseconds; their outputs are
meaningless but deterministic.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

WORDS = (
    "the a an of to and in is it that what where who how why which river bank money "
    "fish water city night day model server vector search query document fast slow "
    "batch queue token sentence quick brown fox jumps over lazy dog"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MAX_POSITIONS = 64
HIDDEN = 32
LABELS = ("negative", "neutral", "positive")


def _tokenizer(folder: Path) -> None:
    from transformers import BertTokenizerFast
    from transformers.utils import logging

    logging.disable_progress_bar()
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate([*SPECIAL, *WORDS, "##s", "##ing"])}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=MAX_POSITIONS)
    tokenizer.save_pretrained(str(folder))


def _config(**extra: object) -> object:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS) + 2,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS,
        **extra,
    )


def save_reranker(folder: Path) -> Path:
    """A ``BertForSequenceClassification`` with one label: a reranker."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(1)
    _tokenizer(folder)
    BertForSequenceClassification(_config(num_labels=1)).save_pretrained(str(folder))
    return folder


def save_classifier(folder: Path) -> Path:
    """A ``BertForSequenceClassification`` with three named labels."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(2)
    _tokenizer(folder)
    config = _config(
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    BertForSequenceClassification(config).save_pretrained(str(folder))
    return folder


def save_masked_lm(folder: Path) -> Path:
    """A ``BertForMaskedLM``, served with ``--pooling splade``."""
    import torch
    from transformers import BertForMaskedLM

    torch.manual_seed(3)
    _tokenizer(folder)
    BertForMaskedLM(_config()).save_pretrained(str(folder))
    return folder


def save_sentence_transformer(
    folder: Path, *, prompts: dict[str, str] | None = None, dense_features: int | None = None
) -> Path:
    """A sentence-transformers model (BERT + mean pooling, no Normalize) with ``prompts``.

    ``dense_features``: a Dense module after the pooling, projecting to that many features.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules import Dense, Pooling
    from transformers import BertModel

    torch.manual_seed(4)
    bert = folder.parent / f"{folder.name}-bert"
    _tokenizer(bert)
    BertModel(_config()).save_pretrained(str(bert))
    modules: list[torch.nn.Module] = [Transformer(str(bert)), Pooling(HIDDEN, "mean")]
    if dense_features is not None:
        modules.append(Dense(HIDDEN, dense_features))
    SentenceTransformer(modules=modules, prompts=prompts or {}, device="cpu").save(str(folder))
    shutil.rmtree(bert)
    return folder


def with_prompts(source: Path, folder: Path, prompts: dict[str, str]) -> Path:
    """A copy of the sentence-transformers model at ``source`` (files linked) with ``prompts``."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "config_sentence_transformers.json":
            (folder / item.name).symlink_to(item)
    config_file = source / "config_sentence_transformers.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    config["prompts"] = prompts
    (folder / "config_sentence_transformers.json").write_text(json.dumps(config))
    return folder


def fake_hub_cache(source: Path, cache: Path, repo_id: str, commit: str) -> Path:
    """Lay ``source`` out as a cached Hugging Face snapshot of ``repo_id`` at ``commit``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for item in source.iterdir():
        (snapshot / item.name).symlink_to(item)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot
