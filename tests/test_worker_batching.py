"""The queue and dynamic batcher, driven by a fake backend on a virtual clock."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from tei_manager.worker.batching import (
    GATHER_FRACTION,
    GATHER_MAX_SECS,
    Batcher,
    InThread,
    RowResult,
)
from tei_manager.worker.errors import EngineError, ErrorKind

BATCH_SECONDS = 1.0


class FakeBackend:
    """Takes ``BATCH_SECONDS`` a batch, records each batch, answers ``item * 10``."""

    def __init__(self, *, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on

    async def infer(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        await trio.sleep(BATCH_SECONDS)
        if self.fail_on in items:
            raise RuntimeError("boom")
        return [item * 10 for item in items]

    @property
    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]


def make(
    backend: FakeBackend,
    *,
    max_batch_tokens: int = 1000,
    max_batch_requests: int | None = None,
    max_concurrent_requests: int = 100,
) -> Batcher[int, int]:
    return Batcher(
        backend,
        max_batch_tokens=max_batch_tokens,
        max_batch_requests=max_batch_requests,
        max_concurrent_requests=max_concurrent_requests,
    )


async def call(
    batcher: Batcher[int, int],
    rows: list[tuple[int, int]],
    into: dict[int, list[RowResult[int]]],
    after: float = 0.0,
) -> None:
    """Wait ``after`` seconds, then submit ``rows`` as one admitted request."""
    await trio.sleep(after)
    with batcher.admit():
        into[rows[0][0]] = await batcher.submit(rows)


async def test_requests_that_arrive_during_a_batch_form_the_next_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = FakeBackend()
    batcher = make(backend)
    results: dict[int, list[RowResult[int]]] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        async with trio.open_nursery() as callers:
            callers.start_soon(call, batcher, [(0, 5)], results)
            for item in range(1, 10):  # all arrive while the first batch runs
                callers.start_soon(call, batcher, [(item, 5)], results, 0.25)
        nursery.cancel_scope.cancel()
    assert backend.sizes == [1, 9]
    assert {item: [r.output for r in rows] for item, rows in results.items()} == {
        item: [item * 10] for item in range(10)
    }
    # Queue time runs from enqueue to the start of the batch, inference for the batch.
    assert results[0][0].queue_time == 0
    # The nine waited for the first batch, then for its caller to come back (it never
    # does; the batcher gives up after its gather window).
    window = min(GATHER_MAX_SECS, GATHER_FRACTION * BATCH_SECONDS)
    assert results[5][0].queue_time == pytest.approx(BATCH_SECONDS - 0.25 + window)
    assert results[5][0].inference_time == pytest.approx(BATCH_SECONDS)
    stats = batcher.statistics()
    assert (stats.batches_run, stats.rows_run, stats.last_batch_rows) == (2, 10, 9)
    assert stats.last_batch_tokens == 45
    assert stats.inference_time_total == pytest.approx(2 * BATCH_SECONDS)


@pytest.mark.parametrize(
    ("limits", "tokens", "sizes"),
    [
        ({"max_batch_requests": 4}, [10] * 10, [4, 4, 2]),
        ({"max_batch_tokens": 35}, [10] * 10, [3, 3, 3, 1]),
        # Counted padded, as the batch really runs: the widest row times the rows.
        ({"max_batch_tokens": 40}, [5, 20, 5, 5, 40], [2, 2, 1]),
        ({"max_batch_tokens": 40, "max_batch_requests": 1}, [5, 5], [1, 1]),
    ],
)
async def test_batches_respect_the_limits(
    autojump_clock: trio.testing.MockClock,
    limits: dict[str, int],
    tokens: list[int],
    sizes: list[int],
) -> None:
    backend = FakeBackend()
    batcher = make(backend, **limits)
    results: dict[int, list[RowResult[int]]] = {}
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as callers:
            for item, count in enumerate(tokens):
                callers.start_soon(call, batcher, [(item, count)], results, item * 0.01)
            await trio.sleep(0.5)  # everything is queued before the batcher starts
            await nursery.start(batcher.run)
        nursery.cancel_scope.cancel()
    assert backend.sizes == sizes
    assert [item for batch in backend.batches for item in batch] == list(range(len(tokens)))
    assert len(results) == len(tokens)


async def test_a_multi_row_request_spreads_over_batches_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = FakeBackend()
    batcher = make(backend, max_batch_requests=4)
    results: dict[int, list[RowResult[int]]] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        await call(batcher, [(item, 3) for item in range(6)], results)
        nursery.cancel_scope.cancel()
    assert backend.sizes == [4, 2]
    assert [r.output for r in results[0]] == [0, 10, 20, 30, 40, 50]


async def test_over_max_concurrent_requests_is_refused_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = FakeBackend()
    batcher = make(backend, max_concurrent_requests=2)
    results: dict[int, list[RowResult[int]]] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        nursery.start_soon(call, batcher, [(1, 5)], results)
        nursery.start_soon(call, batcher, [(2, 5)], results)
        await trio.testing.wait_all_tasks_blocked()
        assert batcher.statistics().admitted_requests == 2
        before = trio.current_time()
        with pytest.raises(EngineError) as caught, batcher.admit():
            pass
        assert (caught.value.kind, caught.value.message) == (
            ErrorKind.OVERLOADED,
            "Model is overloaded",
        )
        assert trio.current_time() == before
        await trio.sleep(2 * BATCH_SECONDS)
        with batcher.admit():  # room again once the others are answered
            assert batcher.statistics().admitted_requests == 1
        nursery.cancel_scope.cancel()
    assert sorted(results) == [1, 2]


async def test_a_row_larger_than_max_batch_tokens_is_refused() -> None:
    batcher = make(FakeBackend(), max_batch_tokens=100)
    with pytest.raises(EngineError) as caught:
        await batcher.submit([(1, 10), (2, 101)])
    assert caught.value.kind is ErrorKind.VALIDATION
    assert "less than 100 tokens" in caught.value.message and "101" in caught.value.message
    assert batcher.statistics().queued_rows == 0


async def test_a_cancelled_waiter_is_dropped_and_the_others_are_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = FakeBackend()
    batcher = make(backend)
    results: dict[int, list[RowResult[int]]] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        async with trio.open_nursery() as callers:
            callers.start_soon(call, batcher, [(1, 5)], results)
            with trio.move_on_after(0.5):  # gives up while queued behind batch 1
                await call(batcher, [(2, 5)], results, 0.1)
            callers.start_soon(call, batcher, [(3, 5)], results, 0.1)
        assert batcher.statistics().admitted_requests == 0
        nursery.cancel_scope.cancel()
    assert backend.batches == [[1], [3]]  # item 2 never reached the backend
    assert sorted(results) == [1, 3]
    assert batcher.statistics().rows_dropped == 1


async def test_a_waiter_cancelled_mid_batch_does_not_disturb_the_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = FakeBackend()
    batcher = make(backend)
    results: dict[int, list[RowResult[int]]] = {}
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as callers:
            callers.start_soon(call, batcher, [(1, 5)], results)
            await trio.sleep(0.1)
            with trio.move_on_after(0.4 + BATCH_SECONDS / 2):  # gives up mid-batch
                async with trio.open_nursery() as inner:
                    inner.start_soon(call, batcher, [(2, 5)], results)
                    await trio.sleep(0.4)  # both rows are queued: they share the batch
                    await nursery.start(batcher.run)
        await call(batcher, [(3, 5)], results)  # the batcher carries on
        nursery.cancel_scope.cancel()
    assert backend.batches == [[1, 2], [3]]
    assert sorted(results) == [1, 3]
    assert results[1][0].output == 10


async def test_a_failed_batch_fails_its_rows_and_the_batcher_carries_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FakeBackend(fail_on=13)
    batcher = make(backend)
    errors: list[EngineError] = []

    async def failing(item: int) -> None:
        with pytest.raises(EngineError) as caught:
            await batcher.submit([(item, 5)])
        errors.append(caught.value)

    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        async with trio.open_nursery() as callers:
            callers.start_soon(failing, 13)
            callers.start_soon(failing, 14)
        [after] = await batcher.submit([(15, 5)])
        nursery.cancel_scope.cancel()
    assert after.output == 150
    assert [(e.kind, e.message) for e in errors] == [
        (ErrorKind.BACKEND, "inference failed: boom")
    ] * 2
    assert errors[0] is not errors[1]  # each caller raises its own exception
    assert "inference failed" in caplog.text


async def test_a_multi_row_call_stops_at_its_first_failed_row(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = FakeBackend(fail_on=13)
    batcher = make(backend, max_batch_requests=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        with pytest.raises(EngineError, match="boom"):
            await batcher.submit([(13, 5), (1, 5), (2, 5)])
        await trio.sleep(5 * BATCH_SECONDS)
        nursery.cancel_scope.cancel()
    # Row 1 was already taken when the failure was delivered; row 2 was dropped.
    assert backend.batches == [[13], [1]]
    assert batcher.statistics().rows_dropped == 1


async def test_stopping_the_batcher_fails_the_waiting_callers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = FakeBackend()
    batcher = make(backend)
    errors: list[EngineError] = []

    async def waiting(item: int) -> None:
        with pytest.raises(EngineError) as caught:
            await batcher.submit([(item, 5)])
        errors.append(caught.value)

    async with trio.open_nursery() as callers:
        callers.start_soon(waiting, 1)
        callers.start_soon(
            waiting,
            2,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            await trio.sleep(BATCH_SECONDS / 2)  # one row running, one queued
            nursery.cancel_scope.cancel()
    assert len(errors) == 2
    assert {(e.kind, e.message) for e in errors} == {
        (ErrorKind.BACKEND, "the model server is shutting down")
    }
    with pytest.raises(EngineError, match="shutting down"):  # and it does not wait forever
        await batcher.submit([(3, 5)])


async def test_in_thread_runs_forward_off_the_event_loop() -> None:
    loop_thread = threading.get_ident()
    threads: set[int] = set()

    def forward(items: Sequence[int]) -> list[int]:
        threads.add(threading.get_ident())
        return [item + 1 for item in items]

    backend: InThread[int, int] = InThread(forward)
    batcher: Batcher[int, int] = Batcher(
        backend, max_batch_tokens=100, max_batch_requests=None, max_concurrent_requests=10
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        rows = await batcher.submit([(1, 1), (2, 1)])
        nursery.cancel_scope.cancel()
    assert [row.output for row in rows] == [2, 3]
    assert threads and loop_thread not in threads


async def test_callers_just_answered_are_gathered_into_the_next_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Four clients in a loop: after a batch, they come back within a few ms and the
    batcher waits for them (up to a tenth of the last batch's time) instead of running
    the first arrival alone."""
    backend = FakeBackend()
    batcher = make(backend)

    async def client(item: int) -> None:
        for round_ in range(3):
            with batcher.admit():
                await batcher.submit([(item * 10 + round_, 5)])
            await trio.sleep(0.002 * (item + 1))  # the round trip of an answer and a request

    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        async with trio.open_nursery() as clients:
            for item in range(4):
                clients.start_soon(client, item)
        nursery.cancel_scope.cancel()
    assert backend.sizes == [4, 4, 4]


async def test_a_lone_caller_never_waits_for_company(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = FakeBackend()
    batcher = make(backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        for item in range(3):
            with batcher.admit():
                (result,) = await batcher.submit([(item, 5)])
            assert result.queue_time == 0
        nursery.cancel_scope.cancel()
    assert backend.sizes == [1, 1, 1]
