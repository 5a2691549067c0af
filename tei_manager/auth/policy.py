"""The authenticator: providers, authorization by scope and address, rate limits.

One object answers every front door. ``check`` decides synchronously from an
:class:`AuthRequest`: the identity (the first provider that accepts the request
wins, in the configured order), then whether it holds the scope the call needs,
whether an admin call comes from ``admin_allowed_cidrs``, and whether its token
bucket has a token.

Proxy mode follows the deployment guide's warning to the letter: a certificate
header is believed only from ``trusted_proxies`` (one from anywhere else refuses
the request, whatever else it carries), its certificate is verified like a native
one, and with ``require_cert_headers`` the mtls provider accepts nothing else.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from tei_manager.auth.apikeys import ApiKeyStore
from tei_manager.auth.certs import CertificateVerifier, parse_cert_header
from tei_manager.auth.identity import (
    ANONYMOUS,
    Address,
    AuthRequest,
    Identity,
    Refusal,
    Scope,
    unmapped,
)
from tei_manager.auth.jwt import JwtError, JwtVerifier, looks_like_jwt
from tei_manager.auth.ratelimit import RateLimiter
from tei_manager.errors import ErrorCode

__all__ = ["Authenticator", "bearer_token"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_FORWARDED_MAX_HOPS = 16


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (scheme case-insensitive)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def _within(address: Address | None, networks: Sequence[Network]) -> bool:
    # An IPv4 network never contains an IPv6 address: compare the mapped form as IPv4.
    return address is not None and any(unmapped(address) in network for network in networks)


class Authenticator:
    """Decides who a request comes from and whether it may do what it asks."""

    def __init__(
        self,
        *,
        enabled: bool,
        providers: Sequence[str] = (),
        api_keys: ApiKeyStore | None = None,
        certificates: CertificateVerifier | None = None,
        jwt: JwtVerifier | None = None,
        require_cert_headers: bool = False,
        trusted_proxies: Iterable[Network] = (),
        admin_allowed_cidrs: Iterable[Network] = (),
        public_paths: Iterable[str] = (),
        limiter: RateLimiter | None = None,
    ) -> None:
        self.enabled = enabled
        self.providers = tuple(providers) if enabled else ()
        self.api_keys = api_keys
        #: Replaced when the CA file is re-read (see :mod:`tei_manager.auth.tls`).
        self.certificates = certificates
        self.jwt = jwt
        self.require_cert_headers = require_cert_headers
        self.trusted_proxies = tuple(trusted_proxies)
        self.admin_allowed_cidrs = tuple(admin_allowed_cidrs)
        self.public_paths = frozenset(public_paths)
        self.limiter = limiter
        self.uses_bearer = "api_key" in self.providers or "jwt" in self.providers

    @property
    def active(self) -> bool:
        """Whether any check can refuse a request (else the front doors skip the hook)."""
        return self.enabled or self.limiter is not None or bool(self.admin_allowed_cidrs)

    def is_public(self, path: str) -> bool:
        """Probes and whatever else ``public_paths`` names need no credentials."""
        return path in self.public_paths

    def client_address(self, request: AuthRequest) -> Address | None:
        """The client's address: the peer's, or behind a trusted proxy the nearest
        untrusted hop of ``X-Forwarded-For`` (read right to left, as nginx's realip)."""
        peer = request.peer
        if request.forwarded_for is None or not _within(peer, self.trusted_proxies):
            return peer
        hops = request.forwarded_for.split(",")[-_FORWARDED_MAX_HOPS:]
        for hop in reversed(hops):
            try:
                address = unmapped(ipaddress.ip_address(hop.strip()))
            except ValueError:
                return peer
            if not _within(address, self.trusted_proxies):
                return address
        return peer

    def check(self, request: AuthRequest, scope: Scope, now: float) -> Identity | Refusal:
        """The caller's identity if it may make a call needing ``scope`` now."""
        identity = self.authenticate(request, now)
        if isinstance(identity, Refusal):
            return identity
        refusal = self.authorize(identity, scope, request)
        if refusal is not None:
            return refusal
        if self.limiter is not None and self.limiter.limits(scope):
            client = identity.name or self.limiter.address_client(self.client_address(request))
            wait = self.limiter.take(scope, client, now)
            if wait > 0:
                return Refusal(
                    ErrorCode.OVERLOADED,
                    f"rate limit for {scope} calls exceeded: retry in {wait:.2f} s",
                    identity.name,
                    retry_after_secs=wait,
                )
        return identity

    def authenticate(self, request: AuthRequest, now: float) -> Identity | Refusal:
        """The identity the request's credentials prove, or why they prove none."""
        if not self.enabled:
            return ANONYMOUS
        if request.cert_header is not None and not _within(request.peer, self.trusted_proxies):
            return Refusal(
                ErrorCode.UNAUTHENTICATED,
                f"a client certificate header came from {request.peer or 'an unknown peer'}, "
                "which is not a trusted proxy",
            )
        first_failure: Refusal | None = None
        for provider in self.providers:
            if provider == "mtls":
                verdict = self._certificate(request, now)
            elif provider == "api_key":
                verdict = self._api_key(request)
            else:
                verdict = self._jwt(request, now)
            if isinstance(verdict, Identity):
                return verdict
            if verdict is not None and first_failure is None:
                first_failure = verdict
        if first_failure is not None:
            return first_failure
        return Refusal(ErrorCode.UNAUTHENTICATED, self._what_is_needed())

    def authorize(self, identity: Identity, scope: Scope, request: AuthRequest) -> Refusal | None:
        """None if ``identity`` may make a call needing ``scope`` from where it is."""
        if scope not in identity.scopes:
            return Refusal(
                ErrorCode.FORBIDDEN,
                f"{identity.name} lacks the {scope.value} scope this call needs",
                identity.name,
            )
        if scope is Scope.ADMIN and self.admin_allowed_cidrs:
            address = self.client_address(request)
            if not _within(address, self.admin_allowed_cidrs):
                return Refusal(
                    ErrorCode.FORBIDDEN,
                    f"admin calls are not allowed from {address or 'an unknown address'}",
                    identity.name,
                )
        return None

    def _what_is_needed(self) -> str:
        wanted = []
        if "mtls" in self.providers:
            wanted.append(
                "a client certificate through the TLS proxy"
                if self.require_cert_headers
                else "a client certificate"
            )
        if self.uses_bearer:
            wanted.append("'Authorization: Bearer <token>'")
        return "credentials required: send " + " or ".join(wanted)

    def _certificate(self, request: AuthRequest, now: float) -> Identity | Refusal | None:
        verifier = self.certificates
        if verifier is None:
            return None
        if request.cert_header is not None:  # from a trusted proxy: checked above
            try:
                cert = parse_cert_header(request.cert_header)
            except ValueError as e:
                return Refusal(ErrorCode.UNAUTHENTICATED, f"client certificate refused: {e}")
            return verifier.verify(cert, now)
        if self.require_cert_headers:
            return None  # proxy mode: a native certificate proves nothing here
        if request.peer_certificate is not None:
            return verifier.verify_der(request.peer_certificate, now)
        return None

    def _api_key(self, request: AuthRequest) -> Identity | Refusal | None:
        token = bearer_token(request.authorization)
        if token is None or self.api_keys is None:
            return None
        if self.jwt is not None and looks_like_jwt(token):
            return None  # the jwt provider answers for it
        identity = self.api_keys.identify(token)
        if identity is None:
            return Refusal(
                ErrorCode.UNAUTHENTICATED, "the API key is not valid", bearer_error="invalid_token"
            )
        return identity

    def _jwt(self, request: AuthRequest, now: float) -> Identity | Refusal | None:
        token = bearer_token(request.authorization)
        if token is None or self.jwt is None:
            return None
        if self.api_keys is not None and not looks_like_jwt(token):
            return None  # the api_key provider answers for it
        try:
            return self.jwt.verify(token, now)
        except JwtError as e:
            return Refusal(
                ErrorCode.UNAUTHENTICATED,
                f"bearer token refused: {e}",
                bearer_error="invalid_token",
            )
