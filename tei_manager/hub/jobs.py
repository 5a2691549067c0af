"""A registry job (a download or a smoke load) and the GPU slots smoke loads take turns on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import trio

__all__ = ["GpuSlots", "Job"]


class Job:
    """A download or a smoke load of one model, cancellable on its own.

    ``error`` is None after a success, else why it failed or that it was cancelled.
    """

    def __init__(self, kind: Literal["download", "load"], revision: str | None) -> None:
        self.kind = kind
        self.revision = revision
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.error: str | None = None

    async def wait(self) -> str | None:
        """Wait for the job to end; its ``error``."""
        await self.done.wait()
        return self.error


class GpuSlots:
    """One smoke load per GPU at a time (one at a time on the CPU when there is none)."""

    def __init__(self, gpu_count: int) -> None:
        ids: list[int | None] = list(range(gpu_count)) or [None]
        self._send, self._receive = trio.open_memory_channel[int | None](len(ids))
        for gpu in ids:
            self._send.send_nowait(gpu)

    @asynccontextmanager
    async def take(self) -> AsyncIterator[int | None]:
        """The first GPU free (``None``: the CPU); waits while all are busy."""
        gpu = await self._receive.receive()
        try:
            yield gpu
        finally:
            self._send.send_nowait(gpu)
