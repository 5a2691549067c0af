"""How much memory an instance will take, estimated from its model's files before it starts.

weights + activations + runtime:

- weights: the parameter count, from the ``*.safetensors`` headers (8-byte length,
  then a JSON table of tensors with dtype and shape: no tensor data is read), times
  the bytes per parameter the instance computes in (float32 on the CPU, float16 on
  a GPU, as TEI and the worker load them);
- activations: ``max_batch_tokens`` tokens of ``hidden_size`` floats, times a factor
  (:func:`activation_factor`): measured for the built-in worker per engine on CPU, else
  :data:`ACTIVATION_FACTOR` (the intermediate layer is 4x hidden, and attention, norms
  and the copies between them come on top);
- runtime: the process itself, by what will run it (:func:`cpu_runtime`): the built-in
  worker on ONNX Runtime (its CPU default, torch-free), the worker on torch, or TEI; on a
  GPU, a CUDA context.

A model without safetensors (``pytorch_model.bin`` only) is sized by its weight
files. Once the instance runs, the manager measures it and uses that figure next
time instead (see :class:`~tei_manager.manager.ondemand.OnDemand`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal

import msgspec

__all__ = [
    "ACTIVATION_FACTOR",
    "CPU_RUNTIME_BYTES",
    "GPU_RUNTIME_BYTES",
    "ONNX_ACTIVATION_FACTOR",
    "ONNX_RUNTIME_BYTES",
    "TEI_RUNTIME_BYTES",
    "TORCH_ACTIVATION_FACTOR",
    "TORCH_RUNTIME_BYTES",
    "Footprint",
    "FootprintError",
    "Runtime",
    "activation_factor",
    "cpu_runtime",
    "estimate_footprint",
    "runtime_bytes",
    "safetensors_parameters",
]

# Bytes per element of each safetensors dtype.
DTYPE_BYTES: Final = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
#: Floats of activation memory per token and hidden unit at the batch's peak (on a GPU,
#: and for TEI: not measured here).
ACTIVATION_FACTOR: Final = 8
# The built-in worker on CPU, measured in-process (Model.forward, as the worker calls
# it) on the packaged all-MiniLM-L6-v2, one batch of N rows of 252 tokens (its longest:
# attention grows with the square of the length), VmHWM after minus before, per token
# and hidden float: ONNX 39 (N=16) and 43 (N=64: +1006 MiB: ONNX Runtime's arena keeps
# what the largest batch took), torch 23 and 17. Plus about 15 %. Reproduce with
# ``benches/worker_rss.py --full-batch N``.
#: Activation floats per token and hidden unit, the built-in worker on ONNX Runtime.
ONNX_ACTIVATION_FACTOR: Final = 50
#: Activation floats per token and hidden unit, the built-in worker on torch.
TORCH_ACTIVATION_FACTOR: Final = 27
# The CPU runtimes are what a process holds beyond its float32 weights, measured as the
# VmHWM of a real worker process (tei_manager.testing.run_worker_process) serving the
# packaged all-MiniLM-L6-v2 (22.7 M parameters: 87 MiB of weights) with
# --max-batch-tokens 512, once loaded, on the second start (the ONNX graph cached):
# ONNX 223 MiB, torch 523 MiB (three runs each, within 1 MiB). Each constant is that
# minus the weights, plus about 15 %: an estimate below the real peak over-commits.
# A first ONNX start exports the graph in a child process (onnx_load.py) that loads
# torch and peaks at about 840 MiB for this model; it exits before the worker is
# ready, so it is neither in the worker's VmHWM nor in this estimate.
#: The built-in worker on ONNX Runtime (its CPU default): Python, onnxruntime,
#: tokenizers and numpy, no torch (measured 136 MiB).
ONNX_RUNTIME_BYTES: Final = 160 << 20
#: The built-in worker on torch: Python, torch, transformers, sentence-transformers
#: and tokenizers (measured 436 MiB).
TORCH_RUNTIME_BYTES: Final = 512 << 20
#: text-embeddings-router on CPU: not measured here (no TEI binary on this host); the
#: figure this estimate always used, from the worker on torch before its weights.
TEI_RUNTIME_BYTES: Final = 448 << 20
#: A CPU instance whose runtime is not known: the largest of them.
CPU_RUNTIME_BYTES: Final = max(ONNX_RUNTIME_BYTES, TORCH_RUNTIME_BYTES, TEI_RUNTIME_BYTES)
#: A CUDA context and the allocator's slack on a GPU.
GPU_RUNTIME_BYTES: Final = 512 << 20
# A header larger than this is no safetensors file (the format caps it at 100 MB).
_MAX_HEADER_BYTES: Final = 100_000_000
_DEFAULT_HIDDEN_SIZE: Final = 1024
# The worker's --dtype values that keep its "auto" engine off ONNX Runtime on CPU.
_TORCH_ONLY_DTYPES: Final = frozenset({"float16", "bfloat16"})

Runtime = Literal["onnx", "torch", "tei"]
"""What runs a CPU instance: the built-in worker on one of its engines, or TEI."""
_CPU_RUNTIME_BYTES: Final[dict[Runtime, int]] = {
    "onnx": ONNX_RUNTIME_BYTES,
    "torch": TORCH_RUNTIME_BYTES,
    "tei": TEI_RUNTIME_BYTES,
}


class FootprintError(Exception):
    """The model's files cannot be sized."""


class Footprint(msgspec.Struct, frozen=True, kw_only=True):
    """An instance's memory, estimated; ``total_bytes`` is what admission reserves."""

    parameters: int
    weights_bytes: int
    activation_bytes: int
    runtime_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes + self.runtime_bytes


def safetensors_parameters(header: bytes) -> int:
    """The parameter count a safetensors JSON header describes."""
    try:
        table = json.loads(header)
    except ValueError as e:
        raise FootprintError(f"bad safetensors header: {e}") from None
    if not isinstance(table, dict):
        raise FootprintError("bad safetensors header: not a table")
    count = 0
    for name, tensor in table.items():
        if name == "__metadata__":
            continue
        shape = tensor.get("shape") if isinstance(tensor, dict) else None
        if not isinstance(shape, list) or tensor.get("dtype") not in DTYPE_BYTES:
            raise FootprintError(f"bad safetensors header: tensor {name!r}")
        elements = 1
        for dim in shape:
            elements *= int(dim)
        count += elements
    return count


def _read_header(path: Path) -> bytes:
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise FootprintError(f"{path.name}: too short for safetensors")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER_BYTES:
            raise FootprintError(f"{path.name}: header of {length} bytes")
        return f.read(length)


def _hidden_size(model_dir: Path) -> int:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return _DEFAULT_HIDDEN_SIZE
    for key in ("hidden_size", "d_model", "n_embd"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    return _DEFAULT_HIDDEN_SIZE


def _flag(args: Sequence[str], name: str) -> str | None:
    """The last value of ``name`` in ``args`` (``--x v`` or ``--x=v``), as argparse takes it."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1 :]
    return value


def cpu_runtime(
    engine: str | None, extra_args: Sequence[str], *, is_tei: bool, onnx_installed: bool
) -> Runtime:
    """What will run an instance on the CPU, decided as the worker decides its engine.

    ``engine`` is the instance's ``engine`` field; an ``--engine`` or ``--dtype`` in its
    ``extra_args`` comes later on the command line and wins. On ``auto`` the worker runs
    ONNX Runtime unless it is not installed or the dtype is one it cannot run (a model it
    cannot export falls back to torch at load: measured once it runs).
    """
    if is_tei:
        return "tei"
    chosen = _flag(extra_args, "--engine") or engine or "auto"
    if chosen == "torch":
        return "torch"
    if chosen == "onnx":
        return "onnx"
    if not onnx_installed or _flag(extra_args, "--dtype") in _TORCH_ONLY_DTYPES:
        return "torch"
    return "onnx"


def runtime_bytes(runtime: Runtime | None, *, gpu: bool) -> int:
    """The runtime part of an estimate: a CUDA context on a GPU, else by ``runtime``
    (None: not known, the largest)."""
    if gpu:
        return GPU_RUNTIME_BYTES
    return CPU_RUNTIME_BYTES if runtime is None else _CPU_RUNTIME_BYTES[runtime]


def activation_factor(runtime: Runtime | None, *, gpu: bool) -> int:
    """Activation floats per token and hidden unit for ``runtime`` (None: the largest)."""
    if gpu:
        return ACTIVATION_FACTOR
    return {
        "onnx": ONNX_ACTIVATION_FACTOR,
        "torch": TORCH_ACTIVATION_FACTOR,
        "tei": ACTIVATION_FACTOR,
        None: max(ONNX_ACTIVATION_FACTOR, TORCH_ACTIVATION_FACTOR, ACTIVATION_FACTOR),
    }[runtime]


def estimate_footprint(
    model_dir: str | Path, *, max_batch_tokens: int, gpu: bool, runtime: Runtime | None = None
) -> Footprint:
    """The estimated memory of an instance of the model in ``model_dir``; blocking.

    ``runtime`` is what runs it on the CPU (:func:`cpu_runtime`; None: the largest).
    """
    folder = Path(model_dir)
    per_parameter = 2 if gpu else 4
    files = sorted(folder.glob("*.safetensors"))
    try:
        if files:
            parameters = sum(safetensors_parameters(_read_header(p)) for p in files)
        else:
            # pytorch_model.bin / ONNX only: sized by the files (as stored, float32).
            stored = [*folder.glob("*.bin"), *folder.glob("*.onnx"), *folder.glob("onnx/*.onnx")]
            if not stored:
                raise FootprintError(f"no weight files in {folder}")
            parameters = sum(p.stat().st_size for p in stored) // 4
    except OSError as e:
        raise FootprintError(f"cannot read the weights: {e.strerror or e}") from None
    activation = max_batch_tokens * _hidden_size(folder) * 4 * activation_factor(runtime, gpu=gpu)
    return Footprint(
        parameters=parameters,
        weights_bytes=parameters * per_parameter,
        activation_bytes=activation,
        runtime_bytes=runtime_bytes(runtime, gpu=gpu),
    )
