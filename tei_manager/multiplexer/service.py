"""``tei_multiplexer.v1.TeiMultiplexer``: every tei.v1 RPC, relayed to a managed instance.

The relay works on message bytes. A wrapped request is ``{1: Target, 2: tei.v1
request}``: :mod:`~tei_manager.multiplexer.wire` finds the target and slices out the
inner request, which goes to the instance untouched; the instance's reply is
already the ``tei.v1`` response the client expects and comes back untouched. No
protobuf message is built on the way, so a relayed call costs little more than
its HTTP/2 work.

``EmbedArrow`` / ``EmbedSparseArrow`` / ``EmbedArrowStream`` route here and embed
in :mod:`~tei_manager.multiplexer.arrow_relay`: each non-null text is one message of
a single ``EmbedStream`` (``EmbedSparseStream``) call to the instance, so the
instance batches them as it likes, and the answer has one row per input row, with
an ``error`` for each row that failed.

Unary calls take a path with no task of their own (:class:`_UnaryRelay`) when the
instance's connection is up: the request is passed on from the client
connection's reader, and the reply from the instance connection's reader. Only a
call that would have to wait (no connection yet, a short flow-control window)
runs the ordinary handler, which does the same with a task.

A unary call routed by ``model_id`` that never got an answer (no connection, a
refused stream, a connection lost before any reply) is sent once more to another
running replica (:mod:`~tei_manager.multiplexer.failover`); Arrow calls keep at
most the instance's ``max_concurrent_requests`` texts in flight, shared with every
other Arrow call to it (the pool's :class:`~tei_manager.multiplexer.pool.Pacer`).

Deadlines: a unary call gets at most ``request_timeout`` (and the client's own
deadline, which travels to the instance as ``grpc-timeout``), counted from when its
instance runs: the cold start of an on-demand instance has its own bound (its
``startup_timeout_secs``, and the client's deadline); a stream fails after
``stream_idle_timeout`` without a message in either direction. A client that
cancels cancels the instance's call. Statuses from the instance pass through
unchanged; failures of the relay itself name the instance.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Final

import trio
from google.protobuf.message import DecodeError

from tei_manager._proto.tei.v1 import tei_grpc
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tei_manager.config import DEFAULT_STREAM_BATCHES
from tei_manager.core.instances import InstanceRecord, InstanceStatus
from tei_manager.core.routing import Router
from tei_manager.errors import TeiError, quote
from tei_manager.gateway.admission import Admission
from tei_manager.gateway.errors import InferenceError
from tei_manager.grpc.calls import CallContext, FastCall, FastUnaryHandler, ServerCall
from tei_manager.grpc.channel import Call, Channel, Metadata
from tei_manager.grpc.rpc import GrpcError, MethodSpec, StatusCode, pushback_ms, status_code
from tei_manager.grpc.transport import MessageReceived, ResponseEnded, Stream
from tei_manager.multiplexer import arrow, arrow_relay
from tei_manager.multiplexer.arrow_stream import serve_stream
from tei_manager.multiplexer.failover import (
    CLOSED,
    CONNECT,
    Failover,
    Outcome,
    call_failure,
    retry_model,
    stream_failure,
)
from tei_manager.multiplexer.metrics import UNROUTED, CallMetrics, MultiplexerMetrics
from tei_manager.multiplexer.pool import ConnectionPool
from tei_manager.multiplexer.routing_key import call_target
from tei_manager.multiplexer.wire import Target, WireError, parse_target, split_request

__all__ = ["Multiplexer", "relayed_metadata"]

#: Client metadata that authenticates the client to us, never passed on to an instance.
_CREDENTIALS = frozenset({"authorization", "x-ssl-client-cert"})


def relayed_metadata(metadata: Metadata) -> Metadata:
    """``metadata`` without the client's credentials (its API key, JWT or certificate)."""
    for key, _ in metadata:  # a loop, not any(): no generator on every relayed call
        if key in _CREDENTIALS:
            return tuple(item for item in metadata if item[0] not in _CREDENTIALS)
    return metadata


log = logging.getLogger(__name__)

Spec = MethodSpec[Any, Any]

#: Timeout messages kept (one per instance name); far more than a host runs.
_TIMEOUT_MESSAGES: Final = 4096


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
        """The call goes to ``instance`` (again: a retry moves it there)."""
        if self._series is not None:
            self._series.in_flight -= 1
        self._series = self._metrics.call(instance, self._method)
        self._series.in_flight += 1

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
            series.in_flight -= 1
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
        admission: Admission,
        request_timeout: float,
        stream_idle_timeout: float,
        arrow_dtype: arrow.Dtype = "f32",
        stream_batches: int = DEFAULT_STREAM_BATCHES,
    ) -> None:
        """``arrow_dtype``: dense Arrow answers' float type when a request leaves it
        unspecified; ``stream_batches``: batches of one EmbedArrowStream run at once."""
        self._router = router
        self._admission = admission
        self._pool = pool
        self._metrics = metrics
        self._request_timeout = request_timeout
        self._stream_idle_timeout = stream_idle_timeout
        self._arrow_dtype = arrow_dtype
        self._stream_batches = stream_batches
        self._failover = Failover(router, metrics)
        # Each unary call carries its timeout message; made once per instance name.
        self._timeout_messages: dict[str, str] = {}

    # -- routing ---------------------------------------------------------------------
    def _resolve(self, data: bytes, metadata: Metadata) -> tuple[InstanceRecord, bytes, str | None]:
        """The instance a wrapped request goes to, the inner request's bytes, and the
        model it may fail over within (see :func:`retry_model`)."""
        try:
            target_bytes, inner = split_request(data)
            target = None if target_bytes is None else parse_target(target_bytes)
        except WireError as error:
            raise GrpcError(
                StatusCode.INVALID_ARGUMENT, f"could not decode the request: {error}"
            ) from None
        target, record = self._choose(target, metadata)
        return record, inner, retry_model(target)

    def _choose(
        self, target: Target | None, metadata: Metadata
    ) -> tuple[Target | None, InstanceRecord]:
        """The target (``target`` or the call's ``x-tei-*`` metadata) and its instance;
        a routing failure as the status the client gets."""
        try:
            target = call_target(target, metadata)
            return target, self._router.choose(target)
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
    def fast_unary(self, spec: Spec) -> FastUnaryHandler | None:
        backend = _BACKENDS.get(spec.name)  # None for the Arrow methods
        return None if backend is None else partial(self._relay_unary, backend)

    def _relay_unary(self, backend: Spec, call: FastCall, data: bytes) -> bool:
        """Route a unary call and pass its request on, from the client connection's reader.

        The instance's reply answers it from the instance connection's reader; a
        call that has to wait (a connection to make, a short window) goes on in a task.
        """
        try:
            target_bytes, inner = split_request(data)
            target = None if target_bytes is None else parse_target(target_bytes)
            target = call_target(target, call.context.metadata)
            record = self._router.choose(target)
        except WireError as error:
            self._refuse(
                call, backend, StatusCode.INVALID_ARGUMENT, f"could not decode the request: {error}"
            )
            return True
        except TeiError as error:
            self._refuse(call, backend, error.grpc_status, error.message)
            return True
        name = record.name
        if record.status is InstanceStatus.RUNNING:  # else timed once it runs (_relay_later)
            call.limit(call.started + self._request_timeout, self._timed_out(name))
        relay = _UnaryRelay(
            call, record, self._router, self._admission, self._metrics.call(name, backend.name)
        )
        relay.start()
        model = retry_model(target)
        if model is not None:
            relay.model = model
            relay.retry = partial(self._fail_over, backend, inner)
        limit = record.config.max_concurrent_requests
        if self._admission.try_enter(name, limit):
            relay.admitted = name
            self._dispatch(relay, backend, record, inner)
            return True
        refusal = self._admission.refusal(name, limit)
        if refusal is not None:  # not even a place in the queue: no task for it
            _answer(call, _overloaded(refusal))
            return True
        call.spawn(self._admit_later, relay, backend, record, inner)
        return True

    async def _admit_later(
        self, relay: _UnaryRelay, backend: Spec, record: InstanceRecord, inner: bytes
    ) -> None:
        """Wait in the instance's admission queue, then send the call on."""
        call = relay.call
        if call.done:  # the client left before the task began
            return
        name = record.name
        with trio.CancelScope() as scope:  # cancelled when the call ends
            relay.scope = scope
            try:
                await self._queue(record, backend.name)
            except GrpcError as error:
                _answer(call, error)
                return
            if call.done:  # it ended as the slot came
                self._admission.leave(name)
                return
            relay.admitted = name
        relay.scope = None
        if scope.cancelled_caught or relay.admitted is None:
            return
        self._dispatch(relay, backend, record, inner)

    @asynccontextmanager
    async def _admitted(self, record: InstanceRecord, method: str) -> AsyncIterator[None]:
        """Hold an admission slot on ``record`` (waiting in its queue) for the block."""
        name = record.name
        if not self._admission.try_enter(name, record.config.max_concurrent_requests):
            await self._queue(record, method)
        try:
            yield
        finally:
            self._admission.leave(name)

    async def _queue(self, record: InstanceRecord, method: str) -> None:
        """Wait in ``record``'s admission queue for a slot (pair it with ``leave``);
        a refusal (queue full, waited too long) as RESOURCE_EXHAUSTED with pushback."""
        try:
            waited = await self._admission.enter(record.name, record.config.max_concurrent_requests)
        except InferenceError as error:
            raise _overloaded(error) from None
        self._metrics.queued.labels(method=method).observe(waited)

    def _dispatch(
        self, relay: _UnaryRelay, backend: Spec, record: InstanceRecord, inner: bytes
    ) -> None:
        """Send the call to ``record`` from here if its connection is up, else in a task."""
        call = relay.call
        channel = self._pool.ready(record)
        stream = None
        if channel is not None:
            stream = channel.relay(
                backend,
                inner,
                deadline=call.deadline,
                watcher=relay.on_reply,
                metadata=relayed_metadata(call.context.metadata),
            )
        if stream is not None:
            relay.stream = stream
        else:
            call.spawn(self._relay_later, relay, backend, record, inner)

    def _fail_over(self, backend: Spec, inner: bytes, relay: _UnaryRelay, reason: str) -> bool:
        """A task-free call failed unanswered: send it to another replica; False if none."""
        record = self._reroute(relay, backend, reason)
        if record is None:
            return False
        self._dispatch(relay, backend, record, inner)
        return True

    def _reroute(self, relay: _UnaryRelay, backend: Spec, reason: str) -> InstanceRecord | None:
        """Move a call that may fail over (once) to another replica; None if it may not."""
        model = relay.model
        if model is None:
            return None
        relay.model = None  # once only
        record = self._failover.reroute(model, relay.record, backend.name, reason)
        if record is not None:
            relay.move_to(record, self._metrics.call(record.name, backend.name))
        return record

    def _refuse(self, call: FastCall, backend: Spec, code: StatusCode, message: str) -> None:
        series = self._metrics.call(UNROUTED, backend.name)
        call.on_end = lambda final: series.finished(trio.current_time() - call.started, final)
        call.reply(None, code, message)

    async def _relay_later(
        self, relay: _UnaryRelay, backend: Spec, record: InstanceRecord, inner: bytes
    ) -> None:
        call = relay.call
        if call.done:  # the client left before the task began
            return
        with trio.CancelScope(deadline=call.deadline) as scope:
            relay.scope = scope
            cold = await self._started(record)
            call.limit(trio.current_time() + self._request_timeout, self._timed_out(record.name))
            scope.deadline = call.deadline
            outcome = await self._exchange_failing_over(
                backend,
                record,
                inner,
                relayed_metadata(call.context.metadata),
                partial(self._reroute, relay, backend),
                cold,
            )
            call.reply(outcome.reply, outcome.code, outcome.message)
        if scope.cancelled_caught:  # moot if the call ended otherwise meanwhile
            call.reply(None, StatusCode.DEADLINE_EXCEEDED, call.deadline_message)

    async def _unary(self, call: ServerCall, context: CallContext, backend: Spec) -> None:
        """A unary call the reader could not pass on (its request never came, say)."""
        with _Observed(self._metrics, backend.name) as observed:
            record, inner, model = self._resolve(await self._first_request(call), context.metadata)
            observed.routed(record.name)
            current = record  # the replica the call is at (a retry moves it)

            def reroute(reason: str) -> InstanceRecord | None:
                nonlocal model, current
                if model is None:
                    return None
                moved = self._failover.reroute(model, current, backend.name, reason)
                model = None  # once only
                if moved is not None:
                    self._router.end(current.name)
                    self._router.begin(moved.name)
                    observed.routed(moved.name)
                    current = moved
                return moved

            # The slot stays with the first replica if the call fails over.
            async with self._admitted(record, backend.name):
                with self._router.track(record.name):
                    cold = await self._started(record)
                with trio.move_on_after(self._request_timeout) as timer:
                    self._router.begin(record.name)
                    try:
                        outcome = await self._exchange_failing_over(
                            backend,
                            record,
                            inner,
                            relayed_metadata(context.metadata),
                            reroute,
                            cold,
                        )
                    finally:
                        self._router.end(current.name)
                    if outcome.reply is not None:
                        await call.send(outcome.reply)
            if timer.cancelled_caught:
                raise GrpcError(StatusCode.DEADLINE_EXCEEDED, self._timed_out(current.name))
            if outcome.code is not StatusCode.OK:
                raise GrpcError(outcome.code, outcome.message)

    async def _started(self, record: InstanceRecord) -> Outcome | None:
        """Wait for an on-demand instance's cold start (the pool's ``before_connect``,
        bounded by its startup timeout and the client's deadline) before the call's
        own ``request_timeout`` starts; None once it runs, else the failure."""
        if record.status is InstanceStatus.RUNNING:
            return None
        try:
            await self._pool.channel(record)
        except GrpcError as error:
            return Outcome(None, error.code, _naming(error, record.name), CONNECT)
        return None

    async def _exchange_failing_over(
        self,
        backend: Spec,
        record: InstanceRecord,
        inner: bytes,
        metadata: Metadata,
        reroute: Callable[[str], InstanceRecord | None],
        first: Outcome | None = None,
    ) -> Outcome:
        """:meth:`_exchange`, sent again where ``reroute`` moves the call (it says
        None when the call may not move, or no other replica runs) after an
        attempt that never got an answer; ``first``: the outcome of an attempt
        already made (a cold start that failed)."""
        outcome = first
        while True:
            if outcome is None:
                outcome = await self._exchange(backend, record, inner, metadata)
            if outcome.retry is None:
                return outcome
            moved = reroute(outcome.retry)
            if moved is None:
                return outcome
            record = moved
            outcome = None

    async def _exchange(
        self, backend: Spec, record: InstanceRecord, inner: bytes, metadata: Metadata
    ) -> Outcome:
        """One unary call to the instance (connecting first if needed): reply and status,
        and whether it may be retried elsewhere (it never got an answer)."""
        name = record.name
        try:
            channel = await self._pool.channel(record)
            await channel.wait_for_stream_slot()  # over the instance's stream limit: queue
        except GrpcError as error:
            return Outcome(None, error.code, _naming(error, name), CONNECT)
        try:
            relayed = channel.start_call(backend, metadata=metadata)
        except GrpcError as error:  # closed or going away since it was pooled
            return Outcome(None, error.code, _naming(error, name), CLOSED)
        reply = None
        try:
            await relayed.send_raw(inner)
            await relayed.done_writing()
            reply = await relayed.receive_raw()
            if reply is None:
                return Outcome(None, StatusCode.INTERNAL, _no_response(name))
            await relayed.receive_raw()  # the status
            return Outcome(reply, StatusCode.OK, "")
        except GrpcError as error:
            failure = _from_instance(error, relayed, name)
            retry = call_failure(
                error,
                replied=reply is not None or relayed.answered,
                connection_usable=channel.usable,
            )
            return Outcome(reply, failure.code, failure.message, retry)
        finally:
            relayed.close()

    def _timed_out(self, name: str) -> str:
        message = self._timeout_messages.get(name)
        if message is None:
            if len(self._timeout_messages) >= _TIMEOUT_MESSAGES:
                self._timeout_messages.clear()  # names of deleted instances
            message = self._timeout_messages[name] = (
                f"instance {quote(name)} did not answer within "
                f"{self._request_timeout:g} s (grpc_request_timeout_secs)"
            )
        return message

    # -- streams -----------------------------------------------------------------------
    async def _stream(self, call: ServerCall, context: CallContext, backend: Spec) -> None:
        """Relay a client or bidi stream; the first message's target picks the instance."""
        with _Observed(self._metrics, backend.name) as observed:
            record, inner, _ = self._resolve(await self._first_request(call), context.metadata)
            name = record.name
            observed.routed(name)
            async with self._admitted(record, backend.name):
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
        async with channel.open_call(
            backend, metadata=relayed_metadata(context.metadata)
        ) as relayed:
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
        request_type: type[arrow_relay.ArrowRequest],
    ) -> None:
        with _Observed(self._metrics, method) as observed:
            request = _arrow_request(await self._first_request(call), request_type, method)
            options = arrow_relay.arrow_options(request, self._arrow_dtype)
            async with self._arrow_instance(request, options, context, observed) as instance:
                payload = await arrow_relay.answer(instance, options, request.arrow_ipc)
            await call.send(_arrow_response(payload))

    async def _arrow_stream(self, call: ServerCall, context: CallContext) -> None:
        """EmbedArrowStream: the first request's target and options hold for every batch."""
        method = "EmbedArrowStream"
        with _Observed(self._metrics, method) as observed:
            request = _arrow_request(
                await self._first_request(call), multiplexer_pb2.EmbedArrowRequest, method
            )
            options = arrow_relay.arrow_options(request, self._arrow_dtype)
            async with self._arrow_instance(request, options, context, observed) as instance:
                await serve_stream(
                    call,
                    request.arrow_ipc,
                    options,
                    instance,
                    concurrency=self._stream_batches,
                    idle_timeout=self._stream_idle_timeout,
                )

    @asynccontextmanager
    async def _arrow_instance(
        self,
        request: arrow_relay.ArrowRequest,
        options: arrow_relay.ArrowOptions,
        context: CallContext,
        observed: _Observed,
    ) -> AsyncIterator[arrow_relay.ArrowInstance | None]:
        """The instance an Arrow call embeds on, for the whole call; None for ``noop``."""
        if options.noop:
            yield None
            return
        routing = request.target.WhichOneof("routing") if request.HasField("target") else None
        target = None if routing is None else (routing, getattr(request.target, routing))
        _, record = self._choose(target, context.metadata)
        name = record.name
        observed.routed(name)
        with self._router.track(name):
            channel = await self._pool.channel(record)
            yield arrow_relay.ArrowInstance(
                name,
                channel,
                self._pool.pacer(record),
                relayed_metadata(context.metadata),
                self._stream_idle_timeout,
            )

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

    async def EmbedArrowStream(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        await self._arrow_stream(call, context)

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


class _UnaryRelay:
    """One routed unary call's bookkeeping, and its answer from the instance's events.

    The call is in flight from :meth:`start`; its work is the instance's ``stream``
    (read by :meth:`on_reply`) or a task under ``scope``, stopped when the call ends.
    A call that may fail over has its ``model`` and a ``retry`` hook, which sends
    it elsewhere (:meth:`move_to`) when its stream fails unanswered.
    """

    __slots__ = (
        "_admission",
        "_reply",
        "_router",
        "_series",
        "admitted",
        "call",
        "model",
        "record",
        "retry",
        "scope",
        "stream",
    )

    def __init__(
        self,
        call: FastCall,
        record: InstanceRecord,
        router: Router,
        admission: Admission,
        series: CallMetrics,
    ) -> None:
        self.call = call
        self.record = record
        self._router = router
        self._admission = admission
        #: The instance whose admission slot the call holds, if any.
        self.admitted: str | None = None
        self._series = series
        self._reply: bytes | None = None
        self.stream: Stream | None = None
        self.scope: trio.CancelScope | None = None
        self.model: str | None = None
        self.retry: Callable[[_UnaryRelay, str], bool] | None = None

    def start(self) -> None:
        self._router.begin(self.record.name)
        self._series.in_flight += 1
        self.call.on_end = self._ended

    def move_to(self, record: InstanceRecord, series: CallMetrics) -> None:
        """The call goes to ``record`` instead: its failed stream is let go."""
        self._forget_stream()
        self._router.end(self.record.name)
        self._series.in_flight -= 1
        # The slot moves too if the new replica has one free; else the retry goes
        # on without (it already waited its turn once).
        self._leave()
        if self._admission.try_enter(record.name, record.config.max_concurrent_requests):
            self.admitted = record.name
        self.record = record
        self._series = series
        self._router.begin(record.name)
        series.in_flight += 1

    def on_reply(self, stream: Stream) -> None:
        """The instance's stream has news (its watcher): answer once its status is in."""
        while (event := stream.pop_event()) is not None:
            kind = type(event)
            if kind is MessageReceived:
                if self._reply is None:
                    self._reply = event.data  # type: ignore[union-attr]
            elif kind is ResponseEnded:
                code = status_code(event.status)  # type: ignore[union-attr]
                if code is StatusCode.OK and self._reply is None:
                    self.call.reply(None, StatusCode.INTERNAL, _no_response(self.record.name))
                else:
                    self.call.reply(self._reply, code, event.status_message)  # type: ignore[union-attr]
                return
        error = stream.error
        if error is not None:
            if self._reply is None and self.retry is not None and not self.call.done:
                reason = stream_failure(stream)
                if reason is not None and self.retry(self, reason):
                    return
            self.call.reply(None, error.code, _naming(error, self.record.name))

    def _forget_stream(self) -> None:
        stream = self.stream
        if stream is not None:
            self.stream = None
            stream.watcher = None
            if stream.response_ended is None and stream.error is None:
                stream.cancel()  # the client left or the deadline passed: stop the instance
            stream.release()

    def _leave(self) -> None:
        name, self.admitted = self.admitted, None
        if name is not None:
            self._admission.leave(name)

    def _ended(self, code: StatusCode) -> None:
        self._forget_stream()
        self._leave()
        if self.scope is not None:
            self.scope.cancel()
        self._router.end(self.record.name)
        self._series.in_flight -= 1
        self._series.finished(trio.current_time() - self.call.started, code)


def _overloaded(refusal: InferenceError) -> GrpcError:
    """An admission refusal as RESOURCE_EXHAUSTED with its retry delay as pushback."""
    after = refusal.retry_after
    return GrpcError(
        StatusCode.RESOURCE_EXHAUSTED,
        refusal.message,
        retry_pushback_ms=None if after is None else pushback_ms(after),
    )


def _answer(call: FastCall, error: GrpcError) -> None:
    """End a task-free call with ``error``'s status (and pushback, if any)."""
    call.reply(None, error.code, error.message, retry_pushback_ms=error.retry_pushback_ms)


def _no_response(name: str) -> str:
    return f"instance {quote(name)} ended the call without a response"


def _naming(error: GrpcError, name: str) -> str:
    """A relay failure's message, naming the instance unless it already does."""
    if error.message.startswith("instance "):
        return error.message
    return f"instance {quote(name)}: {error.message}"


def _from_instance(error: GrpcError, relayed: Call[Any, Any], name: str) -> GrpcError:
    """The instance's own status unchanged; a relay failure (connection lost) naming it."""
    if relayed.answered:
        return error
    return GrpcError(error.code, _naming(error, name))


def _arrow_request(
    data: bytes, request_type: type[arrow_relay.ArrowRequest], method: str
) -> arrow_relay.ArrowRequest:
    try:
        return request_type.FromString(data)
    except DecodeError:
        raise GrpcError(
            StatusCode.INVALID_ARGUMENT, f"could not decode the {method} request"
        ) from None


def _arrow_response(payload: bytes) -> bytes:
    # EmbedArrowResponse and EmbedSparseArrowResponse: {1: arrow_ipc}, encoded alike.
    return multiplexer_pb2.EmbedArrowResponse(arrow_ipc=payload).SerializeToString()


#: The tei.v1 method each multiplexer method relays to, by name.
_BACKENDS: dict[str, Spec] = {
    spec.name: spec
    for servicer in (
        tei_grpc.InfoServicer,
        tei_grpc.EmbedServicer,
        tei_grpc.PredictServicer,
        tei_grpc.RerankServicer,
        tei_grpc.TokenizeServicer,
    )
    for spec in servicer.METHODS
}
