"""Waiting for a slot: queueing, the queue timeout, cancellation, all on trio's mock clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tei_manager.gateway.admission import Admission
from tei_manager.gateway.errors import InferenceError, Kind


async def test_waits_in_order_and_reports_the_time_queued(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission(max_queued=5, queue_timeout=10.0)
    assert await admission.enter("a", 1) == 0.0
    order: list[tuple[str, float]] = []

    async def waiter(name: str) -> None:
        queued = await admission.enter("a", 1)
        order.append((name, queued))
        await trio.sleep(1.0)
        admission.leave("a")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, "first")
        await trio.sleep(0.1)
        nursery.start_soon(waiter, "second")
        await trio.sleep(1.9)
        admission.leave("a")  # the holder finishes at t=2
    assert order == [("first", pytest.approx(2.0)), ("second", pytest.approx(2.9))]
    assert admission.statistics()["a"].in_flight == 0


async def test_full_queue_is_refused_at_once(autojump_clock: trio.testing.MockClock) -> None:
    admission = Admission(max_queued=0, queue_timeout=10.0)
    await admission.enter("a", 1)
    started = trio.current_time()
    with pytest.raises(InferenceError) as refused:
        await admission.enter("a", 1)
    assert refused.value.kind is Kind.OVERLOADED
    assert trio.current_time() == started
    assert "max_concurrent_requests 1" in refused.value.message
    assert refused.value.retry_after == 10.0  # nothing finished yet: the queue timeout


async def test_queue_timeout_refuses_with_a_retry_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission(max_queued=5, queue_timeout=3.0)
    await admission.enter("a", 1)
    started = trio.current_time()
    with pytest.raises(InferenceError) as refused:
        await admission.enter("a", 1)
    assert trio.current_time() - started == pytest.approx(3.0)
    assert "queue_timeout_secs" in refused.value.message
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1.0
    assert admission.statistics()["a"].queued == 0


async def test_a_cancelled_waiter_leaves_the_queue_and_a_granted_one_its_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission(max_queued=5, queue_timeout=30.0)
    await admission.enter("a", 1)
    with trio.move_on_after(1.0):
        await admission.enter("a", 1)
    assert admission.statistics()["a"].queued == 0
    admission.leave("a")
    assert admission.statistics()["a"].in_flight == 0

    # Cancelled, then granted in the same instant: the slot must come back.
    await admission.enter("a", 1)
    with trio.CancelScope() as scope:

        async def grant_then_cancel() -> None:
            await trio.sleep(1.0)
            scope.cancel()  # the waiter will raise Cancelled...
            admission.leave("a")  # ...though the slot was handed to it meanwhile

        async with trio.open_nursery() as nursery:
            nursery.start_soon(grant_then_cancel)
            await admission.enter("a", 1)
    assert admission.statistics()["a"].in_flight == 0
    admission.forget("a")
    assert admission.statistics() == {}


async def test_the_task_free_checks_take_a_slot_or_say_why_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission(max_queued=1, queue_timeout=10.0)
    assert admission.try_enter("a", 1)
    assert not admission.try_enter("a", 1)  # full
    assert admission.refusal("a", 1) is None  # but there is room to wait

    async def waiter() -> None:
        await admission.enter("a", 1)
        admission.leave("a")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(0.1)
        refused = admission.refusal("a", 1)
        assert refused is not None and refused.kind is Kind.OVERLOADED
        assert refused.retry_after is not None and refused.retry_after >= 1
        assert not admission.try_enter("a", 1)  # a free slot goes to the waiter first
        admission.leave("a")
    assert admission.statistics()["a"].in_flight == 0
