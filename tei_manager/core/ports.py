"""Automatic port allocation from the manager's instance port range.

A port is handed out only if no registered instance uses it, it was not released
in the last :data:`TIME_WAIT_SECS` (a deleted instance's sockets linger in
TIME_WAIT for about a minute), and it can be bound right now. Binding is the one
piece of I/O, and it is injected (``probe``) so the decision logic is testable
without sockets; :func:`probe_bindable` is the real probe.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Collection
from typing import Final

from tei_manager.errors import ErrorCode, LimitError

__all__ = [
    "MAX_PORT",
    "MIN_UNPRIVILEGED_PORT",
    "TIME_WAIT_SECS",
    "PortAllocator",
    "PortProbe",
    "probe_bindable",
]

MIN_UNPRIVILEGED_PORT: Final = 1024
MAX_PORT: Final = 65535
TIME_WAIT_SECS: Final = 60.0

PortProbe = Callable[[int], bool]
"""Answers whether a port can be bound right now."""


def probe_bindable(port: int) -> bool:
    """Whether ``port`` can be bound on 127.0.0.1 and on 0.0.0.0 right now.

    Neither SO_REUSEADDR nor SO_REUSEPORT is set: with them a bind can succeed next
    to a live listener or a TIME_WAIT socket, which is exactly what we must detect.
    """
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


class PortAllocator:
    """Chooses free ports from ``[start, end]`` (inclusive), lowest first."""

    def __init__(
        self,
        start: int,
        end: int,
        *,
        probe: PortProbe,
        clock: Callable[[], float] = time.monotonic,
        quarantine_secs: float = TIME_WAIT_SECS,
    ) -> None:
        if start < MIN_UNPRIVILEGED_PORT:
            raise ValueError(f"port range start {start} is privileged: use 1024-65535")
        if end > MAX_PORT or end < start:
            raise ValueError(f"port range {start}-{end} is invalid")
        self.start = start
        self.end = end
        self._probe = probe
        self._clock = clock
        self._quarantine_secs = quarantine_secs
        self._released: dict[int, float] = {}  # port -> when it was released

    def release(self, port: int) -> None:
        """Start ``port``'s quarantine: it is not handed out for ``quarantine_secs``."""
        self._released[port] = self._clock()

    def quarantined(self) -> frozenset[int]:
        """Ports released too recently to be handed out again."""
        self._expire()
        return frozenset(self._released)

    def allocate(self, in_use: Collection[int] = ()) -> int:
        """The lowest port of the range that is usable now.

        ``in_use`` holds ports already taken (instances, metrics ports, the
        manager's own listeners). Raises ``PORT_ALLOCATION_FAILED`` when none is left.
        """
        self._expire()
        busy = 0
        for port in range(self.start, self.end + 1):
            if port in in_use or port in self._released:
                continue
            if self._probe(port):
                return port
            busy += 1
        taken = sum(1 for p in in_use if self.start <= p <= self.end)
        cooling = sum(1 for p in self._released if p not in in_use and self.start <= p <= self.end)
        raise LimitError(
            ErrorCode.PORT_ALLOCATION_FAILED,
            f"no free port in {self.start}-{self.end}: {taken} used by instances or the "
            f"manager, {cooling} released less than {self._quarantine_secs:g} s ago, "
            f"{busy} busy on the host",
        )

    def _expire(self) -> None:
        cutoff = self._clock() - self._quarantine_secs
        for port in [p for p, at in self._released.items() if at <= cutoff]:
            del self._released[port]
