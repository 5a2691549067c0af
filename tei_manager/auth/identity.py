"""Who a caller is, what it asks for, and the answer: small frozen records.

A front door (REST hook, gRPC authorizer) describes each request as an
:class:`AuthRequest`; :class:`~tei_manager.auth.policy.Authenticator` answers with an
:class:`Identity` (allowed) or a :class:`Refusal` (what to answer instead).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Iterable
from typing import Final

import msgspec

from tei_manager.errors import ErrorCode

__all__ = [
    "ANONYMOUS",
    "Address",
    "AuthRequest",
    "Identity",
    "Refusal",
    "Scope",
    "field_value",
    "parse_peer",
    "unmapped",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Scope(enum.StrEnum):
    """What a call needs: ``admin`` (instances, models, state), ``inference``, ``read``."""

    ADMIN = "admin"
    INFERENCE = "inference"
    READ = "read"


class Identity(msgspec.Struct, frozen=True):
    """An authenticated caller: ``name`` (key name, certificate subject, JWT subject),
    the provider that vouched for it, and the scopes it holds."""

    name: str
    provider: str
    scopes: frozenset[Scope]


# Auth disabled: every caller may do everything, and is named by nothing.
ANONYMOUS: Final = Identity("", "none", frozenset(Scope))


class AuthRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The credentials one request carries, as a front door sees them.

    ``peer`` is the TCP peer's address (None if unknown); ``authorization`` the
    ``Authorization`` header or ``authorization`` metadata; ``peer_certificate`` the
    DER client certificate of a native TLS connection; ``cert_header`` the raw
    ``X-SSL-Client-Cert`` value; ``forwarded_for`` the ``X-Forwarded-For`` value.
    """

    peer: Address | None
    authorization: str | None = None
    peer_certificate: bytes | None = None
    cert_header: str | None = None
    forwarded_for: str | None = None


class Refusal(msgspec.Struct, frozen=True):
    """A request turned away: the code (UNAUTHENTICATED, FORBIDDEN, OVERLOADED), a
    message safe to show the client, and for OVERLOADED how long to wait."""

    code: ErrorCode
    message: str
    identity: str = ""  # who was refused, when known; "" for no or bad credentials
    retry_after_secs: float = 0.0
    bearer_error: str | None = None  # RFC 6750 error for WWW-Authenticate ("invalid_token")


def field_value(values: Iterable[str]) -> str | None:
    """One header (or metadata key) sent several times, as the single comma-separated
    value it stands for (RFC 9110 5.3); None when it was not sent.

    Never just the first: a proxy that appends its own ``X-Forwarded-For`` or
    certificate header line leaves the client's forged one first.
    """
    joined = ",".join(values)
    return joined if joined else None


def unmapped(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``, what a dual-stack socket
    reports for an IPv4 client) as the IPv4 address it is; others unchanged."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_peer(peer: object) -> Address | None:
    """The address of an ASGI ``client`` tuple ``(host, port)``, or of a ``host:port``
    string (``[v6]:port`` or the bare ``v6:port`` a plain join makes)."""
    if isinstance(peer, str):
        # Every call on a gRPC connection has the same peer string: parse it once.
        return _parse_peer_text(peer)
    return _parse_peer(peer)


@functools.lru_cache(maxsize=4096)
def _parse_peer_text(peer: str) -> Address | None:
    return _parse_peer(peer)


def _parse_peer(peer: object) -> Address | None:
    if isinstance(peer, tuple | list) and peer:
        host = peer[0]
    elif isinstance(peer, str) and ":" in peer:
        host = peer.rsplit(":", 1)[0]
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
    else:
        return None
    if not isinstance(host, str):
        return None
    try:
        return unmapped(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        return None
