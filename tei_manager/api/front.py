"""The REST port's lean HTTP/1.1 front: inference requests served straight off the socket.

Hypercorn spends about 950 µs of CPU per request on a trivial app (a task, a
channel and shielded sends per request, two socket writes), and even a bare trio +
h11 loop about 300 µs. For the inference routes, small and frequent, that was most
of what the manager spends per request. So every plaintext connection starts here,
in :meth:`LeanFront.serve`:

- a request head is read whole (at most Hypercorn's ``h11_max_incomplete_size``
  bytes, 16 KiB, even when it arrives whole in one read; 431 over it, and the
  connection closed) and parsed by :mod:`tei_manager.api.http1`, which reads only
  plain heads: GET or POST, origin-form, ``Content-Length`` framing, clean CRLF
  lines. Anything else (a chunked body, a bare LF, obs-fold, a malformed line)
  is not the front's: the connection goes to Hypercorn, whose h11 answers it;
- a request an inference route serves (the same match as
  :class:`~tei_manager.api.inference_asgi.InferenceDispatch`: the app's own Werkzeug
  map, GET and POST only, no ``Upgrade``) is answered here: its body read whole
  (``100 Continue`` first when the client waits for it; 413 over
  :data:`~tei_manager.api.inference.INFERENCE_MAX_BODY_BYTES`, 408 after
  :data:`~tei_manager.api.inference_asgi.BODY_TIMEOUT_SECS`, and either closes the
  connection), checked by the same :class:`~tei_manager.api.auth.RequestGuard`
  (the client's address for rate limits), handed to the same handler, and its answer
  written in one socket write. A client that goes away while its handler runs
  cancels it (499 in the request metrics, as on Quart's path);
- the first request that is anything else (a control-plane route, HEAD, OPTIONS, an
  upgrade, HTTP/2's prior-knowledge preface ``PRI * HTTP/2.0``, an absolute-form
  target, a head that is not plain) hands the connection to Hypercorn for the rest
  of its life: a :class:`~hypercorn.trio.tcp_server.TCPServer` over the same socket,
  fed first the bytes already read for that request (and anything pipelined
  behind it).

The connection rules are Hypercorn's: keep-alive unless the client asks to close or
speaks HTTP/1.0; the keep-alive timeout runs from the end of one answer (or the
accept) until the next request head is complete, so it also bounds a head sent
slowly; a connection closes after ``keep_alive_max_requests`` requests. On shutdown
(:meth:`terminate`) connections waiting for a request head close at once, and a
request in flight is answered with ``Connection: close``.
"""

from __future__ import annotations

import logging
import math
import select
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, NamedTuple
from urllib.parse import unquote

import trio
from hypercorn.config import Config
from hypercorn.utils import parse_socket_addr
from werkzeug.datastructures import Headers

from tei_manager.api import inference_asgi
from tei_manager.api.http1 import CONTINUE, Head, encode_answer, head_end, parse_head
from tei_manager.api.inference import (
    INFERENCE_MAX_BODY_BYTES,
    Answer,
    InferenceRequest,
    too_large,
)
from tei_manager.api.inference_asgi import (
    Finish,
    InferenceDispatch,
    Matched,
    error_answer,
    refusal_answer,
    slow_body,
)
from tei_manager.gateway.errors import InferenceError

__all__ = ["LeanFront", "ReplayStream", "at_eof"]

log = logging.getLogger(__name__)

# What one read asks of the socket (Hypercorn's MAX_RECV).
_MAX_RECV: Final = 1 << 16
# Status of a request whose client went away before its answer (as on Quart's path).
_NO_RESPONSE: Final = 499
#: How long a connection closed with input unread keeps reading it off, so that closing
#: does not reset the connection before the client has read the answer (nginx's
#: lingering close; its lingering_timeout is 5 s).
LINGER_SECS: Final = 2.0
#: How often the sockets of requests in flight are checked for a client that left.
LEFT_POLL_SECS: Final = 0.1
_RDHUP: Final[int] = getattr(select, "POLLRDHUP", 0)  # Linux's; elsewhere, _at_eof asks
_LEFT: Final = select.POLLHUP | select.POLLERR | select.POLLNVAL | _RDHUP

#: Records one answered (or abandoned) request: route, method, status, seconds.
Observe = Callable[[str, str, int, float], None]
#: Serves a connection from its first byte (Hypercorn's ``TCPServer``).
HandOff = Callable[["ReplayStream"], Awaitable[None]]


class ReplayStream:
    """A plaintext socket stream that first gives back bytes already read from it.

    What Hypercorn's ``TCPServer`` uses of a stream: ``socket`` (for the client and
    server addresses), ``receive_some``, ``send_all``, ``send_eof`` and ``aclose``.
    It has no ``do_handshake``: that is how ``TCPServer`` tells plaintext from TLS.
    """

    def __init__(self, stream: trio.SocketStream, buffered: bytes) -> None:
        self._stream = stream
        self._buffered = buffered
        self.socket = stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._buffered:
            size = len(self._buffered) if max_bytes is None else max_bytes
            data, self._buffered = self._buffered[:size], self._buffered[size:]
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


class _Refused(NamedTuple):
    status: int  # 431: a head too large


class LeanFront:
    """Serves plaintext connections; see the module docstring."""

    def __init__(
        self,
        dispatch: InferenceDispatch,
        config: Config,
        hand_off: HandOff,
        observe: Observe,
    ) -> None:
        self._dispatch = dispatch
        self._config = config
        self._hand_off = hand_off
        self._observe = observe
        self._connections: set[_Connection] = set()  # served here (terminate() looks)
        self._terminated = False
        self._server = b"hypercorn-h11" if config.include_server_header else None
        # Connections whose handler runs: run() cancels one whose client left.
        self._in_flight: set[_Connection] = set()
        self._polling = False
        self._parked: trio.Event | None = None  # run() waits on it while nothing runs

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Cancel each request whose client goes away while its handler runs (a 499).

        Every :data:`LEFT_POLL_SECS` while requests run, one ``poll`` with no wait asks
        all their sockets at once whether the peer closed (``POLLRDHUP``, or a hang-up
        or error). A socket with data is a pipelined request: that client is there,
        and its socket is not asked again during this request. This replaced a
        watcher task per request (a task, a socket registration and a cancellation
        each time), which cost more CPU than the rest of the front; a client that
        leaves is found within two intervals instead of at once, and only a request
        still running then costs anything. :meth:`serve` needs this running.
        """
        self._polling = True
        task_status.started()
        try:
            while True:
                if not self._in_flight:
                    self._parked = trio.Event()
                    await self._parked.wait()
                await trio.sleep(LEFT_POLL_SECS)
                self._cancel_the_left()
        finally:
            self._polling = False

    def _cancel_the_left(self) -> None:
        poll = select.poll()
        asked: dict[int, _Connection] = {}
        for conn in self._in_flight:
            fd = conn.sock.fileno()
            if fd >= 0:
                asked[fd] = conn
                poll.register(fd, select.POLLIN | _LEFT)
        for fd, events in poll.poll(0):
            conn = asked[fd]
            if events & _LEFT or (events & select.POLLIN and not _RDHUP and at_eof(fd)):
                self._in_flight.discard(conn)
                conn.scope.cancel()  # the handler, then the connection
            elif events & select.POLLIN:
                self._in_flight.discard(conn)

    def terminate(self) -> None:
        """Shutdown: close connections waiting for a request; answer the rest with a close."""
        self._terminated = True
        for conn in self._connections:
            if conn.waiting:
                conn.scope.cancel()

    async def serve(self, stream: trio.SocketStream) -> None:
        """Serve one accepted plaintext connection until it closes or goes to Hypercorn."""
        if not self._polling:
            raise RuntimeError("LeanFront.serve needs LeanFront.run running")
        sock = stream.socket
        conn = _Connection(stream)
        self._connections.add(conn)
        try:
            client = parse_socket_addr(sock.family, sock.getpeername())
            with conn.scope:  # the keep-alive timeout, shutdown, or the client gone
                served = 0
                while not self._terminated:
                    end = await self._read_head(conn)
                    if end is None:
                        break
                    if isinstance(end, _Refused):
                        await _send_all(sock, self._encode(end.status, [], b"", close=True))
                        await _linger(stream)
                        break
                    head = parse_head(conn.buffer[:end])
                    matched = None if head is None else self._match(head)
                    if head is None or matched is None:
                        await self._hand_off(ReplayStream(stream, conn.buffer))
                        return
                    conn.buffer = conn.buffer[end:]
                    served += 1
                    taken = await self._serve_request(conn, head, matched, client, served)
                    if not taken:  # its body was refused, unread
                        await _linger(stream)
                        break
                    if not head.keep_alive or served >= self._config.keep_alive_max_requests:
                        break
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:
            # A bug here must cost one connection, not the listener (Hypercorn's rule).
            log.exception("REST connection from the lean front failed")
        finally:
            self._connections.discard(conn)
        await stream.aclose()

    def _match(self, head: Head) -> Matched | None:
        try:
            path = unquote(head.target.partition(b"?")[0].decode("ascii"), errors="strict")
        except UnicodeError:
            return None  # Hypercorn answers what it makes of it
        return self._dispatch.match_path(head.method, path)  # remembered there

    async def _read_head(self, conn: _Connection) -> int | _Refused | None:
        """Where the next request head ends in ``conn.buffer``; None if the client
        closes. Waiting for it runs the keep-alive timeout (on the connection's scope,
        so a head sent slowly is cut off too) and shutdown closes it."""
        limit = self._config.h11_max_incomplete_size
        buffer = conn.buffer
        end = head_end(buffer)
        if end < 0:
            scope = conn.scope
            scope.deadline = trio.current_time() + self._config.keep_alive_timeout
            conn.waiting = True
            try:
                while end < 0:
                    if len(buffer) > limit:
                        return _Refused(431)
                    scanned = len(buffer)
                    data = await conn.sock.recv(_MAX_RECV)
                    if not data:
                        return None
                    buffer = conn.buffer = buffer + data
                    end = head_end(buffer, scanned)
            finally:
                conn.waiting = False
                scope.deadline = math.inf
        return _Refused(431) if end > limit else end

    async def _serve_request(
        self,
        conn: _Connection,
        head: Head,
        matched: Matched,
        client: tuple[str, int] | None,
        served: int,
    ) -> bool:
        """Answer one inference request; whether its body was read whole. Timed and
        counted under its status, 499 if the client left (the connection's scope is
        then cancelled: it ends)."""
        started = time.perf_counter()
        status, taken = _NO_RESPONSE, False
        try:
            status, taken = await self._answer(conn, head, matched, client, served)
        finally:
            self._observe(matched.label, head.method, status, time.perf_counter() - started)
        return taken

    async def _answer(
        self,
        conn: _Connection,
        head: Head,
        matched: Matched,
        client: tuple[str, int] | None,
        served: int,
    ) -> tuple[int, bool]:
        """Read, check and answer the request (see :meth:`_serve_request`)."""
        guard = self._dispatch.guard
        method = head.method
        refusal = None
        finish: Finish | None = None
        if guard.active:
            path = unquote(head.target.partition(b"?")[0].decode("ascii"))
            headers = Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers])
            extras: dict[str, object] = {"client": client}
            refusal = guard.authorize(method, path, headers, extras)

            def finish(status: int) -> dict[str, str]:
                return guard.finish(method, path, headers, extras, status)

        body = await _read_body(conn, head)
        if body is None:  # the client closed half way: nothing to answer
            conn.scope.cancel()
            return _NO_RESPONSE, False
        taken = not isinstance(body, InferenceError)
        if refusal is not None:
            extra = {} if finish is None else finish(refusal.status_code)
            answer = await refusal_answer(refusal, extra)
        elif isinstance(body, InferenceError):
            answer = error_answer(matched.door, body)
            if finish is not None:
                answer = _with_headers(answer, finish(answer.status))
        else:
            answer = await self._run_unless_left(
                matched, InferenceRequest(body, matched.model, head.headers), conn
            )
            if finish is not None:
                answer = _with_headers(answer, finish(answer.status))
        close = (
            not taken
            or not head.keep_alive
            or self._terminated
            or served >= self._config.keep_alive_max_requests
        )
        fields = [(name.lower().encode(), value.encode()) for name, value in answer.headers]
        if answer.content_type is not None:
            fields.insert(0, (b"content-type", answer.content_type.encode()))
        await _send_all(conn.sock, self._encode(answer.status, fields, answer.body, close=close))
        return answer.status, taken

    async def _run_unless_left(
        self, matched: Matched, request: InferenceRequest, conn: _Connection
    ) -> Answer:
        """The handler's answer; if the client goes away first, :meth:`run` cancels
        the connection's scope, the handler with it."""
        self._in_flight.add(conn)
        if self._parked is not None:
            self._parked.set()
            self._parked = None
        try:
            return await matched.view(request)
        finally:
            self._in_flight.discard(conn)

    def _encode(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, close: bool
    ) -> bytes:
        return encode_answer(
            status,
            headers,
            body,
            date=self._config.include_date_header,
            server=self._server,
            close=close,
        )


class _Connection:
    """One plaintext connection: its stream and socket, what was read off it and not
    yet served, and the scope it is served in."""

    __slots__ = ("buffer", "scope", "sock", "stream", "waiting")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        # Its own operations, not SocketStream's (two context managers and a
        # conflict check each): one task serves the connection.
        self.sock = stream.socket
        self.buffer = b""
        #: Cancelled when the keep-alive timeout passes, at shutdown while waiting
        #: for a head, or when the client leaves while its handler runs.
        self.scope = trio.CancelScope()
        self.waiting = False  # for the next request head


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    sent = await sock.send(data)
    if sent < len(data):
        with memoryview(data) as view:
            while sent < len(view):
                sent += await sock.send(view[sent:])


async def _linger(stream: trio.SocketStream) -> None:
    """Close our side, then read off what the client still sends, for a while."""
    await stream.send_eof()
    with trio.move_on_after(LINGER_SECS):
        while await stream.receive_some(_MAX_RECV):
            pass


def _with_headers(answer: Answer, extra: Mapping[str, str]) -> Answer:
    if not extra:
        return answer
    return answer._replace(headers=(*answer.headers, *extra.items()))


async def _read_body(conn: _Connection, head: Head) -> bytes | InferenceError | None:
    """The whole body (and ``conn.buffer`` past it); an error for a body too large or
    too slow (left unread); None if the client left."""
    length = head.length
    if length > INFERENCE_MAX_BODY_BYTES:
        return too_large()  # not read at all, and no 100 Continue asked for it
    buffer = conn.buffer
    if len(buffer) < length:
        if head.expects_continue and not buffer:
            await _send_all(conn.sock, CONTINUE)
        chunks = [buffer]
        size = len(buffer)
        # Read where tests can shorten it.
        with trio.move_on_after(inference_asgi.BODY_TIMEOUT_SECS):
            while size < length:
                data = await conn.sock.recv(_MAX_RECV)
                if not data:
                    return None  # closed half way: nothing to answer
                chunks.append(data)
                size += len(data)
        if size < length:
            return slow_body()
        buffer = b"".join(chunks)
    conn.buffer = buffer[length:]
    return buffer[:length] if len(buffer) != length else buffer


def at_eof(fd: int) -> bool:
    """Whether the peer of socket ``fd`` closed it (asked where poll has no
    ``POLLRDHUP`` to say so): a one-byte peek, the socket borrowed, never owned."""
    borrowed = socket.socket(fileno=fd)
    try:
        return borrowed.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        borrowed.detach()
