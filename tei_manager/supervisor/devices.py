"""The host's devices: one reading of GPUs and host memory, and the engine's build.

:func:`detect_devices` picks NVML (``nvidia-ml-py``, when importable and the driver
answers), else ``nvidia-smi``, else no GPU: a :class:`~tei_manager.core.gpu.DeviceTable`
that GPU preflight, ``max_batch_tokens = "auto"``, CPU-fallback detection and the
memory series of /metrics read. Models on demand read the same table through
:func:`host_devices` (host RAM from ``/proc/meminfo``, ``MemAvailable``, then each
GPU of the table as a :class:`DeviceReading`) and :func:`gpu_process_memory` (the
table's GPU processes, summed per pid). Everything here blocks: call it from a
worker thread, or once before the event loop starts.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import msgspec

from tei_manager.core.gpu import DeviceTable, GpuDevice, GpuProcess
from tei_manager.core.ondemand import CPU_DEVICE, gpu_device
from tei_manager.supervisor.launch import Program

__all__ = [
    "DeviceReading",
    "DeviceSource",
    "GpuProcessMemory",
    "NoDevices",
    "NvidiaSmiDevices",
    "NvmlDevices",
    "detect_devices",
    "engine_gpu_build",
    "gpu_process_memory",
    "host_devices",
    "parse_compute_apps",
    "parse_gpu_query",
    "parse_meminfo",
    "process_tree_peak_rss",
    "process_tree_rss",
]

_MIB: Final = 1 << 20
_TIMEOUT_SECS: Final = 10.0
# Strings a CUDA build of text-embeddings-router carries (the CUDA libraries it
# links or loads); a CPU build has none of them.
_CUDA_MARKERS: Final = (b"libcublas", b"libcudart", b"libcuda.so", b"cudarc")
_CHUNK: Final = 1 << 20

Runner = Callable[[Sequence[str]], str]


def _run(argv: Sequence[str]) -> str:
    return subprocess.run(
        list(argv), capture_output=True, text=True, check=True, timeout=_TIMEOUT_SECS
    ).stdout


class NoDevices:
    """No GPU, or no way to see one."""

    source = "none"

    def gpus(self) -> Sequence[GpuDevice]:
        return []

    def gpu_processes(self) -> Sequence[GpuProcess] | None:
        return None


def parse_gpu_query(output: str) -> list[GpuDevice]:
    """``nvidia-smi --query-gpu=index,name,memory.total,memory.free
    --format=csv,noheader,nounits`` (MiB) as devices."""
    devices = []
    for line in output.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4:
            continue
        try:
            index, total, free = int(fields[0]), int(fields[2]), int(fields[3])
        except ValueError:
            continue  # "[N/A]" on some devices
        devices.append(
            GpuDevice(
                index=index,
                name=fields[1],
                memory_total_bytes=total * _MIB,
                memory_free_bytes=free * _MIB,
            )
        )
    return devices


def parse_compute_apps(output: str, uuid_to_index: dict[str, int]) -> list[GpuProcess]:
    """``nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory
    --format=csv,noheader,nounits`` as processes."""
    processes = []
    for line in output.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3 or fields[0] not in uuid_to_index:
            continue
        try:
            pid, used = int(fields[1]), int(fields[2])
        except ValueError:
            used = 0
            if not fields[1].isdigit():
                continue
            pid = int(fields[1])
        processes.append(
            GpuProcess(pid=pid, gpu_index=uuid_to_index[fields[0]], used_bytes=used * _MIB)
        )
    return processes


class NvidiaSmiDevices:
    """The table from ``nvidia-smi`` queries (one process each time)."""

    source = "nvidia-smi"

    def __init__(self, run: Runner = _run) -> None:
        self._run = run

    def gpus(self) -> Sequence[GpuDevice]:
        try:
            return parse_gpu_query(
                self._run(
                    [
                        "nvidia-smi",
                        "--query-gpu=index,name,memory.total,memory.free",
                        "--format=csv,noheader,nounits",
                    ]
                )
            )
        except (OSError, subprocess.SubprocessError):
            return []

    def gpu_processes(self) -> Sequence[GpuProcess] | None:
        try:
            uuids = self._run(
                ["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader,nounits"]
            )
            index = {}
            for line in uuids.splitlines():
                number, _, uuid = (part.strip() for part in line.partition(","))
                if number.isdigit():
                    index[uuid] = int(number)
            apps = self._run(
                [
                    "nvidia-smi",
                    "--query-compute-apps=gpu_uuid,pid,used_memory",
                    "--format=csv,noheader,nounits",
                ]
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return parse_compute_apps(apps, index)


class NvmlDevices:
    """The table from NVML through ``nvidia-ml-py`` (``import pynvml``)."""

    source = "nvml"

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml

    def gpus(self) -> Sequence[GpuDevice]:
        nvml = self._nvml
        devices = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = nvml.nvmlDeviceGetName(handle)
                devices.append(
                    GpuDevice(
                        index=index,
                        name=name.decode() if isinstance(name, bytes) else str(name),
                        memory_total_bytes=int(memory.total),
                        memory_free_bytes=int(memory.free),
                    )
                )
        except nvml.NVMLError:
            return []
        return devices

    def gpu_processes(self) -> Sequence[GpuProcess] | None:
        nvml = self._nvml
        processes = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                for app in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    used = app.usedGpuMemory if isinstance(app.usedGpuMemory, int) else 0
                    processes.append(GpuProcess(pid=int(app.pid), gpu_index=index, used_bytes=used))
        except nvml.NVMLError:
            return None
        return processes


def detect_devices(*, run: Runner = _run) -> NvmlDevices | NvidiaSmiDevices | NoDevices:
    """NVML if ``pynvml`` imports and initialises, else nvidia-smi if it answers, else none."""
    try:
        import pynvml  # type: ignore[import-not-found, unused-ignore]

        pynvml.nvmlInit()
        return NvmlDevices(pynvml)
    except Exception:
        pass
    smi = NvidiaSmiDevices(run)
    try:
        run(["nvidia-smi", "-L"])
    except (OSError, subprocess.SubprocessError):
        return NoDevices()
    return smi


class DeviceReading(msgspec.Struct, frozen=True, kw_only=True):
    """One device's memory now: ``cpu`` (host RAM) or ``gpu:N``."""

    device: str
    total_bytes: int
    free_bytes: int


DeviceSource = Callable[[], list[DeviceReading]]
"""Reads every device (blocking): :func:`host_devices` over the manager's table."""

GpuProcessMemory = Callable[[Iterable[int]], dict[int, int]]
"""GPU memory (bytes, summed over GPUs) used by each of the given pids that uses any."""


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


def host_devices(table: DeviceTable, *, meminfo: str = "/proc/meminfo") -> list[DeviceReading]:
    """The host's RAM, then the GPUs of ``table`` in index order."""
    try:
        with open(meminfo, encoding="ascii") as f:
            ram = parse_meminfo(f.read())
    except OSError:
        ram = DeviceReading(device=CPU_DEVICE, total_bytes=0, free_bytes=0)
    return [
        ram,
        *(
            DeviceReading(
                device=gpu_device(g.index),
                total_bytes=g.memory_total_bytes,
                free_bytes=g.memory_free_bytes,
            )
            for g in sorted(table.gpus(), key=lambda g: g.index)
        ),
    ]


def gpu_process_memory(pids: Iterable[int], table: DeviceTable) -> dict[int, int]:
    """GPU memory used by each of ``pids``, summed over GPUs, from ``table``; pids
    using none (or a table that cannot tell) are left out."""
    wanted = set(pids)
    used: dict[int, int] = {}
    for process in table.gpu_processes() or ():
        if process.pid in wanted and process.used_bytes:
            used[process.pid] = used.get(process.pid, 0) + process.used_bytes
    return used


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


def _binary_mentions_cuda(path: str) -> bool | None:
    tail = b""
    longest = max(len(m) for m in _CUDA_MARKERS)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                window = tail + chunk
                if any(marker in window for marker in _CUDA_MARKERS):
                    return True
                tail = window[-longest:]
    except OSError:
        return None
    return False


def _torch_build() -> tuple[str, list[str]]:
    return importlib.metadata.version("torch"), importlib.metadata.requires("torch") or []


def engine_gpu_build(
    program: Program, *, torch_build: Callable[[], tuple[str, list[str]]] = _torch_build
) -> bool | None:
    """Whether ``program`` can use a GPU. None: cannot tell.

    TEI: its binary carries the CUDA libraries' names. The built-in worker: its
    torch is a ``+cpu`` wheel (no), a ``+cu``/``+rocm`` one or one that requires
    NVIDIA's CUDA wheels (yes).
    """
    if program.is_tei:
        return _binary_mentions_cuda(program.argv[0])
    try:
        version, requires = torch_build()
    except importlib.metadata.PackageNotFoundError:
        return None
    local = version.partition("+")[2]
    if local == "cpu":
        return False
    if local.startswith(("cu", "rocm")) or any(r.startswith("nvidia-") for r in requires):
        return True
    return None
