"""Serving the REST API with Hypercorn on Trio, with a graceful, bounded shutdown.

We bind the listening socket ourselves and hand it to Hypercorn: the bound port
is known exactly (port 0 in tests), a taken port fails as a plain ``OSError``
before anything else starts, and the socket options are ours (SO_REUSEADDR so a
restart need not wait out TIME_WAIT; never SO_REUSEPORT, so a second manager
cannot silently share the port).

Connections are Hypercorn's: ``Connection: close`` and HTTP/1.0 are honoured, and
an idle keep-alive connection closes after ``api_keep_alive_timeout_secs``
(:mod:`tei_manager.api.exchange` keeps Quart-Trio from cutting either short).
Shutdown is Hypercorn's too: once ``shutdown`` is set the listener closes (new
connections are refused), idle keep-alive connections close at once, and requests
in flight get ``drain_timeout_secs`` to finish before they are cancelled.
"""

from __future__ import annotations

import logging
import socket
import ssl
from functools import partial

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio import serve

from tei_manager import tracing
from tei_manager.api.app import create_app, route_of
from tei_manager.api.auth import capture_peer_certificates
from tei_manager.api.facade import ManagerFacade
from tei_manager.auth.security import Security, build_security
from tei_manager.gateway.relay import Gateway

__all__ = ["serve_api"]

log = logging.getLogger(__name__)


class _PreboundConfig(Config):
    """A Hypercorn config that serves on an already bound socket, with our TLS context.

    The context is ours (not one Hypercorn builds from file names) so that
    certificates can be reloaded into it while it serves, and so that it notes
    client certificates for the auth hook.
    """

    def __init__(self, sock: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
        super().__init__()
        self._sock = sock
        self._ssl_context = ssl_context

    def create_sockets(self) -> Sockets:
        # Hypercorn listens on these and closes them when it stops serving.
        if self._ssl_context is not None:
            return Sockets(secure_sockets=[self._sock], insecure_sockets=[], quic_sockets=[])
        return Sockets(secure_sockets=[], insecure_sockets=[self._sock], quic_sockets=[])

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._ssl_context


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
        config = _PreboundConfig(sock, ssl_context)
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
        app = tracing.wrap_asgi(create_app(manager, security, gateway), route_of)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve,
                    app,
                    config,
                    shutdown_trigger=shutdown.wait if shutdown is not None else None,
                )
            )
            log.info(
                "REST API listening on %s port %d%s",
                host,
                bound_port,
                " (TLS)" if ssl_context is not None else "",
            )
            manager.mark_listening()
            task_status.started(bound_port)
