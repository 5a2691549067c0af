"""``tei_multiplexer.v1.TeiMultiplexer``: every tei.v1 RPC, relayed to a managed instance.

The relay works on message bytes. A wrapped request is ``{1: Target, 2: tei.v1
request}``: :mod:`~tei_manager.multiplexer.wire` finds the target and slices out the
inner request, which goes to the instance untouched; the instance's reply is
already the ``tei.v1`` response the client expects and comes back untouched. No
protobuf message is built on the way, so a relayed call costs little more than
its HTTP/2 work.

``EmbedArrow`` / ``EmbedSparseArrow`` read every record batch of the request, send
each non-null text as one message of a single ``EmbedStream`` (``EmbedSparseStream``)
call to the instance, all in flight at once so the instance batches them as it
likes, and answer one row per input row (null text, null row).

Deadlines: a unary call gets at most ``request_timeout`` (and the client's own
deadline, which travels to the instance as ``grpc-timeout``); a stream fails after
``stream_idle_timeout`` without a message in either direction. A client that
cancels cancels the instance's call. Statuses from the instance pass through
unchanged; failures of the relay itself name the instance.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from google.protobuf.message import DecodeError

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tei_manager.core.registry import InstanceRecord
from tei_manager.core.routing import Router
from tei_manager.errors import TeiError, quote
from tei_manager.grpc.channel import Call, Channel
from tei_manager.grpc.rpc import GrpcError, MethodSpec, StatusCode
from tei_manager.grpc.server import CallContext, ServerCall
from tei_manager.multiplexer import arrow
from tei_manager.multiplexer.metrics import UNROUTED, CallMetrics, MultiplexerMetrics
from tei_manager.multiplexer.pool import ConnectionPool
from tei_manager.multiplexer.wire import Target, WireError, parse_target, split_request

__all__ = ["Multiplexer"]

log = logging.getLogger(__name__)

Spec = MethodSpec[Any, Any]


class _Observed:
    """Metrics of one multiplexer call: in flight while routed, counted when done."""

    __slots__ = ("_method", "_metrics", "_series", "_started", "code")

    def __init__(self, metrics: MultiplexerMetrics, method: str) -> None:
        self._metrics = metrics
        self._method = method
        self._series: CallMetrics | None = None
        self._started = trio.current_time()
        self.code = StatusCode.OK

    def routed(self, instance: str) -> None:
        self._series = self._metrics.call(instance, self._method)
        self._series.in_flight.inc()

    def __enter__(self) -> _Observed:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: Any
    ) -> None:
        if isinstance(error, GrpcError):
            self.code = error.code
        elif error is not None:
            self.code = (
                StatusCode.CANCELLED if isinstance(error, trio.Cancelled) else StatusCode.INTERNAL
            )
        series = self._series
        if series is None:
            series = self._metrics.call(UNROUTED, self._method)
        else:
            series.in_flight.dec()
        series.finished(trio.current_time() - self._started, self.code)


class Multiplexer(multiplexer_grpc.TeiMultiplexerServicer):
    """The relay; ``RAW``: its handlers see message bytes (see :class:`ServerCall`)."""

    RAW = True

    def __init__(
        self,
        router: Router,
        pool: ConnectionPool,
        metrics: MultiplexerMetrics,
        *,
        request_timeout: float,
        stream_idle_timeout: float,
    ) -> None:
        self._router = router
        self._pool = pool
        self._metrics = metrics
        self._request_timeout = request_timeout
        self._stream_idle_timeout = stream_idle_timeout

    # -- routing ---------------------------------------------------------------------
    def _resolve(self, data: bytes) -> tuple[InstanceRecord, bytes]:
        """The instance a wrapped request goes to, and the inner request's bytes."""
        try:
            target_bytes, inner = split_request(data)
            target = None if target_bytes is None else parse_target(target_bytes)
        except WireError as error:
            raise GrpcError(
                StatusCode.INVALID_ARGUMENT, f"could not decode the request: {error}"
            ) from None
        return self._choose(target), inner

    def _choose(self, target: Target | None) -> InstanceRecord:
        """The instance for ``target``; a routing failure as the status the client gets."""
        try:
            return self._router.choose(target)
        except TeiError as error:
            raise GrpcError(error.grpc_status, error.message) from None

    async def _first_request(self, call: ServerCall) -> bytes:
        data = await call.receive()
        if data is None:
            raise GrpcError(
                StatusCode.INVALID_ARGUMENT,
                "no request received: the first message's target picks the instance",
            )
        return data

    # -- unary -----------------------------------------------------------------------
    async def _unary(self, call: ServerCall, context: CallContext, backend: Spec) -> None:
        with _Observed(self._metrics, backend.name) as observed:
            record, inner = self._resolve(await self._first_request(call))
            name = record.name
            observed.routed(name)
            router = self._router
            router.begin(name)
            try:
                channel = await self._pool.channel(record)
                with trio.move_on_after(self._request_timeout) as timer:
                    # The hot path: no context managers beyond the deadline's.
                    relayed = channel.start_call(backend, metadata=context.metadata)
                    try:
                        await relayed.send_raw(inner)
                        await relayed.done_writing()
                        reply = await relayed.receive_raw()
                        if reply is None:
                            raise GrpcError(
                                StatusCode.INTERNAL,
                                f"instance {quote(name)} ended the call without a response",
                            )
                        await call.send(reply)
                        await relayed.receive_raw()  # the status
                    except GrpcError as error:
                        raise _from_instance(error, relayed, name) from None
                    finally:
                        relayed.close()
            finally:
                router.end(name)
            if timer.cancelled_caught:
                raise GrpcError(
                    StatusCode.DEADLINE_EXCEEDED,
                    f"instance {quote(name)} did not answer within "
                    f"{self._request_timeout:g} s (grpc_request_timeout_secs)",
                )

    # -- streams -----------------------------------------------------------------------
    async def _stream(self, call: ServerCall, context: CallContext, backend: Spec) -> None:
        """Relay a client or bidi stream; the first message's target picks the instance."""
        with _Observed(self._metrics, backend.name) as observed:
            record, inner = self._resolve(await self._first_request(call))
            name = record.name
            observed.routed(name)
            with self._router.track(name):
                channel = await self._pool.channel(record)
                await self._relay_stream(call, context, backend, channel, name, inner)

    async def _relay_stream(
        self,
        call: ServerCall,
        context: CallContext,
        backend: Spec,
        channel: Channel,
        name: str,
        first: bytes,
    ) -> None:
        idle_timeout = self._stream_idle_timeout
        failures: list[GrpcError] = []
        async with channel.open_call(backend, metadata=context.metadata) as relayed:
            with trio.CancelScope(deadline=trio.current_time() + idle_timeout) as idle:

                def active() -> None:
                    idle.deadline = trio.current_time() + idle_timeout

                async with trio.open_nursery() as nursery:

                    async def guarded(direction: Callable[[], Awaitable[None]]) -> None:
                        try:
                            await direction()
                        except GrpcError as error:
                            failures.append(_from_instance(error, relayed, name))
                            nursery.cancel_scope.cancel()

                    async def requests() -> None:
                        await relayed.send_raw(first)
                        while (data := await call.receive()) is not None:
                            active()
                            try:
                                _, inner = split_request(data)
                            except WireError as error:
                                raise GrpcError(
                                    StatusCode.INVALID_ARGUMENT,
                                    f"could not decode a stream message: {error}",
                                ) from None
                            await relayed.send_raw(inner)
                        await relayed.done_writing()

                    async def replies() -> None:
                        while (reply := await relayed.receive_raw()) is not None:
                            active()
                            await call.send(reply)
                        # The instance ended the call: requests still unread are moot.
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(guarded, requests)
                    nursery.start_soon(guarded, replies)
        if failures:
            raise failures[0]
        if idle.cancelled_caught:
            raise GrpcError(
                StatusCode.DEADLINE_EXCEEDED,
                f"stream to instance {quote(name)} idle for {idle_timeout:g} s "
                "(grpc_request_timeout_secs)",
            )

    # -- Arrow -----------------------------------------------------------------------------
    async def _arrow(
        self,
        call: ServerCall,
        context: CallContext,
        method: str,
        request_type: type[multiplexer_pb2.EmbedArrowRequest]
        | type[multiplexer_pb2.EmbedSparseArrowRequest],
    ) -> None:
        with _Observed(self._metrics, method) as observed:
            try:
                request = request_type.FromString(await self._first_request(call))
            except DecodeError:
                raise GrpcError(
                    StatusCode.INVALID_ARGUMENT, f"could not decode the {method} request"
                ) from None
            try:
                column = arrow.read_texts(request.arrow_ipc)
                texts = column.texts
            except arrow.ArrowInputError as error:
                raise GrpcError(
                    StatusCode.INVALID_ARGUMENT, f"arrow_ipc: {error.message}"
                ) from None
            sparse = isinstance(request, multiplexer_pb2.EmbedSparseArrowRequest)
            if request.noop:
                payload = arrow.noop_sparse(column) if sparse else arrow.noop_dense(column)
                await call.send(_arrow_response(payload))
                return
            routing = request.target.WhichOneof("routing") if request.HasField("target") else None
            target = None if routing is None else (routing, getattr(request.target, routing))
            record = self._choose(target)
            name = record.name
            observed.routed(name)
            if isinstance(request, multiplexer_pb2.EmbedSparseArrowRequest):
                backend: Spec = tei_grpc.Embed.EmbedSparseStream
                messages: list[bytes] = [
                    tei_pb2.EmbedSparseRequest(
                        inputs=t, truncate=request.truncate
                    ).SerializeToString()
                    for t in texts
                ]
            else:
                backend = tei_grpc.Embed.EmbedStream
                messages = [
                    tei_pb2.EmbedRequest(
                        inputs=t, truncate=request.truncate, normalize=request.normalize
                    ).SerializeToString()
                    for t in texts
                ]
            with self._router.track(name):
                channel = await self._pool.channel(record)
                replies = await self._feed(channel, backend, context, name, messages)
            try:
                if sparse:
                    rows = [
                        arrow.sparse_row(tei_pb2.EmbedSparseResponse.FromString(r)) for r in replies
                    ]
                    payload = await trio.to_thread.run_sync(arrow.write_sparse, column, rows)
                else:
                    dense = [arrow.embed_response_floats(r) for r in replies]
                    payload = await trio.to_thread.run_sync(arrow.write_dense, column, dense)
            except (ValueError, DecodeError) as error:
                raise GrpcError(
                    StatusCode.INTERNAL, f"instance {quote(name)} answered badly: {error}"
                ) from None
            await call.send(_arrow_response(payload))

    async def _feed(
        self,
        channel: Channel,
        backend: Spec,
        context: CallContext,
        name: str,
        messages: list[bytes],
    ) -> list[bytes]:
        """Send ``messages`` over one stream call, all in flight; the replies in order."""
        if not messages:
            return []
        idle_timeout = self._stream_idle_timeout
        replies: list[bytes] = []
        failures: list[GrpcError] = []
        async with channel.open_call(backend, metadata=context.metadata) as relayed:
            with trio.CancelScope(deadline=trio.current_time() + idle_timeout) as idle:
                async with trio.open_nursery() as nursery:

                    async def send_all() -> None:
                        try:
                            for message in messages:
                                await relayed.send_raw(message)
                            await relayed.done_writing()
                        except GrpcError as error:
                            failures.append(_from_instance(error, relayed, name))
                            nursery.cancel_scope.cancel()

                    nursery.start_soon(send_all)
                    try:
                        while (reply := await relayed.receive_raw()) is not None:
                            idle.deadline = trio.current_time() + idle_timeout
                            replies.append(reply)
                    except GrpcError as error:
                        failures.append(_from_instance(error, relayed, name))
                    nursery.cancel_scope.cancel()
        if failures:
            raise failures[0]
        if idle.cancelled_caught:
            raise GrpcError(
                StatusCode.DEADLINE_EXCEEDED,
                f"instance {quote(name)} sent nothing for {idle_timeout:g} s "
                "(grpc_request_timeout_secs)",
            )
        if len(replies) != len(messages):
            raise GrpcError(
                StatusCode.INTERNAL,
                f"instance {quote(name)} answered {len(replies)} of {len(messages)} texts",
            )
        return replies

    # -- the service's methods ---------------------------------------------------------
    async def Info(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._unary(call, context, tei_grpc.Info.Info)

    async def Embed(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._unary(call, context, tei_grpc.Embed.Embed)

    async def EmbedStream(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._stream(call, context, tei_grpc.Embed.EmbedStream)

    async def EmbedSparse(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._unary(call, context, tei_grpc.Embed.EmbedSparse)

    async def EmbedSparseStream(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._stream(call, context, tei_grpc.Embed.EmbedSparseStream)

    async def EmbedAll(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._unary(call, context, tei_grpc.Embed.EmbedAll)

    async def EmbedAllStream(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._stream(call, context, tei_grpc.Embed.EmbedAllStream)

    async def EmbedArrow(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._arrow(call, context, "EmbedArrow", multiplexer_pb2.EmbedArrowRequest)

    async def EmbedSparseArrow(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._arrow(
            call, context, "EmbedSparseArrow", multiplexer_pb2.EmbedSparseArrowRequest
        )

    async def Predict(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._unary(call, context, tei_grpc.Predict.Predict)

    async def PredictStream(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._stream(call, context, tei_grpc.Predict.PredictStream)

    async def PredictPair(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._unary(call, context, tei_grpc.Predict.PredictPair)

    async def PredictPairStream(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._stream(call, context, tei_grpc.Predict.PredictPairStream)

    async def Rerank(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._unary(call, context, tei_grpc.Rerank.Rerank)

    async def RerankStream(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._stream(call, context, tei_grpc.Rerank.RerankStream)

    async def Tokenize(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._unary(call, context, tei_grpc.Tokenize.Tokenize)

    async def TokenizeStream(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._stream(call, context, tei_grpc.Tokenize.TokenizeStream)

    async def Decode(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._unary(call, context, tei_grpc.Tokenize.Decode)

    async def DecodeStream(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._stream(call, context, tei_grpc.Tokenize.DecodeStream)


def _from_instance(error: GrpcError, relayed: Call[Any, Any], name: str) -> GrpcError:
    """The instance's own status unchanged; a relay failure (connection lost) naming it."""
    if relayed.answered or error.message.startswith("instance "):
        return error
    return GrpcError(error.code, f"instance {quote(name)}: {error.message}")


def _arrow_response(payload: bytes) -> bytes:
    # EmbedArrowResponse and EmbedSparseArrowResponse: {1: arrow_ipc}, encoded alike.
    return multiplexer_pb2.EmbedArrowResponse(arrow_ipc=payload).SerializeToString()
