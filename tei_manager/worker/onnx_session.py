"""Running an ONNX graph with ONNX Runtime on CPU, with session options chosen by measurement.

The options (see DESIGN.md, "The worker", for the A/B figures): every optimisation
ORT has (its transformer fusions: attention, GELU, LayerNorm with skip connections),
one intra-op thread per core the process may use, no spinning between operators
(a spinning pool burns a core that the event loop and the tokenizer need, and the
worker is measured in CPU-seconds per text), the memory arena kept (it reuses
activation buffers between batches), and operators run one after another (a BERT
layer is a chain: parallel execution only adds scheduling).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The inputs the worker can feed; a graph asking for anything else cannot be run.
KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class GraphError(Exception):
    """The graph cannot be loaded, or does not take and give what this model needs."""


def session_options(*, threads: int | None = None, spinning: bool = False) -> Any:
    """The tuned ``SessionOptions`` (``threads``: default one per usable core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3  # warnings about unused initializers are not ours to fix
    return options


class OnnxRunner:
    """One ONNX Runtime session over a graph that maps token tensors to one float output."""

    def __init__(self, path: Path, *, outputs: Sequence[str], rank: int, width: int | None) -> None:
        """Load ``path``; its output is the first of ``outputs`` it has, of ``rank`` dims.

        ``width``: the size the output's last dimension must have, when known.
        """
        import onnxruntime as ort

        self.path = path
        try:
            self._session = ort.InferenceSession(
                str(path), session_options(), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own types for unreadable graphs
            raise GraphError(f"cannot load {path}: {exc}") from exc
        self.input_names = tuple(i.name for i in self._session.get_inputs())
        unknown = [name for name in self.input_names if name not in KNOWN_INPUTS]
        if unknown or "input_ids" not in self.input_names:
            raise GraphError(
                f"{path} takes inputs {list(self.input_names)}; the worker feeds "
                f"{list(KNOWN_INPUTS)} (input_ids required)"
            )
        by_name = {output.name: output for output in self._session.get_outputs()}
        chosen = next((name for name in outputs if name in by_name), None)
        if chosen is None:
            raise GraphError(f"{path} has outputs {list(by_name)}, none of {list(outputs)}")
        shape = by_name[chosen].shape
        last = shape[-1] if shape else None
        if len(shape) != rank or (width is not None and isinstance(last, int) and last != width):
            raise GraphError(f"{path}: output {chosen!r} has shape {shape}, not this model's")
        self._output = chosen

    def run(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """The graph's output for the padded int64 batch ``features``."""
        feed = {name: features[name] for name in self.input_names if name in features}
        if "token_type_ids" in self.input_names and "token_type_ids" not in feed:
            feed["token_type_ids"] = np.zeros_like(features["input_ids"])
        [result] = self._session.run([self._output], feed)
        return np.asarray(result, dtype=np.float32)
