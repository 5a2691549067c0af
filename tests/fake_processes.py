"""Small fakes of the operating system for the supervisor: processes and Info calls.

:class:`FakeHost` spawns :class:`FakeProcess` objects and answers their Info calls
the way a real instance would (refused before spawn and after exit, UNAVAILABLE
while "loading", then answering), all in Trio time, so tests run on the mock clock.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import TypeVar

import trio

from tei_manager.config import InstanceConfig
from tei_manager.supervisor.probe import ProbeError
from tei_manager.supervisor.process import SpawnError


class FakeProcess:
    """A process that exits when told to, or on signals the way it was configured."""

    def __init__(self, pid: int, *, spawned_at: float, sigterm_exit_secs: float | None) -> None:
        self.pid = pid
        self.pgid = pid
        self.start_ticks: int | None = None
        self.returncode: int | None = None
        self.spawned_at = spawned_at
        self.exited_at: float | None = None
        # Seconds from SIGTERM to exit; None: SIGTERM is ignored (only SIGKILL works).
        self.sigterm_exit_secs = sigterm_exit_secs
        self.signals: list[str] = []
        self._exited = trio.Event()

    def exit(self, code: int) -> None:
        """The process ends by itself (a crash, for a nonzero code)."""
        if self.returncode is None:
            self.returncode = code
            self.exited_at = trio.current_time()
            self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    async def terminate(self, grace: float) -> int:
        self.signals.append("SIGTERM")
        with trio.move_on_after(grace):
            if self.sigterm_exit_secs is not None:
                await trio.sleep(self.sigterm_exit_secs)
                self.exit(0)
            return await self.wait()
        self.kill()
        return await self.wait()

    def kill(self) -> None:
        if self.returncode is None:
            self.signals.append("SIGKILL")
            self.exit(-9)


class FakeHost:
    """Spawner and prober for the runner; remembers every process per instance."""

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        ready_after: float = 1.0,
        sigterm_exit_secs: float | None = 0.0,
        crash_after: float | None = None,
    ) -> None:
        self._nursery = nursery
        self.ready_after = ready_after  # seconds from spawn until Info answers
        self.sigterm_exit_secs = sigterm_exit_secs
        self.crash_after = crash_after  # every process exits with 3 this long after spawn
        self.processes: defaultdict[str, list[FakeProcess]] = defaultdict(list)
        self.unhealthy: set[str] = set()  # Info answers UNAVAILABLE
        self.hanging: set[str] = set()  # Info never answers
        self.spawn_error: str | None = None
        self.overlaps = 0  # spawns while a process of the same instance was alive
        self._next_pid = 1000

    def spawn(self, config: InstanceConfig) -> FakeProcess:
        if self.spawn_error is not None:
            raise SpawnError(self.spawn_error)
        mine = self.processes[config.name]
        if any(p.returncode is None for p in mine):
            self.overlaps += 1
        self._next_pid += 1
        process = FakeProcess(
            self._next_pid,
            spawned_at=trio.current_time(),
            sigterm_exit_secs=self.sigterm_exit_secs,
        )
        mine.append(process)
        if self.crash_after is not None:
            self._nursery.start_soon(self._crash_later, process, self.crash_after)
        return process

    async def _crash_later(self, process: FakeProcess, delay: float) -> None:
        await trio.sleep(delay)
        process.exit(3)

    async def probe(self, config: InstanceConfig) -> None:
        mine = self.processes[config.name]
        if not mine or mine[-1].returncode is not None:
            raise ProbeError("connection refused")
        if config.name in self.hanging:
            await trio.sleep_forever()
        if trio.current_time() - mine[-1].spawned_at < self.ready_after:
            raise ProbeError("UNAVAILABLE: model loading")
        if config.name in self.unhealthy:
            raise ProbeError("UNAVAILABLE: broken")

    def current(self, name: str) -> FakeProcess:
        return self.processes[name][-1]

    def spawn_times(self, name: str) -> list[float]:
        return [p.spawned_at for p in self.processes[name]]

    def alive(self, name: str) -> list[FakeProcess]:
        return [p for p in self.processes[name] if p.returncode is None]


NEVER = math.inf
T = TypeVar("T")


async def run_inline(fn: Callable[[], T]) -> T:
    """Blocking file I/O run in the event loop's thread: on the mock clock, virtual
    time must not jump while a worker thread is busy."""
    await trio.lowlevel.checkpoint()
    return fn()
