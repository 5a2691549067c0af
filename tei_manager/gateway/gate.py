"""Admission of one instance, decided: a limit in flight, a bounded FIFO queue, a drain rate.

The same rule on every front door: an instance takes at most its
``max_concurrent_requests`` through the manager at once; beyond that up to
``max_queued_requests`` wait, first come first served, for at most
``queue_timeout_secs``; the rest are refused at once (429 ``OVERLOADED``, gRPC
RESOURCE_EXHAUSTED) with a retry delay estimated from how fast the instance has
been finishing requests lately, as Envoy's and grpc-go's retry pushback expect.

:class:`InstanceGate` is pure and synchronous (no trio, no clock of its own: callers
pass ``now``). A slot that frees is handed straight to the oldest waiter, so a
newcomer can never overtake the queue. The waiting is
:class:`~tei_manager.gateway.admission.Admission`'s.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Final

import msgspec

__all__ = ["DRAIN_WINDOW", "AdmissionStatistics", "InstanceGate", "Ticket"]

# Completions remembered for the drain rate: enough to smooth bursts, few enough
# that the estimate follows a change of load within a second or two.
DRAIN_WINDOW: Final = 64
# Retry-After bounds: never "now" (a stampede), never more than a minute.
MIN_RETRY_AFTER_SECS: Final = 1.0
MAX_RETRY_AFTER_SECS: Final = 60.0


class Ticket:
    """One waiter's place in a queue; ``granted`` once a slot was handed to it."""

    __slots__ = ("granted", "wake")

    def __init__(self, wake: Callable[[], None]) -> None:
        self.granted = False
        self.wake = wake


class AdmissionStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """One instance's gate, for metrics."""

    in_flight: int
    queued: int
    drain_per_sec: float


class InstanceGate:
    """The admission state of one instance."""

    __slots__ = ("_done", "_waiting", "in_flight", "limit", "max_queued")

    def __init__(self, limit: int, max_queued: int) -> None:
        self.limit = limit
        self.max_queued = max_queued
        self.in_flight = 0
        self._waiting: deque[Ticket] = deque()
        self._done: deque[float] = deque(maxlen=DRAIN_WINDOW)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def try_enter(self) -> bool:
        """Take a slot if one is free and nobody is waiting for it."""
        if self.in_flight < self.limit and not self._waiting:
            self.in_flight += 1
            return True
        return False

    def can_queue(self) -> bool:
        return len(self._waiting) < self.max_queued

    def enqueue(self, ticket: Ticket) -> None:
        self._waiting.append(ticket)

    def withdraw(self, ticket: Ticket) -> None:
        """A waiter gave up (timeout, cancellation) before it was granted a slot."""
        self._waiting.remove(ticket)

    def leave(self, now: float) -> Ticket | None:
        """A request finished: its slot goes to the oldest waiter, returned to be woken."""
        self._done.append(now)
        if self._waiting and self.in_flight <= self.limit:
            ticket = self._waiting.popleft()
            ticket.granted = True
            return ticket  # the slot passes on: in_flight stays the same
        self.in_flight -= 1
        return None

    def drain_rate(self) -> float:
        """Requests finished per second lately; 0 until two have finished."""
        done = self._done
        if len(done) < 2:
            return 0.0
        span = done[-1] - done[0]
        return (len(done) - 1) / span if span > 0 else math.inf

    def retry_after(self, fallback: float) -> float:
        """Seconds until the queue ahead of a newcomer has likely drained.

        ``fallback`` (the queue timeout) when nothing has finished lately.
        """
        rate = self.drain_rate()
        ahead = len(self._waiting) + 1
        estimate = fallback if rate == 0 else ahead / rate
        return min(MAX_RETRY_AFTER_SECS, max(MIN_RETRY_AFTER_SECS, estimate))

    def statistics(self) -> AdmissionStatistics:
        return AdmissionStatistics(
            in_flight=self.in_flight, queued=len(self._waiting), drain_per_sec=self.drain_rate()
        )
