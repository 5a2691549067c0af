"""The inference routes served straight on the ASGI connection, in front of Quart.

An embedding request is small and frequent, so what the manager spends per request
is what a client sees at high concurrency on a busy host. Quart's path per request
(a request context, a Werkzeug request, a nursery and two tasks, hooks, a
``Response``) cost about as much CPU as the whole relay to the instance. Here a
request that matches an inference route is answered by the same handlers with none
of that; every other request, and the inference routes' HEAD, OPTIONS (CORS
preflight), 404 and 405 answers, stay Quart's.

What the request gets is what Quart gave it:

- the route is matched by the app's own Werkzeug map, so exactly the requests Quart
  would have sent to an inference view come here;
- the auth hook's checks, CORS headers and access log (:class:`RequestGuard`, the
  object Quart's hooks call), a refusal answered before the body is used;
- the body, read whole up to :data:`INFERENCE_MAX_BODY_BYTES` (413 in the door's
  shape, and the connection closed, over it) within Quart's 60 s body timeout;
- the connection's keep-alive, close and body-drain rules (:class:`Exchange`, the
  same wrapper Quart's requests go through);
- a client that goes away cancels its handler, as Quart-Trio does: its session
  records 499 and its admission slot frees at once.

:meth:`InferenceDispatch.serve` is the one place one inference request runs from
start to answer (where a span would wrap it); the routing key is
:attr:`InferenceRequest.model` and the body's ``model``, read by the handlers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from functools import partial
from typing import Any, Final, NamedTuple, cast

import trio
from hypercorn.typing import HTTPScope
from quart import Response
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, MapAdapter, RoutingException

from tei_manager.api.auth import RequestGuard
from tei_manager.api.exchange import Exchange
from tei_manager.api.inference import (
    INFERENCE_PREFIXES,
    Answer,
    Door,
    InferenceRequest,
    InferenceView,
    too_large,
)
from tei_manager.gateway.errors import InferenceError, Kind

__all__ = [
    "BODY_TIMEOUT_SECS",
    "Finish",
    "InferenceDispatch",
    "Matched",
    "error_answer",
    "refusal_answer",
    "slow_body",
]

#: How long a request body may take to arrive (Quart's ``BODY_TIMEOUT`` default).
BODY_TIMEOUT_SECS: Final = 60.0
# HEAD and OPTIONS (CORS preflight) stay Quart's; every inference route is GET or POST.
_METHODS: Final = frozenset({"GET", "POST"})
#: Routing answers remembered (see ``InferenceDispatch.match_path``), for paths up to
#: this long; all forgotten when this many are, so paths a client makes up cannot
#: grow it past ~0.5 MB.
MAX_REMEMBERED_MATCHES: Final = 1024
MAX_REMEMBERED_PATH_CHARS: Final = 512


class Matched(NamedTuple):
    """A request an inference route serves."""

    label: str  # the rule, as the request-duration histogram labels Quart's requests
    door: Door
    view: InferenceView
    model: str  # the {model} path parameter, "" where the route has none


class InferenceDispatch:
    """Matches and serves the inference routes registered on a Quart app's ``url_map``."""

    def __init__(
        self,
        url_map: Map,
        views: Mapping[str, tuple[Door, InferenceView]],
        guard: RequestGuard,
    ) -> None:
        self._map = url_map
        self._adapter: MapAdapter | None = None  # bound at first use, once every rule is in
        self._views = views
        self._guard = guard
        self._matches: dict[tuple[str, str], Matched | None] = {}

    @property
    def guard(self) -> RequestGuard:
        """The auth, CORS and access-log checks every inference request goes through."""
        return self._guard

    def match(self, scope: HTTPScope) -> Matched | None:
        """The inference route that serves this request; None: Quart's."""
        return self.match_path(scope["method"], scope["path"])

    def match_path(self, method: str, path: str) -> Matched | None:
        """The inference route for ``method`` on ``path`` (percent-decoded); None: Quart's.

        Werkzeug's matcher costs some microseconds a request (tens for a route with a
        ``{model}``), and the answer for a path never changes once the app is built:
        it is remembered, for a bounded number of paths of bounded length.
        """
        if not path.startswith(INFERENCE_PREFIXES) or method not in _METHODS:
            return None
        if len(path) > MAX_REMEMBERED_PATH_CHARS:
            return self._match(method, path)
        key = (method, path)
        try:
            return self._matches[key]
        except KeyError:
            pass
        matched = self._match(method, path)
        if len(self._matches) >= MAX_REMEMBERED_MATCHES:
            self._matches.clear()
        self._matches[key] = matched
        return matched

    def _match(self, method: str, path: str) -> Matched | None:
        if self._adapter is None:
            self._adapter = self._map.bind("localhost")
        try:
            rule, args = self._adapter.match(path, method, return_rule=True)
        except (HTTPException, RoutingException):  # 404, 405, a redirect: Quart answers
            return None
        found = self._views.get(rule.endpoint)
        if found is None:
            return None
        door, view = found
        return Matched(rule.rule, door, view, args.get("model", ""))

    async def serve(self, matched: Matched, scope: HTTPScope, exchange: Exchange) -> None:
        """Answer one request (nothing if the client leaves first)."""
        refusal: Response | None = None
        finish: Finish = _no_headers
        if self._guard.active:
            method, path = scope["method"], scope["path"]
            extras = cast(MutableMapping[str, Any], scope)
            headers = Headers(
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            )
            refusal = self._guard.authorize(method, path, headers, extras)
            finish = partial(self._guard.finish, method, path, headers, extras)
        body = await _read_body(exchange)
        if body is None:
            return  # the client left
        if refusal is not None:
            await _send_response(exchange, refusal, finish(refusal.status_code))
        elif isinstance(body, InferenceError):
            answer = error_answer(matched.door, body)
            await _send_answer(exchange, answer, finish(answer.status))
        else:
            request = InferenceRequest(body, matched.model, scope["headers"])
            await _answer_unless_left(matched.view, request, exchange, finish)


#: The access log and CORS headers of an answered request, given its status.
Finish = Callable[[int], Mapping[str, str]]


def _no_headers(status: int) -> Mapping[str, str]:
    return {}


async def _read_body(exchange: Exchange) -> bytes | InferenceError | None:
    """The whole body; an error for a body too large or too slow; None if the client left."""
    if exchange.too_large:  # by its Content-Length: not read at all
        return too_large()
    chunks: list[bytes] = []
    with trio.move_on_after(BODY_TIMEOUT_SECS):
        while True:
            message = await exchange.receive()
            if message["type"] != "http.request":
                return None  # http.disconnect
            if exchange.too_large:
                return too_large()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return slow_body()


class _SlowBody(InferenceError):
    """A body that did not arrive within :data:`BODY_TIMEOUT_SECS`: 408."""


def slow_body() -> InferenceError:
    """The error of a request body that did not arrive within :data:`BODY_TIMEOUT_SECS`."""
    return _SlowBody(Kind.VALIDATION, f"request body: not received within {BODY_TIMEOUT_SECS:g} s")


def error_answer(door: Door, error: InferenceError) -> Answer:
    """``door``'s answer to a request whose body could not be taken (413, 408)."""
    answer = door.error_response(error)
    if isinstance(error, _SlowBody):
        answer = answer._replace(status=408)  # the client's delay: no door has a kind
    return answer


async def refusal_answer(response: Response, extra: Mapping[str, str]) -> Answer:
    """The auth hook's refusal (a Quart response) as an answer, ``extra`` headers added."""
    response.headers.update(extra)
    body = await response.get_data(as_text=False)
    headers = tuple((k, v) for k, v in response.headers.items() if k.lower() != "content-length")
    return Answer(body, response.status_code, headers, None)


async def _answer_unless_left(
    view: InferenceView,
    request: InferenceRequest,
    exchange: Exchange,
    finish: Finish,
) -> None:
    """Send ``view``'s answer, unless the client goes away first (the view is cancelled).

    The watcher is not cancelled: Hypercorn hands the request an ``http.disconnect``
    once the answer's last part is sent, so it ends by itself (a cancellation per
    request cost twice as much).
    """
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as view_scope:
            nursery.start_soon(_cancel_on_disconnect, exchange, view_scope)
            answer = await view(request)
        if view_scope.cancelled_caught:
            return  # the client left
        await _send_answer(exchange, answer, finish(answer.status))


async def _cancel_on_disconnect(exchange: Exchange, scope: trio.CancelScope) -> None:
    # The body has been read: what comes next is the client going away, or the
    # answer having been sent.
    while (await exchange.receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _send_answer(exchange: Exchange, answer: Answer, extra: Mapping[str, str]) -> None:
    headers = [(b"content-length", str(len(answer.body)).encode())]
    if answer.content_type is not None:
        headers.append((b"content-type", answer.content_type.encode()))
    for name, value in (*answer.headers, *extra.items()):
        headers.append((name.lower().encode(), value.encode()))
    await exchange.send(
        {"type": "http.response.start", "status": answer.status, "headers": headers}
    )
    await exchange.send({"type": "http.response.body", "body": answer.body, "more_body": False})


async def _send_response(exchange: Exchange, response: Response, extra: Mapping[str, str]) -> None:
    """A Quart response (the auth hook's refusal), sent as Quart would."""
    await _send_answer(exchange, await refusal_answer(response, extra), {})
