"""The gRPC server: the accept loop, connection limits, TLS and shutdown, serving
servicers through our trio transport and gRPC protocol layer.

What it guarantees (each has a test in tests/test_grpc_server.py): binds the
configured host without ``reuse_port``; TLS contexts advertise ALPN "h2"; the peer
certificate reaches handlers; the message-size limit is configurable and an
oversized message fails only its call with RESOURCE_EXHAUSTED; a client's
RST_STREAM or connection loss cancels the handler and ``grpc-timeout`` bounds it
(DEADLINE_EXCEEDED); handler exceptions become INTERNAL with a clean message;
cancellation at shutdown logs nothing. What one peer may make it hold is bounded by
its ``Limits`` (connections per listener here; the rest in the transport and below,
tested in tests/test_grpc_limits.py). Each call is run by ``_dispatch.CallDispatcher``;
what its handler sees is in ``calls``.
"""

from __future__ import annotations

import errno
import logging
import ssl
from collections.abc import Iterable

import trio

from tei_manager.grpc._dispatch import CallDispatcher
from tei_manager.grpc.calls import Authorizer, CallObserver
from tei_manager.grpc.limits import DEFAULT_LIMITS, Limits
from tei_manager.grpc.rpc import Servicer
from tei_manager.grpc.transport import Transport

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 40 * 1024 * 1024
#: accept() errors that mean "out of a resource for now": back off and retry
#: (trio's serve_listeners list); any other error ends the server.
_ACCEPT_BACKOFF_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF_SECS = 0.1


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
        self.port = port
        self.ssl_context = ssl_context
        self.max_message_bytes = max_message_bytes
        # ``authorize`` is called with each call's context when its headers arrive,
        # before any handler (fast or not) sees it, and before an unknown method is
        # answered UNIMPLEMENTED (so no one probes our methods unauthenticated); a
        # refusal answers the call at once. ``on_call`` observes every finished call.
        self._calls = CallDispatcher(on_call=on_call, authorize=authorize)
        self._transports: set[Transport] = set()
        self._connections_refused = 0
        self._accept_errors = 0
        self._accept_scope: trio.CancelScope | None = None
        self._grace = 0.0
        #: Set once the port is bound and accepting.
        self.listening = trio.Event()
        for servicer in servicers:
            self.add_servicer(servicer)

    def add_servicer(self, servicer: Servicer) -> None:
        self._calls.add_servicer(servicer)

    @property
    def service_names(self) -> list[str]:
        return self._calls.service_names

    def statistics(self) -> dict[str, int]:
        """Connections, running calls, refused connections, accept() failures and the
        output queued for peers (at scrape time)."""
        return {
            "connections": len(self._transports),
            "active_calls": self._calls.active_calls,
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
                connections.start_soon(self._calls.expire_fast_calls)
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
                    await self._calls.wait_idle()
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
            transport = Transport(
                stream,
                client_side=False,
                max_message_bytes=self.max_message_bytes,
                limits=self.limits,
                on_request=self._calls.request_handler(peer, certificate, calls),
            )
            if self._accept_scope is not None and self._accept_scope.cancel_called:
                transport.goaway = True
            self._transports.add(transport)
            try:
                await transport.run()
            finally:
                self._transports.discard(transport)
                calls.cancel_scope.cancel()


class _ListenerCount:
    """Connections one listener has open (``Limits.max_connections``)."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = 0


__all__ = [
    "ACCEPT_BACKOFF_SECS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "GrpcServer",
    "server_ssl_context",
]
