"""Authentication, authorization, rate limits and CORS on the REST port.

Installed on the app as one ``before_request`` hook (and an ``after_request`` one
for CORS headers and the access log), so every route, unknown paths included, is
checked before it runs: a request without credentials learns nothing, not even
whether a path exists. The decision is :class:`~tei_manager.auth.policy.Authenticator`'s;
this module only turns the request into an :class:`AuthRequest` and a refusal into
an answer (:func:`~tei_manager.api.refusals.render_refusal`: in OpenAI's error shape
under ``/v1/``, TEI's under ``/tei/``, the contract's elsewhere):

- 401 ``UNAUTHENTICATED`` with ``WWW-Authenticate: Bearer realm="tei-manager"``
  (RFC 6750; ``error="invalid_token"`` when a token was sent and refused) where a
  bearer provider is configured;
- 403 ``FORBIDDEN``; 429 ``OVERLOADED`` with ``Retry-After`` in whole seconds.

Native TLS client certificates. Hypercorn does not put the TLS connection in the
ASGI scope, so the certificate travels in a context variable: the context we give
Hypercorn makes its ``SSLObject``s set it when their handshake completes. The
handshake runs in the connection's task and trio copies a task's context into the
tasks it spawns, so each request handled on that connection sees its own
connection's certificate and no other.
"""

from __future__ import annotations

import contextvars
import logging
import re
import ssl
import time
from collections.abc import MutableMapping
from typing import Any, Final, cast

from quart import Quart, Response, request
from werkzeug.datastructures import Headers

from tei_manager.api.refusals import render_refusal
from tei_manager.api.routes import JSON
from tei_manager.auth.identity import (
    AuthRequest,
    Identity,
    Refusal,
    Scope,
    field_value,
    parse_peer,
)
from tei_manager.auth.security import Security
from tei_manager.errors import ErrorCode

__all__ = [
    "IDENTITY_KEY",
    "RequestGuard",
    "capture_peer_certificates",
    "install_auth",
    "scope_for",
]

access_log = logging.getLogger("tei_manager.access")

#: Where the authenticated identity's name travels in the ASGI scope.
IDENTITY_KEY: Final = "tei_manager.identity"
# Inference routes (OpenAI- and TEI-compatible) live under these prefixes.
_INFERENCE_PREFIXES: Final = ("/v1/", "/tei/")
_READ_METHODS: Final = frozenset({"GET", "HEAD"})
_MAX_LOGGED_CHARS: Final = 200
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")
# Reset, export and import of the desired state.
_STATE_PREFIX: Final = "/state"

_peer_certificate: contextvars.ContextVar[bytes | None] = contextvars.ContextVar(
    "tei_manager_peer_certificate", default=None
)


class _CertificateNotingSSLObject(ssl.SSLObject):
    """Notes the client certificate in the connection task's context after the handshake."""

    def do_handshake(self) -> None:
        super().do_handshake()
        _peer_certificate.set(self.getpeercert(binary_form=True))


def capture_peer_certificates(context: ssl.SSLContext) -> ssl.SSLContext:
    """Make connections served with ``context`` expose their client certificate here."""
    context.sslobject_class = _CertificateNotingSSLObject
    return context


def scope_for(method: str, path: str) -> Scope:
    """The scope a REST call needs: inference routes, reads, or administration.

    ``/state/...`` is administration whatever the method: an export holds every
    instance's configuration.
    """
    if path.startswith(_INFERENCE_PREFIXES):
        return Scope.INFERENCE
    if path == _STATE_PREFIX or path.startswith(_STATE_PREFIX + "/"):
        return Scope.ADMIN
    if method in _READ_METHODS:
        return Scope.READ
    return Scope.ADMIN


def _loggable(text: str) -> str:
    """``text`` cut short, with control characters escaped: the path arrives
    percent-decoded, and ``%0A`` must not start a forged access-log line."""
    if len(text) > _MAX_LOGGED_CHARS:
        text = text[:_MAX_LOGGED_CHARS] + "..."
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _extras(scope: object) -> MutableMapping[str, Any]:
    return cast(MutableMapping[str, Any], scope)


class RequestGuard:
    """The checks :func:`install_auth` hooks into the app, callable outside Quart too."""

    def __init__(self, security: Security) -> None:
        self._auth = security.authenticator
        self._cors = security.cors
        self._metrics = security.metrics

    def _refuse(self, path: str, refusal: Refusal) -> Response:
        self._metrics.rejected("rest", refusal)
        answer = render_refusal(path, refusal, bearer=self._auth.uses_bearer)
        return Response(answer.body, answer.status, answer.headers, content_type=JSON)

    @property
    def active(self) -> bool:
        """Whether requests are checked, CORS applied or access logged at all."""
        return self._auth.active or self._cors.enabled

    async def before(self) -> Response | None:
        headers = request.headers
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in headers:
            return self._preflight()
        return self.authorize(request.method, request.path, headers, _extras(request.scope))

    def authorize(
        self, method: str, path: str, headers: Headers, scope: MutableMapping[str, Any]
    ) -> Response | None:
        """The refusal of a request, or None to let it through (its identity noted in ``scope``)."""
        if self._auth.is_public(path) or not self._auth.active:
            return None
        verdict = self._auth.check(
            AuthRequest(
                peer=parse_peer(scope.get("client")),
                authorization=headers.get("Authorization"),
                peer_certificate=_peer_certificate.get(),
                cert_header=field_value(headers.getlist("X-SSL-Client-Cert")),
                forwarded_for=field_value(headers.getlist("X-Forwarded-For")),
            ),
            scope_for(method, path),
            time.time(),
        )
        if isinstance(verdict, Identity):
            scope[IDENTITY_KEY] = verdict.name
            return None
        scope[IDENTITY_KEY] = verdict.identity
        return self._refuse(path, verdict)

    def _preflight(self) -> Response:
        headers = request.headers
        answer = self._cors.preflight(
            headers.get("Origin"),
            headers.get("Access-Control-Request-Method"),
            headers.get("Access-Control-Request-Headers"),
        )
        if answer is None:
            return self._refuse(
                request.path,
                Refusal(ErrorCode.FORBIDDEN, "cross-origin request not allowed by [cors]"),
            )
        response = Response(b"", status=204)
        response.headers.update(answer)
        return response

    async def after(self, response: Response) -> Response:
        response.headers.update(
            self.finish(
                request.method,
                request.path,
                request.headers,
                _extras(request.scope),
                response.status_code,
            )
        )
        return response

    def finish(
        self,
        method: str,
        path: str,
        headers: Headers,
        scope: MutableMapping[str, Any],
        status: int,
    ) -> dict[str, str]:
        """Log an answered request; the CORS headers its answer gets."""
        if self._auth.active:
            identity = scope.get(IDENTITY_KEY) or "-"
            client = scope.get("client")
            access_log.info(
                "%s %s %s %d identity=%s",
                client[0] if client else "-",
                method,
                _loggable(path),
                status,
                _loggable(identity),
                extra={"identity": identity, "status": status},
            )
        if self._cors.enabled and method != "OPTIONS":
            return self._cors.response_headers(headers.get("Origin"))
        return {}


def install_auth(app: Quart, security: Security) -> RequestGuard:
    """Check every request ``app`` serves against ``security``; the guard, for requests
    served before Quart's hooks run (:mod:`~tei_manager.api.inference_asgi`)."""
    hooks = RequestGuard(security)
    app.before_request(hooks.before)
    app.after_request(hooks.after)
    return hooks
