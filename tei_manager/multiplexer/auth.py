"""Auth on the multiplexer's port: the gRPC server's authorizer.

Each call is checked once, when its headers arrive and before any handler (fast
or not) sees it, from its ``CallContext``: ``authorization`` metadata (``Bearer
<key or JWT>``), the peer address, the native TLS client certificate, and in proxy
mode the ``x-ssl-client-cert`` metadata a trusted proxy adds. TeiMultiplexer
methods need the ``inference`` scope, reflection ``read``; the gRPC health checks
are public by default (``public_paths``), like the REST probes.

Refusals: UNAUTHENTICATED, PERMISSION_DENIED, and RESOURCE_EXHAUSTED with
``grpc-retry-pushback-ms`` for rate limits.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from tei_manager.auth.identity import AuthRequest, Identity, Scope, field_value, parse_peer
from tei_manager.auth.security import Security
from tei_manager.errors import ERROR_TABLE, ErrorCode
from tei_manager.grpc.calls import Authorizer, CallContext, CallRefusal
from tei_manager.grpc.rpc import pushback_ms

__all__ = ["grpc_authorizer", "scope_for_method"]

log = logging.getLogger(__name__)

_READ_SERVICES: Final = ("/grpc.reflection.", "/grpc.health.")


def scope_for_method(path: str) -> Scope:
    """The scope a gRPC method needs: ``read`` to look around, ``inference`` otherwise."""
    return Scope.READ if path.startswith(_READ_SERVICES) else Scope.INFERENCE


def grpc_authorizer(security: Security) -> Authorizer | None:
    """The authorizer for ``security``, or None when nothing can be refused."""
    auth = security.authenticator
    metrics = security.metrics
    if not auth.active:
        return None

    def authorize(context: CallContext) -> CallRefusal | None:
        path = context.method.path
        if auth.is_public(path):
            return None
        verdict = auth.check(
            AuthRequest(
                peer=parse_peer(context.peer),
                authorization=context.metadata_value("authorization"),
                peer_certificate=context.peer_certificate,
                cert_header=field_value(context.metadata_values("x-ssl-client-cert")),
                forwarded_for=field_value(context.metadata_values("x-forwarded-for")),
            ),
            scope_for_method(path),
            time.time(),
        )
        if isinstance(verdict, Identity):
            return None
        metrics.rejected("grpc", verdict)
        log.debug("refused %s from %s: %s", path, context.peer, verdict.message)
        pushback = None
        if verdict.code is ErrorCode.OVERLOADED:
            pushback = pushback_ms(verdict.retry_after_secs)
        return CallRefusal(ERROR_TABLE[verdict.code].grpc_status, verdict.message, pushback)

    return authorize
