"""Finding, loading and running a model: synchronous batched inference for one worker thread.

Three kinds of model, told apart the way text-embeddings-router does it:

- ``--pooling splade``: a ``*ForMaskedLM`` model; a sparse vector over the vocabulary.
- ``*ForSequenceClassification`` in ``config.json``: a reranker (one label) or a classifier.
- anything else: a dense sentence-transformers model, run through its own modules
  (Transformer, Pooling, Dense...) so results match ``SentenceTransformer.encode``; a
  Normalize module is left to the request's ``normalize`` (default true), as TEI does.

On CPU a forward pass has a large fixed cost (reading every weight once), so a batch of
mixed lengths wastes compute twice over: on padding, and on extra passes when it is split
by length. A BERT encoder therefore runs a batch unpadded, as TEI does on GPU: the rows are
packed end to end into a few sequences, each row's positions restart at zero and a
block-diagonal attention mask keeps the rows apart, so every row sees exactly what it
would see alone. Other models run in length-sorted groups.

On CPU the model runs on ONNX Runtime when it can (``--engine auto``, the default):
``onnx_model.py`` serves it without torch, which this module then never imports (torch
is imported only where the torch engine needs it).
"""

from __future__ import annotations

import gc
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from tokenizers import Tokenizer

from tei_manager.worker.errors import ModelLoadError
from tei_manager.worker.onnx_load import cuda_possible, onnx_blocker, return_freed_memory
from tei_manager.worker.options import WorkerOptions
from tei_manager.worker.tokenization import Encoding, Tokenization

if TYPE_CHECKING:
    import torch

    from tei_manager.worker.onnx_model import OnnxModel

log = logging.getLogger(__name__)

ModelType = Literal["embedding", "classifier", "reranker"]
Task = Literal["pooled", "tokens", "sparse", "scores"]
RowOutput = list[float] | list[list[float]] | list[tuple[int, float]]

# The fixed cost of one forward pass on CPU, in tokens' worth of compute (measured for
# a 6-layer MiniLM on 2 cores: ~5 ms against ~0.17 ms a token). It decides when a
# mixed-length batch is cheaper run as several groups of similar length.
FORWARD_OVERHEAD_TOKENS = 32
# Bounds the search for group boundaries, so that huge batches split in linear time.
_MAX_GROUP_ROWS = 64
# Packed rows are laid end to end in sequences this many tokens long (or as long as the
# longest row). Longer sequences waste less on their tails but pay attention over the
# whole sequence; on a 2-core CPU 64 ran MiniLM batches fastest (48..80 within noise).
PACK_TOKENS = 64
# Formats this worker never reads; skipping them keeps a download to what it loads.
_IGNORED_FILES = [
    "openvino/*",
    "*.h5",
    "*.msgpack",
    "*.ot",
    "*.gguf",
    "tf_model*",
    "flax_model*",
    "rust_model*",
    "coreml/*",
]
# ONNX graphs: torch reads none. The ONNX engine reads onnx/model.onnx (and its
# external weights), not the optimised and quantised variants Hub repos put beside it.
_IGNORED_FOR_TORCH = ["*.onnx", "*.onnx_data", "onnx/*"]
_IGNORED_FOR_ONNX = ["onnx/model_*", "onnx/*quantized*"]


def ignored_files(*, onnx: bool) -> list[str]:
    """The patterns of repo files a download skips, for the ONNX engine or for torch."""
    return [*_IGNORED_FILES, *(_IGNORED_FOR_ONNX if onnx else _IGNORED_FOR_TORCH)]


class Row(msgspec.Struct, frozen=True):
    """One sequence to run through the model, and what to bring back from it."""

    encoding: Encoding
    task: Task
    normalize: bool = False
    dimensions: int | None = None


class Model:
    """A loaded model: its tokenization, what it is, and ``forward`` for a batch of rows."""

    def __init__(
        self,
        *,
        model_type: ModelType,
        is_splade: bool,
        tokenization: Tokenization,
        hidden_size: int,
        labels: tuple[str, ...],
        model_sha: str | None,
        net: torch.nn.Module,
        device: torch.device,
        pad_id: int,
        pad_left: bool,
        uses_token_types: bool,
        packed: PackedEncoder | None = None,
    ) -> None:
        self.model_type = model_type
        self.is_splade = is_splade
        self.tokenization = tokenization
        self.hidden_size = hidden_size
        self.labels = labels
        self.model_sha = model_sha
        import torch

        self.dtype = str(next(net.parameters(), torch.zeros(())).dtype).removeprefix("torch.")
        self.engine = "torch"
        self._net = net
        self._device = device
        self._pad_id = pad_id
        self._pad_left = pad_left
        self._uses_token_types = uses_token_types
        self._packed = packed
        self.graph_path: Path | None = None  # no ONNX graph runs

    def onnx_part(self) -> tuple[str, tuple[torch.nn.Module, ...], torch.nn.Module]:
        """What to run on ONNX Runtime: (its name, the torch modules after it, the part).

        A sentence-transformers model exports its transformer (the modules after it run
        in numpy, ``onnx_heads.py``). A classifier or masked LM exports whole.
        """
        import torch

        if self.model_type != "embedding" or self.is_splade:
            return ("masked-lm" if self.is_splade else "classifier"), (), self._net
        from sentence_transformers.base.modules.transformer import Transformer
        from sentence_transformers.sentence_transformer.modules import Dense, LayerNorm, Pooling

        modules: tuple[torch.nn.Module, ...] = tuple(self._net)  # type: ignore[arg-type]
        encoder = getattr(modules[0], "model", None) if modules else None
        if not isinstance(modules[0], Transformer) or not isinstance(encoder, torch.nn.Module):
            raise ModelLoadError("the first module is not a transformer ONNX can run")
        heads = modules[1:]
        other = [type(m).__name__ for m in heads if not isinstance(m, Pooling | Dense | LayerNorm)]
        if other:
            raise ModelLoadError(f"modules {', '.join(other)} have no ONNX path")
        return "encoder", heads, encoder

    def example_features(self) -> dict[str, torch.Tensor]:
        """A small padded batch to trace the model with (one row padded, so masks are kept)."""
        encoding = self.tokenization.encode("the quick brown fox jumps over", truncate=True)
        half = max(2, len(encoding.ids) // 2)
        short = Encoding(encoding.ids[:half], encoding.type_ids[:half])
        rows = [Row(encoding, "pooled"), Row(short, "pooled")]
        return self._padded(rows, len(encoding.ids))

    @property
    def runs_packed(self) -> bool:
        """Whether batches run unpadded, packed into shared sequences."""
        return self._packed is not None

    def forward(self, rows: Sequence[Row]) -> list[RowOutput]:
        """Run one batch; one output per row, in order. Blocking: call it from a thread.

        A BERT encoder on CPU runs the batch packed (see the module docstring). Other
        models on CPU run it as a few length-sorted groups, cutting the padding a
        mixed-length batch would otherwise compute; on a GPU it runs whole.
        """
        if self._packed is not None:
            return self._forward_packed(self._packed, rows)
        outputs: list[RowOutput] = [[] for _ in rows]
        overhead = FORWARD_OVERHEAD_TOKENS if self._device.type == "cpu" else None
        for group in length_groups([len(row.encoding.ids) for row in rows], overhead):
            members = [rows[i] for i in group]
            for i, output in zip(group, self._forward_padded(members), strict=True):
                outputs[i] = output
        return outputs

    def _forward_padded(self, rows: Sequence[Row]) -> list[RowOutput]:
        import torch

        width = max(len(row.encoding.ids) for row in rows)
        features = self._padded(rows, width)
        with torch.inference_mode():
            if self.is_splade:
                return self._splade(rows, features)
            if self.model_type != "embedding":
                logits = self._net(**features).logits.float().cpu()
                return [scores.tolist() for scores in logits]
            return self._dense(rows, features, width)

    def _padded(self, rows: Sequence[Row], width: int) -> dict[str, Any]:
        """Build the padded batch tensors in one go (no per-row torch work)."""
        import torch

        ids, type_ids, mask = [], [], []
        for row in rows:
            length = len(row.encoding.ids)
            padding = width - length
            if self._pad_left:
                ids.append([self._pad_id] * padding + row.encoding.ids)
                type_ids.append([0] * padding + row.encoding.type_ids)
                mask.append([0] * padding + [1] * length)
            else:
                ids.append(row.encoding.ids + [self._pad_id] * padding)
                type_ids.append(row.encoding.type_ids + [0] * padding)
                mask.append([1] * length + [0] * padding)
        features = {
            "input_ids": torch.tensor(ids, dtype=torch.long, device=self._device),
            "attention_mask": torch.tensor(mask, dtype=torch.long, device=self._device),
        }
        if self._uses_token_types:
            features["token_type_ids"] = torch.tensor(
                type_ids, dtype=torch.long, device=self._device
            )
        return features

    def _dense(self, rows: Sequence[Row], features: dict[str, Any], width: int) -> list[RowOutput]:
        features["modality"] = "text"
        return _dense_outputs(rows, self._net(features), width, pad_left=self._pad_left)

    def _forward_packed(self, packed: PackedEncoder, rows: Sequence[Row]) -> list[RowOutput]:
        import torch

        lengths = [len(row.encoding.ids) for row in rows]
        longest = max(lengths)
        sequences = pack_rows(lengths, max(PACK_TOKENS, longest))
        width = max(sum(lengths[i] for i in members) for members in sequences)
        ids: list[list[int]] = []
        type_ids: list[list[int]] = []
        positions: list[list[int]] = []
        segments: list[list[int]] = []
        starts = [0] * len(rows)  # where each row begins in the flattened sequences
        for number, members in enumerate(sequences):
            seq_ids: list[int] = []
            seq_types: list[int] = []
            seq_positions: list[int] = []
            seq_segments: list[int] = []
            for segment, i in enumerate(members):
                encoding = rows[i].encoding
                starts[i] = number * width + len(seq_ids)
                seq_ids += encoding.ids
                seq_types += encoding.type_ids
                seq_positions += range(lengths[i])
                seq_segments += [segment] * lengths[i]
            tail = width - len(seq_ids)
            # The tail is one more segment: it attends only to itself, so no query row
            # of the mask is empty, and its outputs are never read.
            ids.append(seq_ids + [self._pad_id] * tail)
            type_ids.append(seq_types + [0] * tail)
            positions.append(seq_positions + [0] * tail)
            segments.append(seq_segments + [-1] * tail)
        segment_ids = torch.tensor(segments, device=self._device)
        inputs = {
            "input_ids": torch.tensor(ids, dtype=torch.long, device=self._device),
            "position_ids": torch.tensor(positions, dtype=torch.long, device=self._device),
            # (sequences, 1, width, width): a token attends to the tokens of its own row.
            "attention_mask": (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None],
        }
        if self._uses_token_types:
            inputs["token_type_ids"] = torch.tensor(type_ids, dtype=torch.long, device=self._device)
        # Back to one right-padded row per input for the modules after the encoder.
        gather = [
            [*range(start, start + length), *[start] * (longest - length)]
            for start, length in zip(starts, lengths, strict=True)
        ]
        mask = [[1] * length + [0] * (longest - length) for length in lengths]
        with torch.inference_mode():
            hidden = packed.encoder(**inputs, return_dict=True).last_hidden_state
            flat = hidden.reshape(-1, hidden.shape[-1])
            features: dict[str, Any] = {
                "token_embeddings": flat[torch.tensor(gather, device=self._device)],
                "attention_mask": torch.tensor(mask, dtype=torch.long, device=self._device),
            }
            for module in packed.heads:
                features = module(features)
            return _dense_outputs(rows, features, longest, pad_left=False)

    def _splade(self, rows: Sequence[Row], features: dict[str, Any]) -> list[RowOutput]:
        logits = self._net(**features).logits
        return _splade_outputs(rows, logits, features["attention_mask"])


def _splade_outputs(
    rows: Sequence[Row], logits: torch.Tensor, mask: torch.Tensor
) -> list[RowOutput]:
    import torch

    # SPLADE pooling: max over the sequence of log(1 + relu(logit)), padding masked out.
    weights = torch.log1p(torch.relu(logits.float())) * mask.unsqueeze(-1)
    pooled = weights.max(dim=1).values.cpu()
    results: list[RowOutput] = []
    for i, row in enumerate(rows):
        if row.task == "sparse":
            indices = torch.nonzero(pooled[i]).squeeze(1)
            results.append(list(zip(indices.tolist(), pooled[i][indices].tolist(), strict=True)))
        else:
            results.append(_vector(pooled[i], row))
    return results


class PackedEncoder(msgspec.Struct, frozen=True):
    """A dense model split for packed batches: its encoder, then the modules after it."""

    encoder: torch.nn.Module
    heads: tuple[torch.nn.Module, ...]


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Pack rows (by index) into sequences of at most ``width`` tokens, longest first.

    First-fit decreasing: each row goes into the first sequence it fits, a new one when
    none has room. Every length must be at most ``width``.
    """
    sequences: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True):
        length = lengths[i]
        for number, free in enumerate(room):
            if length <= free:
                sequences[number].append(i)
                room[number] = free - length
                break
        else:
            sequences.append([i])
            room.append(width - length)
    return sequences


def _dense_outputs(
    rows: Sequence[Row], features: dict[str, Any], width: int, *, pad_left: bool
) -> list[RowOutput]:
    pooled = features["sentence_embedding"].float().cpu()
    tokens = features["token_embeddings"].float().cpu() if _any(rows, "tokens") else None
    results: list[RowOutput] = []
    for i, row in enumerate(rows):
        if row.task == "tokens" and tokens is not None:
            length = len(row.encoding.ids)
            real = tokens[i, width - length :] if pad_left else tokens[i, :length]
            results.append(real.tolist())
        else:
            results.append(_vector(pooled[i], row))
    return results


def _packed_encoder(st: Any, device: torch.device) -> PackedEncoder | None:
    """The parts of a sentence-transformers model to run packed, or None if it cannot be.

    Packing needs an encoder that takes explicit position ids and a 4-D attention mask
    and uses nothing else about the batch layout: a BERT with absolute positions under
    the sdpa or eager attention. The modules after it must work on the token embeddings
    and attention mask alone. On a GPU padding is cheap, so batches run padded there.
    """
    import torch
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules import Dense, LayerNorm, Pooling

    if device.type != "cpu" or len(st) < 2 or not isinstance(st[0], Transformer):
        return None
    encoder = getattr(st[0], "model", None)
    config = getattr(encoder, "config", None)
    if (
        not isinstance(encoder, torch.nn.Module)
        or getattr(config, "model_type", None) != "bert"
        or getattr(config, "position_embedding_type", "absolute") != "absolute"
        or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager")
        or getattr(config, "is_decoder", False)
    ):
        return None
    heads = tuple(st)[1:]
    if not all(isinstance(module, Pooling | Dense | LayerNorm) for module in heads):
        return None
    return PackedEncoder(encoder, heads)


def length_groups(lengths: Sequence[int], overhead: int | None) -> list[list[int]]:
    """Split rows (by index) into groups to run separately, shortest rows first.

    A group costs its padded size (longest row times rows) plus ``overhead`` tokens for
    the forward pass itself; the split minimises the total. ``None``: one group.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    if overhead is None or len(order) < 2:
        return [order]
    count = len(order)
    best = [0] + [math.inf] * count  # best[k]: cheapest split of the k shortest rows
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        width = lengths[order[end - 1]]  # sorted, so the last row is the widest
        for start in range(max(0, end - _MAX_GROUP_ROWS), end):
            cost = best[start] + width * (end - start) + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups = []
    end = count
    while end:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def _any(rows: Sequence[Row], task: Task) -> bool:
    return any(row.task == task for row in rows)


def _vector(vector: torch.Tensor, row: Row) -> list[float]:
    if row.dimensions is not None:
        # Matryoshka: keep the leading dimensions, then normalize what is left.
        vector = vector[: row.dimensions]
    if row.normalize:
        import torch

        vector = torch.nn.functional.normalize(vector, p=2.0, dim=0)
    values: list[float] = vector.tolist()
    return values


def resolve_model_dir(options: WorkerOptions, *, onnx: bool = False) -> Path:
    """The local folder of ``options.model_id``: as given, or its snapshot in the HF cache.

    Downloads into ``--huggingface-hub-cache`` (or HF_HOME's cache) unless HF_HUB_OFFLINE
    is set, in which case only an already cached snapshot is accepted. ``onnx``: the
    model will run on ONNX Runtime, so its ``onnx/model.onnx`` is fetched too.
    """
    local = Path(options.model_id).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id=options.model_id,
            revision=options.revision,
            cache_dir=options.huggingface_hub_cache,
            ignore_patterns=ignored_files(onnx=onnx),
        )
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"model {options.model_id!r} (revision {options.revision or 'main'}) is not in the "
            f"Hugging Face cache and cannot be downloaded (offline or unreachable): {exc}"
        ) from exc
    except (HFValidationError, OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot resolve model {options.model_id!r}: {exc}") from exc
    return Path(folder)


def load_model(options: WorkerOptions) -> Model | OnnxModel:
    """Resolve and load the model ``options`` name, on its engine, device and dtype.

    On ONNX Runtime torch is not imported (unless a graph must be exported, and then in
    a child process); it is imported when the model runs on torch.
    """
    device_type = _device_type(options)
    blocker = onnx_blocker(options, device_type)
    if options.engine == "onnx" and blocker is not None:
        raise ModelLoadError(f"--engine onnx: {blocker}")
    on_onnx = options.engine != "torch" and blocker is None
    if options.dtype == "int8" and not on_onnx:
        raise ModelLoadError("--dtype int8 needs ONNX Runtime (--engine onnx, or auto on CPU)")
    if options.engine == "auto" and blocker is not None:
        log.info("running the model on torch: %s", blocker)
    path = resolve_model_dir(options, onnx=on_onnx)
    if on_onnx:
        from tei_manager.worker.onnx_model import load_onnx
        from tei_manager.worker.onnx_session import GraphError

        try:
            model = load_onnx(options, path)
        except (GraphError, ModelLoadError, OSError, RuntimeError, ValueError, KeyError) as exc:
            if options.engine == "onnx":
                raise ModelLoadError(f"--engine onnx: {exc}") from exc
            log.warning("running the model on torch: it cannot run on ONNX Runtime: %s", exc)
        else:
            gc.collect()
            return_freed_memory()
            log.info("running the model on ONNX Runtime", extra={"graph": str(model.graph_path)})
            return model
    import torch

    try:
        device = torch.device(options.device or device_type)
    except RuntimeError as exc:
        raise ModelLoadError(f"--device {options.device!r}: {exc}") from exc
    return load_torch_model(options, path, device)


def _device_type(options: WorkerOptions) -> str:
    """The type of the device the model runs on ("cpu", "cuda"...), checked like torch does."""
    if options.device is None:
        return "cuda" if cuda_possible() else "cpu"
    if options.device.partition(":")[0] == "cpu":
        return "cpu"  # no need to import torch to know
    import torch

    try:
        return torch.device(options.device).type
    except RuntimeError as exc:
        raise ModelLoadError(f"--device {options.device!r}: {exc}") from exc


def load_torch_model(options: WorkerOptions, path: Path, device: torch.device) -> Model:
    """The model in ``path`` on torch (the torch engine, and the source of ONNX exports)."""
    import torch

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    config = read_json(path / "config.json")
    architectures = config.get("architectures") or []
    try:
        default = "float16" if device.type == "cuda" else "float32"
        dtype = dtypes.get(options.dtype or default, torch.float32)  # int8: from float32
        if options.pooling == "splade":
            require_masked_lm(architectures)
            return _load_transformers(options, path, device, dtype, config, splade=True)
        if any(name.endswith("ForSequenceClassification") for name in architectures):
            return _load_transformers(options, path, device, dtype, config, splade=False)
        return _load_sentence_transformer(options, path, device, dtype, config)
    except ModelLoadError:
        raise
    except Exception as exc:  # whatever the loaders raise, the worker reports it as one error
        raise ModelLoadError(f"cannot load model {options.model_id!r} from {path}: {exc}") from exc


def _load_sentence_transformer(
    options: WorkerOptions,
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    config: dict[str, Any],
) -> Model:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    _quiet_transformers()
    st = SentenceTransformer(
        str(path), device=str(device), local_files_only=True, model_kwargs={"dtype": dtype}
    )
    # model_kwargs only reaches the transformer; Dense and other modules follow here.
    st.to(dtype).eval()
    # TEI ignores a model's Normalize module and normalizes when the request asks (the
    # default), so `normalize: false` gets the raw pooled vector, as from TEI.
    for index in reversed(range(len(st))):
        if type(st[index]).__name__ == "Normalize":
            del st[index]
    if options.pooling is not None:
        mode = "lasttoken" if options.pooling == "last-token" else options.pooling
        poolings = [module for module in st if isinstance(module, Pooling)]
        if not poolings:
            raise ModelLoadError(f"--pooling {options.pooling}: the model has no pooling module")
        for module in poolings:
            module.pooling_mode = mode
    tokenizer = st.tokenizer
    # ST's own default prompt applies when neither the request nor the flags name one,
    # so that an unprompted Embed equals an unprompted encode().
    prompts = {name: text for name, text in st.prompts.items() if text is not None}
    hidden_size = st.get_embedding_dimension()
    if hidden_size is None:
        raise ModelLoadError("cannot tell the embedding dimension of this model")
    max_length = max_input_length(st.max_seq_length, config)
    return Model(
        model_type="embedding",
        is_splade=False,
        tokenization=make_tokenization(
            tokenizer, options, max_length, prompts, st.default_prompt_name
        ),
        hidden_size=hidden_size,
        labels=(),
        model_sha=snapshot_sha(path),
        net=st,
        device=device,
        pad_id=tokenizer.pad_token_id or 0,
        pad_left=tokenizer.padding_side == "left",
        uses_token_types="token_type_ids" in tokenizer.model_input_names,
        packed=_packed_encoder(st, device),
    )


def _load_transformers(
    options: WorkerOptions,
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    config: dict[str, Any],
    *,
    splade: bool,
) -> Model:
    from transformers import (
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    _quiet_transformers()
    auto = AutoModelForMaskedLM if splade else AutoModelForSequenceClassification
    net = auto.from_pretrained(str(path), dtype=dtype, local_files_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if splade:
        model_type: ModelType = "embedding"
        labels: tuple[str, ...] = ()
        hidden_size = int(net.config.vocab_size)
    else:
        id2label = net.config.id2label
        labels = tuple(str(id2label[i]) for i in sorted(id2label))
        model_type = "reranker" if len(labels) == 1 else "classifier"
        hidden_size = int(net.config.hidden_size)
    return Model(
        model_type=model_type,
        is_splade=splade,
        tokenization=make_tokenization(
            tokenizer, options, max_input_length(tokenizer.model_max_length, config), {}, None
        ),
        hidden_size=hidden_size,
        labels=labels,
        model_sha=snapshot_sha(path),
        net=net,
        device=device,
        pad_id=tokenizer.pad_token_id or 0,
        pad_left=tokenizer.padding_side == "left",
        uses_token_types="token_type_ids" in tokenizer.model_input_names,
    )


def make_tokenization(
    tokenizer: Any,
    options: WorkerOptions,
    max_length: int,
    prompts: dict[str, str],
    model_default_prompt_name: str | None,
) -> Tokenization:
    # A transformers tokenizer wraps the fast one; the ONNX path reads it directly.
    backend = (
        tokenizer
        if isinstance(tokenizer, Tokenizer)
        else getattr(tokenizer, "backend_tokenizer", None)
    )
    if backend is None:
        raise ModelLoadError("the model needs a fast tokenizer (tokenizer.json)")
    if options.max_batch_tokens < max_length:
        log.warning(
            "max_input_length %d is larger than --max-batch-tokens %d; using %d",
            max_length,
            options.max_batch_tokens,
            options.max_batch_tokens,
        )
        max_length = options.max_batch_tokens
    default_prompt = options.default_prompt
    prompt_name = options.default_prompt_name or model_default_prompt_name
    if default_prompt is None and prompt_name is not None:
        if prompt_name not in prompts:
            raise ModelLoadError(
                f"--default-prompt-name {prompt_name!r} is not one of the model's prompts "
                f"(available: {', '.join(sorted(prompts)) or 'none'})"
            )
        default_prompt = prompts[prompt_name]
    return Tokenization(
        backend, max_input_length=max_length, prompts=prompts, default_prompt=default_prompt
    )


def max_input_length(tokenizer_limit: int | None, config: dict[str, Any]) -> int:
    """The longest input in tokens: the tokenizer's limit, within the position embeddings."""
    positions = int(config.get("max_position_embeddings") or 512)
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        # These number positions from pad_token_id + 1, which costs the table that many rows.
        positions -= int(config.get("pad_token_id", 1)) + 1
    if tokenizer_limit is None or tokenizer_limit <= 0:
        return positions
    return min(int(tokenizer_limit), positions)


def snapshot_sha(path: Path) -> str | None:
    """The commit of an HF-cache snapshot folder (``.../snapshots/<sha>``); None otherwise."""
    return path.name if path.parent.name == "snapshots" else None


def require_masked_lm(architectures: Sequence[str]) -> None:
    """``--pooling splade`` reads a masked LM's vocabulary logits: refuse any other head."""
    if not any(name.endswith("ForMaskedLM") for name in architectures):
        raise ModelLoadError(
            "--pooling splade needs a *ForMaskedLM model; this one is "
            f"{', '.join(architectures) or 'of no known architecture'}"
        )


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _quiet_transformers() -> None:
    # A progress bar per loaded weight file only clutters a server's log.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
