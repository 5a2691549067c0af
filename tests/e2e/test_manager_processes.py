"""The manager with real worker processes: lifecycle, crash recovery, no orphans, restore.

The instances run ``tei-manager worker`` on tiny random models (a few hundred KB) and,
once, on the packaged all-MiniLM-L6-v2. Most of each test's time is workers importing
torch (~5 s each on a small machine), so each test starts as few as it can.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import tomli_w
import trio

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.config import InstanceConfig, ManagerConfig, SeedInstance
from tei_manager.core.instances import DesiredState, InstanceInfo, InstanceStatus
from tei_manager.core.ports import probe_bindable
from tei_manager.grpc.channel import open_channel
from tei_manager.grpc.rpc import GrpcError
from tei_manager.manager.service import Manager
from tei_manager.manager.state import load_state
from tei_manager.supervisor.orphans import read_runtime, runtime_path
from tei_manager.supervisor.procfs import read_stat
from tests.conftest import TinyModels
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

S = InstanceStatus
READY_TIMEOUT = 120.0  # a cold torch import on a loaded CI machine can be slow
ROOT = Path(__file__).parent.parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_port_range(size: int) -> int:
    """The first port of ``size`` consecutive ports that are free now, high in the range."""
    rng = random.Random()
    for _ in range(100):
        start = rng.randrange(30000, 60000 - size)
        if all(probe_bindable(p) for p in range(start, start + size)):
            return start
    raise RuntimeError("no free port range")


def manager_config(tmp_path: Path, *, api_port: int, grpc_port: int) -> ManagerConfig:
    """A manager under ``tmp_path`` with ten free instance ports and quick health checks."""
    start = _free_port_range(10)
    return ManagerConfig(
        api_host="127.0.0.1",
        api_port=api_port,
        grpc_port=grpc_port,
        state_file=str(tmp_path / "state" / "state.toml"),
        log_dir=str(tmp_path / "logs"),
        instance_port_start=start,
        instance_port_end=start + 9,
        health_check_interval_secs=1.0,
        startup_timeout_secs=READY_TIMEOUT,
        graceful_shutdown_timeout_secs=10.0,
    )


@pytest.fixture
def config(tmp_path: Path) -> ManagerConfig:
    return manager_config(tmp_path, api_port=_free_port(), grpc_port=_free_port())


@asynccontextmanager
async def running(manager: Manager) -> AsyncIterator[Manager]:
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        yield manager
        nursery.cancel_scope.cancel()


async def _until(
    manager: Manager, name: str, check: Callable[[InstanceInfo], bool], what: str
) -> InstanceInfo:
    def probe() -> InstanceInfo | None:
        info = manager.get_instance(name)
        return info if check(info) else None

    try:
        return await wait_for(probe, within=READY_TIMEOUT, what=f"{name} {what}")
    except AssertionError as e:
        log = manager.log_path(name).read_text(errors="replace")[-3000:]
        raise AssertionError(f"{e}: {manager.get_instance(name)}\n{log}") from None


async def _running(manager: Manager, name: str, *, not_pid: int | None = None) -> InstanceInfo:
    return await _until(
        manager, name, lambda i: i.status is S.RUNNING and i.pid != not_pid, "running"
    )


def _gone(pid: int) -> bool:
    stat = read_stat(pid)
    return stat is None or stat.state == "Z"


async def _wait_gone(pid: int, *, within: float = 15.0) -> None:
    await wait_for(lambda: _gone(pid), within=within, what=f"process {pid} gone")


async def _embed(port: int, text: str) -> list[float]:
    async with open_channel("127.0.0.1", port) as channel:
        with trio.fail_after(30):
            reply = await channel.unary_unary(
                tei_grpc.Embed.Embed, tei_pb2.EmbedRequest(inputs=text)
            )
    return list(reply.embeddings)


async def _info(port: int) -> tei_pb2.InfoResponse:
    async with open_channel("127.0.0.1", port) as channel:
        with trio.fail_after(10):
            return await channel.unary_unary(tei_grpc.Info.Info, tei_pb2.InfoRequest())


# -- one manager, in this process ----------------------------------------------------------------
async def test_lifecycle_and_crash_recovery_of_a_real_worker(
    config: ManagerConfig, tiny_models: TinyModels
) -> None:
    model = str(tiny_models.sentence_transformer)
    async with running(Manager(config)) as manager:
        created = await manager.create_instance(
            InstanceConfig(name="tiny", model_id=model, max_batch_tokens=4096)
        )
        assert created.status is S.STARTING and created.pid is not None
        info = await _running(manager, "tiny")
        assert info.port == config.instance_port_start
        assert len(await _embed(info.port, "the quick brown fox")) == 32
        assert (await _info(info.port)).max_batch_tokens == 4096  # our flags reached it
        await _until(manager, "tiny", lambda i: i.last_health_check is not None, "checked")

        # kill -9: the exit is seen at once, and the instance comes back.
        os.kill(info.pid or 0, signal.SIGKILL)
        info = await _running(manager, "tiny", not_pid=info.pid)
        assert info.restarts == 1
        assert manager.metrics.statistics().restarts["crash"] == 1
        assert len(await _embed(info.port, "after the crash")) == 32

        stopping = await manager.stop_instance("tiny")
        assert stopping.status in (S.STOPPING, S.STOPPED)
        await _until(manager, "tiny", lambda i: i.status is S.STOPPED, "stopped")
        await _wait_gone(info.pid or 0)

        await manager.start_instance("tiny")
        info = await _running(manager, "tiny")
        assert len(await _embed(info.port, "started again")) == 32

        await manager.restart_instance("tiny")
        restarted = await _running(manager, "tiny", not_pid=info.pid)
        await _wait_gone(info.pid or 0)
        assert len(await _embed(restarted.port, "restarted")) == 32

        logs = await manager.instance_logs("tiny", None, None)
        messages = [json.loads(line)["message"] for line in logs.lines if line.startswith("{")]
        assert messages.count("Ready") == 4  # created, after the crash, started, restarted

        await manager.delete_instance("tiny")
        assert _gone(restarted.pid or 0)  # delete returns once the process is gone
        assert manager.list_instances() == []
    assert load_state(config.state_file).state.instances == ()


async def test_packaged_minilm_serves_embeddings(config: ManagerConfig, minilm_dir: Path) -> None:
    async with running(Manager(config)) as manager:
        await manager.create_instance(InstanceConfig(name="minilm", model_id=str(minilm_dir)))
        info = await _running(manager, "minilm")
        vector = await _embed(info.port, "What is the capital of France?")
        assert len(vector) == 384
        assert math.isclose(math.sqrt(sum(v * v for v in vector)), 1.0, rel_tol=1e-3)
        pid = info.pid or 0
    await _wait_gone(pid)  # shutting the manager down stopped the instance


# -- the manager as its own process: tei-manager serve ---------------------------------------------
def _write_config(path: Path, config: ManagerConfig, seeds: tuple[SeedInstance, ...]) -> Path:
    data = {
        "api_host": config.api_host,
        "api_port": config.api_port,
        "grpc_port": config.grpc_port,
        "state_file": config.state_file,
        "log_dir": config.log_dir,
        "instance_port_start": config.instance_port_start,
        "instance_port_end": config.instance_port_end,
        "health_check_interval_secs": config.health_check_interval_secs,
        "graceful_shutdown_timeout_secs": config.graceful_shutdown_timeout_secs,
        "instances": [{"name": s.name, "model_id": s.model_id, "port": s.port} for s in seeds],
    }
    path.write_text(tomli_w.dumps(data))
    return path


def _serve(config_file: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tei_manager", "serve", "--config", str(config_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


def _recorded_pid(config: ManagerConfig) -> int | None:
    """The instance pid the manager recorded in its runtime file, once it did."""
    runtime = read_runtime(runtime_path(config.state_file))
    return runtime.instances[0].pid if runtime is not None and runtime.instances else None


async def _worker_pid(config: ManagerConfig) -> int:
    return await wait_for(
        lambda: _recorded_pid(config), within=READY_TIMEOUT, what="instance process recorded"
    )


async def _answers(port: int) -> None:
    with trio.move_on_after(READY_TIMEOUT):
        while True:
            try:
                await _info(port)
                return
            except GrpcError:
                await trio.sleep(0.1)
    raise AssertionError(f"the instance on port {port} never answered")


async def test_a_killed_manager_leaves_no_orphans_and_the_next_one_restores(
    config: ManagerConfig, tiny_models: TinyModels, tmp_path: Path
) -> None:
    pytest.importorskip("tei_manager.api.server")
    port = config.instance_port_start + 3
    seed = SeedInstance(name="tiny", model_id=str(tiny_models.sentence_transformer), port=port)
    manager_log = tmp_path / "manager.log"

    # 1. A manager process with a seed instance, SIGKILLed: its worker must die with it.
    first = _serve(_write_config(tmp_path / "seeded.toml", config, (seed,)), manager_log)
    try:
        pid = await _worker_pid(config)
        await _answers(port)
    finally:
        first.kill()
        first.wait()
    await _wait_gone(pid, within=5.0)

    # 2. The next manager (no seeds now) restores the instance from the state file...
    state = load_state(config.state_file).state
    assert [(i.config.name, i.desired_state) for i in state.instances] == [
        ("tiny", DesiredState.RUNNING)
    ]
    second = _serve(_write_config(tmp_path / "plain.toml", config, ()), manager_log)
    try:
        await _answers(port)
        new_pid = await _worker_pid(config)
        assert new_pid != pid
        # ... and on SIGTERM shuts down gracefully: exit 0, the instance stopped.
        started = time.monotonic()
        second.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(second.wait, 30) == 0
        assert time.monotonic() - started < config.graceful_shutdown_timeout_secs + 5
    finally:
        second.kill()
        second.wait()
    assert _gone(new_pid)
    assert not runtime_path(config.state_file).exists()
    state = load_state(config.state_file).state
    assert [(i.config.name, i.desired_state) for i in state.instances] == [
        ("tiny", DesiredState.RUNNING)  # a shutdown is not a stop: it comes back next time
    ]
    assert "Traceback" not in manager_log.read_text()
