"""When to restart an instance, how long to wait first, and when to give up.

Pure: every method takes ``now`` (seconds on any monotonic clock; the supervisor
passes ``trio.current_time()``), so the policy is tested with plain numbers or
Trio's ``MockClock`` and never sleeps itself.
"""

from __future__ import annotations

import enum
from collections import deque

import msgspec

from tei_manager.config import ManagerConfig
from tei_manager.core.instances import DesiredState

__all__ = [
    "HealthVerdict",
    "RestartAction",
    "RestartDecision",
    "RestartPolicy",
    "RestartTracker",
]


class RestartPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """The knobs: exponential backoff, crash-loop window, health failure threshold.

    The defaults are those of :class:`~tei_manager.config.ManagerConfig`: like
    Kubernetes' CrashLoopBackOff, the delay doubles up to a cap and the instance is
    retried for ever, never left ``failed`` unless ``crash_loop_restarts`` says so.
    """

    initial_backoff_secs: float = 1.0
    max_backoff_secs: float = 300.0
    backoff_multiplier: float = 2.0
    # Running this long without exiting counts as healthy: the backoff starts over.
    stable_after_secs: float = 60.0
    # This many restarts within the window, and the next exit gives up (0: never).
    crash_loop_restarts: int = 0
    crash_loop_window_secs: float = 300.0
    # Consecutive failed health checks that trigger a restart (0: never).
    max_failures_before_restart: int = 3

    @classmethod
    def from_config(cls, config: ManagerConfig) -> RestartPolicy:
        """The policy the manager's configuration asks for."""
        return cls(
            initial_backoff_secs=config.restart_backoff_initial_secs,
            max_backoff_secs=config.restart_backoff_max_secs,
            crash_loop_restarts=config.crash_loop_restarts,
            crash_loop_window_secs=config.crash_loop_window_secs,
            max_failures_before_restart=config.max_failures_before_restart,
        )

    def backoff(self, attempt: int) -> float:
        """Delay before backed-off restart number ``attempt`` (0-based) since the last
        stable run; an immediate first restart is not counted."""
        try:
            delay = self.initial_backoff_secs * self.backoff_multiplier**attempt
        except OverflowError:  # a very long crash history: far past the cap anyway
            return self.max_backoff_secs
        return float(min(delay, self.max_backoff_secs))


class RestartAction(enum.StrEnum):
    RESTART = "restart"  # wait delay_secs, then spawn again
    GIVE_UP = "give_up"  # crash loop: mark the instance failed
    STAY_STOPPED = "stay_stopped"  # the user wants it stopped: never restart


class RestartDecision(msgspec.Struct, frozen=True, kw_only=True):
    """What to do after an instance's process ended."""

    action: RestartAction
    delay_secs: float = 0.0
    reason: str = ""


class HealthVerdict(enum.StrEnum):
    HEALTHY = "healthy"
    FAILING = "failing"  # failed, but below the restart threshold
    RESTART = "restart"  # threshold reached: restart the process


class RestartTracker:
    """One instance's restart history; feed it events, act on its decisions.

    The first exit of a process that had become ready, with no restart within the
    crash-loop window, restarts at once. Every other exit (a second crash within
    the window, or an exit before the process was ever ready) waits the backoff,
    which grows with each such restart until a stable run resets it.
    """

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._attempt = 0  # restarts since the last stable run
        self._restart_times: deque[float] = deque()
        self._running_since: float | None = None
        self.health_failures = 0  # consecutive failed checks

    def reset(self) -> None:
        """Forget the history: the user started or restarted the instance by hand."""
        self._attempt = 0
        self._restart_times.clear()
        self._running_since = None
        self.health_failures = 0

    def on_running(self, now: float) -> None:
        """The instance became ready."""
        self._running_since = now
        self.health_failures = 0

    def on_exit(self, now: float, *, desired: DesiredState) -> RestartDecision:
        """The process ended (crash, failed start, or killed after failed checks)."""
        running_since, self._running_since = self._running_since, None
        self.health_failures = 0
        if desired is DesiredState.STOPPED:
            return RestartDecision(action=RestartAction.STAY_STOPPED)
        p = self.policy
        if running_since is not None and now - running_since >= p.stable_after_secs:
            self._attempt = 0
        while self._restart_times and self._restart_times[0] <= now - p.crash_loop_window_secs:
            self._restart_times.popleft()
        if p.crash_loop_restarts and len(self._restart_times) >= p.crash_loop_restarts:
            return RestartDecision(
                action=RestartAction.GIVE_UP,
                reason=f"crash loop: {len(self._restart_times)} restarts within "
                f"{p.crash_loop_window_secs:g} s (crash_loop_restarts = {p.crash_loop_restarts})",
            )
        if running_since is not None and not self._restart_times:
            # It had been serving and has not been restarted within the window: a
            # first failure, restarted at once as systemd and Kubernetes do. Waiting
            # would only add to the outage; the backoff is for the second crash on.
            delay = 0.0
        else:
            delay = p.backoff(self._attempt)
            self._attempt += 1
        self._restart_times.append(now)
        n = len(self._restart_times)
        if delay:
            reason = f"crash loop: restart {n} within {p.crash_loop_window_secs:g} s"
        else:
            reason = "restarting at once"
        return RestartDecision(action=RestartAction.RESTART, delay_secs=delay, reason=reason)

    def on_health_check(self, ok: bool) -> HealthVerdict:
        """Count one health check of a running instance."""
        if ok:
            self.health_failures = 0
            return HealthVerdict.HEALTHY
        self.health_failures += 1
        threshold = self.policy.max_failures_before_restart
        if threshold and self.health_failures >= threshold:
            self.health_failures = 0
            return HealthVerdict.RESTART
        return HealthVerdict.FAILING

    def recent_restarts(self, now: float) -> int:
        """Restarts within the crash-loop window ending at ``now``."""
        cutoff = now - self.policy.crash_loop_window_secs
        return sum(1 for t in self._restart_times if t > cutoff)
