"""``EmbedArrowStream``: one answer per request batch, in arrival order, several
batches at once.

The first request's target and options hold for the whole stream; later requests
are read for ``arrow_ipc`` only. Each batch is embedded as an ``EmbedArrow`` call
would be (:func:`~tei_manager.multiplexer.arrow_relay.answer`). The stream reads a
request only while fewer than its concurrency limit of batches are read and not
yet answered: a client that sends faster than its batches complete is held back by
HTTP/2 flow control, and finished answers wait, in order, in at most that many
slots.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from functools import partial

import trio
from google.protobuf.message import DecodeError

from tei_manager._proto.tei_multiplexer.v1 import multiplexer_pb2 as mux
from tei_manager.grpc.calls import ServerCall
from tei_manager.grpc.rpc import GrpcError, StatusCode
from tei_manager.multiplexer.arrow_relay import ArrowInstance, ArrowOptions, answer

__all__ = ["serve_stream"]


class _Batch:
    """One request batch of a stream: its answer or its failure, once done."""

    __slots__ = ("done", "failure", "payload")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.payload = b""
        self.failure: GrpcError | None = None


async def serve_stream(
    call: ServerCall,
    first_ipc: bytes,
    options: ArrowOptions,
    instance: ArrowInstance | None,
    *,
    concurrency: int,
    idle_timeout: float,
) -> None:
    """Answer every request of an ``EmbedArrowStream``, one answer per request, in order.

    At most ``concurrency`` batches are read and not yet answered: the next request
    is read only when one of them is, so a fast client is held back by flow control
    and finished answers wait in at most that many slots. A batch's failure ends the
    stream with its status, once the answers before it are sent. A client silent for
    ``idle_timeout`` while no batch is in progress ends it with DEADLINE_EXCEEDED.
    """
    places = trio.Semaphore(concurrency - 1)  # the first batch is read already
    to_send, in_order = trio.open_memory_channel[_Batch](concurrency)
    failures: list[GrpcError] = []
    in_progress = 0
    waiting: trio.CancelScope | None = None  # the read of the next request

    async def run(batch: _Batch, data: bytes | None) -> None:
        try:
            ipc = first_ipc if data is None else _stream_ipc(data)
            batch.payload = await answer(instance, options, ipc)
        except GrpcError as error:
            batch.failure = error
        batch.done.set()

    async def read(nursery: trio.Nursery) -> None:
        nonlocal in_progress, waiting
        data: bytes | None = None  # the first request, already read
        async with to_send:
            while True:
                batch = _Batch()
                in_progress += 1
                nursery.start_soon(run, batch, data)
                to_send.send_nowait(batch)  # room: at most `concurrency` are queued
                await places.acquire()  # read no further ahead than the limit
                idle_at = math.inf if in_progress else trio.current_time() + idle_timeout
                with trio.CancelScope(deadline=idle_at) as waiting:
                    data = await call.receive()
                if waiting.cancelled_caught:
                    raise GrpcError(
                        StatusCode.DEADLINE_EXCEEDED,
                        f"no request for {idle_timeout:g} s with nothing in progress "
                        "(grpc_request_timeout_secs)",
                    )
                waiting = None
                if data is None:
                    return

    async def write() -> None:
        nonlocal in_progress
        async with in_order:
            async for batch in in_order:
                await batch.done.wait()
                if batch.failure is not None:
                    raise batch.failure
                await call.send(mux.EmbedArrowResponse(arrow_ipc=batch.payload).SerializeToString())
                batch.payload = b""
                in_progress -= 1
                places.release()
                if not in_progress and waiting is not None:
                    waiting.deadline = trio.current_time() + idle_timeout

    async with trio.open_nursery() as nursery:

        async def guarded(direction: Callable[[], Awaitable[None]]) -> None:
            try:
                await direction()
            except GrpcError as error:
                failures.append(error)
                nursery.cancel_scope.cancel()

        nursery.start_soon(guarded, partial(read, nursery))
        nursery.start_soon(guarded, write)
    if failures:
        raise failures[0]


def _stream_ipc(data: bytes) -> bytes:
    """A later request of a stream: only its ``arrow_ipc`` counts."""
    try:
        return mux.EmbedArrowRequest.FromString(data).arrow_ipc
    except DecodeError:
        raise GrpcError(
            StatusCode.INVALID_ARGUMENT, "could not decode an EmbedArrowStream request"
        ) from None
