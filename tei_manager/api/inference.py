"""What the inference routes share: their table entry, scope, body limit and guard.

The inference front doors (:mod:`~tei_manager.api.openai_routes`,
:mod:`~tei_manager.api.tei_routes`) each declare their routes as
:class:`InferenceRoute` entries; :func:`register_inference_routes` adds them to the
app (only when a gateway serves them) and :func:`inference_openapi` documents
them. Every entry carries ``scope = "inference"`` for the auth hook.

Handlers know nothing of Quart or ASGI: each takes an :class:`InferenceRequest`
(the body, the ``{model}`` path parameter, the request headers) and returns an
:class:`Answer`. :mod:`~tei_manager.api.inference_asgi` serves them straight on the
ASGI connection (the hot path); the Quart views registered here serve the same
handlers for what that path leaves to Quart (HEAD) and give Quart the rules its
405 answers come from.

Each door answers its own error shape: a :class:`Door` maps an
:class:`~tei_manager.gateway.errors.InferenceError` to a status and a body, and the
guard around every handler makes sure nothing else leaves (a bug is a 500 in the
door's shape, its traceback in the log only).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, NamedTuple, Protocol, TypeVar

import msgspec
from quart import Quart, Response, request
from quart_trio.wrappers.request import TrioRequest
from werkzeug.exceptions import RequestEntityTooLarge

from tei_manager.api.routes import JSON
from tei_manager.api.routing_key import HEADER_PARAMETERS
from tei_manager.auth.identity import Scope
from tei_manager.errors import from_msgspec_error, retry_after
from tei_manager.gateway.errors import InferenceError, Kind

__all__ = [
    "INFERENCE_MAX_BODY_BYTES",
    "INFERENCE_PREFIXES",
    "INFERENCE_SCOPE",
    "Answer",
    "Door",
    "InferenceRequest",
    "InferenceRoute",
    "InferenceView",
    "decode_body",
    "inference_openapi",
    "json_bytes",
    "register_inference_routes",
    "retry_headers",
    "too_large",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The auth scope of every inference route.
INFERENCE_SCOPE: Final = Scope.INFERENCE
#: Paths the inference routes live under (their bodies get the larger limit).
INFERENCE_PREFIXES: Final = ("/v1/", "/tei/")
# A body of 2048 inputs (OpenAI's most per request) of a few KB each; TEI's own
# limit is 2 MB by default. Larger requests should be split by the client.
INFERENCE_MAX_BODY_BYTES: Final = 8 << 20


class InferenceRequest(NamedTuple):
    """What a handler gets of one HTTP request."""

    body: bytes  # the whole body (empty for a GET)
    model: str  # the ``{model}`` path parameter; "" on routes without one
    headers: Iterable[tuple[bytes, bytes]]  # as ASGI gives them: names lower-cased


class Answer(NamedTuple):
    """What a handler answers: a status, a body, and headers beyond Content-Type/-Length."""

    body: bytes
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str | None = JSON


#: A handler, guarded: it always answers (errors in its door's shape).
InferenceView = Callable[[InferenceRequest], Awaitable[Answer]]


class Door(Protocol):
    """A front door's error shape."""

    def status(self, error: InferenceError) -> int: ...

    def error_response(self, error: InferenceError) -> Answer: ...

    #: The msgspec type of the error body, for the OpenAPI document.
    error_type: object


class InferenceRoute(NamedTuple):
    """One inference route: a handler method name on the door's handler object."""

    endpoint: str  # handler method name; also the OpenAPI operationId
    method: str
    path: str  # OpenAPI template; {model} may contain '/'
    summary: str
    response: object  # msgspec type of the success body (None: empty)
    request: object = None
    statuses: tuple[int, ...] = ()  # error statuses it can answer
    scope: str = INFERENCE_SCOPE


class _InferenceRequest(TrioRequest):
    """Quart-Trio's request, with the inference body limit on the inference paths.

    Quart sizes every body by the app's ``MAX_CONTENT_LENGTH`` (the management
    API's 1 MiB); a list of inputs needs more.
    """

    def __init__(self, method: str, scheme: str, path: str, *args: Any, **kwargs: Any) -> None:
        if path.startswith(INFERENCE_PREFIXES):
            kwargs["max_content_length"] = INFERENCE_MAX_BODY_BYTES
        super().__init__(method, scheme, path, *args, **kwargs)


def too_large() -> InferenceError:
    """The refusal of a body over :data:`INFERENCE_MAX_BODY_BYTES`."""
    return InferenceError(
        Kind.TOO_LARGE, f"request body too large: the limit is {INFERENCE_MAX_BODY_BYTES} bytes"
    )


def decode_body(body: bytes, kind: type[T]) -> T:
    """``body`` as JSON of ``kind``; VALIDATION naming the field otherwise."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as error:
        bad = from_msgspec_error(error)
        raise InferenceError(Kind.VALIDATION, bad.message, param=bad.field or None) from None
    except msgspec.DecodeError as error:
        raise InferenceError(Kind.VALIDATION, f"invalid JSON: {error}") from None


def _guarded(door: Door, route: InferenceRoute, handler: InferenceView) -> InferenceView:
    async def view(request: InferenceRequest) -> Answer:
        try:
            return await handler(request)
        except InferenceError as error:
            return door.error_response(error)
        except Exception:
            log.exception("unhandled error answering %s %s", route.method, route.endpoint)
            return door.error_response(InferenceError(Kind.BACKEND, "internal error"))

    return view


def _quart_view(
    door: Door, endpoint: str, view: InferenceView
) -> Callable[..., Awaitable[Response]]:
    async def quart_view(model: str = "") -> Response:
        try:
            body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        except RequestEntityTooLarge:
            answer = door.error_response(too_large())
        else:
            answer = await view(InferenceRequest(body, model, request.scope["headers"]))
        response = Response(answer.body, status=answer.status, headers=dict(answer.headers) or None)
        if answer.content_type is None:
            del response.headers["Content-Type"]
        else:
            response.content_type = answer.content_type
        return response

    quart_view.__name__ = endpoint
    return quart_view


def register_inference_routes(
    app: Quart, doors: Iterable[tuple[Door, object, tuple[InferenceRoute, ...]]]
) -> dict[str, tuple[Door, InferenceView]]:
    """Add each door's routes, handled by the same-named methods of its handler object;
    the guarded handlers by endpoint, with their door, for the ASGI path."""
    app.request_class = _InferenceRequest
    views: dict[str, tuple[Door, InferenceView]] = {}
    for door, handlers, routes in doors:
        for route in routes:
            view = _guarded(door, route, getattr(handlers, route.endpoint))
            views[route.endpoint] = (door, view)
            app.add_url_rule(
                _quart_rule(route.path),
                route.endpoint,
                _quart_view(door, route.endpoint, view),
                methods=[route.method],
                merge_slashes=False,
                # TEI's root, "/tei/NAME/", is also reached as "/tei/NAME" (a client's
                # base URL): a redirect would leave the POST body unread on the
                # connection, and some clients then hang on it.
                strict_slashes=False,
            )
    return views


def _quart_rule(path: str) -> str:
    return path.replace("{model}", "<model_id:model>")


def inference_openapi(
    doors: Iterable[tuple[Door, tuple[InferenceRoute, ...]]],
) -> tuple[list[object], Callable[[dict[object, Any]], dict[str, dict[str, Any]]]]:
    """The types the routes' schemas need, and a builder of their OpenAPI path items
    given those types' generated schemas."""
    doors = tuple(doors)
    types: list[object] = []
    for door, routes in doors:
        types.append(door.error_type)
        for route in routes:
            for t in (route.request, route.response):
                if t is not None and t not in types:
                    types.append(t)

    def paths(schemas: dict[object, Any]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for door, routes in doors:
            error = {JSON: {"schema": schemas[door.error_type]}}
            for route in routes:
                success: dict[str, Any] = {"description": "OK"}
                if route.response is not None:
                    success["content"] = {JSON: {"schema": schemas[route.response]}}
                doc: dict[str, Any] = {
                    "operationId": route.endpoint,
                    "summary": route.summary,
                    "tags": ["inference"],
                    "x-scope": route.scope,
                    "responses": {
                        "200": success,
                        **{
                            str(status): {"description": "Error", "content": error}
                            for status in sorted({*route.statuses, 500})
                        },
                    },
                }
                if "{model}" in route.path:
                    doc["parameters"] = [
                        {
                            "name": "model",
                            "in": "path",
                            "required": True,
                            "description": "instance name, served_model_name or model id",
                            "schema": {"type": "string"},
                        }
                    ]
                if "{model}" in route.path or route.request is not None:
                    doc["parameters"] = doc.get("parameters", []) + HEADER_PARAMETERS
                if route.request is not None:
                    doc["requestBody"] = {
                        "required": True,
                        "content": {JSON: {"schema": schemas[route.request]}},
                    }
                out.setdefault(route.path, {})[route.method.lower()] = doc
        return out

    return types, paths


def retry_headers(error: InferenceError) -> tuple[tuple[str, str], ...]:
    """``Retry-After`` (whole seconds, rounded up, at least 1) for a refusal that says
    when to retry."""
    if error.retry_after is None:
        return ()
    return (("Retry-After", retry_after(error.retry_after)),)


def json_bytes(body: bytes, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    """A JSON answer from already encoded bytes."""
    return Answer(body, status, headers)
