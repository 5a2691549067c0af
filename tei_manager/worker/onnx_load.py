"""Putting a loaded model on ONNX Runtime: whether it may, and its graph and heads.

``model.load_model`` loads the model with torch first (its tokenizer, config and the
sentence-transformers modules come from there), then asks here for the graph of the
part that costs; the torch weights of that part are dropped once the session runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import torch

from tei_manager.worker.onnx_graph import (
    OnnxDType,
    cache_key,
    cached_graph,
    export_module,
    onnx_cache_dir,
    shipped_graph,
)
from tei_manager.worker.onnx_session import GraphError, OnnxRunner
from tei_manager.worker.options import WorkerOptions

if TYPE_CHECKING:
    from tei_manager.worker.model import Model

log = logging.getLogger(__name__)


class OnnxGraph(msgspec.Struct, frozen=True):
    """A model on ONNX Runtime: the graph's runner, then the torch modules after it."""

    runner: OnnxRunner
    heads: tuple[torch.nn.Module, ...]
    dtype: str


def return_freed_memory() -> None:
    """Hand the heap pages freed by the torch weights (and ORT's load) back to the OS.

    glibc keeps freed memory in the process for reuse; on the packaged model this
    gives back ~40 MiB of RSS that nothing would reuse.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def onnx_blocker(options: WorkerOptions, device: torch.device) -> str | None:
    """Why this model cannot run on ONNX Runtime before even loading it; None if it may."""
    if options.engine == "torch":
        return "--engine torch"
    if device.type != "cpu":
        return f"the device is {device}; the ONNX engine runs on CPU"
    if options.dtype in ("float16", "bfloat16"):
        return f"--dtype {options.dtype}: ONNX Runtime on CPU runs float32 or int8"
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    return None


def load_graph(model: Model, options: WorkerOptions, path: Path) -> OnnxGraph:
    """The model's graph (shipped, cached or exported now) and the modules after it."""
    dtype: OnnxDType = "int8" if options.dtype == "int8" else "float32"
    part, heads, net = model.onnx_part()
    outputs: tuple[str, ...]
    width: int | None
    if model.is_splade:
        outputs, rank, width = ("logits",), 3, model.hidden_size
    elif model.model_type != "embedding":
        outputs, rank, width = ("logits",), 2, len(model.labels)
    else:
        outputs, rank = ("last_hidden_state", "token_embeddings"), 3
        width = getattr(getattr(net, "config", None), "hidden_size", None)
    shipped = shipped_graph(path)
    if shipped is not None and dtype == "float32":
        try:
            runner = OnnxRunner(shipped, outputs=outputs, rank=rank, width=width)
            return OnnxGraph(runner, heads, dtype)
        except GraphError as exc:
            log.warning("not using the model's own ONNX graph: %s", exc)
            shipped = None

    def export(target: Path) -> None:
        if shipped is not None:
            shutil.copyfile(shipped, target)
            return
        example = model.example_features()
        names = list(example)
        export_module(
            _Traced(net, names),
            target,
            input_names=names,
            output_name=outputs[0],
            example=example,
        )

    entry = onnx_cache_dir() / cache_key(path, model.model_sha, part)
    graph = cached_graph(entry, dtype, export)
    try:
        runner = OnnxRunner(graph, outputs=outputs, rank=rank, width=width)
    except GraphError:
        # Hashed when written and again when read: a graph that still fails is not ours
        # to keep. Export it once more; a second failure is the model's.
        graph.unlink(missing_ok=True)
        graph = cached_graph(entry, dtype, export)
        runner = OnnxRunner(graph, outputs=outputs, rank=rank, width=width)
    return OnnxGraph(runner, heads, dtype)


class _Traced(torch.nn.Module):
    """``net`` as the exporter wants it: positional tensors in, one tensor out."""

    def __init__(self, net: torch.nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.net = net
        self.names = tuple(names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        output = self.net(**dict(zip(self.names, tensors, strict=True)), return_dict=True)
        # last_hidden_state for an encoder, logits for a classifier or a masked LM.
        first: torch.Tensor = output[0]
        return first
