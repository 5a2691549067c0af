"""GPU sanity, pure: what GPUs exist, and the decisions taken from that.

A :class:`DeviceTable` answers "which GPUs are there, with how much memory free and
in total" and "which processes hold GPU memory". The real tables (NVML, nvidia-smi)
are in :mod:`tei_manager.supervisor.devices`; tests inject a :class:`StaticDevices`.
Memory-aware placement can build on the same interface.

- :func:`preflight_problems`: at start-up, the GPUs instances ask for exist and
  the engine that will run them is a GPU build (``gpu_preflight``).
- :func:`auto_max_batch_tokens`: ``max_batch_tokens = "auto"`` from the GPU's free
  memory, ``auto_max_batch_tokens_per_gib`` tokens per free GiB.
- :func:`fallen_back`: instances that asked for a GPU but hold no GPU memory, i.e.
  run on the CPU (``gpu_fallback``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Final, Protocol

import msgspec

__all__ = [
    "DEFAULT_MAX_BATCH_TOKENS",
    "MIN_AUTO_MAX_BATCH_TOKENS",
    "DeviceTable",
    "GpuDevice",
    "GpuProcess",
    "StaticDevices",
    "auto_max_batch_tokens",
    "fallen_back",
    "preflight_problems",
]

GIB: Final = 1 << 30
#: TEI's own default, used for "auto" when the instance's GPU is unknown.
DEFAULT_MAX_BATCH_TOKENS: Final = 16384
#: "auto" never goes below this: one long input must still fit a batch.
MIN_AUTO_MAX_BATCH_TOKENS: Final = 512


class GpuDevice(msgspec.Struct, frozen=True, kw_only=True):
    """One GPU as the instances see it (``gpu_id`` = ``index``)."""

    index: int
    name: str
    memory_total_bytes: int
    memory_free_bytes: int


class GpuProcess(msgspec.Struct, frozen=True, kw_only=True):
    """A process holding memory on a GPU."""

    pid: int
    gpu_index: int
    used_bytes: int


class DeviceTable(Protocol):
    """What GPUs exist, and who uses them. Blocking: call from a worker thread."""

    @property
    def source(self) -> str:
        """Where the answers come from ("nvml", "nvidia-smi", "none", "static")."""
        ...

    def gpus(self) -> Sequence[GpuDevice]:
        """Every GPU visible to this process, by index."""
        ...

    def gpu_processes(self) -> Sequence[GpuProcess] | None:
        """Processes holding GPU memory; None when this table cannot tell."""
        ...


class StaticDevices:
    """A fixed table: tests, and hosts where the operator states the GPUs."""

    source = "static"

    def __init__(
        self, gpus: Iterable[GpuDevice] = (), processes: Iterable[GpuProcess] | None = ()
    ) -> None:
        self.devices = list(gpus)
        self.processes = None if processes is None else list(processes)

    def gpus(self) -> Sequence[GpuDevice]:
        return list(self.devices)

    def gpu_processes(self) -> Sequence[GpuProcess] | None:
        return None if self.processes is None else list(self.processes)


def preflight_problems(
    requested: Mapping[str, int],
    gpus: Sequence[GpuDevice],
    *,
    engine: str,
    engine_gpu_build: bool | None,
) -> list[str]:
    """What is wrong for instances ``{name: gpu_id}`` on ``gpus`` with ``engine``.

    ``engine_gpu_build`` None means the engine's build could not be told.
    """
    problems: list[str] = []
    present = sorted(g.index for g in gpus)
    have = f"GPUs {', '.join(map(str, present))}" if present else "no GPU"
    for name, gpu_id in requested.items():
        if gpu_id not in present:
            problems.append(f"instance {name!r} asks for GPU {gpu_id}, but this host has {have}")
    if requested and engine_gpu_build is False:
        problems.append(
            f"{len(requested)} instance(s) ask for a GPU, but {engine} is a CPU build: "
            "they would run on the CPU"
        )
    return problems


def auto_max_batch_tokens(device: GpuDevice | None, *, per_gib: int) -> int:
    """``max_batch_tokens`` for "auto": ``per_gib`` tokens per GiB free on ``device``,
    rounded down to a multiple of 256, at least 512; TEI's default without a device."""
    if device is None:
        return DEFAULT_MAX_BATCH_TOKENS
    tokens = int(device.memory_free_bytes / GIB * per_gib) // 256 * 256
    return max(MIN_AUTO_MAX_BATCH_TOKENS, tokens)


def fallen_back(running: Mapping[str, int], gpu_groups: Collection[int]) -> list[str]:
    """Instances ``{name: process group}`` that asked for a GPU whose process group
    holds no GPU memory (``gpu_groups``: process groups of the GPU processes)."""
    return [name for name, group in running.items() if group not in gpu_groups]
