"""Leftovers of a dead manager: the runtime file, and killing only what is really ours."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import trio

from tei_manager.supervisor.launch import LaunchSpec
from tei_manager.supervisor.orphans import (
    RuntimeFile,
    RuntimeRecord,
    manager_alive,
    read_runtime,
    reap_orphans,
    remove_runtime,
    runtime_path,
    write_runtime,
)
from tei_manager.supervisor.process import InstanceProcess, spawn
from tei_manager.supervisor.procfs import read_cmdline, read_stat
from tests.waiting import wait_for

MODEL = "/models/org--tiny"
PORT = 18123

# An "instance": its command line names the model and the port, like a real one's,
# and it starts a grandchild in its process group.
INSTANCE = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print("grandchild", child.pid, flush=True)
    time.sleep(60)
    """
)


def _alive(pid: int) -> bool:
    stat = read_stat(pid)
    return stat is not None and stat.state != "Z"


async def _instance(tmp_path: Path) -> tuple[InstanceProcess, int]:
    log = tmp_path / "i.log"
    argv = (sys.executable, "-c", INSTANCE, "--model-id", MODEL, "--port", str(PORT))
    process = spawn(LaunchSpec(argv=argv, env=dict(os.environ), log_path=str(log)))
    lines = await wait_for(lambda: _lines_from(log, "grandchild "), within=10, what="started")
    return process, int(lines[0].split()[1])


def _lines_from(log: Path, prefix: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith(prefix)]


def _record(pid: int, **changes: object) -> RuntimeRecord:
    stat = read_stat(pid)
    assert stat is not None
    fields: dict[str, object] = {
        "name": "tiny",
        "pid": pid,
        "pgid": stat.pgid,
        "start_ticks": stat.start_ticks,
        "port": PORT,
        "model_id": MODEL,
    }
    return RuntimeRecord(**(fields | changes))  # type: ignore[arg-type]


def _runtime(*records: RuntimeRecord) -> RuntimeFile:
    # Written by a manager that is gone: pid 1 with a start time that cannot match.
    return RuntimeFile(manager_pid=1, manager_start_ticks=-1, instances=records)


def test_the_runtime_file_sits_next_to_the_state_file(tmp_path: Path) -> None:
    path = runtime_path(tmp_path / "state.toml")
    assert path == tmp_path / "state.runtime.json"
    assert read_runtime(path) is None
    runtime = RuntimeFile(
        manager_pid=42,
        manager_start_ticks=7,
        instances=(RuntimeRecord(name="a", pid=5, pgid=5, start_ticks=9, port=8080, model_id="m"),),
    )
    write_runtime(path, runtime)
    assert read_runtime(path) == runtime
    assert [p.name for p in tmp_path.iterdir()] == ["state.runtime.json"]  # no temp left
    path.write_text("{not json")
    assert read_runtime(path) is None
    remove_runtime(path)
    remove_runtime(path)
    assert not path.exists()


def test_a_live_manager_is_recognised_by_pid_and_start_time() -> None:
    parent = read_stat(os.getppid())
    assert parent is not None
    alive = RuntimeFile(manager_pid=parent.pid, manager_start_ticks=parent.start_ticks)
    assert manager_alive(alive)
    assert not manager_alive(RuntimeFile(manager_pid=parent.pid, manager_start_ticks=1))
    assert not manager_alive(RuntimeFile(manager_pid=os.getpid(), manager_start_ticks=None))


async def test_a_recorded_group_still_alive_is_killed(tmp_path: Path) -> None:
    process, grandchild = await _instance(tmp_path)
    assert read_cmdline(process.pid)[-4:] == ["--model-id", MODEL, "--port", str(PORT)]  # type: ignore[index]
    killed = await trio.to_thread.run_sync(reap_orphans, _runtime(_record(process.pid)))
    assert {k.pid for k in killed} == {process.pid, grandchild}
    assert await process.wait() == -9
    assert not _alive(grandchild)


async def test_a_reused_pid_is_left_alone(tmp_path: Path) -> None:
    process, grandchild = await _instance(tmp_path)
    try:
        # Same pid, but started at another time, or running something else.
        for changes in ({"start_ticks": 1}, {"model_id": "/models/other"}, {"port": PORT + 1}):
            runtime = _runtime(_record(process.pid, **changes))
            assert await trio.to_thread.run_sync(reap_orphans, runtime) == []
        assert _alive(process.pid) and _alive(grandchild)
    finally:
        await process.terminate(5)


def test_what_a_dead_leader_left_in_its_group_is_killed(tmp_path: Path) -> None:
    log = tmp_path / "leader.log"
    code = INSTANCE.replace("time.sleep(60)\n", "")  # the leader exits, its child stays
    with log.open("wb") as out:
        leader = subprocess.Popen(
            [sys.executable, "-c", code, "--model-id", MODEL, "--port", str(PORT)],
            stdout=out,
            start_new_session=True,
        )
    record = _record(leader.pid)
    assert leader.wait(10) == 0
    grandchild = int(_lines_from(log, "grandchild ")[0].split()[1])
    assert _alive(grandchild)
    killed = reap_orphans(_runtime(record))
    assert [k.pid for k in killed] == [grandchild]
    assert not _alive(grandchild)
