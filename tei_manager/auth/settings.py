"""The ``[auth]``, ``[rate_limit]`` and ``[cors]`` sections of the configuration file.

Compatible with the original's ``[auth]`` / ``[auth.mtls]`` tables (``enabled``,
``providers``, ``require_cert_headers``, ``ca_cert``, ``server_cert``, ``server_key``,
``allow_self_signed``, ``verify_subject``, ``allowed_subjects``, ``verify_san``,
``allowed_sans``), plus what it lacked: ``trusted_proxies``, ``public_paths``,
``admin_allowed_cidrs``, ``[auth.api_key]``, ``[auth.jwt]``, rate limits and CORS.
Validation here is pure (no file is read); :mod:`tei_manager.auth.build` reads the
files and names the field when one is unusable.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Final, Literal

import msgspec

from tei_manager.errors import ValidationError, quote

__all__ = [
    "DEFAULT_PUBLIC_PATHS",
    "SCOPES",
    "ApiKeyConfig",
    "ApiKeyEntry",
    "AuthConfig",
    "BucketConfig",
    "CorsConfig",
    "JwtConfig",
    "MtlsConfig",
    "ProviderName",
    "RateLimitConfig",
    "ScopeName",
    "parse_network",
    "validate_auth_config",
    "validate_cors_config",
    "validate_rate_limit_config",
]

ScopeName = Literal["admin", "inference", "read"]
SCOPES: Final[tuple[ScopeName, ...]] = ("admin", "inference", "read")
ProviderName = Literal["mtls", "api_key", "jwt"]
JwtAlgorithm = Literal["RS256", "ES256", "EdDSA"]

# Probes stay reachable for kubelets and load balancers that send no credentials;
# gRPC health checks are the multiplexer's probes.
DEFAULT_PUBLIC_PATHS: Final[tuple[str, ...]] = (
    "/health/live",
    "/health/ready",
    "/health/startup",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
)
_SAN_KINDS: Final = ("DNS:", "IP:", "URI:", "email:")
_HEX64_RE: Final = re.compile(r"[0-9a-fA-F]{64}")
_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ORIGIN_RE: Final = re.compile(r"https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?|\*")
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_MAX_LEEWAY_SECS: Final = 300.0


class MtlsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[auth.mtls]``: TLS on both ports and client certificates."""

    ca_cert: str | None = None  # verifies client certificates (intermediates go here too)
    server_cert: str | None = None  # with server_key: both ports serve TLS
    server_key: str | None = None
    allow_self_signed: bool = False  # a self-signed client cert listed in ca_cert passes
    verify_subject: bool = True
    allowed_subjects: tuple[str, ...] = ()  # empty: any subject the CA signed
    verify_san: bool = False
    allowed_sans: tuple[str, ...] = ()  # "DNS:x", "IP:1.2.3.4", "URI:spiffe://...", "email:x"
    scopes: tuple[ScopeName, ...] = SCOPES  # what an accepted certificate may do
    reload_check_secs: float = 10.0  # how often the files are checked for changes


class ApiKeyEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One key: exactly one of ``sha256`` (hex digest), ``file`` or ``env`` holding it."""

    name: str
    scopes: tuple[ScopeName, ...]
    sha256: str | None = None
    file: str | None = None  # the key itself, surrounding whitespace ignored
    env: str | None = None  # name of an environment variable holding the key


class ApiKeyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[auth.api_key]``: bearer keys; only their SHA-256 digests are kept."""

    keys: tuple[ApiKeyEntry, ...] = ()


class JwtConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[auth.jwt]``: bearer JWTs verified offline against configured keys."""

    issuer: str
    audience: str
    public_keys: tuple[str, ...] = ()  # PEM files
    jwks_file: str | None = None
    algorithms: tuple[JwtAlgorithm, ...] = ("RS256", "ES256", "EdDSA")
    leeway_secs: float = 30.0
    identity_claim: str = "sub"
    scopes_claim: str = "scope"  # a space-separated string or a list of strings
    # Claim value -> our scopes; a value absent here is taken as our scope of that name.
    scope_map: dict[str, tuple[ScopeName, ...]] = msgspec.field(default_factory=dict)
    default_scopes: tuple[ScopeName, ...] = ()  # granted to every valid token


class AuthConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[auth]``: who may call what; off by default, as in the original."""

    enabled: bool = False
    providers: tuple[ProviderName, ...] = ()  # a request passes if one of them accepts it
    require_cert_headers: bool = False  # proxy mode: identity from X-SSL-Client-Cert only
    trusted_proxies: tuple[str, ...] = ()  # CIDRs allowed to send certificate headers
    public_paths: tuple[str, ...] = DEFAULT_PUBLIC_PATHS
    admin_allowed_cidrs: tuple[str, ...] = ()  # empty: admin from anywhere
    mtls: MtlsConfig | None = None
    api_key: ApiKeyConfig | None = None
    jwt: JwtConfig | None = None


class BucketConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A token bucket: ``requests_per_sec`` sustained, ``burst`` at once."""

    requests_per_sec: float
    burst: int


class RateLimitConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[rate_limit]``: per identity (or client address when anonymous), per scope."""

    enabled: bool = False
    admin: BucketConfig | None = None  # None: that scope is not limited
    inference: BucketConfig | None = None
    read: BucketConfig | None = None
    max_tracked_clients: int = 10000  # buckets kept; the least recently used go first
    #: Anonymous IPv6 clients share a bucket per network of this prefix (IPv4: per
    #: address); a /64 is what one subscriber holds (ratelimit.DEFAULT_IPV6_PREFIX_BITS).
    ipv6_prefix_bits: int = 64


class CorsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[cors]``: nothing is allowed by default."""

    allowed_origins: tuple[str, ...] = ()  # "https://ui.example.com", or "*"
    allow_credentials: bool = False
    allowed_methods: tuple[str, ...] = ("GET", "POST", "DELETE")
    allowed_headers: tuple[str, ...] = ("authorization", "content-type")
    max_age_secs: int = 600


def parse_network(text: str, field: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR (``10.0.0.0/8``) or a single address; raises naming ``field``."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        shown = text if len(text) <= 64 else text[:64] + "..."
        raise ValidationError(
            field, f"{quote(shown)} is not an address or CIDR (e.g. 10.0.0.0/8)"
        ) from None


def _path(value: str, field: str) -> None:
    if not value or "\x00" in value:
        raise ValidationError(field, "must be a non-empty path")


def _unique(values: tuple[str, ...], field: str) -> None:
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            raise ValidationError(f"{field}[{i}]", f"{quote(value)} is listed twice")
        seen.add(value)


def parse_subject(text: str, field: str) -> tuple[tuple[str, str], ...]:
    """``"CN=client1,O=Acme"`` as ``(("CN", "client1"), ("O", "Acme"))``; ``\\,`` escapes."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    pairs: list[tuple[str, str]] = []
    for part in parts:
        name, sep, value = part.strip().partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValidationError(
                field,
                f"{quote(text)} is not a subject: use ATTR=value[,ATTR=value], e.g. CN=client1",
            )
        pairs.append((name.strip().upper(), value.strip()))
    return tuple(pairs)


def _validate_mtls(auth: AuthConfig, mtls: MtlsConfig, uses_mtls: bool) -> None:
    where = "auth.mtls"
    for name in ("ca_cert", "server_cert", "server_key"):
        value = getattr(mtls, name)
        if value is not None:
            _path(value, f"{where}.{name}")
    if (mtls.server_cert is None) != (mtls.server_key is None):
        missing = "server_key" if mtls.server_key is None else "server_cert"
        raise ValidationError(f"{where}.{missing}", "server_cert and server_key go together")
    if uses_mtls:
        if mtls.ca_cert is None:
            raise ValidationError(f"{where}.ca_cert", "is required by the mtls provider")
        if not auth.require_cert_headers and mtls.server_cert is None:
            raise ValidationError(
                f"{where}.server_cert",
                "native mTLS needs server_cert and server_key; behind a proxy set "
                "auth.require_cert_headers = true",
            )
    for i, subject in enumerate(mtls.allowed_subjects):
        parse_subject(subject, f"{where}.allowed_subjects[{i}]")
    _unique(mtls.allowed_subjects, f"{where}.allowed_subjects")
    for i, san in enumerate(mtls.allowed_sans):
        kind = next((k for k in _SAN_KINDS if san.startswith(k)), None)
        if kind is None or len(san) == len(kind):
            raise ValidationError(
                f"{where}.allowed_sans[{i}]",
                f"{quote(san)} is not a SAN: use DNS:name, IP:address, URI:uri or email:address",
            )
        if kind == "IP:":
            try:
                ipaddress.ip_address(san[3:])
            except ValueError:
                raise ValidationError(
                    f"{where}.allowed_sans[{i}]", f"{quote(san)} is not an IP address"
                ) from None
    _unique(mtls.allowed_sans, f"{where}.allowed_sans")
    if mtls.allow_self_signed and not (
        (mtls.verify_subject and mtls.allowed_subjects) or (mtls.verify_san and mtls.allowed_sans)
    ):
        raise ValidationError(
            f"{where}.allow_self_signed",
            "needs allowed_subjects or allowed_sans: anyone can make a self-signed certificate",
        )
    if not mtls.scopes:
        raise ValidationError(f"{where}.scopes", "must not be empty")
    if not math.isfinite(mtls.reload_check_secs) or mtls.reload_check_secs <= 0:
        raise ValidationError(
            f"{where}.reload_check_secs", f"{mtls.reload_check_secs} is invalid: use a number > 0"
        )


def _validate_api_keys(keys: ApiKeyConfig) -> None:
    if not keys.keys:
        raise ValidationError("auth.api_key.keys", "the api_key provider needs at least one key")
    names: set[str] = set()
    for i, key in enumerate(keys.keys):
        where = f"auth.api_key.keys[{i}]"
        if not key.name or len(key.name) > 64 or not key.name.isprintable():
            raise ValidationError(f"{where}.name", "use 1-64 printable characters")
        if key.name in names:
            raise ValidationError(f"{where}.name", f"duplicate key name {quote(key.name)}")
        names.add(key.name)
        if not key.scopes:
            raise ValidationError(
                f"{where}.scopes", "must not be empty: use admin, inference, read"
            )
        sources = [s for s in ("sha256", "file", "env") if getattr(key, s) is not None]
        if len(sources) != 1:
            raise ValidationError(
                where, "give exactly one of sha256 (hex digest), file or env; never the key itself"
            )
        if key.sha256 is not None and not _HEX64_RE.fullmatch(key.sha256):
            raise ValidationError(f"{where}.sha256", "is not 64 hex digits (sha256sum's output)")
        if key.file is not None:
            _path(key.file, f"{where}.file")
        if key.env is not None and not _ENV_NAME_RE.fullmatch(key.env):
            raise ValidationError(f"{where}.env", f"{quote(key.env)} is not a variable name")


def _validate_jwt(jwt: JwtConfig) -> None:
    where = "auth.jwt"
    for name in ("issuer", "audience", "identity_claim", "scopes_claim"):
        if not getattr(jwt, name):
            raise ValidationError(f"{where}.{name}", "must not be empty")
    if not jwt.public_keys and jwt.jwks_file is None:
        raise ValidationError(f"{where}.public_keys", "give public_keys or jwks_file")
    for i, path in enumerate(jwt.public_keys):
        _path(path, f"{where}.public_keys[{i}]")
    if jwt.jwks_file is not None:
        _path(jwt.jwks_file, f"{where}.jwks_file")
    if not jwt.algorithms:
        raise ValidationError(f"{where}.algorithms", "must not be empty: use RS256, ES256, EdDSA")
    leeway = jwt.leeway_secs
    if not math.isfinite(leeway) or not 0 <= leeway <= _MAX_LEEWAY_SECS:
        raise ValidationError(f"{where}.leeway_secs", f"{leeway} is invalid: use 0-300")


def validate_auth_config(auth: AuthConfig) -> None:
    """Check ``[auth]`` as a whole; raises :class:`ValidationError` naming the field."""
    _unique(auth.providers, "auth.providers")
    if auth.enabled and not auth.providers:
        raise ValidationError("auth.providers", "auth is enabled: name mtls, api_key and/or jwt")
    for i, cidr in enumerate(auth.trusted_proxies):
        parse_network(cidr, f"auth.trusted_proxies[{i}]")
    for i, cidr in enumerate(auth.admin_allowed_cidrs):
        parse_network(cidr, f"auth.admin_allowed_cidrs[{i}]")
    for i, path in enumerate(auth.public_paths):
        if not path.startswith("/"):
            raise ValidationError(f"auth.public_paths[{i}]", f"{quote(path)} must start with '/'")
    uses = set(auth.providers) if auth.enabled else set()
    if auth.require_cert_headers and "mtls" in uses and not auth.trusted_proxies:
        raise ValidationError(
            "auth.trusted_proxies",
            "require_cert_headers needs the proxies' addresses (CIDRs) to accept headers from",
        )
    if auth.mtls is not None:
        _validate_mtls(auth, auth.mtls, "mtls" in uses)
    elif "mtls" in uses:
        raise ValidationError("auth.mtls", "the mtls provider needs an [auth.mtls] section")
    if auth.api_key is not None:
        _validate_api_keys(auth.api_key)
    elif "api_key" in uses:
        raise ValidationError(
            "auth.api_key", "the api_key provider needs an [auth.api_key] section"
        )
    if auth.jwt is not None:
        _validate_jwt(auth.jwt)
    elif "jwt" in uses:
        raise ValidationError("auth.jwt", "the jwt provider needs an [auth.jwt] section")


def validate_rate_limit_config(limits: RateLimitConfig) -> None:
    """Check ``[rate_limit]``."""
    for scope in SCOPES:
        bucket: BucketConfig | None = getattr(limits, scope)
        if bucket is None:
            continue
        rate = bucket.requests_per_sec
        if not math.isfinite(rate) or rate <= 0:
            raise ValidationError(
                f"rate_limit.{scope}.requests_per_sec", f"{rate} is invalid: use a number > 0"
            )
        if bucket.burst < 1:
            raise ValidationError(
                f"rate_limit.{scope}.burst", f"{bucket.burst} is invalid: use >= 1"
            )
    if limits.max_tracked_clients < 1:
        raise ValidationError(
            "rate_limit.max_tracked_clients", f"{limits.max_tracked_clients} is invalid: use >= 1"
        )
    if not 1 <= limits.ipv6_prefix_bits <= 128:
        raise ValidationError(
            "rate_limit.ipv6_prefix_bits", f"{limits.ipv6_prefix_bits} is invalid: use 1-128"
        )


def validate_cors_config(cors: CorsConfig) -> None:
    """Check ``[cors]``."""
    for i, origin in enumerate(cors.allowed_origins):
        if not _ORIGIN_RE.fullmatch(origin):
            raise ValidationError(
                f"cors.allowed_origins[{i}]",
                f"{quote(origin)} is not an origin: use scheme://host[:port] or *",
            )
    if cors.allow_credentials and "*" in cors.allowed_origins:
        raise ValidationError(
            "cors.allow_credentials", "cannot be true with origin '*': list the origins"
        )
    for name in ("allowed_methods", "allowed_headers"):
        for i, token in enumerate(getattr(cors, name)):
            if not _TOKEN_RE.fullmatch(token):
                raise ValidationError(f"cors.{name}[{i}]", f"{quote(token)} is not an HTTP token")
    if not 0 <= cors.max_age_secs <= 86400:
        raise ValidationError("cors.max_age_secs", f"{cors.max_age_secs} is invalid: use 0-86400")
