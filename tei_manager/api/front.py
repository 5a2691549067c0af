"""The REST port's lean HTTP/1.1 front: inference requests served straight with h11.

Hypercorn spends about 950 µs of CPU per request on a trivial app (a task, a
channel and shielded sends per request, two socket writes), where a bare trio + h11
loop giving the same answer spends about 240 µs. For the inference routes, small and
frequent, that was almost half of what the manager spends per request. So every
plaintext connection starts here, in :meth:`LeanFront.serve`:

- a request head is read with h11 (at most Hypercorn's ``h11_max_incomplete_size``
  bytes, 16 KiB, even when it arrives whole in one read; 431 over it, and the
  connection closed);
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
  target) hands the connection to Hypercorn for the rest of its life: a
  :class:`~hypercorn.trio.tcp_server.TCPServer` over the same socket, fed first the
  bytes already read for that request (and anything pipelined behind it).

The connection rules are Hypercorn's: keep-alive unless the client asks to close or
speaks HTTP/1.0; the keep-alive timeout runs from the end of one answer (or the
accept) until the next request head is complete, so it also bounds a head sent
slowly; a connection closes after ``keep_alive_max_requests`` requests. On shutdown
(:meth:`terminate`) connections waiting for a request head close at once, and a
request in flight is answered with ``Connection: close``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, NamedTuple
from urllib.parse import unquote

import h11
import trio
from hypercorn.config import Config
from hypercorn.utils import parse_socket_addr
from werkzeug.datastructures import Headers

from tei_manager.api import inference_asgi
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

__all__ = ["LeanFront", "ReplayStream"]

log = logging.getLogger(__name__)

# What one read asks of the socket (Hypercorn's MAX_RECV).
_MAX_RECV: Final = 1 << 16
# Status of a request whose client went away before its answer (as on Quart's path).
_NO_RESPONSE: Final = 499
_METHODS: Final = frozenset({b"GET", b"POST"})
#: How long a connection closed with input unread keeps reading it off, so that closing
#: does not reset the connection before the client has read the answer (nginx's
#: lingering close; its lingering_timeout is 5 s).
LINGER_SECS: Final = 2.0

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


class _Head(NamedTuple):
    request: h11.Request
    raw: bytes  # every byte read since this request's cycle began: what a handoff replays


class _Refused(NamedTuple):
    status: int  # h11's hint: 400 for a malformed head, 431 for one too large


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
        self._waiting: set[trio.CancelScope] = set()  # connections between requests
        self._terminated = False

    def terminate(self) -> None:
        """Shutdown: close connections waiting for a request; answer the rest with a close."""
        self._terminated = True
        for scope in self._waiting:
            scope.cancel()

    async def serve(self, stream: trio.SocketStream) -> None:
        """Serve one accepted plaintext connection until it closes or goes to Hypercorn."""
        sock = stream.socket
        try:
            client = parse_socket_addr(sock.family, sock.getpeername())
            conn = h11.Connection(
                h11.SERVER, max_incomplete_event_size=self._config.h11_max_incomplete_size
            )
            async with trio.open_nursery() as watchers:
                served = 0
                while not self._terminated:
                    head = await self._read_head(conn, stream)
                    if head is None:
                        break
                    if isinstance(head, _Refused):
                        await self._refuse_head(conn, stream, head.status)
                        await _linger(stream)
                        break
                    request = head.request
                    matched = self._match(request)
                    if matched is None:
                        await self._hand_off(ReplayStream(stream, head.raw))
                        return
                    served += 1
                    if not await self._serve_request(
                        conn, stream, request, matched, client, served, watchers
                    ):
                        break
                    if conn.their_state is not h11.DONE:  # its body was refused, unread
                        await _linger(stream)
                        break
                    if conn.our_state is not h11.DONE:  # Connection: close, HTTP/1.0
                        break
                    conn.start_next_cycle()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass  # the client went away, or broke the protocol after its answer
        except Exception:
            # A bug here must cost one connection, not the listener (Hypercorn's rule).
            log.exception("REST connection from the lean front failed")
        await stream.aclose()

    def _match(self, request: h11.Request) -> Matched | None:
        if request.method not in _METHODS:
            return None
        for name, _ in request.headers:
            if name == b"upgrade":  # h2c, websocket: Hypercorn's
                return None
        target = request.target.partition(b"?")[0]
        try:
            path = unquote(target.decode("ascii"), errors="strict")
        except UnicodeError:
            return None  # Hypercorn answers what it makes of it
        return self._dispatch.match_path(request.method.decode("ascii"), path)

    async def _read_head(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> _Head | _Refused | None:
        """The next request head; None if the client closes, is too slow, or we shut down."""
        raw = [bytes(conn.trailing_data[0])]
        limit = self._config.h11_max_incomplete_size
        with trio.CancelScope(
            deadline=trio.current_time() + self._config.keep_alive_timeout
        ) as waiting:
            self._waiting.add(waiting)
            try:
                while True:
                    try:
                        event = conn.next_event()
                    except h11.RemoteProtocolError as error:
                        return _Refused(error.error_status_hint)
                    if isinstance(event, h11.Request):
                        read = b"".join(raw)
                        # h11 bounds only a head still incomplete; one read can bring more.
                        if len(read) - len(conn.trailing_data[0]) > limit:
                            return _Refused(431)
                        return _Head(event, read)
                    if event is not h11.NEED_DATA:
                        return None  # ConnectionClosed
                    data = await stream.receive_some(_MAX_RECV)
                    raw.append(data)
                    conn.receive_data(data)
            finally:
                self._waiting.discard(waiting)
        return None  # the keep-alive timeout, or shutdown

    async def _refuse_head(
        self, conn: h11.Connection, stream: trio.SocketStream, status: int
    ) -> None:
        """Answer a head h11 refused as Hypercorn does: an empty answer, then close."""
        headers = [(b"content-length", b"0"), (b"connection", b"close")]
        headers += self._config.response_headers("h11")
        try:
            out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return
        await stream.send_all(out)

    async def _serve_request(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        request: h11.Request,
        matched: Matched,
        client: tuple[str, int] | None,
        served: int,
        watchers: trio.Nursery,
    ) -> bool:
        """Answer one inference request; False if the connection cannot carry another."""
        started = time.perf_counter()
        method = request.method.decode("ascii")
        status = _NO_RESPONSE
        try:
            status = await self._answer(
                conn, stream, request, matched, method, client, served, watchers
            )
        finally:
            self._observe(matched.label, method, status, time.perf_counter() - started)
        return status != _NO_RESPONSE

    async def _answer(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        request: h11.Request,
        matched: Matched,
        method: str,
        client: tuple[str, int] | None,
        served: int,
        watchers: trio.Nursery,
    ) -> int:
        """Read, check and answer the request; its status, or 499 if the client left."""
        guard = self._dispatch.guard
        refusal = None
        finish: Finish | None = None
        if guard.active:
            path = unquote(request.target.partition(b"?")[0].decode("ascii"))
            headers = Headers(
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
            )
            extras: dict[str, object] = {"client": client}
            refusal = guard.authorize(method, path, headers, extras)

            def finish(status: int) -> dict[str, str]:
                return guard.finish(method, path, headers, extras, status)

        body = await _read_body(conn, stream, request)
        if body is None:
            return _NO_RESPONSE
        close = isinstance(body, InferenceError)  # the body is not (all) taken
        if refusal is not None:
            extra = {} if finish is None else finish(refusal.status_code)
            answer = await refusal_answer(refusal, extra)
        elif isinstance(body, InferenceError):
            answer = error_answer(matched.door, body)
            if finish is not None:
                answer = _with_headers(answer, finish(answer.status))
        else:
            found = await _run_unless_left(
                matched, InferenceRequest(body, matched.model, request.headers), stream, watchers
            )
            if found is None:
                return _NO_RESPONSE
            answer = found
            if finish is not None:
                answer = _with_headers(answer, finish(answer.status))
        close = close or self._terminated or served >= self._config.keep_alive_max_requests
        await stream.send_all(self._encode(conn, answer, close))
        return answer.status

    def _encode(self, conn: h11.Connection, answer: Answer, close: bool) -> bytes:
        """The whole answer, head and body, for one socket write."""
        headers = [(b"content-length", b"%d" % len(answer.body))]
        if answer.content_type is not None:
            headers.append((b"content-type", answer.content_type.encode()))
        for name, value in answer.headers:
            headers.append((name.lower().encode(), value.encode()))
        headers += self._config.response_headers("h11")
        if close:
            headers.append((b"connection", b"close"))
        out = conn.send(h11.Response(status_code=answer.status, headers=headers)) or b""
        out += conn.send(h11.Data(data=answer.body)) or b""
        return out + (conn.send(h11.EndOfMessage()) or b"")


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


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)  # h11 checked it is digits
    return None


async def _read_body(
    conn: h11.Connection, stream: trio.SocketStream, request: h11.Request
) -> bytes | InferenceError | None:
    """The whole body; an error for one too large or too slow; None if the client left."""
    length = _content_length(request)
    if length is not None and length > INFERENCE_MAX_BODY_BYTES:
        return too_large()  # not read at all, and no 100 Continue asked for it
    chunks: list[bytes] = []
    size = 0
    # Read where tests can shorten it.
    with trio.move_on_after(inference_asgi.BODY_TIMEOUT_SECS):
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return None  # closed half way, or a broken chunk: nothing to answer
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    await stream.send_all(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
                data = await stream.receive_some(_MAX_RECV)
                conn.receive_data(data)
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
                size += len(event.data)
                if size > INFERENCE_MAX_BODY_BYTES:
                    return too_large()
            elif isinstance(event, h11.EndOfMessage):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            else:
                return None
    return slow_body()


async def _run_unless_left(
    matched: Matched, request: InferenceRequest, stream: trio.SocketStream, watchers: trio.Nursery
) -> Answer | None:
    """The handler's answer, or None if the client goes away first (the handler is cancelled).

    The watcher runs in the connection's nursery, so the answer need not wait for it to
    end: cancelling it takes its socket registration away at once.
    """
    watching = trio.CancelScope()
    with trio.CancelScope() as view_scope:
        watchers.start_soon(_cancel_on_close, stream.socket, view_scope, watching)
        answer = await matched.view(request)
    watching.cancel()
    if view_scope.cancelled_caught:
        return None
    return answer


async def _cancel_on_close(
    sock: trio.socket.SocketType, scope: trio.CancelScope, watching: trio.CancelScope
) -> None:
    """Cancel ``scope`` if the client closes; stop watching at the first byte it sends
    (a pipelined request, read once this answer is written), or when ``watching`` is
    cancelled."""
    with watching:
        try:
            data = await sock.recv(1, trio.socket.MSG_PEEK)
        except OSError:
            data = b""
        if not data:
            scope.cancel()
