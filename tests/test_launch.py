"""Launch commands: which program, which flags, which environment; GPU counting."""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from tei_manager.config import InstanceConfig, OtelConfig
from tei_manager.errors import ConfigError, ErrorCode
from tei_manager.supervisor.gpus import count_gpus, parse_nvidia_smi_list
from tei_manager.supervisor.launch import (
    Program,
    build_command,
    build_env,
    launch_spec,
    resolve_program,
    worker_program,
)
from tei_manager.worker.options import parse_options

WORKER = worker_program()
TEI = Program(argv=("/opt/tei/text-embeddings-router",), is_tei=True)


def _config(**fields: object) -> InstanceConfig:
    base: dict[str, object] = {"name": "bge", "model_id": "BAAI/bge-small-en-v1.5", "port": 8081}
    return InstanceConfig(**(base | fields))  # type: ignore[arg-type]


def _executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# -- which program ---------------------------------------------------------------------------
def test_without_tei_the_built_in_worker_runs_with_this_interpreter() -> None:
    program = resolve_program(None, which=lambda name: None)
    assert program == WORKER
    assert program.argv == (sys.executable, "-m", "tei_manager", "worker")
    assert not program.is_tei


def test_tei_on_path_is_preferred() -> None:
    found = {"text-embeddings-router": "/usr/local/bin/text-embeddings-router"}
    program = resolve_program(None, which=found.get)
    assert program == Program(argv=("/usr/local/bin/text-embeddings-router",), is_tei=True)


def test_a_configured_binary_is_used_as_given(tmp_path: Path) -> None:
    binary = _executable(tmp_path / "my-tei")
    assert resolve_program(str(binary)) == Program(argv=(str(binary),), is_tei=True)


def test_a_configured_binary_that_cannot_run_is_a_config_error(tmp_path: Path) -> None:
    not_executable = tmp_path / "tei"
    not_executable.write_text("")
    for configured in (str(tmp_path / "missing"), str(not_executable), "no-such-tei-anywhere"):
        with pytest.raises(ConfigError) as error:
            resolve_program(configured)
        assert error.value.code is ErrorCode.INVALID_CONFIG
        assert str(error.value).startswith("tei_binary_path: ")


# -- flags -------------------------------------------------------------------------------------
def test_the_minimal_command_has_every_managed_flag() -> None:
    assert build_command(_config(), WORKER) == [
        *WORKER.argv,
        "--model-id",
        "BAAI/bge-small-en-v1.5",
        "--hostname",
        "127.0.0.1",
        "--port",
        "8081",
        "--max-batch-tokens",
        "16384",
        "--max-concurrent-requests",
        "512",
        "--json-output",
    ]


def test_optional_flags_then_extra_args_last() -> None:
    config = _config(
        pooling="splade",
        prometheus_port=9100,
        revision="refs/pr/2",
        max_batch_tokens=2048,
        max_concurrent_requests=8,
        extra_args=("--auto-truncate", "--max-client-batch-size=64"),
    )
    argv = build_command(config, WORKER)
    tail = argv[len(WORKER.argv) :]
    assert tail[tail.index("--max-batch-tokens") + 1] == "2048"
    assert tail[tail.index("--max-concurrent-requests") + 1] == "8"
    assert tail[-8:] == [
        "--pooling",
        "splade",
        "--prometheus-port",
        "9100",
        "--revision",
        "refs/pr/2",
        "--auto-truncate",
        "--max-client-batch-size=64",
    ]


def test_engine_goes_to_the_worker_only() -> None:
    config = _config(engine="onnx")
    argv = build_command(config, WORKER)
    assert argv[argv.index("--engine") + 1] == "onnx"
    assert parse_options(argv[len(WORKER.argv) :]).engine == "onnx"
    assert "--engine" not in build_command(config, TEI)
    assert "--engine" not in build_command(_config(), WORKER)


def test_tei_gets_its_own_unix_socket_per_instance() -> None:
    first = build_command(_config(port=8081), TEI)
    second = build_command(_config(port=8082), TEI)
    assert first[0] == TEI.argv[0]
    uds = [argv[argv.index("--uds-path") + 1] for argv in (first, second)]
    assert uds[0] != uds[1]
    assert "--uds-path" not in build_command(_config(), WORKER)


def test_an_unresolved_port_is_refused() -> None:
    for port in (None, 0):
        with pytest.raises(ValueError, match="no port"):
            build_command(_config(port=port), WORKER)


def test_the_worker_accepts_the_command_it_is_given() -> None:
    config = _config(pooling="mean", prometheus_port=9100, extra_args=("--auto-truncate",))
    options = parse_options(build_command(config, WORKER)[len(WORKER.argv) :])
    assert (options.model_id, options.port, options.hostname) == (
        config.model_id,
        8081,
        "127.0.0.1",
    )
    assert (options.pooling, options.prometheus_port) == ("mean", 9100)
    assert options.json_output and options.auto_truncate


# -- environment ----------------------------------------------------------------------------------
def test_gpu_id_becomes_cuda_visible_devices() -> None:
    base = {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    env = build_env(_config(gpu_id=2), base)
    assert env["CUDA_VISIBLE_DEVICES"] == "2"
    assert env["PATH"] == "/usr/bin"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert base["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # not mutated


def test_without_gpu_id_the_environment_is_inherited() -> None:
    env = build_env(_config(), {"CUDA_VISIBLE_DEVICES": "1"})
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in build_env(_config(), {})


def test_launch_spec_puts_the_log_in_the_log_dir(tmp_path: Path) -> None:
    spec = launch_spec(_config(gpu_id=0), WORKER, log_dir=tmp_path, base_env={})
    assert spec.log_path == str(tmp_path / "bge.log")
    assert spec.env == {"CUDA_VISIBLE_DEVICES": "0", "PYTHONUNBUFFERED": "1"}
    assert spec.argv == tuple(build_command(_config(gpu_id=0), WORKER))


# -- GPUs -------------------------------------------------------------------------------------
NVIDIA_SMI_L = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5c2a)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-91fe)
  MIG 3g.40gb     Device  0: (UUID: MIG-2b8c)
"""


def test_nvidia_smi_lines_are_counted_without_mig_devices() -> None:
    assert parse_nvidia_smi_list(NVIDIA_SMI_L) == 2
    assert parse_nvidia_smi_list("") == 0


def test_gpus_come_from_nvidia_smi_first(tmp_path: Path) -> None:
    def run(argv: Sequence[str]) -> str:
        assert list(argv) == ["nvidia-smi", "-L"]
        return NVIDIA_SMI_L

    (tmp_path / "0000:00:01.0").mkdir()
    assert count_gpus(run=run, proc_dir=str(tmp_path)) == 2


def test_without_nvidia_smi_the_driver_entries_count(tmp_path: Path) -> None:
    def missing(argv: Sequence[str]) -> str:
        raise FileNotFoundError(argv[0])

    def failing(argv: Sequence[str]) -> str:
        raise subprocess.CalledProcessError(9, list(argv))

    for name in ("0000:17:00.0", "0000:65:00.0", "0000:ca:00.0"):
        (tmp_path / name).mkdir()
    assert count_gpus(run=missing, proc_dir=str(tmp_path)) == 3
    assert count_gpus(run=failing, proc_dir=str(tmp_path)) == 3
    assert count_gpus(run=missing, proc_dir=str(tmp_path / "absent")) == 0


def test_this_host_is_counted_without_error() -> None:
    # Whatever the host has; on a GPU-less machine this is 0 and every gpu_id is refused.
    assert count_gpus() >= 0


def test_tei_exports_its_spans_where_the_manager_does_when_tracing_is_on() -> None:
    otel = OtelConfig(endpoint=" http://collector:4317 ", service_name="tm")
    argv = build_command(_config(name="bge"), TEI, otel=otel)
    assert argv[argv.index("--otlp-endpoint") + 1] == "http://collector:4317"
    assert argv[argv.index("--otlp-service-name") + 1] == "tm-bge"
    assert "--otlp-endpoint" not in build_command(_config(), TEI, otel=OtelConfig())
    assert "--otlp-endpoint" not in build_command(_config(), WORKER, otel=otel)  # no such flag
    own = _config(extra_args=["--otlp-endpoint", "http://other:4317"])
    assert build_command(own, TEI, otel=otel).count("--otlp-endpoint") == 1
