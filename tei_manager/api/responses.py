"""Turning results and failures into HTTP responses.

Every error leaves as ``{"error", "code", "timestamp"}``, whatever raised it: a
:class:`TeiError` from the manager, a routing or protocol error from Werkzeug
(404 for an unknown path, 405, 413), or a bug (500 with no detail; the traceback
goes to the server log, never to the client).
"""

from __future__ import annotations

import logging
from typing import Final

import msgspec
from quart import Response
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from tei_manager.api.refusals import DoorError
from tei_manager.api.routes import JSON, MAX_BODY_BYTES
from tei_manager.errors import ErrorBody, ErrorCode, TeiError, error_body, rfc3339_utc

__all__ = [
    "error_response",
    "http_exception_response",
    "json_response",
    "unexpected_error_response",
]

log = logging.getLogger(__name__)

_encoder: Final = msgspec.json.Encoder()

# Werkzeug's HTTP errors, in the contract's codes.
_HTTP_CODES: Final[dict[int, str]] = {
    400: ErrorCode.VALIDATION_ERROR.value,
    401: ErrorCode.UNAUTHENTICATED.value,
    403: ErrorCode.FORBIDDEN.value,
    404: ErrorCode.NOT_FOUND.value,
    405: ErrorCode.METHOD_NOT_ALLOWED.value,
    408: ErrorCode.TIMEOUT.value,
    413: ErrorCode.PAYLOAD_TOO_LARGE.value,
    429: ErrorCode.OVERLOADED.value,
    503: ErrorCode.BACKEND_UNAVAILABLE.value,
    504: ErrorCode.TIMEOUT.value,
}

# A path is echoed in 404/405 messages; a huge one is cut so the body stays small.
_MAX_ECHOED_PATH: Final = 200


def json_response(body: object, status: int = 200) -> Response:
    """``body`` (Structs, lists, dicts) encoded with msgspec."""
    return Response(_encoder.encode(body), status=status, content_type=JSON)


def error_response(error: TeiError) -> Response:
    """The contract's error body for ``error``, with its code's HTTP status."""
    return json_response(error_body(error), error.http_status)


def http_exception_response(
    error: HTTPException,
    method: str,
    path: str,
    render: DoorError | None = None,
) -> Response:
    """A Werkzeug HTTP error (404, 405, 413, ...) in the contract's error shape, or
    rendered by ``render`` from its code and message (a front door's own shape)."""
    status = error.code or 500
    code = _HTTP_CODES.get(status)
    if code is None:
        code = (ErrorCode.INTERNAL_ERROR if status >= 500 else ErrorCode.VALIDATION_ERROR).value
    path = path if len(path) <= _MAX_ECHOED_PATH else path[:_MAX_ECHOED_PATH] + "..."
    headers: dict[str, str] = {}
    if isinstance(error, MethodNotAllowed) and error.valid_methods:
        headers["Allow"] = ", ".join(sorted(error.valid_methods))
        message = f"{method} is not allowed on {path}: use {headers['Allow']}"
    elif status == 404:
        message = f"no such route: {method} {path}"
    elif status == 413:
        message = f"request body too large: the limit is {MAX_BODY_BYTES} bytes"
    else:
        message = (error.description or error.name).rstrip(".")
    if render is None:
        response = json_response(
            ErrorBody(error=message, code=code, timestamp=rfc3339_utc()), status
        )
    else:
        response = Response(render(ErrorCode(code), message), status=status, content_type=JSON)
    response.headers.update(headers)
    return response


def unexpected_error_response(error: BaseException, method: str, path: str) -> Response:
    """500 for an exception nobody expected; the details go to the log only.

    An ``OSError`` is ``IO_ERROR`` with its one-line reason (no file names: they
    can reveal the host's layout); anything else is ``INTERNAL_ERROR``.
    """
    log.error("unhandled error answering %s %s", method, path, exc_info=error)
    if isinstance(error, OSError):
        tei = TeiError(ErrorCode.IO_ERROR, f"I/O error: {error.strerror or type(error).__name__}")
    else:
        tei = TeiError(ErrorCode.INTERNAL_ERROR, "internal error")
    return error_response(tei)
