"""Spawning and ending real (tiny) processes: pidfd exits, process groups, PDEATHSIG."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio

from tei_manager.supervisor.launch import LaunchSpec
from tei_manager.supervisor.process import InstanceProcess, SpawnError, describe_exit, spawn
from tei_manager.supervisor.procfs import read_stat
from tests.waiting import wait_for


def _python(code: str, log: Path, **env: str) -> InstanceProcess:
    argv = (sys.executable, "-c", textwrap.dedent(code))
    return spawn(LaunchSpec(argv=argv, env={**os.environ, **env}, log_path=str(log)))


def _line(log: Path, prefix: str) -> str | None:
    return next((x for x in log.read_text().splitlines() if x.startswith(prefix)), None)


async def _wait_for_line(log: Path, prefix: str) -> str:
    return await wait_for(lambda: _line(log, prefix), within=10, what=f"{prefix!r} logged")


def _gone(pid: int) -> bool:
    """Dead: no such process, or a zombie nobody reaped yet (as init does, eventually)."""
    stat = read_stat(pid)
    return stat is None or stat.state == "Z"


async def _wait_gone(pid: int) -> None:
    await wait_for(lambda: _gone(pid), within=5, what=f"process {pid} gone")


async def test_an_exit_is_seen_at_once_and_output_goes_to_the_log(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "a.log"  # the directory is created on demand
    process = _python("import time; time.sleep(0.3); print('bye'); raise SystemExit(3)", log)
    started = time.monotonic()
    assert process.returncode is None
    assert await process.wait() == 3
    assert 0.3 <= time.monotonic() - started < 0.3 + 0.5
    assert process.returncode == 3
    lines = log.read_text().splitlines()
    assert lines[0].startswith("--- tei-manager ") and "starting" in lines[0]
    assert lines[1:] == ["bye"]


async def test_every_run_appends_to_the_same_log(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    for word in ("first", "second"):
        assert await _python(f"print('{word}')", log).wait() == 0
    lines = log.read_text().splitlines()
    assert [line for line in lines if not line.startswith("---")] == ["first", "second"]
    assert len(lines) == 4


async def test_the_child_leads_its_own_session_with_its_environment(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    code = (
        "import os; print('sid', os.getsid(0) == os.getpid(), os.environ['CUDA_VISIBLE_DEVICES'])"
    )
    process = _python(code, log, CUDA_VISIBLE_DEVICES="3")
    assert process.pgid == process.pid
    await process.wait()
    assert await _wait_for_line(log, "sid") == "sid True 3"


async def test_terminate_ends_a_process_with_sigterm(tmp_path: Path) -> None:
    process = _python("import time; time.sleep(60)", tmp_path / "a.log")
    assert await process.terminate(5.0) == -signal.SIGTERM
    assert describe_exit(-signal.SIGTERM) == "killed by SIGTERM"


async def test_terminate_escalates_to_sigkill_after_the_grace(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    process = _python(
        """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(60)
        """,
        log,
    )
    await _wait_for_line(log, "ready")
    started = time.monotonic()
    assert await process.terminate(0.3) == -signal.SIGKILL
    assert 0.3 <= time.monotonic() - started < 0.3 + 0.5
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"


GRANDCHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("grandchild", child.pid, flush=True)
{then}
"""


async def test_terminate_ends_the_whole_process_group(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    process = _python(GRANDCHILD.format(then="time.sleep(60)"), log)
    grandchild = int((await _wait_for_line(log, "grandchild")).split()[1])
    await process.terminate(5.0)
    await _wait_gone(grandchild)


async def test_what_a_crashed_process_left_behind_is_killed(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    process = _python(GRANDCHILD.format(then="raise SystemExit(1)"), log)
    assert await process.wait() == 1
    grandchild = int((await _wait_for_line(log, "grandchild")).split()[1])
    await _wait_gone(grandchild)


async def test_waiting_from_two_tasks_is_fine(tmp_path: Path) -> None:
    process = _python("import time; time.sleep(0.2)", tmp_path / "a.log")
    codes: list[int] = []
    async with trio.open_nursery() as nursery:
        for _ in range(2):

            async def waiter() -> None:
                codes.append(await process.wait())

            nursery.start_soon(waiter)
    assert codes == [0, 0]


def test_a_missing_program_is_a_spawn_error(tmp_path: Path) -> None:
    spec = LaunchSpec(argv=(str(tmp_path / "nope"),), env={}, log_path=str(tmp_path / "a.log"))
    with pytest.raises(SpawnError, match=r"^cannot start .*nope: No such file or directory$"):
        spawn(spec)


PARENT = """
import os, sys, time
from tei_manager.supervisor.launch import LaunchSpec
from tei_manager.supervisor.process import spawn

child = spawn(LaunchSpec(
    argv=(sys.executable, "-c", "import time; time.sleep(60)"),
    env=dict(os.environ),
    log_path=sys.argv[1],
))
print(child.pid, flush=True)
time.sleep(60)
"""


def test_children_die_with_a_sigkilled_parent(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "child.log")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    ) as parent:
        try:
            assert parent.stdout is not None
            child = int(parent.stdout.readline())
            assert not _gone(child)
        finally:
            parent.kill()
    deadline = time.monotonic() + 5
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _gone(child), "the child outlived its SIGKILLed parent"
