"""A gRPC client channel on our trio transport: one HTTP/2 connection, many calls.

Deadlines are trio's: a call made under ``trio.fail_after`` / ``move_on_after``
(or inside a handler whose client set a deadline) sends the time left as
``grpc-timeout``. Unlike purerpc's client, a cancelled call resets its stream so the
server stops working on it, and a lost connection fails the calls on it with
UNAVAILABLE instead of crashing the caller's nursery.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, Generic

import trio
from google.protobuf.message import DecodeError

from tei_manager import tracing
from tei_manager.grpc.limits import DEFAULT_LIMITS, Limits
from tei_manager.grpc.rpc import GrpcError, MethodSpec, Req, Resp, StatusCode
from tei_manager.grpc.server import DEFAULT_MAX_MESSAGE_BYTES
from tei_manager.grpc.transport import MESSAGE_PREFIX_BYTES, Stream, StreamRefused, Transport

Metadata = tuple[tuple[str, str], ...]
#: How often a unary call the server refused (REFUSED_STREAM) is made again.
REFUSED_RETRIES = 3
REFUSED_BACKOFF_SECS = 0.02


def client_ssl_context(
    ca_file: str | None = None,
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> ssl.SSLContext:
    """A TLS client context with ALPN "h2" and an optional client certificate."""
    context = ssl.create_default_context(cafile=ca_file)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    context.set_alpn_protocols(["h2"])
    return context


class Channel:
    """A connection to one gRPC server. Run it with ``open_channel`` or ``nursery.start(run)``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        connect_timeout: float = 5.0,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.host = host
        #: Our side's limits; ``keepalive_interval_secs`` turns on keepalive PINGs.
        self.limits = limits
        self.port = port
        self.authority = f"{host}:{port}"
        self._ssl_context = ssl_context
        self._scheme = "https" if ssl_context is not None else "http"
        self._server_hostname = server_hostname or host
        self._max_message_bytes = max_message_bytes
        self._connect_timeout = connect_timeout
        self._transport: Transport | None = None
        self._scope: trio.CancelScope | None = None

    @property
    def usable(self) -> bool:
        """True while new calls can be started on this connection."""
        t = self._transport
        return t is not None and not t.closed and not t.goaway

    @property
    def active_calls(self) -> int:
        return 0 if self._transport is None else len(self._transport.streams)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, then serve the connection until it closes or ``close()`` is called.

        Connection failures before ``started`` raise GrpcError(UNAVAILABLE).
        """
        # Opened for a request, perhaps, but its reader's callbacks serve every call on it.
        tracing.forget_request()
        tcp: trio.SocketStream | None = None
        try:
            with trio.fail_after(self._connect_timeout):
                tcp = await trio.open_tcp_stream(self.host, self.port)
                sock: trio.abc.Stream = tcp
                if self._ssl_context is not None:
                    tls = trio.SSLStream(
                        tcp, self._ssl_context, server_hostname=self._server_hostname
                    )
                    await tls.do_handshake()
                    sock = tls
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as error:
            if tcp is not None:
                await trio.aclose_forcefully(tcp)
            # trio reports a failed handshake as BrokenResourceError from the SSLError.
            reason = str(error) or str(error.__cause__ or type(error).__name__)
            raise GrpcError(
                StatusCode.UNAVAILABLE, f"cannot connect to {self.authority}: {reason}"
            ) from None
        transport = Transport(
            sock, client_side=True, max_message_bytes=self._max_message_bytes, limits=self.limits
        )
        self._transport = transport
        with trio.CancelScope() as self._scope:
            await transport.run(task_status=task_status)

    def close(self) -> None:
        """Drop the connection; calls on it fail with UNAVAILABLE."""
        if self._transport is not None:
            self._transport.close()
        if self._scope is not None:
            self._scope.cancel()

    # -- calls ---------------------------------------------------------------
    def _start(
        self, spec: MethodSpec[Any, Any], metadata: Metadata, deadline: float | None = None
    ) -> Stream:
        transport = self._transport
        if transport is None or transport.closed or transport.goaway:
            raise GrpcError(StatusCode.UNAVAILABLE, f"no connection to {self.authority}")
        ender = None
        if tracing.tracer is not None:
            ender, metadata = tracing.start_client(spec, self.host, self.port, metadata)
        stream = transport.open_stream()
        stream.on_release = ender
        timeout = None
        if deadline is None:
            deadline = trio.current_effective_deadline()
        if deadline != math.inf:
            # Sent rounded up, so the server never sees zero; none left (a scope
            # cancelled before this call checkpoints) is the shortest timeout.
            timeout = max(0.0, deadline - trio.current_time())
        try:
            transport.start_request(
                stream, self._scheme, spec.path, self.authority, timeout, metadata
            )
        except BaseException:
            stream.release()
            raise
        transport.flush()
        return stream

    async def wait_for_stream_slot(self) -> None:
        """Wait until the server's SETTINGS_MAX_CONCURRENT_STREAMS allows one more call.

        Calls over the server's limit queue here instead of failing.
        Raises ``GrpcError`` (UNAVAILABLE) when the connection is gone.
        """
        transport = self._transport
        if transport is None:
            raise GrpcError(StatusCode.UNAVAILABLE, f"no connection to {self.authority}")
        await transport.wait_for_stream_slot()

    @asynccontextmanager
    async def open_call(
        self,
        spec: MethodSpec[Req, Resp],
        *,
        metadata: Metadata = (),
    ) -> AsyncIterator[Call[Req, Resp]]:
        """A call of any shape: ``send`` requests, ``done_writing``, then read replies.

        Leaving the block before the call ended resets its stream (the server's
        handler is cancelled). Over the server's stream limit, the call waits for a
        free stream.
        """
        await self.wait_for_stream_slot()
        call = self.start_call(spec, metadata=metadata)
        try:
            yield call
        finally:
            call.close()

    def start_call(
        self,
        spec: MethodSpec[Req, Resp],
        *,
        metadata: Metadata = (),
        deadline: float | None = None,
    ) -> Call[Req, Resp]:
        """``open_call`` without the context manager, for hot paths: ``close()`` it after.

        ``deadline`` (trio clock) is what travels as ``grpc-timeout``; None: the
        caller's effective deadline (a caller that knows it saves looking it up).
        Raises UNAVAILABLE over the server's stream limit: ``await
        wait_for_stream_slot()`` first to queue instead.
        """
        return Call(self._start(spec, metadata, deadline), spec)

    def relay(
        self,
        spec: MethodSpec[Any, Any],
        data: bytes,
        *,
        deadline: float,
        watcher: Callable[[Stream], None],
        metadata: Metadata = (),
    ) -> Stream | None:
        """Start a call with its one request message (already serialized), never waiting.

        For task-free relays: the request is sent and the sending side closed at
        once (END_STREAM on its DATA frame), and ``watcher`` is called from the
        connection's reader for each reply event (see ``Stream.watcher``).
        ``deadline`` (trio clock) travels as ``grpc-timeout``. Returns the call's
        stream, whose owner releases it (``Stream.release``) when done; None when
        the call cannot start without waiting: no usable connection, no free
        stream, or a short window.
        """
        transport = self._transport
        if (
            transport is None
            or len(data) > self._max_message_bytes
            or not transport.can_send_now(len(data) + MESSAGE_PREFIX_BYTES)
        ):
            return None
        ender = None
        if tracing.tracer is not None:
            ender, metadata = tracing.start_client(spec, self.host, self.port, metadata)
        stream = transport.open_stream()
        stream.on_release = ender
        timeout = None if deadline == math.inf else deadline - trio.current_time()
        transport.start_request(stream, self._scheme, spec.path, self.authority, timeout, metadata)
        if not stream.send_message_now(data, last=True):  # the checks above rule this out
            stream.cancel()
            stream.release()
            return None
        stream.watcher = watcher
        return stream

    async def unary_unary(
        self,
        spec: MethodSpec[Req, Resp],
        request: Req,
        *,
        metadata: Metadata = (),
    ) -> Resp:
        for attempt in range(REFUSED_RETRIES + 1):
            try:
                async with self.open_call(spec, metadata=metadata) as call:
                    await call.send(request)
                    await call.done_writing()
                    return await call.single()
            except StreamRefused:
                # The server's count of our streams can trail ours (a stream we
                # reset counts there until its handler ends): try again.
                if attempt == REFUSED_RETRIES:
                    raise
                await trio.sleep(REFUSED_BACKOFF_SECS * (attempt + 1))
        raise AssertionError("unreachable")

    async def stream_unary(
        self,
        spec: MethodSpec[Req, Resp],
        requests: Iterable[Req] | AsyncIterable[Req],
        *,
        metadata: Metadata = (),
    ) -> Resp:
        async with self.open_call(spec, metadata=metadata) as call:
            if isinstance(requests, AsyncIterable):
                async for request in requests:
                    await call.send(request)
            else:
                for request in requests:
                    await call.send(request)
            await call.done_writing()
            return await call.single()


class Call(Generic[Req, Resp]):
    """One call in flight on a channel."""

    __slots__ = ("_spec", "_stream")

    def __init__(self, stream: Stream, spec: MethodSpec[Req, Resp]) -> None:
        self._stream = stream
        self._spec = spec

    def close(self) -> None:
        """Forget the call; one that has not ended is reset (the server's handler is cancelled)."""
        stream = self._stream
        if stream.trailers is None and stream.error is None:
            stream.cancel()
        stream.release()

    async def send(self, request: Req) -> None:
        await self._stream.send_message(request.SerializeToString())

    async def send_raw(self, data: bytes) -> None:
        """Send an already serialized request message."""
        await self._stream.send_message(data)

    async def done_writing(self) -> None:
        self._stream.end_request()

    async def receive_raw(self) -> bytes | None:
        """The next reply's bytes; None when the call ended OK; GrpcError otherwise."""
        return await self._stream.receive_message()

    async def receive(self) -> Resp | None:
        data = await self._stream.receive_message()
        if data is None:
            return None
        try:
            reply: Resp = self._spec.response_type.FromString(data)
        except DecodeError:
            raise GrpcError(StatusCode.INTERNAL, "could not decode the response") from None
        return reply

    async def single(self) -> Resp:
        reply = await self.receive()
        if reply is None:
            raise GrpcError(StatusCode.INTERNAL, "the call ended without a response")
        if await self._stream.receive_message() is not None:
            raise GrpcError(StatusCode.INTERNAL, "expected one response, got more")
        return reply

    def __aiter__(self) -> Call[Req, Resp]:
        return self

    async def __anext__(self) -> Resp:
        reply = await self.receive()
        if reply is None:
            raise StopAsyncIteration
        return reply

    @property
    def answered(self) -> bool:
        """True once the server sent the call's status (a failure then is the server's)."""
        return self._stream.trailers is not None

    @property
    def trailing_metadata(self) -> Metadata:
        trailers = self._stream.trailers
        return () if trailers is None else tuple(trailers.custom_metadata)


@asynccontextmanager
async def open_channel(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    connect_timeout: float = 5.0,
    limits: Limits = DEFAULT_LIMITS,
) -> AsyncIterator[Channel]:
    """Connect to ``host:port`` for the duration of the block."""
    channel = Channel(
        host,
        port,
        ssl_context=ssl_context,
        max_message_bytes=max_message_bytes,
        connect_timeout=connect_timeout,
        limits=limits,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(channel.run)
            try:
                yield channel
            finally:
                channel.close()
    except BaseExceptionGroup as group:
        # The connection task never raises once started, so a lone exception is the
        # caller's own (a GrpcError, say): give it back unwrapped.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
