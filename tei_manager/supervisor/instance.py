"""One instance's supervision: its process task, readiness, health checks and restarts.

An :class:`InstanceRunner` lives as long as the instance is registered. Its task is
the instance's nursery in the tree::

    runner.run                      (cancelled: instance deleted, or manager stopping)
    └── run scope                   (cancelled: stop or restart asked for)
        └── one process at a time
            ├── exit watcher        pidfd: the exit is seen the moment it happens
            └── checks              Info until it answers, then Info every interval

The exit watcher marks the record the moment the process is seen to exit (it
leaves ``running`` then, not after the next health check), so a record whose
process died is never ``running``: routing may trust the status.

Whatever ends a process's supervision (exit, failed checks, cancellation), the
process is gone before the next one is spawned: every path out goes through the
shielded SIGTERM → grace → SIGKILL of its group. So there is never more than one
process per instance, whatever the user asks and in which order.

The runner decides synchronously in its ``request_*`` methods (called by the
manager right after the registry accepted the request) and acts in its task.
Spawning and probing are injected, so tests drive it with fakes on a mock clock.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Final, NamedTuple, Protocol, TypeVar

import msgspec
import trio

from tei_manager.config import InstanceConfig, ManagerConfig
from tei_manager.core.instances import InstanceRecord, InstanceStatus
from tei_manager.core.logslice import last_error_line, read_log_slice
from tei_manager.core.restart import HealthVerdict, RestartAction, RestartPolicy, RestartTracker
from tei_manager.manager.metrics import ManagerMetrics
from tei_manager.supervisor.probe import ProbeError, Prober
from tei_manager.supervisor.process import SpawnError, describe_exit

__all__ = [
    "STOP_GRACE_CAP_SECS",
    "BlockingRunner",
    "InstanceRunner",
    "ProcessHandle",
    "RunnerSettings",
    "Spawner",
]

log = logging.getLogger("tei_manager.supervisor")

# The longest an instance gets to exit after SIGTERM before SIGKILL. TEI and the
# worker drain in-flight requests on SIGTERM; a request still running after this
# is not worth holding a stop (or a whole manager shutdown) for.
STOP_GRACE_CAP_SECS: Final = 10.0


class ProcessHandle(Protocol):
    """A running instance process, as :func:`~tei_manager.supervisor.process.spawn` gives."""

    pid: int
    pgid: int
    start_ticks: int | None

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    async def terminate(self, grace: float) -> int: ...

    def kill(self) -> None: ...


Spawner = Callable[[InstanceConfig], ProcessHandle]
"""Starts an instance's process now (synchronously); raises ``SpawnError``."""

T = TypeVar("T")


class BlockingRunner(Protocol):
    """Runs blocking file I/O off the event loop: ``trio.to_thread.run_sync``.

    Tests on the mock clock run it inline instead, so virtual time cannot jump
    while a worker thread is busy.
    """

    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


class RunnerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The runner's timings; :meth:`from_config` takes them from the manager config."""

    startup_timeout_secs: float = 300.0  # an instance's own value wins
    health_check_interval_secs: float = 10.0
    probe_timeout_secs: float = 2.0
    # Start-up polls Info this often: a refused connection or an UNAVAILABLE answer
    # costs the instance next to nothing, and every tick of delay is added to each
    # start and each failover.
    readiness_interval_secs: float = 0.1
    stop_grace_secs: float = STOP_GRACE_CAP_SECS
    log_tail_lines: int = 20
    # Read for the error line of a start-up crash (a Python traceback is long).
    error_scan_lines: int = 200

    @classmethod
    def from_config(cls, config: ManagerConfig) -> RunnerSettings:
        return cls(
            startup_timeout_secs=config.startup_timeout_secs,
            health_check_interval_secs=config.health_check_interval_secs,
            stop_grace_secs=min(config.graceful_shutdown_timeout_secs, STOP_GRACE_CAP_SECS),
        )


class _Why(enum.Enum):
    """Why a process's supervision ended (cancellation aside)."""

    CRASH = "crash"  # it exited by itself (or was killed from outside)
    HEALTH = "health"  # too many failed health checks: it was ended to restart it
    STARTUP_TIMEOUT = "startup_timeout"  # it never answered: ended, to be restarted


class _End(NamedTuple):
    why: _Why
    message: str
    during_startup: bool = False


def _utcnow() -> datetime:
    return datetime.now(UTC)


class InstanceRunner:
    """Supervises one registered instance; the manager owns one per instance."""

    def __init__(
        self,
        record: InstanceRecord,
        *,
        spawn: Spawner,
        probe: Prober,
        settings: RunnerSettings,
        policy: RestartPolicy,
        metrics: ManagerMetrics,
        on_change: Callable[[], None] = lambda: None,
        log_path: Path | None = None,
        run_blocking: BlockingRunner = trio.to_thread.run_sync,
    ) -> None:
        self.record = record
        self.tracker = RestartTracker(policy)
        self.process: ProcessHandle | None = None
        self.done = trio.Event()  # set once the task ended: no process is left
        self._spawn = spawn
        self._probe = probe
        self._settings = settings
        self._metrics = metrics
        self._on_change = on_change
        self._log_path = log_path
        self._run_blocking = run_blocking
        # The registry already decided: a new instance wanted running is "starting".
        self._want_run = record.status is InstanceStatus.STARTING
        self._wake = trio.Event()
        self._scope = trio.CancelScope()
        self._run_scope: trio.CancelScope | None = None
        self._hurry = False  # SIGKILL without grace from now on
        self._requests = 0  # counts start/restart requests
        self._task_status: trio.TaskStatus[None] | None = None
        # Why the current process is being ended as a failure (request_fail).
        self._failure: str | None = None

    @property
    def name(self) -> str:
        return self.record.name

    # -- requests: synchronous decisions, the task acts on them --------------------
    def request_start(self) -> None:
        """Run the instance (the registry said it is not starting or running)."""
        self._want_run = True
        self._failure = None
        self._requests += 1
        self.tracker.reset()  # a start by hand forgives the crash history
        self._wake.set()

    def request_stop(self) -> None:
        """End the process, if any; never start another until asked."""
        self._want_run = False
        if self.process is not None:
            self.record.mark_stopping()
        elif self.record.status is not InstanceStatus.FAILED:
            self.record.mark_stopped()  # waiting out a backoff, or not spawned yet
        if self._run_scope is not None:
            self._run_scope.cancel()
        self._on_change()

    def request_unload(self) -> None:
        """End the process of an on-demand instance to free its memory (idle, or
        evicted); it rests ``idle`` and its next request starts it again."""
        self._want_run = False
        if self.process is not None:
            self.record.mark_stopping()
        elif self.record.status is not InstanceStatus.FAILED:
            self.record.mark_at_rest()
        if self._run_scope is not None:
            self._run_scope.cancel()
        self._on_change()

    def request_fail(self, message: str) -> None:
        """End the process and leave the instance ``failed`` with ``message`` (a GPU
        instance found on the CPU, say); never start another until asked."""
        self._failure = message
        self.record.last_error = message
        self.request_stop()

    def request_restart(self) -> bool:
        """End the process, if any, and start a new one; True if one was running."""
        self._want_run = True
        self._failure = None
        self._requests += 1
        self.tracker.reset()
        had_process = self.process is not None
        if had_process:
            self._metrics.instance_restarted(self.name, "manual")
            self.record.mark_restart_requested()
        else:
            self.record.mark_start_requested()
        if self._run_scope is not None:
            self._run_scope.cancel()
        self._wake.set()
        self._on_change()
        return had_process

    def cancel(self) -> None:
        """End supervision for good (the instance was deleted); see :attr:`done`."""
        self._want_run = False
        if self.process is not None:
            self.record.mark_stopping()
        self._scope.cancel()

    def kill_now(self) -> None:
        """Skip the grace period: SIGKILL the process now and any later one at once."""
        self._hurry = True
        if self.process is not None:
            self.process.kill()

    # -- the task --------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise until cancelled; ``started()`` once the first process was spawned
        (or failed to spawn), or at once if the instance is not wanted running."""
        self._task_status = task_status
        try:
            with self._scope:
                while True:
                    if not self._want_run:
                        self._report_started()
                        await self._wake.wait()
                        self._wake = trio.Event()
                        continue
                    requests = self._requests
                    with trio.CancelScope() as self._run_scope:
                        await self._run()
                        # It failed: wait to be asked again, unless that happened already.
                        if self._requests == requests:
                            self._want_run = False
                    self._run_scope = None
                    # The run failed, or a stop or restart cancelled it; either way its
                    # process is gone by now. Wanted running: a restart, or a start
                    # that came while it was stopping.
                    if self._want_run:
                        self.record.mark_start_requested()
                    elif self._failure is not None:
                        self.record.mark_failed(self._failure)
                    elif self.record.status is not InstanceStatus.FAILED:
                        self.record.mark_at_rest()
                    self._on_change()
        finally:
            self._run_scope = None
            if self.record.status is not InstanceStatus.FAILED:
                self.record.mark_at_rest()
            self.done.set()
            self._on_change()

    def _report_started(self) -> None:
        if self._task_status is not None:
            self._task_status.started()
            self._task_status = None

    async def _run(self) -> None:
        """Spawn, supervise, restart as the policy says; returns once the instance failed."""
        record = self.record
        while True:
            try:
                process = self._spawn(record.launch_config())
            except SpawnError as e:
                log.error("instance %s: %s", self.name, e, extra={"instance": self.name})
                record.mark_failed(str(e))
                self._report_started()
                return
            self.process = process
            record.mark_starting(process.pid, _utcnow())
            log.info(
                "instance %s: process %d started",
                self.name,
                process.pid,
                extra={"instance": self.name, "pid": process.pid},
            )
            self._on_change()
            self._report_started()
            end = await self._supervise(process)
            ended_at = trio.current_time()
            self.process = None
            record.mark_exited(end.message)  # the watcher did already, for a crash
            self._on_change()

            message = end.message
            if end.during_startup:
                line = await self._log_error_line()
                if line:
                    message = f"{message}: {line}"
            decision = self.tracker.on_exit(ended_at, desired=record.desired)
            if decision.action is RestartAction.GIVE_UP:
                await self._fail(f"{message}; {decision.reason}")
                return
            if decision.action is RestartAction.STAY_STOPPED:  # pragma: no cover - a stop
                record.mark_stopped()  # cancels this scope, so this is only a safety net
                return
            self._metrics.instance_restarted(
                self.name, "crash" if end.why is _Why.CRASH else "health"
            )
            # From the moment it ended, so the backoff is exact whatever ran since.
            restart_at = ended_at + decision.delay_secs
            if decision.delay_secs:
                next_at = _utcnow() + timedelta(seconds=restart_at - trio.current_time())
                stamp = next_at.isoformat(timespec="seconds").replace("+00:00", "Z")
                error = (
                    f"{message}; {decision.reason}, next try in "
                    f"{decision.delay_secs:g} s (at {stamp})"
                )
                record.mark_restarting(error, next_restart_at=next_at)
            else:
                record.mark_restarting(f"{message}; restarting at once", next_restart_at=None)
            log.warning(
                "instance %s: %s",
                self.name,
                record.last_error,
                extra={"instance": self.name, "reason": end.why.value},
            )
            self._on_change()
            await trio.sleep_until(restart_at)

    async def _fail(self, message: str) -> None:
        tail = await self._log_tail()
        if tail:
            message = f"{message}; last log lines:\n{tail}"
        log.error("instance %s failed: %s", self.name, message, extra={"instance": self.name})
        self.record.mark_failed(message)
        self._on_change()

    async def _supervise(self, process: ProcessHandle) -> _End:
        """Watch ``process`` until it exits or must be ended; it is gone on return."""
        end: _End | None = None
        try:
            async with trio.open_nursery() as nursery:

                def finish(result: _End) -> None:
                    nonlocal end
                    if end is None:
                        end = result
                    nursery.cancel_scope.cancel()

                async def watch_exit() -> None:
                    code = await process.wait()
                    starting = self.record.status is InstanceStatus.STARTING
                    during = " during start-up" if starting else ""
                    message = f"process {describe_exit(code)}{during}"
                    # Not routable from now on: callers must not wait for a health
                    # check to learn that the process is gone.
                    self.record.mark_exited(message)
                    self._on_change()
                    finish(_End(_Why.CRASH, message, during_startup=starting))

                async def watch_checks() -> None:
                    finish(await self._check(process))

                nursery.start_soon(watch_exit)
                nursery.start_soon(watch_checks)
        finally:
            if process.returncode is None:
                self.record.mark_stopping()
                self._on_change()
                grace = 0.0 if self._hurry else self._settings.stop_grace_secs
                # Cleanup that must finish even when we are being cancelled.
                with trio.CancelScope(shield=True):
                    code = await process.terminate(grace)
                log.info(
                    "instance %s: process %d %s",
                    self.name,
                    process.pid,
                    describe_exit(code),
                    extra={"instance": self.name, "pid": process.pid},
                )
        assert end is not None
        return end

    async def _check(self, process: ProcessHandle) -> _End:
        """Poll Info until it answers (readiness), then every interval (health).

        Returns only when the process must be ended: it never became ready, or too
        many consecutive checks failed.
        """
        s = self._settings
        record = self.record
        spawned_at = trio.current_time()
        timeout = record.config.startup_timeout_secs or s.startup_timeout_secs
        ready = False
        last_problem = "no answer yet"
        with trio.move_on_at(spawned_at + timeout):
            while (problem := await self._probe_once()) is not None:
                last_problem = problem
                await trio.sleep(s.readiness_interval_secs)
            ready = True
        if not ready:
            return _End(
                _Why.STARTUP_TIMEOUT,
                f"not ready within {timeout:g} s ({last_problem})",
                during_startup=True,
            )
        if process.returncode is not None:
            # It answered, then exited before we got here: the watcher has ended this
            # supervision already, and the record must not turn "running".
            await trio.sleep_forever()

        now = trio.current_time()
        record.mark_running()
        self.tracker.on_running(now)
        self._metrics.instance_started(now - spawned_at)
        log.info(
            "instance %s: running on port %d (ready after %.1f s)",
            self.name,
            record.port,
            now - spawned_at,
            extra={"instance": self.name, "port": record.port},
        )
        self._on_change()
        while True:
            await trio.sleep(s.health_check_interval_secs)
            started = trio.current_time()
            problem = await self._probe_once()
            ok = problem is None
            record.record_health_check(ok, _utcnow())
            self._metrics.health_checked(self.name, ok=ok, seconds=trio.current_time() - started)
            verdict = self.tracker.on_health_check(ok)
            if ok:
                continue
            log.warning(
                "instance %s: health check failed: %s",
                self.name,
                problem,
                extra={"instance": self.name},
            )
            if verdict is HealthVerdict.RESTART:
                threshold = self.tracker.policy.max_failures_before_restart
                return _End(
                    _Why.HEALTH, f"{threshold} consecutive health checks failed (last: {problem})"
                )

    async def _probe_once(self) -> str | None:
        """One Info call under the probe timeout: None if it answered, else what went wrong."""
        timeout = self._settings.probe_timeout_secs
        with trio.move_on_after(timeout):
            try:
                await self._probe(self.record.config)
            except ProbeError as e:
                return str(e)
            return None
        return f"no answer within {timeout:g} s"

    async def _log_error_line(self) -> str | None:
        """The line of the instance's log that says why its last run failed."""
        if self._log_path is None:
            return None
        lines = await self._run_blocking(
            partial(read_log_slice, self._log_path, -self._settings.error_scan_lines)
        )
        return last_error_line(lines.lines)

    async def _log_tail(self) -> str:
        if self._log_path is None:
            return ""
        lines = await self._run_blocking(
            partial(read_log_slice, self._log_path, -self._settings.log_tail_lines)
        )
        return "\n".join(lines.lines)
