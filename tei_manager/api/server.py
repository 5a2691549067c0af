"""Serving the REST API with Hypercorn on Trio, with a graceful, bounded shutdown.

We bind the listening socket ourselves and hand it to Hypercorn: the bound port
is known exactly (port 0 in tests), a taken port fails as a plain ``OSError``
before anything else starts, and the socket options are ours (SO_REUSEADDR so a
restart need not wait out TIME_WAIT; never SO_REUSEPORT, so a second manager
cannot silently share the port).

The accept loop is ours (Hypercorn's ``worker_serve``, with one change): a
plaintext connection starts in the lean front (:mod:`tei_manager.api.front`), which
answers inference requests itself and hands the connection to Hypercorn's
``TCPServer`` at its first other request. TLS connections all go to Hypercorn
(ALPN h2, client certificates): the lean front's saving is in the HTTP/1.1 framing,
and behind TLS the handshake and record layer cost more than that. The app's ASGI
lifespan (Quart's startup and shutdown hooks) runs as Hypercorn runs it.

Connection rules are Hypercorn's on both: ``Connection: close`` and HTTP/1.0 are
honoured, and an idle keep-alive connection closes after
``api_keep_alive_timeout_secs`` (:mod:`tei_manager.api.exchange` keeps Quart-Trio
from cutting either short). Shutdown: once ``shutdown`` is set the listener closes
(new connections are refused), idle keep-alive connections close at once, and
requests in flight get ``drain_timeout_secs`` to finish before they are cancelled.

At most ``api_max_connections`` connections are served at once, as the gRPC port
does it: one accepted over the limit is closed at once (the peer sees its connection
closed before any answer, never a hang), and a connection counts from its accept
until its handler ends, lean front and Hypercorn alike, TLS or not.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import cast

import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ASGIFramework, ConnectionState, LifespanState
from hypercorn.utils import wrap_app

from tei_manager import tracing
from tei_manager.api.app import ApiApp, create_app, route_of
from tei_manager.api.auth import capture_peer_certificates
from tei_manager.api.facade import ManagerFacade
from tei_manager.api.front import LeanFront, ReplayStream
from tei_manager.auth.security import Security, build_security
from tei_manager.gateway.relay import Gateway

__all__ = ["serve_api"]

log = logging.getLogger(__name__)

#: How long the accept loop waits after running out of descriptors or memory (trio's
#: ``serve_listeners`` waits as long).
ACCEPT_BACKOFF_SECS = 0.1
_ACCEPT_BACKOFF_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


async def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not listening yet); ``port`` 0 lets the OS pick."""
    infos = await trio.socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    # The resolver's first answer is the system's preferred address for the name.
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_api(
    manager: ManagerFacade,
    host: str,
    port: int,
    *,
    shutdown: trio.Event | None = None,
    drain_timeout_secs: float | None = None,
    gateway: Gateway | None = None,
    security: Security | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the REST API for ``manager`` on ``host:port``; hands back the bound port.

    ``security`` (default: built from ``manager.config``) decides who may call
    what; when it has TLS contexts the port serves HTTPS.

    Start it with ``port = await nursery.start(serve_api, manager, host, port)``:
    the port is handed back (and ``manager.mark_listening()`` called) only once
    the socket accepts connections. It serves until cancelled, or until
    ``shutdown`` is set: then it stops accepting, lets requests in flight finish
    for up to ``drain_timeout_secs`` (default: the manager's
    ``graceful_shutdown_timeout_secs``), and returns. With a ``gateway`` it also
    serves the HTTP inference routes (OpenAI's ``/v1/*``, TEI's ``/tei/{model}/*``).
    """
    if security is None:
        security = build_security(manager.config, manager.metrics.prometheus)
    ssl_context = None
    if security.tls is not None:
        ssl_context = capture_peer_certificates(security.tls.rest_context)
    sock = await _bind(host, port)
    # Closing twice is harmless: this only matters if Hypercorn never took the socket.
    with sock:
        bound_port: int = sock.getsockname()[1]
        config = Config()
        config.bind = [f"{host}:{bound_port}"]
        config.graceful_timeout = (
            manager.config.graceful_shutdown_timeout_secs
            if drain_timeout_secs is None
            else drain_timeout_secs
        )
        # Through our logging setup (text or JSON lines), not Hypercorn's own stderr handler.
        # Idle keep-alive connections close after this, and at once on shutdown.
        config.keep_alive_timeout = manager.config.api_keep_alive_timeout_secs
        config.errorlog = logging.getLogger("hypercorn.error")
        config.accesslog = None
        config.include_server_header = False
        app = create_app(manager, security, gateway)
        asgi = tracing.wrap_asgi(app, route_of)  # app itself when tracing is off
        async with trio.open_nursery() as nursery:
            await nursery.start(
                _serve,
                app,
                asgi,
                config,
                sock,
                ssl_context,
                shutdown,
                manager.config.api_max_connections,
            )
            log.info(
                "REST API listening on %s port %d%s",
                host,
                bound_port,
                " (TLS)" if ssl_context is not None else "",
            )
            manager.mark_listening()
            task_status.started(bound_port)


async def _serve(
    app: ApiApp,
    traced: ASGIFramework,
    config: Config,
    sock: socket.socket,
    ssl_context: ssl.SSLContext | None,
    shutdown: trio.Event | None,
    max_connections: int,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hypercorn's ``worker_serve`` for our one socket, plaintext connections through the
    lean front; returns once ``shutdown`` is set and the connections have drained.
    ``traced`` is ``app`` with a span per request when tracing is on: then every
    request takes the ASGI path, which makes the span (the front makes none).

    Closes ``sock`` when it stops accepting."""
    config.set_statsd_logger_class(StatsdLogger)
    asgi: AppWrapper = wrap_app(traced, config.wsgi_max_body_size, "asgi")
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(asgi, config, lifespan_state)
    context = WorkerContext(None)
    state = ConnectionState(lifespan_state.copy())

    async def hypercorn(stream: trio.abc.Stream | ReplayStream) -> None:
        # TCPServer tells TLS from plaintext by the stream's do_handshake (ReplayStream
        # and SocketStream have none); its type says SSLStream only.
        tls_or_not = cast(trio.SSLStream[trio.SocketStream], stream)
        await TCPServer(asgi, config, context, state, tls_or_not)

    front: LeanFront | None = None
    handler: Callable[[trio.abc.Stream], Awaitable[None]] = hypercorn
    if ssl_context is None and app.inference is not None and traced is app:
        front = LeanFront(app.inference, config, hypercorn, app.manager.metrics.observe_http)
        handler = cast(Callable[[trio.abc.Stream], Awaitable[None]], front.serve)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        count = _Count()
        app.manager.metrics.http_listener.watch(count.statistics)
        if front is not None:  # outlives the connections, drained ones included
            await lifespan_nursery.start(front.run)
        async with trio.open_nursery() as connections:
            sock.listen(config.backlog)
            listener: trio.abc.Listener[trio.abc.Stream]
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            if ssl_context is not None:
                listener = trio.SSLListener(listener, ssl_context, https_compatible=True)
            task_status.started()
            try:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(
                        _accept, listener, handler, connections, max_connections, count
                    )
                    if shutdown is None:
                        await trio.sleep_forever()
                    else:
                        await shutdown.wait()
                    accepting.cancel_scope.cancel()  # closes the listener
            finally:
                await context.terminated.set()
                if front is not None:
                    front.terminate()
                connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


async def _accept(
    listener: trio.abc.Listener[trio.abc.Stream],
    handler: Callable[[trio.abc.Stream], Awaitable[None]],
    nursery: trio.Nursery,
    limit: int,
    count: _Count,
) -> None:
    """Serve each connection ``listener`` accepts with ``handler`` in ``nursery``, at
    most ``limit`` at once: one over the limit is closed at once. Backs off while the
    process is out of descriptors or memory; closes ``listener`` when cancelled.
    ``count`` keeps what it sees."""
    failing = refusing = False
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:
                if error.errno not in _ACCEPT_BACKOFF_ERRNOS:
                    raise
                count.accept_errors += 1
                if not failing:
                    failing = True
                    log.warning("accept failed on the REST port, backing off: %s", error)
                await trio.sleep(ACCEPT_BACKOFF_SECS)
                continue
            if failing:
                failing = False
                log.warning("accepting again on the REST port")
            if count.open >= limit:
                count.refused += 1
                if not refusing:
                    refusing = True
                    log.warning(
                        "REST port at api_max_connections %d: closing new connections", limit
                    )
                await trio.aclose_forcefully(stream)
                continue
            refusing = False
            count.open += 1
            nursery.start_soon(_counted, handler, stream, count)


async def _counted(
    handler: Callable[[trio.abc.Stream], Awaitable[None]],
    stream: trio.abc.Stream,
    count: _Count,
) -> None:
    try:
        await handler(stream)
    finally:
        try:
            await trio.aclose_forcefully(stream)
        finally:
            count.open -= 1


class _Count:
    """Connections the REST port has open (``api_max_connections``)."""

    __slots__ = ("accept_errors", "open", "refused")

    def __init__(self) -> None:
        self.open = 0
        self.refused = 0
        self.accept_errors = 0

    def statistics(self) -> dict[str, int]:
        """For ``tei_manager_http_connections*`` (see :mod:`tei_manager.listener_metrics`)."""
        return {
            "connections": self.open,
            "connections_refused": self.refused,
            "accept_errors": self.accept_errors,
        }
