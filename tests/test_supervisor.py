"""One instance's runner, driven by fakes on Trio's mock clock: restarts, health, stops.

Every test runs on the autojumping mock clock (``clock``: pytest-trio only uses a
clock the test function asks for itself), so every time asserted here is exact: the
fakes live in Trio time, and the runner computes its backoff from the moment a
process ended.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import pytest
import trio
import trio.testing

from tei_manager.config import InstanceConfig
from tei_manager.core.instances import DesiredState, InstanceRecord, InstanceStatus
from tei_manager.core.restart import RestartPolicy
from tei_manager.manager.metrics import ManagerMetrics
from tei_manager.supervisor.instance import InstanceRunner, RunnerSettings
from tests.fake_processes import NEVER, FakeHost, run_inline

S = InstanceStatus


@pytest.fixture
def clock(autojump_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    return autojump_clock


SETTINGS = RunnerSettings(
    startup_timeout_secs=60,
    health_check_interval_secs=10,
    probe_timeout_secs=2,
    readiness_interval_secs=0.25,
    stop_grace_secs=5,
)


def _record(*, status: InstanceStatus = S.STARTING, **fields: object) -> InstanceRecord:
    config = InstanceConfig(name="a", model_id="org/model", port=8080, **fields)  # type: ignore[arg-type]
    desired = DesiredState.RUNNING if status is S.STARTING else DesiredState.STOPPED
    return InstanceRecord(
        config=config, desired=desired, created_at=datetime.now(UTC), status=status
    )


def _runner(
    host: FakeHost,
    record: InstanceRecord,
    *,
    policy: RestartPolicy | None = None,
    settings: RunnerSettings = SETTINGS,
    metrics: ManagerMetrics | None = None,
    log_path: Path | None = None,
    on_change: Callable[[], None] = lambda: None,
) -> InstanceRunner:
    return InstanceRunner(
        record,
        spawn=host.spawn,
        probe=host.probe,
        settings=settings,
        policy=policy or RestartPolicy(crash_loop_restarts=0),
        metrics=metrics or ManagerMetrics(),
        on_change=on_change,
        log_path=log_path,
        run_blocking=run_inline,
    )


class Changes:
    """The runner's change notifications, to wait for a state without polling."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._event.wait()
            self._event = trio.Event()


def _stop(runner: InstanceRunner) -> None:
    """What the manager does for a stop request once the registry accepted it."""
    runner.record.desired = DesiredState.STOPPED
    runner.request_stop()


# -- start-up -------------------------------------------------------------------------------
async def test_running_once_info_answers(
    clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    host = FakeHost(nursery, ready_after=1.0)
    record = _record()
    metrics = ManagerMetrics()
    await nursery.start(_runner(host, record, metrics=metrics).run)
    # started() came after the spawn: the pid is known right away.
    assert (record.status, record.pid) == (S.STARTING, host.current("a").pid)
    await trio.sleep_until(0.99)
    assert record.status is S.STARTING
    await trio.sleep_until(1.01)  # probes at 0, 0.25, ... 1.0: the fifth answers
    assert record.status is S.RUNNING
    assert metrics.prometheus.get_sample_value("tei_manager_instance_startup_seconds_sum") == 1.0


async def test_readiness_is_polled_finely_by_default(
    clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    # Every start and every failover waits for the poll that notices readiness.
    host = FakeHost(nursery, ready_after=1.05)
    record = _record()
    settings = RunnerSettings(startup_timeout_secs=60, health_check_interval_secs=10)
    await nursery.start(_runner(host, record, settings=settings).run)
    await trio.sleep_until(1.04)
    assert record.status is S.STARTING
    await trio.sleep_until(1.11)  # the probe at about 1.1 answered
    assert record.status is S.RUNNING


async def test_a_startup_timeout_restarts_with_backoff(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    host = FakeHost(nursery, ready_after=NEVER)
    record = _record(startup_timeout_secs=3.0)  # the instance's own timeout wins
    await nursery.start(_runner(host, record).run)
    await trio.sleep_until(3.5)
    assert host.current("a").exited_at == 3.0
    assert host.current("a").signals == ["SIGTERM"]
    assert (record.status, record.pid, record.restarts) == (S.STARTING, None, 1)
    error = record.last_error or ""
    assert error.startswith(
        "not ready within 3 s (UNAVAILABLE: model loading); "
        "crash loop: restart 1 within 300 s, next try in 1 s (at "
    )
    await trio.sleep_until(20)
    # Timed out at 3, 7, 12: each try waits the doubled backoff first.
    assert host.spawn_times("a") == [0.0, 4.0, 9.0, 16.0]


async def test_a_configured_crash_loop_limit_fails_with_the_log_tail(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    log = tmp_path / "a.log"
    log.write_text("".join(f"line {i}\n" for i in range(30)))
    host = FakeHost(nursery, ready_after=NEVER)
    record = _record(startup_timeout_secs=3.0)
    changes = Changes()
    policy = RestartPolicy(crash_loop_restarts=1)
    runner = _runner(host, record, policy=policy, log_path=log, on_change=changes.notify)
    await nursery.start(runner.run)
    # The log is read in a thread, while the mock clock may jump: wait for the outcome.
    await changes.wait_for(lambda: record.status is S.FAILED)
    assert host.spawn_times("a") == [0.0, 4.0]  # timed out at 3, then at 7: given up
    assert host.current("a").exited_at == 7.0
    error = record.last_error or ""
    assert error.startswith(
        "not ready within 3 s (UNAVAILABLE: model loading): line 29; crash loop: "
        "1 restarts within 300 s (crash_loop_restarts = 1); last log lines:\n"
    )
    assert error.endswith("\n".join(f"line {i}" for i in range(10, 30)))
    assert "line 9\n" not in error


async def test_a_spawn_error_fails_the_instance(
    clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    host = FakeHost(nursery)
    host.spawn_error = "cannot start text-embeddings-router: Permission denied"
    record = _record()
    await nursery.start(_runner(host, record).run)
    assert record.status is S.FAILED
    assert record.last_error == "cannot start text-embeddings-router: Permission denied"


# -- crashes ----------------------------------------------------------------------------------
async def test_a_first_crash_restarts_at_once_then_backoff_grows_exactly(
    clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    host = FakeHost(nursery, ready_after=1.0)
    record = _record()
    metrics = ManagerMetrics()
    await nursery.start(_runner(host, record, metrics=metrics).run)

    await trio.sleep_until(5.0)
    first = host.current("a")
    first.exit(1)  # running since 1, no restart yet: spawned again at once
    await trio.sleep_until(5.5)
    assert host.current("a") is not first
    assert (record.status, record.pid, record.restarts) == (S.STARTING, host.current("a").pid, 1)
    assert record.last_error == "process exited with code 1; restarting at once"

    await trio.sleep_until(6.01)  # spawned at 5, running since 6
    assert (record.status, record.last_error, record.next_restart_at) == (S.RUNNING, None, None)
    await trio.sleep_until(8.0)
    host.current("a").exit(-11)  # the second crash within the window → 1 s backoff
    await trio.sleep_until(8.5)
    assert (record.status, record.pid, record.restarts) == (S.STARTING, None, 2)
    assert record.next_restart_at is not None
    await trio.sleep_until(9.5)  # spawned at 9, still loading
    assert record.status is S.STARTING
    host.current("a").exit(1)  # an exit during start-up is a crash too → 2 s backoff
    await trio.sleep_until(9.6)
    assert (record.last_error or "").startswith(
        "process exited with code 1 during start-up; "
        "crash loop: restart 3 within 300 s, next try in 2 s (at "
    )
    assert record.next_restart_at is not None

    await trio.sleep_until(100)
    assert host.spawn_times("a") == [0.0, 5.0, 9.0, 11.5]
    assert record.status is S.RUNNING
    assert record.restarts == 3
    assert metrics.statistics().restarts == {"crash": 3, "health": 0, "manual": 0}
    assert host.overlaps == 0


async def test_a_crash_loop_fails_the_instance_when_configured(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    log = tmp_path / "a.log"
    log.write_text("Traceback (most recent call last):\nRuntimeError: CUDA out of memory\n")
    host = FakeHost(nursery, ready_after=NEVER, crash_after=0.5)
    record = _record()
    policy = RestartPolicy(crash_loop_restarts=3, crash_loop_window_secs=300)
    changes = Changes()
    runner = _runner(host, record, policy=policy, log_path=log, on_change=changes.notify)
    await nursery.start(runner.run)
    await changes.wait_for(lambda: record.status is S.FAILED)
    await trio.sleep_until(1000)
    # Exits at 0.5, 2, 4.5, 9; restarts after 1, 2, 4 s; the fourth exit gives up.
    assert host.spawn_times("a") == [0.0, 1.5, 4.0, 8.5]
    assert record.status is S.FAILED
    assert record.pid is None
    error = record.last_error or ""
    assert error.startswith(
        "process exited with code 3 during start-up: RuntimeError: CUDA out of memory; "
        "crash loop: 3 restarts within 300 s (crash_loop_restarts = 3); last log lines:"
    )
    assert error.endswith("RuntimeError: CUDA out of memory")


# -- stopping -----------------------------------------------------------------------------------
async def test_a_stopped_instance_is_never_restarted(
    clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    host = FakeHost(nursery, sigterm_exit_secs=0.5)
    record = _record()
    runner = _runner(host, record)
    await nursery.start(runner.run)
    await trio.sleep_until(5.0)
    _stop(runner)
    assert record.status is S.STOPPING  # at once: the stop returns promptly
    await trio.sleep_until(5.51)
    assert (record.status, record.pid) == (S.STOPPED, None)
    assert host.current("a").signals == ["SIGTERM"]
    await trio.sleep_until(10_000)
    assert len(host.processes["a"]) == 1
    assert record.restarts == 0


async def test_stop_escalates_to_sigkill_after_the_grace_period(
    clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    host = FakeHost(nursery, sigterm_exit_secs=None)  # ignores SIGTERM
    record = _record()
    runner = _runner(host, record)
    await nursery.start(runner.run)
    await trio.sleep_until(5.0)
    _stop(runner)
    await trio.sleep_until(9.99)
    assert record.status is S.STOPPING
    await trio.sleep_until(10.01)
    assert record.status is S.STOPPED
    assert host.current("a").signals == ["SIGTERM", "SIGKILL"]
    assert host.current("a").exited_at == 10.0


async def test_a_stop_during_backoff_stops_at_once(
    clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    host = FakeHost(nursery)
    record = _record()
    runner = _runner(host, record)
    await nursery.start(runner.run)
    await trio.sleep_until(5.0)
    host.current("a").exit(1)  # restarted at once
    await trio.sleep_until(5.2)
    host.current("a").exit(1)  # the second crash waits out a 1 s backoff
    await trio.sleep_until(5.5)
    _stop(runner)
    assert record.status is S.STOPPED
    await trio.sleep_until(1000)
    assert len(host.processes["a"]) == 2


async def test_kill_now_skips_the_grace_period(
    clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    host = FakeHost(nursery, sigterm_exit_secs=None)
    record = _record()
    runner = _runner(host, record)
    await nursery.start(runner.run)
    await trio.sleep_until(5.0)
    _stop(runner)
    await trio.sleep_until(6.0)
    runner.kill_now()
    await trio.sleep_until(6.01)
    assert record.status is S.STOPPED
    assert host.current("a").exited_at == 6.0


async def test_cancelling_the_runner_ends_the_process(
    clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    host = FakeHost(nursery, sigterm_exit_secs=1.0)
    record = _record()
    runner = _runner(host, record)
    await nursery.start(runner.run)
    await trio.sleep_until(5.0)
    runner.cancel()  # the instance was deleted
    await runner.done.wait()
    assert trio.current_time() == 6.0
    assert host.alive("a") == []
    assert record.status is S.STOPPED


# -- health -------------------------------------------------------------------------------------
async def test_failed_health_checks_restart_the_process(
    clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    host = FakeHost(nursery, ready_after=1.0)
    record = _record()
    metrics = ManagerMetrics()
    await nursery.start(_runner(host, record, metrics=metrics).run)
    await trio.sleep_until(11.01)  # running at 1, checks at 11, 21, 31, ...
    assert record.last_health_check is not None
    assert record.health_check_failures == 0
    host.unhealthy.add("a")
    await trio.sleep_until(21.01)
    assert (record.status, record.health_check_failures) == (S.RUNNING, 1)
    await trio.sleep_until(31.01)
    assert record.health_check_failures == 2
    await trio.sleep_until(41.01)  # the third failure: ended at 41 and restarted at once
    host.unhealthy.discard("a")
    assert record.last_error == (
        "3 consecutive health checks failed (last: UNAVAILABLE: broken); restarting at once"
    )
    await trio.sleep_until(100)
    assert host.spawn_times("a") == [0.0, 41.0]
    assert host.processes["a"][0].signals == ["SIGTERM"]
    assert (record.status, record.restarts, record.health_check_failures) == (S.RUNNING, 1, 0)
    stats = metrics.statistics()
    assert stats.restarts["health"] == 1
    assert stats.health_check_failures == 3


async def test_a_hung_health_check_fails_after_the_probe_timeout(
    clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    host = FakeHost(nursery, ready_after=1.0)
    record = _record()
    await nursery.start(_runner(host, record).run)
    await trio.sleep_until(5.0)
    host.hanging.add("a")
    await trio.sleep_until(13.01)  # the check at 11 gives up at 13
    assert record.health_check_failures == 1
    await trio.sleep_until(38.0)  # fails at 13, 25, 37: restarted at once
    assert host.spawn_times("a") == [0.0, 37.0]
    # The new process hangs too: its first start-up probe gives up at 39.
    host.hanging.discard("a")
    await trio.sleep_until(39.24)
    assert record.status is S.STARTING
    await trio.sleep_until(39.26)  # the next probe, one readiness interval later
    assert record.status is S.RUNNING
    await trio.sleep_until(100)
    assert host.spawn_times("a") == [0.0, 37.0]


async def test_zero_max_failures_never_restarts(
    clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    host = FakeHost(nursery, ready_after=1.0)
    record = _record()
    policy = RestartPolicy(max_failures_before_restart=0)
    await nursery.start(_runner(host, record, policy=policy).run)
    await trio.sleep_until(5)
    host.unhealthy.add("a")
    await trio.sleep_until(1000)
    assert len(host.processes["a"]) == 1
    assert record.status is S.RUNNING
    assert record.health_check_failures == 99  # checks at 11, 21, ..., 991


# -- requests ---------------------------------------------------------------------------------
async def test_two_starts_spawn_one_process(
    clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    host = FakeHost(nursery)
    record = _record(status=S.STOPPED)
    runner = _runner(host, record)
    await nursery.start(runner.run)
    assert host.processes["a"] == []
    record.mark_start_requested()  # as the registry does
    runner.request_start()
    runner.request_start()
    await trio.sleep_until(10)
    assert len(host.processes["a"]) == 1
    assert record.status is S.RUNNING


async def test_a_start_while_stopping_waits_for_the_old_process(
    clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    host = FakeHost(nursery, sigterm_exit_secs=None)  # needs SIGKILL after 5 s
    record = _record()
    runner = _runner(host, record)
    await nursery.start(runner.run)
    await trio.sleep_until(5.0)
    _stop(runner)
    await trio.sleep_until(6.0)
    record.desired = DesiredState.RUNNING  # the registry accepts a start while stopping
    runner.request_start()
    runner.request_start()
    await trio.sleep_until(100)
    assert host.spawn_times("a") == [0.0, 10.0]  # only once the first was killed
    assert host.overlaps == 0
    assert record.status is S.RUNNING


async def test_a_manual_restart_starts_again_without_backoff(
    clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    host = FakeHost(nursery, sigterm_exit_secs=0.5)
    record = _record()
    metrics = ManagerMetrics()
    runner = _runner(host, record, metrics=metrics)
    await nursery.start(runner.run)
    await trio.sleep_until(5.0)
    assert runner.request_restart() is True
    assert record.status is S.STOPPING
    await trio.sleep_until(100)
    assert host.spawn_times("a") == [0.0, 5.5]
    assert (record.status, record.restarts) == (S.RUNNING, 1)
    assert metrics.statistics().restarts == {"crash": 0, "health": 0, "manual": 1}


async def test_a_restart_of_a_failed_instance_forgives_the_crash_loop(
    clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    host = FakeHost(nursery, ready_after=NEVER, crash_after=0.5)
    record = _record()
    policy = RestartPolicy(crash_loop_restarts=1)
    runner = _runner(host, record, policy=policy)
    await nursery.start(runner.run)
    await trio.sleep_until(100)
    assert record.status is S.FAILED
    assert len(host.processes["a"]) == 2
    host.crash_after = None
    host.ready_after = 1.0
    assert runner.request_restart() is False  # nothing was running
    await trio.sleep_until(200)
    assert record.status is S.RUNNING
    assert host.spawn_times("a")[-1] == 100.0


# -- self-healing -------------------------------------------------------------------------------
async def test_by_default_a_crash_loop_never_gives_up(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    host = FakeHost(nursery, ready_after=NEVER, crash_after=0.5)
    record = _record()
    policy = RestartPolicy()  # the manager's defaults: 1 s doubling to 300 s, no limit
    await nursery.start(_runner(host, record, policy=policy).run)
    await trio.sleep_until(3000)
    spawned = host.spawn_times("a")
    gaps = [round(b - a - 0.5, 3) for a, b in itertools.pairwise(spawned)]
    assert gaps[:10] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert set(gaps[9:]) == {300}  # capped, and still trying
    assert record.status is S.STARTING
    assert record.next_restart_at is not None
    assert "crash loop: restart " in (record.last_error or "")
    # Once the cause is gone, it comes back by itself at the next try.
    host.crash_after = None
    host.ready_after = 1.0
    await trio.sleep_until(3400)
    assert (record.status, record.next_restart_at, record.last_error) == (S.RUNNING, None, None)


async def test_a_kill_from_outside_is_a_crash(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    host = FakeHost(nursery, ready_after=1.0)
    record = _record()
    metrics = ManagerMetrics()
    await nursery.start(_runner(host, record, metrics=metrics).run)
    await trio.sleep_until(5.0)
    host.current("a").kill()  # SIGKILL by someone else (the OOM killer, an operator)
    await trio.sleep_until(5.01)
    assert record.last_error == "process killed by SIGKILL; restarting at once"
    await trio.sleep_until(10)
    assert host.spawn_times("a") == [0.0, 5.0]
    assert (record.status, record.restarts) == (S.RUNNING, 1)
    assert metrics.statistics().restarts["crash"] == 1


class GatedBlocking:
    """A ``run_blocking`` that holds each call until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = trio.Event()
        self.calls = 0

    async def __call__(self, fn: Callable[[], T]) -> T:
        self.calls += 1
        await self.gate.wait()
        return fn()


T = TypeVar("T")


@pytest.mark.parametrize("crash_loop_restarts", [0, 1])
async def test_an_exit_makes_the_instance_unroutable_at_once(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path, crash_loop_restarts: int
) -> None:
    log = tmp_path / "a.log"
    log.write_text("Traceback (most recent call last):\nOSError: no such model\n")
    host = FakeHost(nursery, ready_after=1.0)
    record = _record()
    seen: list[tuple[InstanceStatus, int | None]] = []
    blocking = GatedBlocking()
    runner = InstanceRunner(
        record,
        spawn=host.spawn,
        probe=host.probe,
        settings=SETTINGS,
        policy=RestartPolicy(crash_loop_restarts=crash_loop_restarts),
        metrics=ManagerMetrics(),
        on_change=lambda: seen.append((record.status, record.pid)),
        log_path=log,
        run_blocking=blocking,
    )
    await nursery.start(runner.run)
    await trio.sleep_until(1.01)
    assert record.status is S.RUNNING
    # A second crash, so that a limit of 1 gives up, and both read the log.
    host.current("a").exit(1)
    await trio.sleep_until(1.5)  # spawned again at once, still starting
    seen.clear()
    host.current("a").exit(1)  # died while starting: its log is read, slowly
    await trio.testing.wait_all_tasks_blocked()
    # The log read (and with it the decision) is still pending, yet the record
    # already says the process is gone, and said so in the first notification.
    assert blocking.calls == 1
    assert (record.status, record.pid) == (S.STARTING, None)
    assert seen[0] == (S.STARTING, None)
    blocking.gate.set()
    await trio.sleep_until(3)
    assert record.status is (S.FAILED if crash_loop_restarts else S.STARTING)
    assert all(status is not S.RUNNING or pid is not None for status, pid in seen)


async def test_a_startup_crash_quotes_the_log_s_error_line(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    log = tmp_path / "a.log"
    log.write_text(
        "--- tei-manager 2026-01-01T00:00:00Z: starting old run\n"
        "ValueError: from an older run\n"
        "--- tei-manager 2026-01-01T00:01:00Z: starting python -m tei_manager worker\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "OSError: /tmp/nonexistent does not appear to have a file named config.json\n"
        "\n"
    )
    host = FakeHost(nursery, ready_after=NEVER, crash_after=0.5)
    record = _record()
    changes = Changes()
    runner = _runner(host, record, log_path=log, on_change=changes.notify)
    await nursery.start(runner.run)
    await changes.wait_for(lambda: record.restarts == 1)
    assert (record.last_error or "").startswith(
        "process exited with code 3 during start-up: "
        "OSError: /tmp/nonexistent does not appear to have a file named config.json; "
        "crash loop: restart 1 within 300 s, next try in 1 s"
    )
