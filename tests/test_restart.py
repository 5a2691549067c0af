from __future__ import annotations

import pytest
import trio

from tei_manager.config import ManagerConfig
from tei_manager.core.instances import DesiredState
from tei_manager.core.restart import (
    HealthVerdict,
    RestartAction,
    RestartDecision,
    RestartPolicy,
    RestartTracker,
)

RUN = DesiredState.RUNNING


def test_backoff_doubles_to_the_cap() -> None:
    policy = RestartPolicy()
    assert [policy.backoff(n) for n in range(11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert RestartPolicy(max_backoff_secs=30).backoff(5) == 30
    assert RestartPolicy(initial_backoff_secs=0.5, backoff_multiplier=3).backoff(2) == 4.5


def test_backoff_never_overflows() -> None:
    assert RestartPolicy().backoff(10_000) == 300.0


def test_restart_delays_grow_while_the_instance_keeps_crashing() -> None:
    tracker = RestartTracker(RestartPolicy(crash_loop_restarts=0, max_backoff_secs=30))
    delays = []
    now = 0.0
    for _ in range(7):
        decision = tracker.on_exit(now, desired=RUN)
        assert decision.action is RestartAction.RESTART
        delays.append(decision.delay_secs)
        now += decision.delay_secs + 1  # started, ran one second, crashed
        tracker.on_running(now - 1)
    assert delays == [1, 2, 4, 8, 16, 30, 30]


def test_a_stable_run_resets_the_backoff() -> None:
    tracker = RestartTracker(RestartPolicy(stable_after_secs=60))
    assert tracker.on_exit(0, desired=RUN).delay_secs == 1
    tracker.on_running(1)
    assert tracker.on_exit(10, desired=RUN).delay_secs == 2  # ran 9 s: not stable
    tracker.on_running(12)
    assert tracker.on_exit(72, desired=RUN).delay_secs == 1  # ran 60 s: stable


def test_the_first_crash_after_a_run_restarts_at_once() -> None:
    tracker = RestartTracker(RestartPolicy(crash_loop_restarts=5, crash_loop_window_secs=300))
    tracker.on_running(0)
    first = tracker.on_exit(5, desired=RUN)
    assert first == RestartDecision(
        action=RestartAction.RESTART, delay_secs=0, reason="restarting at once"
    )
    delays = []
    now, decision = 5.0, first
    while decision.action is RestartAction.RESTART:
        delays.append(decision.delay_secs)
        tracker.on_running(now + decision.delay_secs + 1)  # ready a second after the spawn
        now += decision.delay_secs + 2  # ran one second, crashed
        decision = tracker.on_exit(now, desired=RUN)
    # From the second crash in the window the backoff runs as before, and the
    # immediate restart still counts towards the crash loop.
    assert delays == [0, 1, 2, 4, 8]
    assert decision.action is RestartAction.GIVE_UP
    assert now == 30


def test_an_exit_before_ready_always_waits_the_backoff() -> None:
    tracker = RestartTracker(RestartPolicy())
    decision = tracker.on_exit(0, desired=RUN)  # never answered: a broken start, not a crash
    assert (decision.delay_secs, decision.reason) == (1, "crash loop: restart 1 within 300 s")


def test_a_second_crash_within_the_window_waits_even_after_a_stable_run() -> None:
    tracker = RestartTracker(RestartPolicy(stable_after_secs=60, crash_loop_window_secs=300))
    tracker.on_running(0)
    assert tracker.on_exit(100, desired=RUN).delay_secs == 0
    tracker.on_running(101)
    assert tracker.on_exit(110, desired=RUN).delay_secs == 1  # ran 9 s
    tracker.on_running(111)
    # Ran 89 s: stable, so the backoff starts over, but a restart at 110 is in the window.
    assert tracker.on_exit(200, desired=RUN).delay_secs == 1
    tracker.on_running(201)
    # The last restart (at 200) left the window at 500: a first crash again.
    assert tracker.on_exit(500, desired=RUN).delay_secs == 0


def test_exit_before_ready_is_not_a_stable_run() -> None:
    tracker = RestartTracker(RestartPolicy())
    tracker.on_exit(0, desired=RUN)
    # Failed to start (never on_running), long after the last exit: backoff still grows.
    assert tracker.on_exit(200, desired=RUN).delay_secs == 2


def test_crash_loop_gives_up() -> None:
    tracker = RestartTracker(RestartPolicy(crash_loop_restarts=5, crash_loop_window_secs=300))
    for t in range(5):
        assert tracker.on_exit(t * 10, desired=RUN).action is RestartAction.RESTART
    assert tracker.recent_restarts(40) == 5
    decision = tracker.on_exit(50, desired=RUN)
    assert decision == RestartDecision(
        action=RestartAction.GIVE_UP,
        reason="crash loop: 5 restarts within 300 s (crash_loop_restarts = 5)",
    )


def test_restarts_spread_beyond_the_window_are_not_a_loop() -> None:
    tracker = RestartTracker(RestartPolicy(crash_loop_restarts=5, crash_loop_window_secs=300))
    for n in range(20):
        decision = tracker.on_exit(n * 61.0, desired=RUN)
        assert decision.action is RestartAction.RESTART, n
    assert tracker.recent_restarts(19 * 61.0) == 5


def test_restart_exactly_window_ago_has_left_the_window() -> None:
    tracker = RestartTracker(RestartPolicy(crash_loop_restarts=2, crash_loop_window_secs=100))
    tracker.on_exit(0, desired=RUN)
    tracker.on_exit(50, desired=RUN)
    assert tracker.on_exit(99.999, desired=RUN).action is RestartAction.GIVE_UP
    tracker = RestartTracker(RestartPolicy(crash_loop_restarts=2, crash_loop_window_secs=100))
    tracker.on_exit(0, desired=RUN)
    tracker.on_exit(50, desired=RUN)
    assert tracker.on_exit(100, desired=RUN).action is RestartAction.RESTART


def test_a_stopped_instance_is_never_restarted() -> None:
    tracker = RestartTracker(RestartPolicy())
    decision = tracker.on_exit(0, desired=DesiredState.STOPPED)
    assert decision.action is RestartAction.STAY_STOPPED
    # ...and it does not count towards a crash loop.
    assert tracker.recent_restarts(0) == 0


def test_reset_forgets_history() -> None:
    tracker = RestartTracker(RestartPolicy(crash_loop_restarts=1))
    tracker.on_exit(0, desired=RUN)
    assert tracker.on_exit(1, desired=RUN).action is RestartAction.GIVE_UP
    tracker.reset()
    decision = tracker.on_exit(2, desired=RUN)
    assert (decision.action, decision.delay_secs) == (RestartAction.RESTART, 1)


def test_health_failures_trigger_a_restart_at_the_threshold() -> None:
    tracker = RestartTracker(RestartPolicy(max_failures_before_restart=3))
    verdicts = [tracker.on_health_check(ok) for ok in (False, False, True, False, False, False)]
    assert verdicts == [
        HealthVerdict.FAILING,
        HealthVerdict.FAILING,
        HealthVerdict.HEALTHY,
        HealthVerdict.FAILING,
        HealthVerdict.FAILING,
        HealthVerdict.RESTART,
    ]
    assert tracker.health_failures == 0  # counting starts over after the restart


def test_zero_threshold_disables_health_restarts() -> None:
    tracker = RestartTracker(RestartPolicy(max_failures_before_restart=0))
    assert {tracker.on_health_check(False) for _ in range(100)} == {HealthVerdict.FAILING}
    assert tracker.health_failures == 100


def test_running_and_exit_reset_health_failures() -> None:
    tracker = RestartTracker(RestartPolicy())
    tracker.on_health_check(False)
    tracker.on_running(0)
    assert tracker.health_failures == 0
    tracker.on_health_check(False)
    tracker.on_exit(1, desired=RUN)
    assert tracker.health_failures == 0


@pytest.mark.parametrize("threshold", [0, 3, 7])
def test_policy_from_config(threshold: int) -> None:
    config = ManagerConfig(state_file="/s", log_dir="/l", max_failures_before_restart=threshold)
    assert RestartPolicy.from_config(config).max_failures_before_restart == threshold


def test_the_config_s_restart_fields_make_the_policy() -> None:
    config = ManagerConfig(
        state_file="/s",
        log_dir="/l",
        restart_backoff_initial_secs=0.5,
        restart_backoff_max_secs=8,
        crash_loop_restarts=4,
        crash_loop_window_secs=60,
    )
    policy = RestartPolicy.from_config(config)
    assert [policy.backoff(n) for n in range(6)] == [0.5, 1, 2, 4, 8, 8]
    assert (policy.crash_loop_restarts, policy.crash_loop_window_secs) == (4, 60)
    # The defaults agree with the config's.
    assert (
        RestartPolicy.from_config(ManagerConfig(state_file="/s", log_dir="/l")) == RestartPolicy()
    )


def test_zero_crash_loop_restarts_keeps_trying_for_ever() -> None:
    tracker = RestartTracker(RestartPolicy(crash_loop_restarts=0))
    decisions = [tracker.on_exit(t * 0.1, desired=RUN) for t in range(1000)]
    assert {d.action for d in decisions} == {RestartAction.RESTART}
    assert decisions[-1].delay_secs == 300


async def test_supervisor_like_loop_gives_up_at_an_exact_time(autojump_clock: object) -> None:
    """Drive the policy with Trio's clock the way the supervisor does: crash at once."""
    tracker = RestartTracker(RestartPolicy(crash_loop_restarts=5))
    start = trio.current_time()
    spawned_at = []
    while True:
        decision = tracker.on_exit(trio.current_time(), desired=RUN)
        if decision.action is not RestartAction.RESTART:
            break
        await trio.sleep(decision.delay_secs)
        spawned_at.append(trio.current_time() - start)
    assert decision.action is RestartAction.GIVE_UP
    assert spawned_at == [1, 3, 7, 15, 31]
    assert trio.current_time() - start == 31
