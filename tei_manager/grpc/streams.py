"""Concurrent, ordered processing of a request stream inside a streaming handler."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

import trio

from tei_manager.grpc.rpc import GrpcError, StatusCode

In = TypeVar("In")
Out = TypeVar("Out")


class _Slot(Generic[Out]):
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Out | None = None
        self.error: BaseException | None = None


async def ordered_map(
    nursery: trio.Nursery,
    requests: AsyncIterator[In],
    fn: Callable[[In], Awaitable[Out]],
    *,
    max_in_flight: int,
) -> AsyncIterator[Out]:
    """Run ``fn`` on each request concurrently (at most ``max_in_flight`` at once)
    and yield the results in request order.

    The work runs in ``nursery`` (the call's, see ``CallContext.nursery``), so this
    generator holds no nursery across its ``yield``. The first failure, in order,
    is raised at its position and ends the stream.
    """
    send, receive = trio.open_memory_channel[_Slot[Out]](math.inf)
    limiter = trio.Semaphore(max_in_flight)

    async def work(slot: _Slot[Out], request: In) -> None:
        try:
            slot.result = await fn(request)
        except Exception as error:  # handed to the consumer, raised in order there
            slot.error = error
        finally:
            limiter.release()
            slot.done.set()

    async def feed() -> None:
        async with send:
            try:
                async for request in requests:
                    await limiter.acquire()
                    slot: _Slot[Out] = _Slot()
                    nursery.start_soon(work, slot, request)
                    send.send_nowait(slot)
            except Exception as error:  # e.g. the client reset the stream
                failed: _Slot[Out] = _Slot()
                failed.error = error
                failed.done.set()
                send.send_nowait(failed)

    nursery.start_soon(feed)
    async with receive:
        async for slot in receive:
            await slot.done.wait()
            if slot.error is not None:
                raise slot.error
            if slot.result is None:
                raise GrpcError(StatusCode.INTERNAL, "a stream item produced no result")
            yield slot.result
