"""What a gRPC handler sees of its call: its context, its messages, and for fast
unary handlers the call itself, answered from callbacks.

``CallContext`` is the method, metadata, peer, certificate and deadline; ``ServerCall``
the messages as bytes, for raw servicers that relay them; ``FastCall`` a unary call
answered with no task of its own. An ``Authorizer`` may refuse a call with a
``CallRefusal`` before any handler runs. ``_dispatch.CallDispatcher`` makes them.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import trio
from google.protobuf.message import Message

from tei_manager.grpc.rpc import GrpcError, MethodSpec, StatusCode, over_limit
from tei_manager.grpc.transport import Stream

if TYPE_CHECKING:
    from tei_manager import tracing
    from tei_manager.grpc._dispatch import CallDispatcher

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


class Responder:
    """Sends a call's response messages, the response headers before the first."""

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


class ServerCall:
    """A call's messages as bytes, for raw servicers (``Servicer.RAW``) that relay them."""

    __slots__ = ("_responder", "_stream")

    def __init__(self, stream: Stream, responder: Responder) -> None:
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
        "_dispatcher",
        "_nursery",
        "context",
        "deadline",
        "deadline_message",
        "done",
        "on_end",
        "started",
        "stream",
        "trace",
    )

    def __init__(
        self,
        dispatcher: CallDispatcher,
        stream: Stream,
        context: CallContext,
        nursery: trio.Nursery,
    ) -> None:
        self._dispatcher = dispatcher
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
        self.trace: tracing.ServerSpan | None = None

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
        dispatcher = self._dispatcher
        dispatcher.fast_call_answered(self)
        stream = self.stream
        headers_sent = False
        if data is not None:
            try:
                stream.start_response()
            except GrpcError:  # the client reset the stream meanwhile
                dispatcher.end_fast_call(self, StatusCode.CANCELLED)
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
        dispatcher.end_fast_call(self, code)

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
            self._dispatcher.end_fast_call(self, ended)

    def watch_stream(self, stream: Stream) -> None:
        """The stream's watcher once the call is taken (the dispatcher sets it): only
        its end matters."""
        if stream.error is None or self.done:
            return
        if stream.reset or stream.connection_closed:
            self.done = True
            self._dispatcher.fast_call_answered(self)
            self._dispatcher.end_fast_call(self, StatusCode.CANCELLED)
        else:  # e.g. a second request message over the size limit
            self.reply(None, stream.error.code, stream.error.message)


__all__ = [
    "Authorizer",
    "CallContext",
    "CallObserver",
    "CallRefusal",
    "FastCall",
    "FastUnaryHandler",
    "ServerCall",
]
