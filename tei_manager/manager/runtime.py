"""The runtime file: which instance processes are alive, for a later manager's reaping.

:class:`RuntimeFileWriter` rewrites the file whenever a process starts or ends,
coalescing bursts of changes into one write, and removes it when the manager stops.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import trio

from tei_manager.supervisor.instance import BlockingRunner, InstanceRunner
from tei_manager.supervisor.orphans import (
    RuntimeFile,
    RuntimeRecord,
    remove_runtime,
    write_runtime,
)

__all__ = ["RuntimeFileWriter", "runtime_snapshot"]

log = logging.getLogger("tei_manager.manager")


def runtime_snapshot(runners: Iterable[InstanceRunner], start_ticks: int | None) -> RuntimeFile:
    """The live processes of ``runners``, with this manager's pid and start time."""
    records = []
    for runner in runners:
        process = runner.process
        if process is not None and process.start_ticks is not None:
            records.append(
                RuntimeRecord(
                    name=runner.name,
                    pid=process.pid,
                    pgid=process.pgid,
                    start_ticks=process.start_ticks,
                    port=runner.record.port,
                    model_id=runner.record.config.model_id,
                )
            )
    return RuntimeFile(
        manager_pid=os.getpid(), manager_start_ticks=start_ticks, instances=tuple(records)
    )


class RuntimeFileWriter:
    """Keeps ``path`` in step with the processes ``runners()`` reports."""

    def __init__(
        self,
        path: Path,
        runners: Callable[[], Iterable[InstanceRunner]],
        *,
        run_blocking: BlockingRunner,
    ) -> None:
        self.path = path
        self.start_ticks: int | None = None
        self._runners = runners
        self._run_blocking = run_blocking
        self._dirty = trio.Event()

    def note_change(self) -> None:
        """A process started or ended: write the file soon."""
        self._dirty.set()

    async def run(self) -> None:
        """Write the file after each burst of changes, until cancelled."""
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            snapshot = runtime_snapshot(self._runners(), self.start_ticks)
            try:
                await self._run_blocking(partial(write_runtime, self.path, snapshot))
            except OSError as e:
                log.warning("cannot write runtime file %s: %s", self.path, e)

    async def remove(self) -> None:
        """No process is left: remove the file."""
        await self._run_blocking(partial(remove_runtime, self.path))
