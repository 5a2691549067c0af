"""The real device tables (see :mod:`tei_manager.core.gpu`) and the engine's build.

:func:`detect_devices` picks NVML (``nvidia-ml-py``, when importable and the driver
answers), else ``nvidia-smi``, else no GPU. Everything here blocks: call it from a
worker thread, or once before the event loop starts.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
from collections.abc import Callable, Sequence
from typing import Any, Final

from tei_manager.core.gpu import GpuDevice, GpuProcess
from tei_manager.supervisor.launch import Program

__all__ = [
    "NoDevices",
    "NvidiaSmiDevices",
    "NvmlDevices",
    "detect_devices",
    "engine_gpu_build",
    "parse_compute_apps",
    "parse_gpu_query",
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
