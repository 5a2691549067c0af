"""Automatic port allocation from the manager's instance port range.

A port is handed out only if no registered instance uses it and it can be bound
right now: the bind test decides, since it asks the kernel, which knows about
every listener and every lingering connection. Ports released recently (by a
deleted instance) are tried last, oldest release first, so a port is reused only
when the range has nothing fresher, never refused for it: instances bind with
SO_REUSEADDR, so a deleted instance's connections in TIME_WAIT do not stand in
the way. Binding is the one piece of I/O, and it is injected (``probe``) so the
decision logic is testable without sockets; :func:`probe_bindable` is the real probe.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable, Collection
from typing import Final

from tei_manager.errors import ErrorCode, LimitError

__all__ = [
    "MAX_PORT",
    "MIN_UNPRIVILEGED_PORT",
    "PortAllocator",
    "PortProbe",
    "probe_bindable",
]

MIN_UNPRIVILEGED_PORT: Final = 1024
MAX_PORT: Final = 65535

PortProbe = Callable[[int], bool]
"""Answers whether a port can be bound right now."""


def probe_bindable(port: int) -> bool:
    """Whether an instance could listen on ``port`` right now, on 127.0.0.1 and 0.0.0.0.

    With SO_REUSEADDR, as the instance servers (TEI's tokio, the worker's Trio) bind:
    on Linux that still fails next to a live listener or any socket bound without
    it, but not next to connections of a deleted instance left in TIME_WAIT, which
    would not stop the instance either. SO_REUSEPORT is never set: with it a bind
    could succeed next to a live listener.
    """
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


class PortAllocator:
    """Chooses free ports from ``[start, end]`` (inclusive): lowest first, the
    recently released last."""

    def __init__(self, start: int, end: int, *, probe: PortProbe) -> None:
        if start < MIN_UNPRIVILEGED_PORT:
            raise ValueError(f"port range start {start} is privileged: use 1024-65535")
        if end > MAX_PORT or end < start:
            raise ValueError(f"port range {start}-{end} is invalid")
        self.start = start
        self.end = end
        self._probe = probe
        # Released ports, oldest release first (dicts keep insertion order). Bounded
        # by the range: a port is in it at most once.
        self._released: dict[int, None] = {}

    def release(self, port: int) -> None:
        """``port`` is free again; it goes to the back of the line."""
        self._released.pop(port, None)
        if self.start <= port <= self.end:
            self._released[port] = None

    def order(self) -> list[int]:
        """Every port of the range in the order :meth:`allocate` tries them."""
        released = self._released
        fresh = (p for p in range(self.start, self.end + 1) if p not in released)
        return list(itertools.chain(fresh, released))

    def allocate(self, in_use: Collection[int] = ()) -> int:
        """The first port in :meth:`order` that is not in use and can be bound now.

        ``in_use`` holds ports already taken (instances, metrics ports, the
        manager's own listeners). Raises ``PORT_ALLOCATION_FAILED`` when none is left.
        """
        busy = 0
        for port in self.order():
            if port in in_use:
                continue
            if self._probe(port):
                return port
            busy += 1
        taken = sum(1 for p in in_use if self.start <= p <= self.end)
        raise LimitError(
            ErrorCode.PORT_ALLOCATION_FAILED,
            f"no free port in {self.start}-{self.end}: {taken} used by instances or the "
            f"manager, {busy} busy on the host",
        )
