"""An auth refusal in the error shape of the door that was knocked on.

A client of the OpenAI door is an OpenAI SDK: it reads ``{"error": {message, type,
param, code}}`` and raises ``AuthenticationError`` / ``PermissionDeniedError`` /
``RateLimitError`` with that message. A client of the TEI door reads TEI's
``{"error", "error_type"}``. Everything else is the manager's own
``{"error", "code", "timestamp"}``. :func:`refusal_renderer` makes that choice from
the path alone, and :func:`render_refusal` builds the whole answer (status,
headers, body bytes) without Quart, so an ASGI-level front for the inference
routes answers exactly what the before-request hook answers.

The shapes, as the servers being imitated send them:

- OpenAI: 401 ``invalid_request_error`` (what it sends for a missing or wrong API
  key), 403 ``invalid_request_error`` (a key without the permission the call
  needs), 429 ``requests`` (OpenAI's type for a client over its request rate;
  the door's own 429, admission refusing for the instance's capacity, stays
  ``rate_limit_error``). ``code`` is the manager's machine code, as for every
  other error of that door.
- TEI answers 401 with an empty body (its ``--api-key`` check); its clients find
  no JSON there, so ours gives them the message in TEI's shape, ``error_type``
  from TEI's own vocabulary so a client parsing it into TEI's enum still can:
  ``Validation`` for 401/403 (the request was refused before reaching the model),
  ``Overloaded`` for 429 (TEI's type for its own 429).

Both keep ``WWW-Authenticate`` (401 with a bearer provider) and ``Retry-After``
(429): the OpenAI SDK honours ``Retry-After`` when it retries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, NamedTuple

import msgspec

from tei_manager.api.openai_routes import ErrorDetail, OpenAIError
from tei_manager.api.tei_routes import TeiErrorResponse
from tei_manager.auth.identity import Refusal
from tei_manager.errors import ERROR_TABLE, ErrorCode, TeiError, error_body, retry_after

__all__ = [
    "BEARER_REALM",
    "DoorError",
    "RefusalAnswer",
    "door_error_renderer",
    "refusal_renderer",
    "render_refusal",
]

#: The RFC 6750 challenge of a 401 where a bearer provider is configured.
BEARER_REALM: Final = 'Bearer realm="tei-manager"'

_OPENAI_PREFIX: Final = "/v1/"
_TEI_PREFIX: Final = "/tei/"

_encode: Final = msgspec.json.encode

RefusalBody = Callable[[Refusal], bytes]


class RefusalAnswer(NamedTuple):
    """A refusal as HTTP: status, headers and the encoded JSON body."""

    status: int
    headers: dict[str, str]
    body: bytes


# OpenAI's ``type`` per refusal code.
_OPENAI_TYPES: Final = {
    ErrorCode.UNAUTHENTICATED: "invalid_request_error",
    ErrorCode.FORBIDDEN: "invalid_request_error",
    ErrorCode.OVERLOADED: "requests",
}

# TEI's ``error_type`` per refusal code (names from TEI's ErrorType).
_TEI_TYPES: Final = {
    ErrorCode.UNAUTHENTICATED: "Validation",
    ErrorCode.FORBIDDEN: "Validation",
    ErrorCode.OVERLOADED: "Overloaded",
}


def _openai(refusal: Refusal) -> bytes:
    kind = _OPENAI_TYPES.get(refusal.code, "invalid_request_error")
    detail = ErrorDetail(message=refusal.message, type=kind, param=None, code=refusal.code.value)
    return _encode(OpenAIError(error=detail))


def _tei(refusal: Refusal) -> bytes:
    return _encode(TeiErrorResponse(refusal.message, _TEI_TYPES.get(refusal.code, "Validation")))


def _manager(refusal: Refusal) -> bytes:
    return _encode(error_body(TeiError(refusal.code, refusal.message)))


def refusal_renderer(path: str) -> RefusalBody:
    """The body renderer for a refusal of a request to ``path``: OpenAI's shape under
    ``/v1/``, TEI's under ``/tei/``, the manager's elsewhere."""
    if path.startswith(_OPENAI_PREFIX):
        return _openai
    if path.startswith(_TEI_PREFIX):
        return _tei
    return _manager


#: Renders an error the manager itself answers (a 404 or 405 from routing) in a door's
#: shape: its code and message, the body bytes.
DoorError = Callable[[ErrorCode, str], bytes]


def door_error_renderer(path: str) -> DoorError | None:
    """How to render the manager's own error (no such route, method not allowed) for
    a request to ``path``: in OpenAI's shape under ``/v1/`` (the SDK raises
    ``NotFoundError`` with its message), TEI's under ``/tei/``; None elsewhere (the
    manager's shape)."""
    render = refusal_renderer(path)
    if render is _manager:
        return None
    return lambda code, message: render(Refusal(code, message))


def render_refusal(path: str, refusal: Refusal, *, bearer: bool) -> RefusalAnswer:
    """The whole answer to ``refusal`` of a request to ``path``; ``bearer``: a bearer
    provider (API key, JWT) is configured, so a 401 carries its challenge."""
    headers: dict[str, str] = {}
    if refusal.code is ErrorCode.UNAUTHENTICATED and bearer:
        challenge = BEARER_REALM
        if refusal.bearer_error is not None:
            challenge += f', error="{refusal.bearer_error}"'
        headers["WWW-Authenticate"] = challenge
    if refusal.code is ErrorCode.OVERLOADED:
        headers["Retry-After"] = retry_after(refusal.retry_after_secs)
    status = ERROR_TABLE[refusal.code].http_status
    return RefusalAnswer(status, headers, refusal_renderer(path)(refusal))
