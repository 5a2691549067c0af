"""Whether a model may run on ONNX Runtime, and exporting its graph in a child process.

Serving on ONNX Runtime needs no torch (``onnx_model.py``); exporting a graph does. The
export runs in a child process (``python -m tei_manager.worker.onnx_load``) that loads
the torch model, traces the part that costs and exits, so the serving worker never
imports torch and its memory never holds torch's libraries or the torch weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tei_manager.worker.options import WorkerOptions

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# How long an export may take before the worker gives up on ONNX for this start.
EXPORT_TIMEOUT_SECS = 1800.0
# The most of the child's error output a load error carries.
_ERROR_TAIL_CHARS = 2000


def return_freed_memory() -> None:
    """Hand the heap pages freed after loading back to the OS.

    glibc keeps freed memory in the process for reuse; after a load it is memory that
    nothing would reuse.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def cuda_possible() -> bool:
    """Whether this host may have a CUDA device, asked without importing torch.

    No NVIDIA device node means no CUDA; with one, torch is asked (and imported).
    """
    if not any(Path(node).exists() for node in ("/dev/nvidiactl", "/dev/nvidia0")):
        return False
    import torch

    return bool(torch.cuda.is_available())


def onnx_blocker(options: WorkerOptions, device_type: str) -> str | None:
    """Why this model cannot run on ONNX Runtime before even loading it; None if it may."""
    if options.engine == "torch":
        return "--engine torch"
    if device_type != "cpu":
        return f"the device is {options.device or device_type}; the ONNX engine runs on CPU"
    if options.dtype in ("float16", "bfloat16"):
        return f"--dtype {options.dtype}: ONNX Runtime on CPU runs float32 or int8"
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    return None


def export_in_subprocess(model_dir: Path, target: Path, *, part: str) -> None:
    """Export ``part`` of the model in ``model_dir`` to ``target`` from a child process."""
    command = [sys.executable, "-m", __name__, str(model_dir), str(target), part]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=EXPORT_TIMEOUT_SECS,
            env=os.environ.copy(),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(
            f"exporting the ONNX graph took over {EXPORT_TIMEOUT_SECS:.0f}s"
        ) from exc
    if done.returncode != 0:
        tail = done.stderr.strip()[-_ERROR_TAIL_CHARS:]
        raise RuntimeError(f"exporting the ONNX graph failed: {tail}")


def export_part(model_dir: Path, target: Path, part: str) -> None:
    """Load the torch model in ``model_dir`` and export ``part`` of it to ``target``."""
    import torch

    from tei_manager.worker.model import load_torch_model
    from tei_manager.worker.onnx_graph import export_module

    options = WorkerOptions(
        model_id=str(model_dir), engine="torch", pooling="splade" if part == "masked-lm" else None
    )
    model = load_torch_model(options, model_dir, torch.device("cpu"))
    found, _, net = model.onnx_part()
    if found != part:
        raise RuntimeError(f"the model's ONNX part is {found}, not {part}")
    outputs = ("last_hidden_state",) if part == "encoder" else ("logits",)
    example = model.example_features()
    names = list(example)
    export_module(
        _traced(net, names), target, input_names=names, output_name=outputs[0], example=example
    )


def _traced(net: torch.nn.Module, names: Sequence[str]) -> Any:
    """``net`` as the exporter wants it: positional tensors in, one tensor out."""
    import torch

    class Traced(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            output = self.net(**dict(zip(names, tensors, strict=True)), return_dict=True)
            # last_hidden_state for an encoder, logits for a classifier or a masked LM.
            first: torch.Tensor = output[0]
            return first

    return Traced()


def main(argv: Sequence[str]) -> int:
    """``python -m tei_manager.worker.onnx_load MODEL_DIR TARGET PART``."""
    model_dir, target, part = argv
    logging.basicConfig(level=logging.WARNING)
    export_part(Path(model_dir), Path(target), part)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
