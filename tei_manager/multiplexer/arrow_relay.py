"""Arrow calls on one instance: a batch's texts embedded, with per-row failures.

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

``EmbedArrowStream`` runs several such batches at once: see
:mod:`~tei_manager.multiplexer.arrow_stream`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

import msgspec
import trio
from google.protobuf.message import DecodeError

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_pb2 as mux
from tei_manager.errors import quote
from tei_manager.grpc.channel import Call, Channel, Metadata
from tei_manager.grpc.rpc import GrpcError, MethodSpec, StatusCode
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
