"""The admission decision of one instance: limit, FIFO hand-off, bounded queue, drain rate."""

from __future__ import annotations

import math

from tei_manager.gateway.gate import (
    DRAIN_WINDOW,
    MAX_RETRY_AFTER_SECS,
    MIN_RETRY_AFTER_SECS,
    InstanceGate,
    Ticket,
)


def ticket(woken: list[str], name: str) -> Ticket:
    return Ticket(lambda: woken.append(name))


def test_enters_up_to_the_limit_then_not() -> None:
    gate = InstanceGate(limit=2, max_queued=5)
    assert gate.try_enter() and gate.try_enter()
    assert not gate.try_enter()
    assert gate.in_flight == 2


def test_a_freed_slot_goes_to_the_oldest_waiter_not_a_newcomer() -> None:
    gate = InstanceGate(limit=1, max_queued=5)
    woken: list[str] = []
    assert gate.try_enter()
    first, second = ticket(woken, "first"), ticket(woken, "second")
    gate.enqueue(first)
    gate.enqueue(second)
    handed = gate.leave(now=1.0)
    assert handed is first and first.granted and not second.granted
    assert gate.in_flight == 1  # the slot passed on
    assert not gate.try_enter()  # a newcomer still queues behind "second"
    assert gate.leave(now=2.0) is second
    assert gate.leave(now=3.0) is None
    assert gate.in_flight == 0 and gate.queued == 0


def test_queue_is_bounded_and_a_withdrawn_waiter_leaves_it() -> None:
    gate = InstanceGate(limit=1, max_queued=1)
    gate.try_enter()
    waiter = Ticket(lambda: None)
    assert gate.can_queue()
    gate.enqueue(waiter)
    assert not gate.can_queue()
    gate.withdraw(waiter)
    assert gate.can_queue()
    assert gate.leave(now=0.0) is None


def test_a_lowered_limit_is_honoured_before_waiters_are_served() -> None:
    gate = InstanceGate(limit=3, max_queued=5)
    for _ in range(3):
        gate.try_enter()
    waiter = Ticket(lambda: None)
    gate.enqueue(waiter)
    gate.limit = 1
    assert gate.leave(now=0.0) is None  # 2 still in flight, over the new limit of 1
    assert gate.leave(now=0.0) is None  # 1 in flight: at the limit
    assert gate.leave(now=0.0) is waiter  # the last one hands its slot over
    assert gate.in_flight == 1


def test_drain_rate_and_retry_after() -> None:
    gate = InstanceGate(limit=1, max_queued=10)
    assert gate.drain_rate() == 0.0
    assert gate.retry_after(fallback=7.0) == 7.0  # nothing finished yet: the queue timeout
    gate.try_enter()
    for i in range(5):  # one finishes every 0.5 s: 2 per second
        gate.leave(now=i * 0.5)
        gate.try_enter()
    assert math.isclose(gate.drain_rate(), 2.0)
    for _ in range(5):
        gate.enqueue(Ticket(lambda: None))
    # Five waiting ahead plus the newcomer, at 2 per second.
    assert math.isclose(gate.retry_after(fallback=7.0), 3.0)


def test_retry_after_is_bounded_and_the_window_forgets() -> None:
    gate = InstanceGate(limit=1, max_queued=1000)
    gate.try_enter()
    gate.leave(now=0.0)
    gate.try_enter()
    gate.leave(now=1000.0)  # one every 1000 s
    gate.try_enter()
    assert gate.retry_after(fallback=1.0) == MAX_RETRY_AFTER_SECS
    for i in range(DRAIN_WINDOW):  # a fast burst replaces the slow history
        gate.leave(now=2000.0 + i * 0.001)
        gate.try_enter()
    assert gate.drain_rate() > 900
    assert gate.retry_after(fallback=1.0) == MIN_RETRY_AFTER_SECS
    stats = gate.statistics()
    assert (stats.in_flight, stats.queued) == (1, 0)
