"""TEI's request queue and dynamic batcher, in Trio.

Callers put already tokenized rows in one queue and wait. A single batcher task takes
as many rows from the front of the queue as fit ``max_batch_tokens`` (counted as the
batch will really be run: padded to its longest row) and ``max_batch_requests``, runs
them through the backend, and hands each caller its outputs. While one batch runs, new
rows keep queueing, which is what makes the next batch big.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar, cast

import msgspec
import trio

from tei_manager.worker.errors import EngineError, ErrorKind, validation
from tei_manager.worker.priority import lower_this_thread

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
OutT = TypeVar("OutT")
ItemT_contra = TypeVar("ItemT_contra", contravariant=True)
OutT_co = TypeVar("OutT_co", covariant=True)

OVERLOADED_MESSAGE = "Model is overloaded"
# Gathering after a batch: wait at most this fraction of the last batch's inference
# time, and never longer than this (see Batcher._gather). A tenth was too short for
# callers behind the multiplexer: 16 callers of a 65 ms batch came back over 7-10 ms,
# and batches of 16 fell apart into 11-12 rows on average.
GATHER_FRACTION = 0.2
GATHER_MAX_SECS = 0.02
STOPPED_MESSAGE = "the model server is shutting down"


class Backend(Protocol[ItemT_contra, OutT_co]):
    """Runs one batch: one output per item, in order."""

    async def infer(self, items: Sequence[ItemT_contra]) -> Sequence[OutT_co]: ...


class InThread(Generic[ItemT, OutT]):
    """A ``Backend`` that runs a blocking ``forward`` off the event loop, one batch at a time."""

    def __init__(self, forward: Callable[[Sequence[ItemT]], Sequence[OutT]]) -> None:
        self._forward = forward
        # One inference thread: batches are already as big as the limits allow, and
        # torch parallelises inside a batch.
        self._limiter = trio.CapacityLimiter(1)

    async def infer(self, items: Sequence[ItemT]) -> Sequence[OutT]:
        return await trio.to_thread.run_sync(self._run, items, limiter=self._limiter)

    def _run(self, items: Sequence[ItemT]) -> Sequence[OutT]:
        lower_this_thread()
        return self._forward(items)


class RowResult(msgspec.Struct, Generic[OutT], frozen=True):
    """One row's output and how long it waited in the queue and in inference (seconds)."""

    output: OutT
    queue_time: float
    inference_time: float


class BatcherStatistics(msgspec.Struct, frozen=True):
    """A snapshot of the queue and the batches run so far."""

    queued_rows: int
    admitted_requests: int
    max_concurrent_requests: int
    batches_run: int
    rows_run: int
    rows_dropped: int
    last_batch_rows: int
    last_batch_tokens: int
    inference_running: bool
    inference_time_total: float


class _Entry(Generic[ItemT, OutT]):
    __slots__ = (
        "abandoned",
        "done",
        "error",
        "inference_time",
        "item",
        "output",
        "queued_at",
        "started_at",
        "tokens",
    )

    def __init__(self, item: ItemT, tokens: int, queued_at: float) -> None:
        self.item = item
        self.tokens = tokens
        self.queued_at = queued_at
        self.started_at = queued_at
        self.inference_time = 0.0
        self.done = trio.Event()
        self.output: OutT | None = None
        self.error: EngineError | None = None
        self.abandoned = False  # its caller stopped waiting: skip it, drop its output

    def finish(self, output: OutT | None, error: EngineError | None) -> None:
        self.output = output
        self.error = error
        self.done.set()


class Batcher(Generic[ItemT, OutT]):
    """The queue, its admission limit and the task that turns it into batches."""

    def __init__(
        self,
        backend: Backend[ItemT, OutT],
        *,
        max_batch_tokens: int,
        max_batch_requests: int | None,
        max_concurrent_requests: int,
    ) -> None:
        self._backend = backend
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.max_concurrent_requests = max_concurrent_requests
        self._queue: deque[_Entry[ItemT, OutT]] = deque()
        self._queue_filled = trio.Event()
        self._running: list[_Entry[ItemT, OutT]] = []
        self._stopped = False  # run() has ended: nothing would answer new rows
        self._admitted = 0
        self._batches_run = 0
        self._rows_run = 0
        self._rows_dropped = 0
        self._last_batch_rows = 0
        self._last_batch_tokens = 0
        self._last_batch_seconds = 0.0
        self._inference_time_total = 0.0

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one of ``max_concurrent_requests`` places, or fail at once with OVERLOADED."""
        if self._admitted >= self.max_concurrent_requests:
            raise EngineError(ErrorKind.OVERLOADED, OVERLOADED_MESSAGE)
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    async def submit(self, rows: Sequence[tuple[ItemT, int]]) -> list[RowResult[OutT]]:
        """Queue ``(item, tokens)`` rows and wait for all their outputs, in order.

        If the caller is cancelled its rows are dropped (or their outputs ignored when
        already running); the other rows in the queue and the batcher carry on.
        """
        for _, tokens in rows:
            if tokens > self.max_batch_tokens:
                raise validation(
                    f"`inputs` must have less than {self.max_batch_tokens} tokens "
                    f"(max_batch_tokens). Given: {tokens}"
                )
        if self._stopped:
            raise EngineError(ErrorKind.BACKEND, STOPPED_MESSAGE)
        now = trio.current_time()
        entries = [_Entry[ItemT, OutT](item, tokens, now) for item, tokens in rows]
        self._queue.extend(entries)
        self._queue_filled.set()
        try:
            for entry in entries:
                await entry.done.wait()
                if entry.error is not None:
                    break  # the call has failed: its other rows need not run
        finally:
            for entry in entries:
                entry.abandoned = True
        results = []
        for entry in entries:
            if entry.error is not None:
                # A fresh exception per caller: one raised object shared between tasks
                # would collect every caller's traceback.
                raise EngineError(entry.error.kind, entry.error.message)
            results.append(
                RowResult(
                    cast(OutT, entry.output),  # set whenever error is None
                    queue_time=entry.started_at - entry.queued_at,
                    inference_time=entry.inference_time,
                )
            )
        return results

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Form and run batches until cancelled; waiting callers then fail with BACKEND."""
        self._stopped = False
        task_status.started()
        try:
            while True:
                # Taken before any checkpoint: the callers of the batch just run have
                # their rows but have not woken, so they still count as in the engine.
                expected = self._admitted
                if not self._queue:
                    self._queue_filled = trio.Event()
                    await self._queue_filled.wait()
                await self._gather(expected)
                batch = self._next_batch()
                if batch:
                    await self._run_batch(batch)
        finally:
            self._stopped = True
            stopped = EngineError(ErrorKind.BACKEND, STOPPED_MESSAGE)
            for entry in [*self._running, *self._queue]:
                entry.finish(None, stopped)
            self._queue.clear()

    async def _gather(self, expected: int) -> None:
        """Give callers just answered a moment to come back before a small batch starts.

        When a batch ends, its callers get their rows and send their next request
        within a few milliseconds (more through a relay or a network hop); starting at
        once would run a batch of the first few arrivals and leave the rest for the
        next, and small batches waste compute. So while fewer rows are queued than
        ``expected`` (the requests in the engine when the last batch ended), wait a
        little: a fifth of the last batch's inference time, at most ``GATHER_MAX_SECS``.
        A lone caller is never kept waiting.
        """
        target = expected
        if self.max_batch_requests is not None:
            target = min(target, self.max_batch_requests)
        if len(self._queue) >= target:
            return
        window = min(GATHER_MAX_SECS, GATHER_FRACTION * self._last_batch_seconds)
        with trio.move_on_after(window):
            while len(self._queue) < target:
                self._queue_filled = trio.Event()
                await self._queue_filled.wait()

    def statistics(self) -> BatcherStatistics:
        """Current queue length, admissions and batch counters."""
        return BatcherStatistics(
            queued_rows=len(self._queue),
            admitted_requests=self._admitted,
            max_concurrent_requests=self.max_concurrent_requests,
            batches_run=self._batches_run,
            rows_run=self._rows_run,
            rows_dropped=self._rows_dropped,
            last_batch_rows=self._last_batch_rows,
            last_batch_tokens=self._last_batch_tokens,
            inference_running=bool(self._running),
            inference_time_total=self._inference_time_total,
        )

    def _next_batch(self) -> list[_Entry[ItemT, OutT]]:
        """Take rows from the front while the padded batch stays within the limits."""
        batch: list[_Entry[ItemT, OutT]] = []
        longest = 0
        queue = self._queue
        while queue:
            entry = queue[0]
            if entry.abandoned:
                queue.popleft()
                self._rows_dropped += 1
                continue
            widest = max(longest, entry.tokens)
            if widest * (len(batch) + 1) > self.max_batch_tokens:
                break
            batch.append(queue.popleft())
            longest = widest
            if len(batch) == self.max_batch_requests:
                break
        return batch

    async def _run_batch(self, batch: list[_Entry[ItemT, OutT]]) -> None:
        started = trio.current_time()
        for entry in batch:
            entry.started_at = started
        # Left set if this task is cancelled mid-batch, so that run() can fail those rows.
        self._running = batch
        error = None
        outputs: Sequence[OutT | None]
        try:
            outputs = await self._backend.infer([entry.item for entry in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"backend returned {len(outputs)} outputs for {len(batch)} rows")
        except Exception as exc:  # trio.Cancelled is a BaseException and passes through
            log.exception("inference failed for a batch of %d rows", len(batch))
            error = EngineError(ErrorKind.BACKEND, f"inference failed: {exc}")
            outputs = [None] * len(batch)
        self._running = []
        elapsed = trio.current_time() - started
        self._inference_time_total += elapsed
        self._batches_run += 1
        self._rows_run += len(batch)
        self._last_batch_rows = len(batch)
        self._last_batch_seconds = elapsed
        self._last_batch_tokens = max(entry.tokens for entry in batch) * len(batch)
        for entry, output in zip(batch, outputs, strict=True):
            entry.inference_time = elapsed
            entry.finish(output, error)
