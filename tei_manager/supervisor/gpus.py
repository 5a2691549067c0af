"""How many GPUs this host has, so a ``gpu_id`` that does not exist is refused.

``nvidia-smi -L`` is asked first: inside a container it lists only the GPUs given to
the container, while ``/proc/driver/nvidia/gpus`` lists every GPU of the host. No
driver at all means no GPU, and then every ``gpu_id`` is refused. Blocking: run
:func:`count_gpus` in a worker thread.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from typing import Final

__all__ = ["PROC_GPUS_DIR", "count_gpus", "parse_nvidia_smi_list"]

PROC_GPUS_DIR: Final = "/proc/driver/nvidia/gpus"
_NVIDIA_SMI_TIMEOUT_SECS: Final = 10.0

Runner = Callable[[Sequence[str]], str]
"""Runs a command and returns its stdout; raises OSError or CalledProcessError."""


def _run(argv: Sequence[str]) -> str:
    done = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        check=True,
        timeout=_NVIDIA_SMI_TIMEOUT_SECS,
    )
    return done.stdout


def parse_nvidia_smi_list(output: str) -> int:
    """Count the ``GPU n: ...`` lines of ``nvidia-smi -L`` (MIG devices are indented)."""
    return sum(1 for line in output.splitlines() if line.startswith("GPU "))


def count_gpus(*, run: Runner = _run, proc_dir: str = PROC_GPUS_DIR) -> int:
    """GPUs usable by instances: ``nvidia-smi -L``, else the driver's /proc entries, else 0."""
    try:
        return parse_nvidia_smi_list(run(["nvidia-smi", "-L"]))
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return len(os.listdir(proc_dir))
    except OSError:
        return 0
