"""Admission per instance, the trio side: waiting in an instance's queue with a timeout.

The rule (see :mod:`tei_manager.gateway.gate`), the same on every front door: an
instance takes at most its ``max_concurrent_requests`` through the manager at once;
beyond that up to ``max_queued_requests`` wait, first come first served, for at
most ``queue_timeout_secs``; the rest are refused at once (429 ``OVERLOADED``, gRPC
RESOURCE_EXHAUSTED) with a retry delay estimated from how fast the instance has
been finishing requests lately.
"""

from __future__ import annotations

import trio

from tei_manager.errors import quote
from tei_manager.gateway.errors import InferenceError, Kind
from tei_manager.gateway.gate import AdmissionStatistics, InstanceGate, Ticket

__all__ = ["Admission"]


class Admission:
    """Gates by instance name, and the waiting (trio)."""

    def __init__(self, *, max_queued: int, queue_timeout: float) -> None:
        self._max_queued = max_queued
        self._queue_timeout = queue_timeout
        self._gates: dict[str, InstanceGate] = {}

    def gate(self, name: str, limit: int) -> InstanceGate:
        """The gate of instance ``name``, whose limit is now ``limit``."""
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = InstanceGate(limit, self._max_queued)
        else:
            gate.limit = limit
        return gate

    def try_enter(self, name: str, limit: int) -> bool:
        """Take a free slot on ``name`` now, without waiting; pair a True with :meth:`leave`."""
        return self.gate(name, limit).try_enter()

    def refusal(self, name: str, limit: int) -> InferenceError | None:
        """The OVERLOADED answer for a request that could not even queue on ``name``
        now (its queue is full), else None."""
        gate = self.gate(name, limit)
        if gate.can_queue():
            return None
        return self._overloaded(name, gate, f"{gate.queued} requests are already queued")

    async def enter(self, name: str, limit: int) -> float:
        """Wait for a slot on ``name``; the seconds spent queued. Pair with :meth:`leave`.

        Raises InferenceError(OVERLOADED) when the queue is full or the wait too long.
        """
        gate = self.gate(name, limit)
        if gate.try_enter():
            return 0.0
        if not gate.can_queue():
            raise self._overloaded(name, gate, f"{gate.queued} requests are already queued")
        event = trio.Event()
        ticket = Ticket(event.set)
        gate.enqueue(ticket)
        started = trio.current_time()
        try:
            with trio.move_on_after(self._queue_timeout):
                await event.wait()
        except BaseException:
            if ticket.granted:
                self.leave(name)
            else:
                gate.withdraw(ticket)
            raise
        if not ticket.granted:
            gate.withdraw(ticket)
            raise self._overloaded(
                name, gate, f"no slot within {self._queue_timeout:g} s (queue_timeout_secs)"
            )
        return trio.current_time() - started

    def leave(self, name: str) -> None:
        """The request holding a slot on ``name`` finished."""
        ticket = self._gates[name].leave(trio.current_time())
        if ticket is not None:
            ticket.wake()

    def forget(self, name: str) -> None:
        """Drop the gate of an instance that is gone (none in flight or queued)."""
        gate = self._gates.get(name)
        if gate is not None and gate.in_flight == 0 and gate.queued == 0:
            del self._gates[name]

    def statistics(self) -> dict[str, AdmissionStatistics]:
        return {name: gate.statistics() for name, gate in self._gates.items()}

    def _overloaded(self, name: str, gate: InstanceGate, why: str) -> InferenceError:
        return InferenceError(
            Kind.OVERLOADED,
            f"instance {quote(name)} is overloaded: {gate.in_flight} requests in flight "
            f"(max_concurrent_requests {gate.limit}) and {why}",
            retry_after=gate.retry_after(self._queue_timeout),
        )
