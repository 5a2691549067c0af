"""The runner with real (tiny) processes, where the process is the subject: an exit seen
through the pidfd unroutes the instance at once, a kill from outside is a crash, and a
start-up crash's exception reaches ``last_error``."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import trio

from tei_manager.config import InstanceConfig
from tei_manager.core.instances import DesiredState, InstanceRecord, InstanceStatus
from tei_manager.core.restart import RestartPolicy
from tei_manager.manager.metrics import ManagerMetrics
from tei_manager.supervisor.instance import InstanceRunner, ProcessHandle, RunnerSettings
from tei_manager.supervisor.launch import LaunchSpec
from tei_manager.supervisor.probe import ProbeError
from tei_manager.supervisor.process import spawn
from tests.waiting import wait_for

S = InstanceStatus
SETTINGS = RunnerSettings(
    startup_timeout_secs=30,
    health_check_interval_secs=600,  # no health check could notice an exit in time
    readiness_interval_secs=0.05,
    stop_grace_secs=2,
)


class Python:
    """Spawns ``python -c code`` for the instance, output to its log."""

    def __init__(self, code: str, log: Path) -> None:
        self.code = textwrap.dedent(code)
        self.log = log
        self.pids: list[int] = []

    def spawn(self, config: InstanceConfig) -> ProcessHandle:
        argv = (sys.executable, "-c", self.code)
        process = spawn(LaunchSpec(argv=argv, env=dict(os.environ), log_path=str(self.log)))
        self.pids.append(process.pid)
        return process


def _runner(
    python: Python, *, ready: bool, on_change: list[tuple[S, int | None, str | None]]
) -> InstanceRunner:
    record = InstanceRecord(
        config=InstanceConfig(name="a", model_id="org/model", port=8080),
        desired=DesiredState.RUNNING,
        created_at=datetime.now(UTC),
        status=S.STARTING,
    )

    async def probe(config: InstanceConfig) -> None:
        await trio.lowlevel.checkpoint()
        if not ready:
            raise ProbeError("connection refused")

    return InstanceRunner(
        record,
        spawn=python.spawn,
        probe=probe,
        settings=SETTINGS,
        policy=RestartPolicy(initial_backoff_secs=60),  # one try is all a test needs
        metrics=ManagerMetrics(),
        on_change=lambda: on_change.append((record.status, record.pid, record.last_error)),
        log_path=python.log,
    )


async def test_a_sigkill_from_outside_unroutes_at_once_and_restarts(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    python = Python("import time; time.sleep(60)", tmp_path / "a.log")
    changes: list[tuple[S, int | None, str | None]] = []
    runner = _runner(python, ready=True, on_change=changes)
    record = runner.record
    await nursery.start(runner.run)
    await wait_for(lambda: record.status is S.RUNNING, within=10, what="running")
    first = python.pids[0]
    changes.clear()
    os.kill(first, signal.SIGKILL)  # the OOM killer, an operator's kill -9
    # The pidfd turns readable at once: the first notification already says the
    # process is gone, long before any health check would have run.
    await wait_for(lambda: changes, within=2, what="a change after the kill")
    assert changes[0] == (S.STARTING, None, "process killed by SIGKILL")
    await wait_for(lambda: len(python.pids) == 2, within=10, what="a second process")
    assert (S.STARTING, None, "process killed by SIGKILL; restarting at once") in changes
    assert record.restarts == 1
    await wait_for(lambda: record.status is S.RUNNING, within=10, what="running again")
    assert record.pid == python.pids[1] != first
    runner.cancel()
    await runner.done.wait()


async def test_a_start_up_crash_quotes_the_exception(nursery: trio.Nursery, tmp_path: Path) -> None:
    python = Python(
        """
        def load(path):
            raise OSError(f"{path} does not appear to have a file named config.json")
        print("loading the model", flush=True)
        load("/tmp/nonexistent")
        """,
        tmp_path / "a.log",
    )
    changes: list[tuple[S, int | None, str | None]] = []
    runner = _runner(python, ready=False, on_change=changes)
    record = runner.record
    await nursery.start(runner.run)
    await wait_for(lambda: record.restarts == 1, within=20, what="a restart decided")
    error = record.last_error or ""
    assert error.startswith(
        "process exited with code 1 during start-up: "
        "OSError: /tmp/nonexistent does not appear to have a file named config.json; "
        "crash loop: restart 1 within 300 s, next try in 60 s (at "
    ), error
    assert (record.status, record.pid) == (S.STARTING, None)
    assert record.next_restart_at is not None
    runner.cancel()
    await runner.done.wait()
