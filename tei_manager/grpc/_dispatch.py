"""Per-call dispatch for ``GrpcServer``: from a call's headers to its handler and
back to its status.

``CallDispatcher`` holds the method table and runs each call the transport reports:
it asks the authorizer first, hands a unary call whose method has a fast handler to
it once the request message is in (``calls.FastCall``, no task), and otherwise
starts a task that parses the requests, runs the handler under the client's
deadline and sends the status. It counts the running calls, so the server's
shutdown can wait for them, and ends fast calls at their deadlines.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

import trio
from google.protobuf.message import DecodeError, Message

from tei_manager import tracing
from tei_manager.grpc._grpc_events import MessageReceived, RequestReceived
from tei_manager.grpc.calls import (
    Authorizer,
    CallContext,
    CallObserver,
    CallRefusal,
    FastCall,
    FastUnaryHandler,
    Responder,
    ServerCall,
)
from tei_manager.grpc.rpc import (
    Cardinality,
    GrpcError,
    MethodSpec,
    Servicer,
    StatusCode,
    client_text,
)
from tei_manager.grpc.transport import Stream

# Its records keep the name they had when this was part of server.py.
log = logging.getLogger("tei_manager.grpc.server")

Handler = Callable[..., Any]


class CallDispatcher:
    """Runs the calls of every connection of one server."""

    def __init__(self, *, on_call: CallObserver | None, authorize: Authorizer | None) -> None:
        self._on_call = on_call
        self.authorize = authorize
        self._methods: dict[str, tuple[MethodSpec[Any, Any], Handler, bool]] = {}
        self._fast: dict[str, FastUnaryHandler] = {}
        # Calls taken by fast handlers and not yet answered; the sweeper task ends
        # those past their deadline and sleeps until the earliest one (_sweep_at).
        self._fast_calls: set[FastCall] = set()
        self._sweep_at = math.inf
        self._sweep_scope: trio.CancelScope | None = None
        self._active_calls = 0
        self._idle = trio.Event()
        self._idle.set()

    def add_servicer(self, servicer: Servicer) -> None:
        for spec in servicer.METHODS:
            self._methods[spec.path] = (spec, getattr(servicer, spec.name), servicer.RAW)
            fast = None
            if servicer.RAW and spec.cardinality is Cardinality.UNARY_UNARY:
                fast = servicer.fast_unary(spec)
            if fast is not None:
                self._fast[spec.path] = fast
            else:
                self._fast.pop(spec.path, None)

    @property
    def service_names(self) -> list[str]:
        return sorted({spec.service for spec, _, _ in self._methods.values()})

    @property
    def active_calls(self) -> int:
        """Calls running now (their handlers, or fast calls not yet ended)."""
        return self._active_calls

    async def wait_idle(self) -> None:
        """Return once no call is running."""
        await self._idle.wait()

    def request_handler(
        self, peer: str | None, certificate: bytes | None, calls: trio.Nursery
    ) -> Callable[[Stream], None]:
        """The transport's ``on_request`` for one connection: its call tasks run in
        ``calls``."""
        fast_handlers = self._fast

        def on_request(call: Stream) -> None:
            request = call.request
            assert request is not None
            if self.authorize is not None and self._refuse(call, peer, certificate):
                return
            if request.path in fast_handlers:
                # Wait for the request message: a fast handler may take it.
                call.watcher = first_event
            else:
                calls.start_soon(self._serve_call, call, peer, certificate)

        def first_event(call: Stream) -> None:
            call.watcher = None
            if not self._start_fast(call, peer, certificate, calls):
                calls.start_soon(self._serve_call, call, peer, certificate)

        return on_request

    async def _serve_call(
        self, stream: Stream, peer: str | None, certificate: bytes | None
    ) -> None:
        request = stream.request
        assert request is not None
        path = request.path
        entry = self._methods.get(path)
        if entry is None:
            stream.send_status(
                StatusCode.UNIMPLEMENTED,
                f"method {client_text(path)} is not implemented",
                headers_sent=False,
            )
            self._finish(stream)
            return
        spec, handler, raw = entry
        self._call_started()
        context = _context(spec, request, peer, certificate)
        responder = Responder(stream)
        code, message = StatusCode.CANCELLED, "cancelled"
        pushback: int | None = None
        started = trio.current_time()
        trace = None
        try:
            if tracing.tracer is not None:
                trace = tracing.start_server(context)
            limit = context.deadline if context.deadline is not None else math.inf
            with trio.CancelScope(deadline=limit) as scope:
                stream.handler_scope = scope
                try:
                    code, message = StatusCode.OK, ""
                    if raw:
                        await handler(ServerCall(stream, responder), context)
                    elif spec.cardinality.server_streaming:
                        try:
                            async with trio.open_nursery() as call_nursery:
                                context.nursery = call_nursery
                                await _dispatch(spec, handler, stream, context, responder)
                                call_nursery.cancel_scope.cancel()
                        except BaseExceptionGroup as group:
                            # The call's status, not a crash: a handler's GrpcError
                            # arrives wrapped by the call nursery.
                            status, rest = group.split(GrpcError)
                            if status is None or rest is not None:
                                raise
                            raise _first_leaf(status) from None
                    else:
                        await _dispatch(spec, handler, stream, context, responder)
                except GrpcError as error:
                    code, message = error.code, error.message
                    pushback = error.retry_pushback_ms
                except Exception:
                    log.exception("unhandled error in gRPC handler %s", path)
                    code, message = StatusCode.INTERNAL, f"internal error while handling {path}"
            if scope.cancelled_caught:
                if stream.reset or stream.connection_closed:
                    code = StatusCode.CANCELLED
                    return
                code, message = StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
            stream.send_status(
                code,
                message,
                headers_sent=responder.headers_sent,
                retry_pushback_ms=None if responder.headers_sent else pushback,
            )
        finally:
            if self._on_call is not None:
                self._on_call(spec, trio.current_time() - started, code)
            if trace is not None:
                tracing.end_server(trace, code)
            self._finish(stream)
            self._call_ended()

    def _refuse(self, stream: Stream, peer: str | None, certificate: bytes | None) -> bool:
        """Ask the authorizer about a call whose headers just arrived; True if refused."""
        request = stream.request
        assert request is not None and self.authorize is not None
        entry = self._methods.get(request.path)
        # An unknown method is authenticated too, and answered UNIMPLEMENTED only
        # once allowed: else a peer without credentials could list our methods.
        spec = _unknown_method(request.path) if entry is None else entry[0]
        try:
            refusal = self.authorize(_context(spec, request, peer, certificate))
        except Exception:
            # It runs in the connection's reader (no await, so no Cancelled to
            # swallow): a bug there must fail this call, not the whole server.
            log.exception("authorizing %s from %s failed", request.path, peer)
            refusal = CallRefusal(
                StatusCode.INTERNAL, f"internal error while authorizing {request.path}"
            )
        if refusal is None:
            return False
        stream.send_status(
            refusal.code,
            refusal.message,
            headers_sent=False,
            retry_pushback_ms=refusal.retry_pushback_ms,
        )
        self._finish(stream)
        return True

    # -- calls answered by fast handlers ----------------------------------------------
    def _start_fast(
        self, stream: Stream, peer: str | None, certificate: bytes | None, nursery: trio.Nursery
    ) -> bool:
        """Offer the call to its fast handler; False leaves it to the ordinary path."""
        event = stream.peek_event()
        request = stream.request
        if stream.error is not None or type(event) is not MessageReceived or request is None:
            return False
        assert isinstance(event, MessageReceived)
        path = request.path
        context = _context(self._methods[path][0], request, peer, certificate)
        call = FastCall(self, stream, context, nursery)
        if tracing.tracer is not None:
            call.trace = tracing.start_server(context)
        # Counted from here, as the handler may answer before it returns.
        self._call_started()
        try:
            taken = self._fast[path](call, event.data)
        except Exception:
            log.exception("unhandled error in gRPC handler %s", path)
            call.reply(None, StatusCode.INTERNAL, f"internal error while handling {path}")
            taken = True
        finally:
            if call.trace is not None:
                call.trace.detach()  # current in the handler and the tasks it started
        if not taken:  # the ordinary path serves (and traces) it; this span is let go
            self._call_ended()
            return False
        # Consumed: its credit goes back (unless the call already ended and was
        # released, which returned it).
        stream.pop_event()
        if not call.done:
            stream.watcher = call.watch_stream
            self._fast_calls.add(call)
            if call.deadline < self._sweep_at:
                self._sweep_at = call.deadline
                if self._sweep_scope is not None:
                    self._sweep_scope.deadline = call.deadline
        return True

    def fast_call_answered(self, call: FastCall) -> None:
        """``call``'s answer is decided: the deadline sweeper leaves it alone."""
        self._fast_calls.discard(call)

    def end_fast_call(self, call: FastCall, code: StatusCode) -> None:
        """``call`` ended with ``code``: observe it, tell its handler, release its stream."""
        stream = call.stream
        stream.watcher = None
        try:
            if self._on_call is not None:
                self._on_call(call.context.method, trio.current_time() - call.started, code)
            on_end, call.on_end = call.on_end, None
            if on_end is not None:
                on_end(code)
            if call.trace is not None:
                tracing.end_server(call.trace, code)
        except Exception:
            log.exception("error ending gRPC call %s", call.context.method.path)
        finally:
            self._finish(stream)
            self._call_ended()

    def _call_started(self) -> None:
        self._active_calls += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle

    def _call_ended(self) -> None:
        self._active_calls -= 1
        if self._active_calls == 0:
            self._idle.set()

    async def expire_fast_calls(self) -> None:
        """End fast calls at their deadlines."""
        while True:
            with trio.CancelScope(deadline=self._sweep_at) as self._sweep_scope:
                await trio.sleep_forever()
            now = trio.current_time()
            earliest = math.inf
            for call in list(self._fast_calls):
                if call.deadline <= now:
                    call.reply(None, StatusCode.DEADLINE_EXCEEDED, call.deadline_message)
                else:
                    earliest = min(earliest, call.deadline)
            self._sweep_at = earliest

    @staticmethod
    def _finish(stream: Stream) -> None:
        # Releasing a stream the client is still sending on resets it (NO_ERROR after
        # our answer): we answered before the client finished, so it should stop. The
        # answer leaves only now, so the call is counted before its client sees it.
        stream.release()


def _context(
    spec: MethodSpec[Any, Any],
    request: RequestReceived,
    peer: str | None,
    certificate: bytes | None,
) -> CallContext:
    """What the handler of a call just received may know about it."""
    deadline = None
    if request.timeout is not None:
        deadline = trio.current_time() + request.timeout
    return CallContext(spec, tuple(request.custom_metadata), peer, certificate, deadline)


def _unknown_method(path: str) -> MethodSpec[Any, Any]:
    """A method we do not serve, for the authorizer to judge by its path (which the
    protocol layer checked is ``/service/method``)."""
    _, service, name = path.split("/")
    return MethodSpec(service, name, Cardinality.UNARY_UNARY, Message, Message)


def _first_leaf(group: BaseExceptionGroup[GrpcError]) -> GrpcError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _parse(spec: MethodSpec[Any, Any], data: bytes) -> Message:
    try:
        message: Message = spec.request_type.FromString(data)
        return message
    except DecodeError:
        raise GrpcError(
            StatusCode.INTERNAL, f"could not decode the {spec.request_type.__name__} message"
        ) from None


async def _one_request(stream: Stream, spec: MethodSpec[Any, Any]) -> Message:
    data = await stream.receive_message()
    if data is None:
        raise GrpcError(StatusCode.INTERNAL, "the call ended without a request message")
    return _parse(spec, data)


async def _request_stream(
    stream: Stream, spec: MethodSpec[Any, Any]
) -> AsyncGenerator[Message, None]:
    while (data := await stream.receive_message()) is not None:
        yield _parse(spec, data)


async def _dispatch(
    spec: MethodSpec[Any, Any],
    handler: Handler,
    stream: Stream,
    context: CallContext,
    responder: Responder,
) -> None:
    cardinality = spec.cardinality
    if cardinality is Cardinality.UNARY_UNARY:
        await responder.send(await handler(await _one_request(stream, spec), context))
        return
    if cardinality is Cardinality.STREAM_UNARY:
        async with aclosing(_request_stream(stream, spec)) as requests:
            await responder.send(await handler(requests, context))
        return
    source: Any = (
        _request_stream(stream, spec)
        if cardinality is Cardinality.STREAM_STREAM
        else await _one_request(stream, spec)
    )
    responses: AsyncGenerator[Message, None] = handler(source, context)
    try:
        async with aclosing(responses):
            async for response in responses:
                await responder.send(response)
    finally:
        # Also when the handler fails part-way: a request generator left suspended
        # would be finalized by the garbage collector, with a ResourceWarning.
        if isinstance(source, AsyncGenerator):
            await source.aclose()
