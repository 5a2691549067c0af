"""A model served on ONNX Runtime without torch: the graph, numpy heads, ``tokenizers``.

Everything the torch path takes from transformers and sentence-transformers is read
here from the model folder: ``config.json`` (kind, labels, sizes), the
sentence-transformers files (modules, prompts, sequence length; the heads in
``onnx_heads.py``) and the tokenizer (``tokenizer.json`` and ``tokenizer_config.json``).
torch is imported only to export a graph the folder does not ship and the cache does
not hold yet, and then in a child process (``onnx_load.export_in_subprocess``), so a
serving worker never carries torch's ~400 MiB of libraries.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from tei_manager.worker.errors import ModelLoadError
from tei_manager.worker.model import (
    FORWARD_OVERHEAD_TOKENS,
    ModelType,
    Row,
    RowOutput,
    length_groups,
    make_tokenization,
    max_input_length,
    read_json,
    require_masked_lm,
    snapshot_sha,
)
from tei_manager.worker.onnx_graph import (
    OnnxDType,
    cache_key,
    cached_graph,
    onnx_cache_dir,
    shipped_graph,
)
from tei_manager.worker.onnx_heads import Array, Head, read_heads
from tei_manager.worker.onnx_load import export_in_subprocess
from tei_manager.worker.onnx_session import GraphError, OnnxRunner
from tei_manager.worker.options import WorkerOptions
from tei_manager.worker.tokenization import Tokenization

log = logging.getLogger(__name__)

# transformers' stand-in for "no limit" in tokenizer_config.json.
_NO_LIMIT = 10**20


class OnnxModel:
    """A loaded model on ONNX Runtime; the same surface as ``model.Model``."""

    engine = "onnx"
    runs_packed = False  # a 4-D mask gained nothing on ORT (see DESIGN.md)

    def __init__(
        self,
        *,
        model_type: ModelType,
        is_splade: bool,
        tokenization: Tokenization,
        hidden_size: int,
        labels: tuple[str, ...],
        model_sha: str | None,
        runner: OnnxRunner,
        dtype: str,
        heads: tuple[Head, ...],
        pad_id: int,
        pad_left: bool,
    ) -> None:
        self.model_type = model_type
        self.is_splade = is_splade
        self.tokenization = tokenization
        self.hidden_size = hidden_size
        self.labels = labels
        self.model_sha = model_sha
        self.dtype = dtype
        self.graph_path = runner.path
        self._runner = runner
        self._heads = heads
        self._pad_id = pad_id
        self._pad_left = pad_left

    def forward(self, rows: Sequence[Row]) -> list[RowOutput]:
        """Run one batch in length-sorted groups; one output per row, in order. Blocking."""
        outputs: list[RowOutput] = [[] for _ in rows]
        lengths = [len(row.encoding.ids) for row in rows]
        for group in length_groups(lengths, FORWARD_OVERHEAD_TOKENS):
            members = [rows[i] for i in group]
            for i, output in zip(group, self._forward_padded(members), strict=True):
                outputs[i] = output
        return outputs

    def _forward_padded(self, rows: Sequence[Row]) -> list[RowOutput]:
        width = max(len(row.encoding.ids) for row in rows)
        ids = np.full((len(rows), width), self._pad_id, dtype=np.int64)
        type_ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            length = len(row.encoding.ids)
            span = slice(width - length, width) if self._pad_left else slice(0, length)
            ids[i, span] = row.encoding.ids
            type_ids[i, span] = row.encoding.type_ids
            mask[i, span] = 1
        output = self._runner.run(
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": type_ids}
        )
        if self.is_splade:
            return _splade_outputs(rows, output, mask)
        if self.model_type != "embedding":
            return [scores.tolist() for scores in output]
        pooled = output
        for head in self._heads:
            pooled = head(pooled, output, mask)
        results: list[RowOutput] = []
        for i, row in enumerate(rows):
            if row.task == "tokens":
                length = len(row.encoding.ids)
                real = output[i, width - length :] if self._pad_left else output[i, :length]
                results.append(real.tolist())
            else:
                results.append(_vector(pooled[i], row))
        return results


def _splade_outputs(rows: Sequence[Row], logits: Array, mask: Array) -> list[RowOutput]:
    # SPLADE pooling: max over the sequence of log(1 + relu(logit)), padding masked out.
    pooled = (np.log1p(np.maximum(logits, 0)) * mask[..., None]).max(axis=1)
    results: list[RowOutput] = []
    for i, row in enumerate(rows):
        if row.task == "sparse":
            [indices] = np.nonzero(pooled[i])
            results.append(list(zip(indices.tolist(), pooled[i][indices].tolist(), strict=True)))
        else:
            results.append(_vector(pooled[i], row))
    return results


def _vector(vector: Array, row: Row) -> list[float]:
    if row.dimensions is not None:
        vector = vector[: row.dimensions]  # Matryoshka: the leading dimensions
    if row.normalize:
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    values: list[float] = vector.astype(np.float32).tolist()
    return values


def load_onnx(options: WorkerOptions, path: Path) -> OnnxModel:
    """The model in ``path`` on ONNX Runtime; its graph shipped, cached, or exported now."""
    config = read_json(path / "config.json")
    architectures = config.get("architectures") or []
    splade = options.pooling == "splade"
    if splade:
        require_masked_lm(architectures)
    classifier = not splade and any(
        name.endswith("ForSequenceClassification") for name in architectures
    )
    tokenizer_config = read_json(path / "tokenizer_config.json")
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelLoadError("the model needs a fast tokenizer (tokenizer.json)")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # the tokenizers library raises plain Exceptions
        raise ModelLoadError(f"cannot read {tokenizer_file}: {exc}") from exc
    tokenizer_limit = tokenizer_config.get("model_max_length")
    if not isinstance(tokenizer_limit, int | float) or tokenizer_limit >= _NO_LIMIT:
        tokenizer_limit = None
    heads: tuple[Head, ...] = ()
    outputs: tuple[str, ...]
    prompts: dict[str, str] = {}
    default_prompt_name = None
    labels: tuple[str, ...] = ()
    model_type: ModelType = "embedding"
    if splade:
        part, outputs, rank = "masked-lm", ("logits",), 3
        hidden_size = int(config["vocab_size"])
        width: int | None = hidden_size
        limit = tokenizer_limit
    elif classifier:
        id2label = config.get("id2label") or {"0": "LABEL_0"}
        labels = tuple(str(id2label[key]) for key in sorted(id2label, key=int))
        model_type = "reranker" if len(labels) == 1 else "classifier"
        part, outputs, rank, width = "classifier", ("logits",), 2, len(labels)
        hidden_size = int(config["hidden_size"])
        limit = tokenizer_limit
    else:
        modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
        heads, hidden_size = read_heads(path, modules, options.pooling)
        part, outputs, rank = "encoder", ("last_hidden_state", "token_embeddings"), 3
        width = config.get("hidden_size")
        hidden_size = hidden_size or int(config["hidden_size"])
        st_config = read_json(path / "config_sentence_transformers.json")
        # sentence-transformers starts every model with blank query and document prompts.
        prompts = {"query": "", "document": ""}
        saved = st_config.get("prompts") or {}
        prompts.update({name: "" if text is None else text for name, text in saved.items()})
        default_prompt_name = st_config.get("default_prompt_name")
        limit = read_json(path / "sentence_bert_config.json").get("max_seq_length")
        if limit is None and tokenizer_limit is not None:
            limit = min(int(tokenizer_limit), int(config.get("max_position_embeddings") or 512))
    runner, dtype = _runner(options, path, part, outputs, rank, width)
    return OnnxModel(
        model_type=model_type,
        is_splade=splade,
        tokenization=make_tokenization(
            tokenizer,
            options,
            max_input_length(None if limit is None else int(limit), config),
            prompts,
            default_prompt_name,
        ),
        hidden_size=hidden_size,
        labels=labels,
        model_sha=snapshot_sha(path),
        runner=runner,
        dtype=dtype,
        heads=heads,
        pad_id=_pad_id(tokenizer, tokenizer_config, path),
        pad_left=tokenizer_config.get("padding_side") == "left",
    )


def _pad_id(tokenizer: Tokenizer, tokenizer_config: dict[str, Any], path: Path) -> int:
    token = tokenizer_config.get("pad_token")
    if token is None:
        token = read_json(path / "special_tokens_map.json").get("pad_token")
    if isinstance(token, dict):
        token = token.get("content")
    found = tokenizer.token_to_id(token) if isinstance(token, str) else None
    return found or 0


def _runner(
    options: WorkerOptions,
    path: Path,
    part: str,
    outputs: tuple[str, ...],
    rank: int,
    width: int | None,
) -> tuple[OnnxRunner, OnnxDType]:
    dtype: OnnxDType = "int8" if options.dtype == "int8" else "float32"
    shipped = shipped_graph(path)
    if shipped is not None and dtype == "float32":
        try:
            return OnnxRunner(shipped, outputs=outputs, rank=rank, width=width), dtype
        except GraphError as exc:
            log.warning("not using the model's own ONNX graph: %s", exc)
            shipped = None

    def export(target: Path) -> None:
        if shipped is not None:
            shutil.copyfile(shipped, target)
        else:
            export_in_subprocess(path, target, part=part)

    entry = onnx_cache_dir() / cache_key(path, snapshot_sha(path), part)
    graph = cached_graph(entry, dtype, export)
    try:
        runner = OnnxRunner(graph, outputs=outputs, rank=rank, width=width)
    except GraphError:
        # Hashed when written and again when read: a graph that still fails is not ours
        # to keep. Export it once more; a second failure is the model's.
        graph.unlink(missing_ok=True)
        graph = cached_graph(entry, dtype, export)
        runner = OnnxRunner(graph, outputs=outputs, rank=rank, width=width)
    return runner, dtype
