"""Spawning an instance process and ending it, without ever leaving one behind.

- Each instance runs in its own session and process group (``start_new_session``),
  so signals reach the whole tree it starts, not only its first process.
- The child asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``),
  so a manager killed with SIGKILL takes its instances with it. The kernel sends that
  signal when the *thread* that forked the child exits, so the fork must happen on a
  thread that lives as long as the manager: the main thread, with
  ``subprocess.Popen``. (``trio.lowlevel.open_process`` forks on a worker thread,
  which retires after ~10 s idle and would kill the instance with it.)
- Exit is waited for with a pidfd, so it is seen the moment it happens. While the
  exited process is a zombie (not yet reaped) its pid, and so its process group id,
  cannot be reused: that is when whatever is left of its group is swept with SIGKILL.

Spawning is synchronous on purpose (see above); it takes a few milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import trio

from tei_manager.core.logslice import RUN_BOUNDARY_PREFIX
from tei_manager.supervisor.launch import LaunchSpec, describe
from tei_manager.supervisor.procfs import read_stat

__all__ = ["InstanceProcess", "SpawnError", "describe_exit", "spawn"]

_PR_SET_PDEATHSIG: Final = 1
_SIGKILL: Final = int(signal.SIGKILL)
# Resolved now, in the parent: looking symbols up between fork and exec is not safe.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


class SpawnError(Exception):
    """The process could not be started; ``str()`` says why."""


def _child_setup(parent_pid: int) -> Callable[[], None]:
    def setup() -> None:
        # Runs in the child, between fork and exec: as little as possible.
        _prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            # The parent died before the prctl took effect: nobody would kill us.
            os.kill(os.getpid(), _SIGKILL)

    return setup


def describe_exit(returncode: int) -> str:
    """``"exited with code 1"`` or ``"killed by SIGKILL"``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with code {returncode}"


def spawn(spec: LaunchSpec) -> InstanceProcess:
    """Start ``spec``'s process, output appended to its log; raises :class:`SpawnError`.

    Call it from the thread that runs Trio (the main thread): see the module notes.
    """
    log_path = Path(spec.log_path)
    stamp = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            # A visible boundary between runs, since every restart appends to one file.
            log.write(f"{RUN_BOUNDARY_PREFIX}{stamp}: starting {describe(spec.argv)}\n".encode())
            log.flush()
            popen = subprocess.Popen(
                spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(spec.env),
                start_new_session=True,
                preexec_fn=_child_setup(os.getpid()),
            )
    except (OSError, subprocess.SubprocessError) as e:
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SpawnError(f"cannot start {spec.argv[0]}: {detail}") from e
    try:
        return InstanceProcess(popen)
    except OSError as e:  # no pidfd (Linux < 5.3): we could not see it exit, so end it
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        raise SpawnError(f"cannot watch process {popen.pid}: {e}") from e


class InstanceProcess:
    """A spawned instance process, leader of its own process group."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid: int = popen.pid
        # start_new_session made the process the leader of its session and group.
        self.pgid: int = popen.pid
        stat = read_stat(popen.pid)
        self.start_ticks: int | None = None if stat is None else stat.start_ticks
        # Linux 5.3+. The pid cannot be reused before we reap it, so this is race-free.
        self._pidfd: int | None = os.pidfd_open(popen.pid)
        # One task at a time watches the pidfd (Trio allows one reader per fd); the
        # lock passes the job on if that task is cancelled.
        self._wait_lock = trio.Lock()

    @property
    def returncode(self) -> int | None:
        """None while running; negative for a signal, as in :mod:`subprocess`."""
        return self._popen.returncode

    async def wait(self) -> int:
        """Wait for the process to exit and reap it; returns the exit code."""
        async with self._wait_lock:
            if self._pidfd is not None:
                await trio.lowlevel.wait_readable(self._pidfd)
                self._reap()
        code = self._popen.returncode
        assert code is not None
        return code

    def _reap(self) -> None:
        # The leader is a zombie, so its group id is still reserved: kill what is left
        # of the group (a grandchild, say) before reaping frees the id for reuse.
        self.signal_group(signal.SIGKILL)
        self._popen.wait()
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def signal_group(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the whole process group, unless the leader was reaped."""
        if self._popen.returncode is not None:
            return  # reaped: the group id may belong to someone else by now
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)

    def kill(self) -> None:
        """SIGKILL the group now; :meth:`wait` then returns at once."""
        self.signal_group(signal.SIGKILL)

    async def terminate(self, grace: float) -> int:
        """SIGTERM the group, wait up to ``grace`` seconds, then SIGKILL it; the exit code."""
        if self._popen.returncode is None:
            self.signal_group(signal.SIGTERM)
            with trio.move_on_after(grace):
                return await self.wait()
            self.signal_group(signal.SIGKILL)
        return await self.wait()
