"""A sentence-transformers model's modules after the transformer, in numpy.

On ONNX Runtime the transformer is a graph; what follows it (Pooling, Dense, LayerNorm)
is a few array operations, read here from the model folder's own files
(``modules.json`` and each module's ``config.json`` and weights) so that serving needs
neither torch nor sentence-transformers. Each head computes what the sentence-transformers
module of the same name computes (the tests compare them). A Normalize module is left to
the request's ``normalize``, as on the torch path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tei_manager.worker.errors import ModelLoadError
from tei_manager.worker.model import read_json

log = logging.getLogger(__name__)

Array = np.ndarray[Any, np.dtype[Any]]

# Legacy ``pooling_mode_*`` keys, in the order sentence-transformers concatenates them.
_LEGACY_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "Identity": lambda x: x,
    "Tanh": np.tanh,
    "ReLU": lambda x: np.maximum(x, 0),
    "Sigmoid": lambda x: 1 / (1 + np.exp(-x)),
}


class Head(Protocol):
    """One module after the transformer: pooled (or token) features in, features out."""

    def __call__(self, pooled: Array, tokens: Array, mask: Array) -> Array: ...


class Pooling:
    """sentence-transformers' Pooling over padded token embeddings, every mode it has."""

    def __init__(self, modes: Sequence[str]) -> None:
        self.modes = tuple(modes)

    def __call__(self, pooled: Array, tokens: Array, mask: Array) -> Array:
        weights = mask[..., None].astype(np.float32)
        vectors = []
        for mode in self.modes:
            if mode == "cls":
                first = mask.argmax(axis=1)
                vectors.append(tokens[np.arange(len(tokens)), first])
            elif mode == "max":
                vectors.append(np.where(weights > 0, tokens, -np.inf).max(axis=1))
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                total = (tokens * weights).sum(axis=1)
                count = np.maximum(weights.sum(axis=1), 1e-9)
                vectors.append(total / (count if mode == "mean" else np.sqrt(count)))
            elif mode == "weightedmean":
                pad = mask.argmax(axis=1)[:, None, None]
                position = np.arange(1, tokens.shape[1] + 1, dtype=np.float32)[None, :, None]
                weighted = weights * (position - pad)
                total = (tokens * weighted).sum(axis=1)
                vectors.append(total / np.maximum(weighted.sum(axis=1), 1e-9))
            else:  # lasttoken: the last unmasked position (right or left padding alike)
                width = tokens.shape[1]
                flipped = mask[:, ::-1]
                last = width - 1 - flipped.argmax(axis=1)
                last = np.where(flipped.max(axis=1) == 0, 0, last)
                vectors.append((tokens * weights)[np.arange(len(tokens)), last])
        return np.concatenate(vectors, axis=-1).astype(np.float32)


class Dense:
    """A linear layer and its activation on the pooled vector (optionally residual)."""

    def __init__(self, weight: Array, bias: Array | None, activation: str, residual: Any) -> None:
        self.weight = np.ascontiguousarray(weight.T, dtype=np.float32)
        self.bias = None if bias is None else bias.astype(np.float32)
        self.activation = _ACTIVATIONS[activation]
        self.residual = residual  # None, True (same width) or a projection matrix

    def __call__(self, pooled: Array, tokens: Array, mask: Array) -> Array:
        out = pooled @ self.weight
        if self.bias is not None:
            out = out + self.bias
        out = self.activation(out)
        if self.residual is True:
            out = out + pooled
        elif self.residual is not None:
            out = out + pooled @ self.residual
        return np.asarray(out, dtype=np.float32)


class LayerNorm:
    """``torch.nn.LayerNorm`` over the pooled vector (eps 1e-5, as sentence-transformers')."""

    def __init__(self, weight: Array, bias: Array) -> None:
        self.weight = weight.astype(np.float32)
        self.bias = bias.astype(np.float32)

    def __call__(self, pooled: Array, tokens: Array, mask: Array) -> Array:
        mean = pooled.mean(axis=-1, keepdims=True)
        variance = ((pooled - mean) ** 2).mean(axis=-1, keepdims=True)
        normed = (pooled - mean) / np.sqrt(variance + 1e-5)
        return np.asarray(normed * self.weight + self.bias, dtype=np.float32)


def read_heads(
    model_dir: Path, modules: Sequence[dict[str, Any]], pooling: str | None
) -> tuple[tuple[Head, ...], int]:
    """The heads named in ``modules.json`` and the width of what they output.

    ``pooling``: the ``--pooling`` flag, replacing every Pooling module's modes.
    Raises ``ModelLoadError`` for a module this path cannot run.
    """
    if not modules or _kind(modules[0]) != "Transformer":
        raise ModelLoadError("the first module is not a transformer ONNX can run")
    heads: list[Head] = []
    width = 0
    for module in modules[1:]:
        kind = _kind(module)
        folder = model_dir / str(module.get("path", ""))
        config = read_json(folder / "config.json")
        if kind == "Pooling":
            modes = _pooling_modes(config)
            if pooling is not None:
                modes = ["lasttoken" if pooling == "last-token" else pooling]
            dimension = config.get("embedding_dimension", config.get("word_embedding_dimension"))
            heads.append(Pooling(modes))
            width = int(dimension or 0) * len(modes)
        elif kind == "Dense":
            heads.append(_dense(folder, config))
            width = int(config["out_features"])
        elif kind == "LayerNorm":
            weights = _weights(folder)
            heads.append(LayerNorm(weights["norm.weight"], weights["norm.bias"]))
        elif kind != "Normalize":
            raise ModelLoadError(f"module {kind} has no ONNX path")
    if not any(isinstance(head, Pooling) for head in heads):
        if pooling is not None:
            raise ModelLoadError(f"--pooling {pooling}: the model has no pooling module")
        raise ModelLoadError("the model has no pooling module")
    return tuple(heads), width


def _kind(module: dict[str, Any]) -> str:
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def _pooling_modes(config: dict[str, Any]) -> list[str]:
    mode = config.get("pooling_mode")
    if isinstance(mode, str):
        return [mode]
    if isinstance(mode, list):
        return [str(m) for m in mode]
    modes = [name for key, name in _LEGACY_MODES.items() if config.get(key)]
    if not modes:
        raise ModelLoadError("the pooling module's config names no pooling mode")
    return modes


def _dense(folder: Path, config: dict[str, Any]) -> Dense:
    activation = str(config.get("activation_function", "Tanh")).rsplit(".", 1)[-1]
    if activation not in _ACTIVATIONS:
        raise ModelLoadError(f"Dense activation {activation} has no ONNX path")
    for key in ("module_input_name", "module_output_name"):
        if config.get(key, "sentence_embedding") != "sentence_embedding":
            raise ModelLoadError("a Dense module on token embeddings has no ONNX path")
    weights = _weights(folder)
    residual: Any = None
    if config.get("use_residual"):
        residual = (
            weights["residual.weight"].T.astype(np.float32)
            if "residual.weight" in weights
            else True
        )
    return Dense(weights["linear.weight"], weights.get("linear.bias"), activation, residual)


def _weights(folder: Path) -> dict[str, Array]:
    """A module's tensors: its safetensors file, else (with torch) its pytorch_model.bin."""
    safetensors = folder / "model.safetensors"
    if safetensors.is_file():
        from safetensors.numpy import load_file

        return load_file(str(safetensors))
    binary = folder / "pytorch_model.bin"
    if not binary.is_file():
        raise ModelLoadError(f"{folder} has no model.safetensors or pytorch_model.bin")
    log.info("reading %s with torch: the module has no safetensors weights", binary)
    import torch

    state = torch.load(str(binary), map_location="cpu", weights_only=True)
    return {name: tensor.float().numpy() for name, tensor in state.items()}
