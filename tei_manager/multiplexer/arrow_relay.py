"""Arrow calls on one instance: a batch's texts embedded with per-row failures, and
``EmbedArrowStream``'s batches run side by side and answered in order.

A batch's texts go as the messages of one tei.v1 ``EmbedStream``
(``EmbedSparseStream``) call, as many in flight as the instance's pacer allows, so
the instance batches them itself. A tei.v1 stream ends at its first failure, so a
row the instance refuses is isolated like this: the replies before the failure are
kept; if the status came from the instance and is one a single input earns
(INVALID_ARGUMENT: empty, too long, a prompt it does not know), the first
unanswered row is asked again alone, as a unary call — its answer or its refusal is
that row's — and the rest go on in a new stream. After :data:`MAX_RESTARTS` such
restarts in one batch (many bad rows), the remaining rows go as unary calls, side by
side within the pacer, so a batch of bad rows costs one call per row, never a
restart per row. Any other failure (the instance gone, overloaded, the wrong kind of
model, a deadline) fails the whole batch.

A stream reads a request only while fewer than its concurrency limit of batches are
read and not yet answered: a client that sends faster than its batches complete is
held back by HTTP/2 flow control, and answers wait in order in at most that many
slots.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Final

import msgspec
import trio
from google.protobuf.message import DecodeError

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_pb2 as mux
from tei_manager.errors import quote
from tei_manager.grpc.channel import Call, Channel, Metadata
from tei_manager.grpc.rpc import GrpcError, MethodSpec, StatusCode
from tei_manager.grpc.server import ServerCall
from tei_manager.multiplexer import arrow
from tei_manager.multiplexer.pool import Pacer

__all__ = [
    "MAX_RESTARTS",
    "ArrowInstance",
    "ArrowOptions",
    "ArrowRequest",
    "answer",
    "arrow_options",
    "embed",
    "serve_stream",
]

ArrowRequest = mux.EmbedArrowRequest | mux.EmbedSparseArrowRequest
Spec = MethodSpec[Any, Any]

#: Restarts of a batch's stream after a refused row; beyond, one unary call per row.
MAX_RESTARTS: Final = 8
#: Statuses that one input earns (TEI's validation errors); any other fails the batch.
_ROW_CODES: Final = frozenset({StatusCode.INVALID_ARGUMENT})
#: An ``error`` cell holds at most this much of the instance's message.
_ERROR_CHARS: Final = 1024

_DTYPES: Final[dict[int, arrow.Dtype]] = {mux.OUTPUT_DTYPE_F32: "f32", mux.OUTPUT_DTYPE_F16: "f16"}


class ArrowOptions(msgspec.Struct, frozen=True, kw_only=True):
    """What an Arrow request asks of every row (the first request's, for a stream)."""

    sparse: bool = False
    noop: bool = False
    truncate: bool = False
    normalize: bool = False
    truncation_direction: int = tei_pb2.TRUNCATION_DIRECTION_RIGHT
    prompt_name: str | None = None
    dimensions: int | None = None
    compression: arrow.Compression = None
    dtype: arrow.Dtype = "f32"

    def messages(self, texts: Sequence[str]) -> list[bytes]:
        """One serialized tei.v1 request per text."""
        fields: dict[str, Any] = {
            "truncate": self.truncate,
            "truncation_direction": self.truncation_direction,
        }
        if self.prompt_name is not None:
            fields["prompt_name"] = self.prompt_name
        if self.sparse:
            sparse = tei_pb2.EmbedSparseRequest
            return [sparse(inputs=text, **fields).SerializeToString() for text in texts]
        fields["normalize"] = self.normalize
        if self.dimensions is not None:
            fields["dimensions"] = self.dimensions
        dense = tei_pb2.EmbedRequest
        return [dense(inputs=text, **fields).SerializeToString() for text in texts]

    @property
    def stream_spec(self) -> Spec:
        return tei_grpc.Embed.EmbedSparseStream if self.sparse else tei_grpc.Embed.EmbedStream

    @property
    def unary_spec(self) -> Spec:
        return tei_grpc.Embed.EmbedSparse if self.sparse else tei_grpc.Embed.Embed


def arrow_options(request: ArrowRequest, default_dtype: arrow.Dtype) -> ArrowOptions:
    """The options of ``request``; an enum value we do not know is INVALID_ARGUMENT."""
    if request.compression == mux.ARROW_COMPRESSION_LZ4:
        compression: arrow.Compression = "lz4"
    elif request.compression == mux.ARROW_COMPRESSION_NONE:
        compression = None
    else:
        raise GrpcError(
            StatusCode.INVALID_ARGUMENT,
            f"compression: {request.compression} is not an ArrowCompression (0 none, 1 lz4)",
        )
    prompt_name = request.prompt_name if request.HasField("prompt_name") else None
    if isinstance(request, mux.EmbedSparseArrowRequest):
        return ArrowOptions(
            sparse=True,
            noop=request.noop,
            truncate=request.truncate,
            truncation_direction=request.truncation_direction,
            prompt_name=prompt_name,
            compression=compression,
        )
    if request.output_dtype == mux.OUTPUT_DTYPE_UNSPECIFIED:
        dtype = default_dtype
    elif request.output_dtype in _DTYPES:
        dtype = _DTYPES[request.output_dtype]
    else:
        raise GrpcError(
            StatusCode.INVALID_ARGUMENT,
            f"output_dtype: {request.output_dtype} is not an OutputDtype "
            "(0 unspecified, 1 f32, 2 f16)",
        )
    return ArrowOptions(
        noop=request.noop,
        truncate=request.truncate,
        normalize=request.normalize,
        truncation_direction=request.truncation_direction,
        prompt_name=prompt_name,
        dimensions=request.dimensions if request.HasField("dimensions") else None,
        compression=compression,
        dtype=dtype,
    )


class ArrowInstance(msgspec.Struct, frozen=True):
    """The instance an Arrow call embeds on, and how to reach it."""

    name: str
    channel: Channel
    #: Its ``max_concurrent_requests`` places, shared by every Arrow call to it.
    pacer: Pacer
    metadata: Metadata
    #: A call with messages in flight and no reply for this long fails.
    idle_timeout: float


# -- one batch ---------------------------------------------------------------------
async def answer(instance: ArrowInstance | None, options: ArrowOptions, ipc: bytes) -> bytes:
    """The Arrow answer to one request batch; ``instance`` None for ``noop``."""
    try:
        column = arrow.read_texts(ipc)
        texts = column.texts
    except arrow.ArrowInputError as error:
        raise GrpcError(StatusCode.INVALID_ARGUMENT, f"arrow_ipc: {error.message}") from None
    if instance is None or options.noop:
        if options.sparse:
            return arrow.noop_sparse(column, compression=options.compression)
        return arrow.noop_dense(column, dtype=options.dtype, compression=options.compression)
    results = await embed(instance, options, texts)
    try:
        if options.sparse:
            sparse: list[arrow.SparseRow | str] = [
                r
                if isinstance(r, str)
                else arrow.sparse_row(tei_pb2.EmbedSparseResponse.FromString(r))
                for r in results
            ]
            payload = await trio.to_thread.run_sync(
                lambda: arrow.write_sparse(column, sparse, compression=options.compression)
            )
        else:
            dense = [r if isinstance(r, str) else arrow.embed_response_floats(r) for r in results]
            dim = options.dimensions or arrow.NOOP_DIM  # used only when every row failed
            payload = await trio.to_thread.run_sync(
                lambda: arrow.write_dense(
                    column, dense, dim=dim, dtype=options.dtype, compression=options.compression
                )
            )
    except (ValueError, DecodeError) as error:
        raise GrpcError(
            StatusCode.INTERNAL, f"instance {quote(instance.name)} answered badly: {error}"
        ) from None
    return payload


async def embed(
    instance: ArrowInstance, options: ArrowOptions, texts: Sequence[str]
) -> list[bytes | str]:
    """Per text in order: the instance's serialized reply, or why it refused that text.

    A failure that is not one row's raises (GrpcError).
    """
    messages = options.messages(texts)
    results: list[bytes | str] = []
    restarts = 0
    while len(results) < len(messages):
        rest = messages[len(results) :]
        if restarts > MAX_RESTARTS:
            results.extend(await _each(instance, options.unary_spec, rest))
            break
        replies, failure = await _feed(instance, options.stream_spec, rest)
        results.extend(replies)
        if failure is None:
            if len(replies) != len(rest):
                raise GrpcError(
                    StatusCode.INTERNAL,
                    f"instance {quote(instance.name)} answered {len(results)} "
                    f"of {len(messages)} texts",
                )
            break
        if failure.code not in _ROW_CODES or len(replies) == len(rest):
            raise failure
        # The stream stopped at a refused row: the first one unanswered, or (an
        # instance that fails out of order) a later one. Asked alone, it answers
        # for itself.
        restarts += 1
        await instance.pacer.acquire()
        try:
            results.append(await _ask(instance, options.unary_spec, messages[len(results)]))
        finally:
            instance.pacer.release()
    return results


class _RowRefused(GrpcError):
    """The instance's own status, of a kind one input earns."""


async def _feed(
    instance: ArrowInstance, spec: Spec, messages: list[bytes]
) -> tuple[list[bytes], GrpcError | None]:
    """Send ``messages`` over one stream call: the replies in order, and the failure
    that ended it early (a :class:`_RowRefused` when the instance refused a row).

    Each message takes a place of the instance's pacer until its reply is in, so
    the instance never holds more than it accepts, whatever the batch size and
    however many calls share it; calls send in turn, first come first served. The
    idle timeout runs only while this call has messages in flight: waiting for its
    turn or a place is not idleness.
    """
    name = instance.name
    pacer = instance.pacer
    idle_timeout = instance.idle_timeout
    replies: list[bytes] = []
    failures: list[GrpcError] = []
    held = 0  # places of the pacer this call holds
    try:
        async with instance.channel.open_call(spec, metadata=instance.metadata) as relayed:
            with trio.CancelScope(deadline=trio.current_time() + idle_timeout) as idle:
                async with trio.open_nursery() as nursery:

                    async def send_all() -> None:
                        nonlocal held
                        try:
                            idle.deadline = math.inf  # waiting for its turn
                            async with pacer.turn:
                                for message in messages:
                                    if not held:
                                        idle.deadline = math.inf
                                    await pacer.acquire()
                                    held += 1
                                    if idle.deadline == math.inf:
                                        idle.deadline = trio.current_time() + idle_timeout
                                    await relayed.send_raw(message)
                            await relayed.done_writing()
                        except GrpcError as error:
                            failures.append(_relay_error(error, relayed, name))
                            nursery.cancel_scope.cancel()

                    nursery.start_soon(send_all)
                    try:
                        while (reply := await relayed.receive_raw()) is not None:
                            if held:  # (more replies than messages fail below)
                                held -= 1
                                pacer.release()
                            idle.deadline = trio.current_time() + idle_timeout
                            replies.append(reply)
                    except GrpcError as error:
                        failures.append(_relay_error(error, relayed, name))
                    nursery.cancel_scope.cancel()
    finally:
        pacer.release(held)
    if failures:
        # The instance's status explains more than a send that failed because of it.
        refused = [f for f in failures if isinstance(f, _RowRefused)]
        return replies, (refused or failures)[0]
    if idle.cancelled_caught:
        raise GrpcError(
            StatusCode.DEADLINE_EXCEEDED,
            f"instance {quote(name)} sent nothing for {idle_timeout:g} s "
            "(grpc_request_timeout_secs)",
        )
    if len(replies) > len(messages):
        raise GrpcError(
            StatusCode.INTERNAL,
            f"instance {quote(name)} answered {len(replies)} of {len(messages)} texts",
        )
    return replies, None


async def _each(instance: ArrowInstance, spec: Spec, messages: list[bytes]) -> list[bytes | str]:
    """One unary call per message, side by side within the pacer; results in order."""
    results: list[bytes | str] = [""] * len(messages)

    async def one(index: int) -> None:
        try:
            results[index] = await _ask(instance, spec, messages[index])
        finally:
            instance.pacer.release()

    async with trio.open_nursery() as nursery:
        for index in range(len(messages)):
            await instance.pacer.acquire()
            nursery.start_soon(one, index)
    return results


async def _ask(instance: ArrowInstance, spec: Spec, message: bytes) -> bytes | str:
    """One text as a unary call (its pacer place held by the caller): its reply, or
    the instance's reason when it refused that text."""
    name = instance.name
    with trio.move_on_after(instance.idle_timeout) as timer:
        async with instance.channel.open_call(spec, metadata=instance.metadata) as call:
            try:
                await call.send_raw(message)
                await call.done_writing()
                reply = await call.receive_raw()
                if reply is not None:
                    await call.receive_raw()  # the status
                    return reply
            except GrpcError as error:
                failure = _relay_error(error, call, name)
                if isinstance(failure, _RowRefused):
                    return _row_error(failure.message)
                raise failure from None
            raise GrpcError(
                StatusCode.INTERNAL, f"instance {quote(name)} ended the call without a response"
            )
    assert timer.cancelled_caught
    raise GrpcError(
        StatusCode.DEADLINE_EXCEEDED,
        f"instance {quote(name)} did not answer within {instance.idle_timeout:g} s "
        "(grpc_request_timeout_secs)",
    )


def _relay_error(error: GrpcError, call: Call[Any, Any], name: str) -> GrpcError:
    """The instance's own status unchanged (a row's as :class:`_RowRefused`); a failure
    of the relay itself (connection lost) naming the instance."""
    if call.answered:
        if error.code in _ROW_CODES:
            return _RowRefused(error.code, error.message)
        return error
    if error.message.startswith("instance "):
        return error
    return GrpcError(error.code, f"instance {quote(name)}: {error.message}")


def _row_error(message: str) -> str:
    message = message or "refused by the instance"
    return message if len(message) <= _ERROR_CHARS else message[: _ERROR_CHARS - 3] + "..."


# -- EmbedArrowStream ----------------------------------------------------------------
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
