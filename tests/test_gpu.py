"""GPU sanity with an injected device table: preflight, "auto" batch tokens, CPU fallback.

The pure decisions (``core/gpu.py``) exhaustively; the device tables' parsers with
recorded ``nvidia-smi`` output; the manager on the mock clock with fake processes
and a :class:`StaticDevices` table.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from tei_manager.config import (
    ConfigError,
    InstanceConfig,
    ManagerConfig,
    SeedInstance,
    parse_config,
    parse_instance_config,
)
from tei_manager.core.gpu import (
    DEFAULT_MAX_BATCH_TOKENS,
    GpuDevice,
    GpuProcess,
    StaticDevices,
    auto_max_batch_tokens,
    fallen_back,
    preflight_problems,
)
from tei_manager.core.instances import InstanceStatus
from tei_manager.core.restart import RestartPolicy
from tei_manager.errors import ValidationError
from tei_manager.manager.service import Manager
from tei_manager.supervisor.devices import (
    NoDevices,
    NvidiaSmiDevices,
    detect_devices,
    engine_gpu_build,
    parse_compute_apps,
    parse_gpu_query,
)
from tei_manager.supervisor.launch import Program, build_command
from tests.fake_processes import FakeHost, FakeProcess, run_inline

GIB = 1 << 30
H100 = GpuDevice(index=0, name="H100", memory_total_bytes=80 * GIB, memory_free_bytes=10 * GIB)
A10 = GpuDevice(index=1, name="A10", memory_total_bytes=24 * GIB, memory_free_bytes=GIB // 8)


# --- pure decisions ---------------------------------------------------------------


def test_preflight_names_each_missing_gpu_and_a_cpu_engine() -> None:
    problems = preflight_problems(
        {"a": 0, "b": 1, "c": 2}, [H100, A10], engine="tei", engine_gpu_build=True
    )
    assert problems == ["instance 'c' asks for GPU 2, but this host has GPUs 0, 1"]
    problems = preflight_problems({"a": 0}, [], engine="the worker", engine_gpu_build=False)
    assert problems == [
        "instance 'a' asks for GPU 0, but this host has no GPU",
        "1 instance(s) ask for a GPU, but the worker is a CPU build: they would run on the CPU",
    ]
    assert preflight_problems({"a": 0}, [H100], engine="x", engine_gpu_build=None) == []
    assert preflight_problems({}, [], engine="x", engine_gpu_build=False) == []


@pytest.mark.parametrize(
    ("device", "per_gib", "tokens"),
    [
        (H100, 2048, 20480),  # 10 GiB free
        (H100, 100, 1000 // 256 * 256),
        (A10, 2048, 512),  # 128 MiB free: the floor
        (None, 2048, DEFAULT_MAX_BATCH_TOKENS),
    ],
)
def test_auto_max_batch_tokens_follows_free_memory(
    device: GpuDevice | None, per_gib: int, tokens: int
) -> None:
    assert auto_max_batch_tokens(device, per_gib=per_gib) == tokens


def test_fallen_back_are_the_groups_without_gpu_memory() -> None:
    assert fallen_back({"on-gpu": 10, "on-cpu": 20}, {10, 99}) == ["on-cpu"]
    assert fallen_back({}, set()) == []


# --- device tables ----------------------------------------------------------------

SMI_GPUS = "0, NVIDIA H100 80GB HBM3, 81559, 81000\n1, NVIDIA A10, 23028, [N/A]\n"
SMI_UUIDS = "0, GPU-aaa\n1, GPU-bbb\n"
SMI_APPS = "GPU-aaa, 4242, 1024\nGPU-bbb, 77, [N/A]\nGPU-zzz, 5, 1\n"


def test_nvidia_smi_output_is_parsed() -> None:
    (gpu,) = parse_gpu_query(SMI_GPUS)  # the [N/A] row is skipped
    assert gpu == GpuDevice(
        index=0,
        name="NVIDIA H100 80GB HBM3",
        memory_total_bytes=81559 << 20,
        memory_free_bytes=81000 << 20,
    )
    assert parse_compute_apps(SMI_APPS, {"GPU-aaa": 0, "GPU-bbb": 1}) == [
        GpuProcess(pid=4242, gpu_index=0, used_bytes=1024 << 20),
        GpuProcess(pid=77, gpu_index=1, used_bytes=0),
    ]


def _smi(outputs: dict[str, str]) -> NvidiaSmiDevices:
    def run(argv: Sequence[str]) -> str:
        for flag, output in outputs.items():
            if flag in argv:
                return output
        raise FileNotFoundError("nvidia-smi")

    return NvidiaSmiDevices(run)


def test_the_nvidia_smi_table_queries_gpus_and_processes() -> None:
    table = _smi(
        {
            "--query-gpu=index,name,memory.total,memory.free": SMI_GPUS,
            "--query-gpu=index,uuid": SMI_UUIDS,
            "--query-compute-apps=gpu_uuid,pid,used_memory": SMI_APPS,
        }
    )
    assert [g.index for g in table.gpus()] == [0]
    processes = table.gpu_processes()
    assert processes is not None and [p.pid for p in processes] == [4242, 77]
    assert _smi({}).gpus() == [] and _smi({}).gpu_processes() is None


def test_detection_falls_back_to_no_gpu() -> None:
    def missing(argv: Sequence[str]) -> str:
        raise FileNotFoundError(argv[0])

    def failing(argv: Sequence[str]) -> str:
        raise subprocess.CalledProcessError(9, list(argv))

    try:
        import pynvml  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        assert isinstance(detect_devices(run=missing), NoDevices)
        assert isinstance(detect_devices(run=failing), NoDevices)
        assert isinstance(detect_devices(run=lambda argv: "GPU 0: x"), NvidiaSmiDevices)
    else:  # pragma: no cover - NVML installed: it answers or it is skipped
        pytest.skip("nvidia-ml-py is installed here; the NVML path is taken first")


def test_the_engine_build_is_told_from_torch_or_the_tei_binary(tmp_path: Path) -> None:
    worker = Program(argv=("python", "-m", "tei_manager", "worker"), is_tei=False)
    assert engine_gpu_build(worker, torch_build=lambda: ("2.13.0+cpu", [])) is False
    assert engine_gpu_build(worker, torch_build=lambda: ("2.13.0+cu128", [])) is True
    nvidia = ["nvidia-cuda-runtime-cu12==12.8; platform_system == 'Linux'"]
    assert engine_gpu_build(worker, torch_build=lambda: ("2.13.0", nvidia)) is True
    assert engine_gpu_build(worker, torch_build=lambda: ("2.13.0", [])) is None
    gpu_tei, cpu_tei = tmp_path / "gpu-router", tmp_path / "cpu-router"
    # The marker straddles a 1 MiB read boundary.
    gpu_tei.write_bytes(b"\0" * ((1 << 20) - 4) + b"libcublasLt.so.12" + b"\0" * 100)
    cpu_tei.write_bytes(b"\0" * (3 << 20))
    assert engine_gpu_build(Program(argv=(str(gpu_tei),), is_tei=True)) is True
    assert engine_gpu_build(Program(argv=(str(cpu_tei),), is_tei=True)) is False
    assert engine_gpu_build(Program(argv=(str(tmp_path / "gone"),), is_tei=True)) is None


# --- configuration -----------------------------------------------------------------


def test_auto_is_a_valid_max_batch_tokens_and_nothing_else_is() -> None:
    config = parse_instance_config({"name": "a", "model_id": "org/m", "max_batch_tokens": "auto"})
    assert config.max_batch_tokens == "auto"
    with pytest.raises(ValidationError, match="max_batch_tokens"):
        parse_instance_config({"name": "a", "model_id": "org/m", "max_batch_tokens": "big"})
    # Unresolved (no GPU known), TEI's default goes on the command line.
    argv = build_command(
        InstanceConfig(name="a", model_id="org/m", port=8080, max_batch_tokens="auto"),
        Program(argv=("tei",), is_tei=False),
    )
    assert argv[argv.index("--max-batch-tokens") + 1] == str(DEFAULT_MAX_BATCH_TOKENS)


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('gpu_preflight = "sometimes"', "gpu_preflight"),
        ('gpu_fallback = "maybe"', "gpu_fallback"),
        ("auto_max_batch_tokens_per_gib = 0", "auto_max_batch_tokens_per_gib"),
    ],
)
def test_gpu_options_are_checked(line: str, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}: "):
        parse_config(line, env={"HOME": "/h"})
    defaults = parse_config("", env={"HOME": "/h"})
    assert (defaults.gpu_preflight, defaults.gpu_fallback) == ("warn", "warn")
    assert defaults.auto_max_batch_tokens_per_gib == 2048


# --- the manager -------------------------------------------------------------------


@pytest.fixture
def clock(autojump_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    return autojump_clock


def _config(tmp_path: Path, *seeds: SeedInstance, **fields: object) -> ManagerConfig:
    return ManagerConfig(
        state_file=str(tmp_path / "state.toml"),
        log_dir=str(tmp_path / "logs"),
        api_port=0,
        grpc_port=0,
        instance_port_start=20000,
        instance_port_end=20009,
        health_check_interval_secs=10,
        instances=seeds,
        **fields,  # type: ignore[arg-type]
    )


class Node:
    def __init__(self, manager: Manager, host: FakeHost, spawned: list[InstanceConfig]) -> None:
        self.manager, self.host, self.spawned = manager, host, spawned


@asynccontextmanager
async def node(config: ManagerConfig, devices: StaticDevices) -> AsyncIterator[Node]:
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery, ready_after=1.0)
        spawned: list[InstanceConfig] = []

        def spawn(cfg: InstanceConfig) -> FakeProcess:
            spawned.append(cfg)
            return host.spawn(cfg)

        manager = Manager(
            config,
            spawner=spawn,
            prober=host.probe,
            gpu_count=len(devices.gpus()),
            port_probe=lambda port: True,
            explicit_port_probe=lambda port: True,
            policy=RestartPolicy.from_config(config),
            run_blocking=run_inline,
            devices=devices,
        )
        await nursery.start(manager.run)
        yield Node(manager, host, spawned)
        nursery.cancel_scope.cancel()


GPU_SEED = SeedInstance(name="g", model_id="org/m", gpu_id=0, max_batch_tokens="auto")


async def test_preflight_fail_stops_start_up_naming_the_missing_gpu(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    seed = SeedInstance(name="far", model_id="org/m", gpu_id=1)
    config = _config(tmp_path, seed, gpu_preflight="fail")
    with pytest.raises(ExceptionGroup) as caught:
        async with node(config, StaticDevices([H100])):
            pytest.fail("the manager started")
    (error,) = caught.value.exceptions
    assert isinstance(error, ConfigError)
    assert str(error).startswith("gpu_preflight: instance 'far' asks for GPU 1, but this host")


async def test_preflight_warn_logs_and_starts(
    tmp_path: Path, clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    seed = SeedInstance(name="far", model_id="org/m", gpu_id=1)
    with caplog.at_level(logging.WARNING, "tei_manager.manager"):
        async with node(_config(tmp_path, seed), StaticDevices([H100])) as n:
            assert n.manager.startup_complete
    assert "gpu_preflight: instance 'far' asks for GPU 1" in caplog.text
    caplog.clear()
    async with node(_config(tmp_path, seed, gpu_preflight="off"), StaticDevices([H100])):
        pass
    assert "gpu_preflight" not in caplog.text


async def test_auto_batch_tokens_come_from_the_gpus_free_memory_at_each_launch(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    devices = StaticDevices([H100], processes=None)
    async with node(_config(tmp_path, GPU_SEED), devices) as n:
        assert n.spawned[-1].max_batch_tokens == 20480  # 10 GiB free x 2048
        assert n.manager.get_instance("g").max_batch_tokens == "auto"  # as configured
        devices.devices = [GpuDevice(index=0, name="H100", memory_total_bytes=80 * GIB,
                                     memory_free_bytes=2 * GIB)]  # fmt: skip
        await n.manager.restart_instance("g")
        await trio.sleep(5)
        assert n.spawned[-1].max_batch_tokens == 4096


async def test_a_gpu_instance_on_the_cpu_is_reported_and_with_fail_stopped(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    cpu = SeedInstance(name="cpu", model_id="org/m")  # asked for no GPU: never checked
    on_gpu = SeedInstance(name="on-gpu", model_id="org/m", gpu_id=0)
    devices = StaticDevices([H100])
    config = _config(tmp_path, GPU_SEED, cpu, on_gpu, gpu_fallback="fail")
    async with node(config, devices) as n:
        # "on-gpu"'s process holds GPU memory; "g"'s does not.
        devices.processes = [
            GpuProcess(pid=n.host.current("on-gpu").pid, gpu_index=0, used_bytes=GIB)
        ]
        await trio.sleep(25)
        g = n.manager.get_instance("g")
        assert g.status is InstanceStatus.FAILED
        assert g.last_error is not None and "holds no GPU memory" in g.last_error
        assert n.host.current("g").returncode is not None
        assert n.manager.get_instance("on-gpu").status is InstanceStatus.RUNNING
        assert n.manager.get_instance("cpu").status is InstanceStatus.RUNNING
        assert n.manager.metrics.gpu_fallbacks.labels(instance="g")._value.get() == 1
        # Started by hand, it is checked again (once per process).
        await n.manager.start_instance("g")
        await trio.sleep(25)
        assert n.manager.get_instance("g").status is InstanceStatus.FAILED
        assert len(n.host.processes["g"]) == 2


async def test_gpu_fallback_warn_keeps_the_instance_and_ignore_never_looks(
    tmp_path: Path, clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "tei_manager.manager"):
        async with node(_config(tmp_path, GPU_SEED), StaticDevices([H100])) as n:
            await trio.sleep(25)
            assert n.manager.get_instance("g").status is InstanceStatus.RUNNING
    assert "instance g: asked for GPU 0 but holds no GPU memory" in caplog.text
    caplog.clear()
    config = _config(tmp_path / "b", GPU_SEED, gpu_fallback="ignore")
    async with node(config, StaticDevices([H100])) as n:
        await trio.sleep(25)
    assert "holds no GPU memory" not in caplog.text
