"""The gRPC server: our trio transport and gRPC protocol layer serving servicers.

What it guarantees (each has a test in tests/test_grpc_server.py): binds the
configured host without ``reuse_port``; TLS contexts advertise ALPN "h2"; the peer
certificate reaches handlers; the message-size limit is configurable and an
oversized message fails only its call with RESOURCE_EXHAUSTED; a client's
RST_STREAM or connection loss cancels the handler and ``grpc-timeout`` bounds it
(DEADLINE_EXCEEDED); handler exceptions become INTERNAL with a clean message;
cancellation at shutdown logs nothing. What one peer may make it hold is bounded by
its ``Limits`` (connections per listener here; the rest in the transport and below,
tested in tests/test_grpc_limits.py).
"""

from __future__ import annotations

import errno
import logging
import math
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from contextlib import aclosing
from typing import Any, NamedTuple

import trio
from google.protobuf.message import DecodeError, Message

from tei_manager.grpc._grpc_events import MessageReceived, RequestReceived
from tei_manager.grpc.limits import DEFAULT_LIMITS, Limits
from tei_manager.grpc.rpc import (
    Cardinality,
    GrpcError,
    MethodSpec,
    Servicer,
    StatusCode,
    client_text,
    over_limit,
)
from tei_manager.grpc.transport import Stream, Transport

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 40 * 1024 * 1024
#: accept() errors that mean "out of a resource for now": back off and retry
#: (trio's serve_listeners list); any other error ends the server.
_ACCEPT_BACKOFF_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF_SECS = 0.1

Handler = Callable[..., Any]
#: Called once per finished call with its method, duration in seconds and status.
CallObserver = Callable[[MethodSpec[Any, Any], float, StatusCode], None]


class CallRefusal(NamedTuple):
    """An authorizer's "no": the call ends at once with this status."""

    code: StatusCode
    message: str
    retry_pushback_ms: int | None = None  # for RESOURCE_EXHAUSTED: when to retry


#: Decides, as a call's headers arrive, whether it may run (see ``GrpcServer.authorize``).
Authorizer = Callable[["CallContext"], CallRefusal | None]


class CallContext:
    """What a handler may know about its call."""

    __slots__ = ("deadline", "metadata", "method", "nursery", "peer", "peer_certificate")

    def __init__(
        self,
        method: MethodSpec[Any, Any],
        metadata: tuple[tuple[str, str], ...],
        peer: str | None,
        peer_certificate: bytes | None,
        deadline: float | None,
    ) -> None:
        self.method = method
        self.metadata = metadata
        self.peer = peer
        #: DER bytes of the client certificate on a mutual-TLS connection.
        self.peer_certificate = peer_certificate
        #: trio clock deadline from the client's ``grpc-timeout``, if any.
        self.deadline = deadline
        #: For server-streaming calls: a nursery that lives as long as the call,
        #: for work a response generator runs concurrently (it must not open
        #: its own nursery across a ``yield``). Its tasks must not raise.
        self.nursery: trio.Nursery | None = None

    def time_remaining(self) -> float | None:
        """Seconds left before the client's deadline (None when it set none)."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - trio.current_time())

    def metadata_value(self, key: str) -> str | None:
        for name, value in self.metadata:
            if name == key:
                return value
        return None

    def metadata_values(self, key: str) -> list[str]:
        """Every value sent for ``key``, in order."""
        return [value for name, value in self.metadata if name == key]


def server_ssl_context(
    certfile: str, keyfile: str, *, client_ca: str | None = None
) -> ssl.SSLContext:
    """A TLS context for gRPC: ALPN "h2" (grpcio refuses TLS without it), optional mTLS."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    if client_ca is not None:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    return context


def _parse(spec: MethodSpec[Any, Any], data: bytes) -> Message:
    try:
        message: Message = spec.request_type.FromString(data)
        return message
    except DecodeError:
        raise GrpcError(
            StatusCode.INTERNAL, f"could not decode the {spec.request_type.__name__} message"
        ) from None


class ServerCall:
    """A call's messages as bytes, for raw servicers (``Servicer.RAW``) that relay them."""

    __slots__ = ("_responder", "_stream")

    def __init__(self, stream: Stream, responder: _Responder) -> None:
        self._stream = stream
        self._responder = responder

    async def receive(self) -> bytes | None:
        """The next request message, or None once the client finished sending."""
        return await self._stream.receive_message()

    async def send(self, data: bytes) -> None:
        """Send one serialized response message (the response headers go first)."""
        await self._responder.send_bytes(data)


#: A servicer's task-free handler for a unary method (see ``Servicer.fast_unary``).
FastUnaryHandler = Callable[["FastCall", bytes], bool]


class FastCall:
    """A unary call answered from callbacks, with no task of its own.

    For a relay whose work happens on another connection: its handler starts that
    work from the connection's reader, and a callback there answers with
    :meth:`reply`. The server ends the call with DEADLINE_EXCEEDED at ``deadline``
    (the client's ``grpc-timeout``, or an earlier one the handler sets with
    :meth:`limit`), ends it when the client cancels or the connection drops, and
    calls ``on_end`` exactly once with the final status, whatever ended it.
    """

    __slots__ = (
        "_nursery",
        "_server",
        "context",
        "deadline",
        "deadline_message",
        "done",
        "on_end",
        "started",
        "stream",
    )

    def __init__(
        self, server: GrpcServer, stream: Stream, context: CallContext, nursery: trio.Nursery
    ) -> None:
        self._server = server
        self._nursery = nursery
        self.stream = stream
        self.context = context
        self.started = trio.current_time()
        self.deadline = math.inf if context.deadline is None else context.deadline
        self.deadline_message = "deadline exceeded"
        #: Set by the handler: called once when the call ends, with its status.
        self.on_end: Callable[[StatusCode], None] | None = None
        #: True once the call's answer is decided.
        self.done = False

    def limit(self, deadline: float, message: str) -> None:
        """End the call at ``deadline`` (DEADLINE_EXCEEDED, ``message``) if that is sooner."""
        if deadline < self.deadline:
            self.deadline = deadline
            self.deadline_message = message

    def spawn(self, async_fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Go on with the call in a task (for work that has to wait): it lives as long
        as the client's connection, and should stop when ``on_end`` is called."""
        self._nursery.start_soon(async_fn, *args)

    def reply(
        self,
        data: bytes | None,
        code: StatusCode = StatusCode.OK,
        message: str = "",
        *,
        retry_pushback_ms: int | None = None,
    ) -> None:
        """Answer with the response ``data`` (None: none), then the status; later calls are moot.

        ``retry_pushback_ms`` (with no ``data``) trails as ``grpc-retry-pushback-ms``:
        when the client may try again (a RESOURCE_EXHAUSTED refusal, say)."""
        if self.done:
            return
        self.done = True
        server = self._server
        server._fast_calls.discard(self)
        stream = self.stream
        headers_sent = False
        if data is not None:
            try:
                stream.start_response()
            except GrpcError:  # the client reset the stream meanwhile
                server._end_fast(self, StatusCode.CANCELLED)
                return
            headers_sent = True
            limit = stream.max_message_bytes
            if len(data) > limit:
                code = StatusCode.RESOURCE_EXHAUSTED
                message = over_limit(len(data), limit)
            elif not stream.send_message_now(data):
                # The client's window is short, or our output to it is full: a
                # task waits.
                self._nursery.start_soon(self._reply_slowly, data, code, message)
                return
        stream.send_status(
            code,
            message,
            headers_sent=headers_sent,
            retry_pushback_ms=None if headers_sent else retry_pushback_ms,
        )
        server._end_fast(self, code)

    async def _reply_slowly(self, data: bytes, code: StatusCode, message: str) -> None:
        stream = self.stream
        ended = StatusCode.CANCELLED  # unless it gets to send its status
        try:
            try:
                with trio.CancelScope(deadline=self.deadline) as scope:
                    await stream.send_message(data)
                if scope.cancelled_caught:
                    code, message = StatusCode.DEADLINE_EXCEEDED, self.deadline_message
            except GrpcError as error:
                code, message = error.code, error.message
            stream.send_status(code, message, headers_sent=True)
            ended = code
        finally:
            self._server._end_fast(self, ended)

    def _watch(self, stream: Stream) -> None:
        # The stream's watcher once the call is taken: only its end matters.
        if stream.error is None or self.done:
            return
        if stream.reset or stream.connection_closed:
            self.done = True
            self._server._fast_calls.discard(self)
            self._server._end_fast(self, StatusCode.CANCELLED)
        else:  # e.g. a second request message over the size limit
            self.reply(None, stream.error.code, stream.error.message)


class GrpcServer:
    """Serves servicers on one port; ``run`` is a trio service (``nursery.start``)."""

    def __init__(
        self,
        servicers: Iterable[Servicer] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        limits: Limits = DEFAULT_LIMITS,
        on_call: CallObserver | None = None,
        authorize: Authorizer | None = None,
    ) -> None:
        self.host = host
        #: What one peer may make a connection hold (streams, headers, windows, time).
        self.limits = limits
        self._on_call = on_call
        self.port = port
        self.ssl_context = ssl_context
        self.max_message_bytes = max_message_bytes
        self._methods: dict[str, tuple[MethodSpec[Any, Any], Handler, bool]] = {}
        self._fast: dict[str, FastUnaryHandler] = {}
        # Calls taken by fast handlers and not yet answered; the sweeper task ends
        # those past their deadline and sleeps until the earliest one (_sweep_at).
        self._fast_calls: set[FastCall] = set()
        self._sweep_at = math.inf
        self._sweep_scope: trio.CancelScope | None = None
        self._transports: set[Transport] = set()
        self._connections_refused = 0
        self._accept_errors = 0
        self._accept_scope: trio.CancelScope | None = None
        self._active_calls = 0
        self._idle = trio.Event()
        self._idle.set()
        self._grace = 0.0
        #: Set once the port is bound and accepting.
        self.listening = trio.Event()
        for servicer in servicers:
            self.add_servicer(servicer)
        #: Called with each call's context when its headers arrive, before any handler
        #: (fast or not) sees it, and before an unknown method is answered
        #: UNIMPLEMENTED (so no one probes our methods unauthenticated); a refusal
        #: answers the call at once.
        self.authorize = authorize

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

    def statistics(self) -> dict[str, int]:
        """Connections, running calls, refused connections, accept() failures and the
        output queued for peers (at scrape time)."""
        return {
            "connections": len(self._transports),
            "active_calls": self._active_calls,
            "connections_refused": self._connections_refused,
            "queued_output_bytes": sum(t.output_size for t in self._transports),
            "accept_errors": self._accept_errors,
        }

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, hand the bound port to ``task_status``, serve until cancelled or shut down."""
        # trio's listeners set SO_REUSEADDR but never SO_REUSEPORT, so a second
        # process cannot silently share the port.
        listeners: list[trio.SocketListener] = await trio.open_tcp_listeners(
            self.port, host=self.host
        )
        self.port = listeners[0].socket.getsockname()[1]
        try:
            async with trio.open_nursery() as connections:
                connections.start_soon(self._expire_fast_calls)
                with trio.CancelScope() as self._accept_scope:
                    async with trio.open_nursery() as accept:
                        for listener in listeners:
                            accept.start_soon(self.accept_connections, listener, connections)
                        self.listening.set()
                        task_status.started(self.port)
                # Shutdown asked: refuse new calls, let running ones finish within the grace.
                for listener in listeners:
                    listener.socket.close()
                for transport in self._transports:
                    transport.goaway = True
                with trio.move_on_after(self._grace):
                    await self._idle.wait()
                with trio.move_on_after(1):
                    async with trio.open_nursery() as closing:
                        for transport in list(self._transports):
                            closing.start_soon(transport.close_gracefully)
                connections.cancel_scope.cancel()
        finally:
            for listener in listeners:
                listener.socket.close()

    def shutdown(self, grace: float = 0.0) -> None:
        """Stop accepting; running calls get ``grace`` seconds, then everything is cancelled."""
        self._grace = grace
        if self._accept_scope is not None:
            self._accept_scope.cancel()

    async def accept_connections(
        self, listener: trio.SocketListener, nursery: trio.Nursery
    ) -> None:
        """Serve the connections ``listener`` accepts, in ``nursery`` (``run`` calls
        this per listener): at most ``max_connections`` at once, and back off while
        the process is out of descriptors or memory."""
        limit = self.limits.max_connections
        count = _ListenerCount()
        failing = False
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:
                # Out of descriptors or memory: back off instead of spinning, as
                # trio's serve_listeners does; anything else is a real failure.
                if error.errno not in _ACCEPT_BACKOFF_ERRNOS:
                    raise
                self._accept_errors += 1
                if not failing:
                    failing = True
                    log.warning("accept failed on gRPC port %d, backing off: %s", self.port, error)
                await trio.sleep(ACCEPT_BACKOFF_SECS)
                continue
            if failing:
                failing = False
                log.warning("accepting again on gRPC port %d", self.port)
            if count.open >= limit:
                # Over the limit: closed at once (no GOAWAY: no HTTP/2 yet), counted.
                self._connections_refused += 1
                await trio.aclose_forcefully(stream)
                continue
            count.open += 1
            nursery.start_soon(self._serve_connection, stream, count)

    async def _serve_connection(self, sock: trio.SocketStream, count: _ListenerCount) -> None:
        try:
            await self._serve_connection_counted(sock)
        finally:
            count.open -= 1

    async def _serve_connection_counted(self, sock: trio.SocketStream) -> None:
        try:
            peer_host, peer_port = sock.socket.getpeername()[:2]
            peer: str | None = f"{peer_host}:{peer_port}"
        except OSError:
            peer = None
        stream: trio.abc.Stream = sock
        certificate: bytes | None = None
        if self.ssl_context is not None:
            tls = trio.SSLStream(sock, self.ssl_context, server_side=True)
            try:
                with trio.fail_after(self.limits.handshake_timeout_secs):
                    await tls.do_handshake()
            except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError, OSError) as error:
                log.info("TLS handshake with %s failed: %s", peer, error)
                await trio.aclose_forcefully(tls)
                return
            certificate = tls.getpeercert(binary_form=True)
            stream = tls
        async with trio.open_nursery() as calls:
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

            transport = Transport(
                stream,
                client_side=False,
                max_message_bytes=self.max_message_bytes,
                limits=self.limits,
                on_request=on_request,
            )
            if self._accept_scope is not None and self._accept_scope.cancel_called:
                transport.goaway = True
            self._transports.add(transport)
            try:
                await transport.run()
            finally:
                self._transports.discard(transport)
                calls.cancel_scope.cancel()

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
        responder = _Responder(stream)
        code, message = StatusCode.CANCELLED, "cancelled"
        pushback: int | None = None
        started = trio.current_time()
        try:
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
        # Counted from here, as the handler may answer before it returns.
        self._call_started()
        try:
            taken = self._fast[path](call, event.data)
        except Exception:
            log.exception("unhandled error in gRPC handler %s", path)
            call.reply(None, StatusCode.INTERNAL, f"internal error while handling {path}")
            taken = True
        if not taken:
            self._call_ended()
            return False
        # Consumed: its credit goes back (unless the call already ended and was
        # released, which returned it).
        stream.pop_event()
        if not call.done:
            stream.watcher = call._watch
            self._fast_calls.add(call)
            if call.deadline < self._sweep_at:
                self._sweep_at = call.deadline
                if self._sweep_scope is not None:
                    self._sweep_scope.deadline = call.deadline
        return True

    def _end_fast(self, call: FastCall, code: StatusCode) -> None:
        stream = call.stream
        stream.watcher = None
        try:
            if self._on_call is not None:
                self._on_call(call.context.method, trio.current_time() - call.started, code)
            on_end, call.on_end = call.on_end, None
            if on_end is not None:
                on_end(code)
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

    async def _expire_fast_calls(self) -> None:
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


class _ListenerCount:
    """Connections one listener has open (``Limits.max_connections``)."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = 0


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


class _Responder:
    __slots__ = ("headers_sent", "stream")

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.headers_sent = False

    async def send(self, message: Message) -> None:
        await self.send_bytes(message.SerializeToString())

    async def send_bytes(self, data: bytes) -> None:
        if not self.headers_sent:
            self.stream.start_response()
            self.headers_sent = True
        await self.stream.send_message(data)


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
    responder: _Responder,
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


__all__ = [
    "Authorizer",
    "CallContext",
    "CallRefusal",
    "FastCall",
    "FastUnaryHandler",
    "GrpcServer",
    "ServerCall",
    "server_ssl_context",
]
