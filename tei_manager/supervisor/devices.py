"""The host's devices and their memory, and how much memory an instance process holds.

Blocking reads (``/proc``, NVML, ``nvidia-smi``): callers on the Trio side use a
worker thread. GPUs are read through NVML (the ``nvidia-ml-py`` package) when it
imports and initialises, else through ``nvidia-smi``, else there are none; the
host's RAM comes from ``/proc/meminfo`` (``MemAvailable``, what the kernel says can
be allocated without swapping, as ``free`` shows it).

:data:`DeviceSource` is the interface the manager depends on: tests inject a fake
table (any callable returning readings), the real one is :func:`host_devices`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import msgspec

from tei_manager.core.ondemand import CPU_DEVICE, gpu_device

__all__ = [
    "DeviceReading",
    "DeviceSource",
    "GpuProcessMemory",
    "gpu_process_memory",
    "host_devices",
    "parse_meminfo",
    "parse_nvidia_smi_apps",
    "parse_nvidia_smi_memory",
    "process_tree_peak_rss",
    "process_tree_rss",
]

_NVIDIA_SMI_TIMEOUT_SECS: Final = 10.0
_MIB: Final = 1 << 20


class DeviceReading(msgspec.Struct, frozen=True, kw_only=True):
    """One device's memory now: ``cpu`` (host RAM) or ``gpu:N``."""

    device: str
    total_bytes: int
    free_bytes: int


DeviceSource = Callable[[], list[DeviceReading]]
"""Reads every device (blocking); :func:`host_devices` or a fake table in tests."""

GpuProcessMemory = Callable[[Iterable[int]], dict[int, int]]
"""GPU memory (bytes, summed over GPUs) used by each of the given pids that uses any."""

Runner = Callable[[Sequence[str]], str]


def _run(argv: Sequence[str]) -> str:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, check=True, timeout=_NVIDIA_SMI_TIMEOUT_SECS
    )
    return done.stdout


def parse_meminfo(text: str) -> DeviceReading:
    """The host RAM of a ``/proc/meminfo`` text (``MemTotal``, ``MemAvailable``; kB)."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key] = int(parts[0]) * 1024
    total = fields.get("MemTotal", 0)
    # Kernels before 3.14 have no MemAvailable: free plus page cache is its estimate.
    free = fields.get("MemAvailable", fields.get("MemFree", 0) + fields.get("Cached", 0))
    return DeviceReading(device=CPU_DEVICE, total_bytes=total, free_bytes=free)


def parse_nvidia_smi_memory(output: str) -> list[DeviceReading]:
    """``nvidia-smi --query-gpu=index,memory.total,memory.free --format=csv,noheader,nounits``."""
    readings = []
    for line in output.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            continue
        index, total, free = (int(p) for p in parts)
        readings.append(
            DeviceReading(
                device=gpu_device(index), total_bytes=total * _MIB, free_bytes=free * _MIB
            )
        )
    return readings


def parse_nvidia_smi_apps(output: str) -> dict[int, int]:
    """``nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits``."""
    used: dict[int, int] = {}
    for line in output.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            pid = int(parts[0])
            used[pid] = used.get(pid, 0) + int(parts[1]) * _MIB
    return used


def _nvml() -> Any | None:
    """The initialised ``pynvml`` module, or None (not installed, or no driver)."""
    try:
        import pynvml  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    return pynvml


def _nvml_devices(nvml: Any) -> list[DeviceReading]:
    readings = []
    for index in range(nvml.nvmlDeviceGetCount()):
        info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index))
        readings.append(
            DeviceReading(
                device=gpu_device(index), total_bytes=int(info.total), free_bytes=int(info.free)
            )
        )
    return readings


def gpu_readings(*, run: Runner = _run) -> list[DeviceReading]:
    """Every GPU's memory: NVML, else ``nvidia-smi``, else none."""
    nvml = _nvml()
    if nvml is not None:
        try:
            return _nvml_devices(nvml)
        except nvml.NVMLError:
            pass
    try:
        return parse_nvidia_smi_memory(
            run(
                [
                    "nvidia-smi",
                    "--query-gpu=index,memory.total,memory.free",
                    "--format=csv,noheader,nounits",
                ]
            )
        )
    except (OSError, subprocess.SubprocessError):
        return []


def host_devices(*, meminfo: str = "/proc/meminfo", run: Runner = _run) -> list[DeviceReading]:
    """The host's RAM, then its GPUs in index order."""
    try:
        with open(meminfo, encoding="ascii") as f:
            ram = parse_meminfo(f.read())
    except OSError:
        ram = DeviceReading(device=CPU_DEVICE, total_bytes=0, free_bytes=0)
    return [ram, *gpu_readings(run=run)]


def gpu_process_memory(pids: Iterable[int], *, run: Runner = _run) -> dict[int, int]:
    """GPU memory used by each of ``pids`` (NVML, else ``nvidia-smi``); pids using none
    are left out."""
    wanted = set(pids)
    used: dict[int, int] = {}
    nvml = _nvml()
    if nvml is not None:
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid in wanted and proc.usedGpuMemory:
                        used[proc.pid] = used.get(proc.pid, 0) + int(proc.usedGpuMemory)
            return used
        except nvml.NVMLError:
            used.clear()
    try:
        out = run(
            [
                "nvidia-smi",
                "--query-compute-apps=pid,used_memory",
                "--format=csv,noheader,nounits",
            ]
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    return {pid: b for pid, b in parse_nvidia_smi_apps(out).items() if pid in wanted}


def _rss(pid: int, proc: str, field: str = "VmRSS:") -> int:
    try:
        with open(f"{proc}/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children(pid: int, proc: str) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"{proc}/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"{proc}/{pid}/task/{tid}/children", encoding="ascii") as f:
                found.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return found


def process_tree_rss(pid: int, *, proc: str = "/proc", peak: bool = False) -> int:
    """Resident memory of ``pid`` and its descendants (a launcher's children count), bytes;
    with ``peak``, the most each ever held (``VmHWM``): what a batch at its largest took."""
    field = "VmHWM:" if peak else "VmRSS:"
    total = 0
    todo = [pid]
    seen: set[int] = set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        total += _rss(current, proc, field)
        todo.extend(_children(current, proc))
    return total


def process_tree_peak_rss(pid: int) -> int:
    """:func:`process_tree_rss` with ``peak``: the figure admission remembers."""
    return process_tree_rss(pid, peak=True)
