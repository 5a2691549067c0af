"""Building the security layer from the configuration: the one place its files are read.

Key files, environment variables, the CA bundle and JWT keys are read once at
start-up; anything unusable is a :class:`ConfigError` naming the field. A key read
from a file or the environment is hashed at once: only its digest is kept.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from cryptography import x509

from tei_manager.auth.apikeys import ApiKeyStore, StoredKey, digest
from tei_manager.auth.certs import CertificatePolicy, CertificateVerifier, load_certificates
from tei_manager.auth.cors import CorsPolicy
from tei_manager.auth.identity import Scope
from tei_manager.auth.jwt import JwtVerifier, PublicKey, load_jwks, load_pem_public_key
from tei_manager.auth.policy import Authenticator
from tei_manager.auth.ratelimit import Bucket, RateLimiter
from tei_manager.auth.settings import (
    SCOPES,
    ApiKeyConfig,
    JwtConfig,
    MtlsConfig,
    parse_network,
)
from tei_manager.config import ManagerConfig
from tei_manager.errors import ConfigError, ValidationError

__all__ = [
    "build_authenticator",
    "build_cors",
    "certificate_policy",
    "read_ca_bundle",
]


def _read(path: str, field: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{field}: cannot read {path}: {e.strerror}") from None


def read_ca_bundle(path: str, field: str = "auth.mtls.ca_cert") -> list[x509.Certificate]:
    """The certificates in the PEM bundle at ``path``."""
    try:
        return load_certificates(_read(path, field))
    except ValueError:
        raise ConfigError(f"{field}: {path} holds no PEM certificate") from None


def certificate_policy(mtls: MtlsConfig) -> CertificatePolicy:
    """The allowlists and scopes of ``[auth.mtls]``."""
    return CertificatePolicy(
        allow_self_signed=mtls.allow_self_signed,
        verify_subject=mtls.verify_subject,
        allowed_subjects=mtls.allowed_subjects,
        verify_san=mtls.verify_san,
        allowed_sans=mtls.allowed_sans,
        scopes=frozenset(Scope(s) for s in mtls.scopes),
    )


def _api_keys(section: ApiKeyConfig, env: Mapping[str, str]) -> ApiKeyStore:
    stored = []
    for i, key in enumerate(section.keys):
        where = f"auth.api_key.keys[{i}]"
        if key.sha256 is not None:
            sha = bytes.fromhex(key.sha256)
        elif key.file is not None:
            text = _read(key.file, f"{where}.file").decode("utf-8", "surrogateescape").strip()
            if not text:
                raise ConfigError(f"{where}.file: {key.file} is empty")
            sha = digest(text)
        else:
            assert key.env is not None
            text = env.get(key.env, "").strip()
            if not text:
                raise ConfigError(f"{where}.env: {key.env} is not set or empty")
            sha = digest(text)
        stored.append(StoredKey(key.name, frozenset(Scope(s) for s in key.scopes), sha))
    return ApiKeyStore(stored)


def _jwt(section: JwtConfig) -> JwtVerifier:
    keys: list[tuple[str | None, PublicKey]] = []
    for i, path in enumerate(section.public_keys):
        field = f"auth.jwt.public_keys[{i}]"
        try:
            keys.append((None, load_pem_public_key(_read(path, field), field)))
        except ValueError as e:
            text = str(e)
            if not text.startswith(field):
                text = f"{field}: {path} is not a PEM public key"
            raise ConfigError(text) from None
    if section.jwks_file is not None:
        field = "auth.jwt.jwks_file"
        try:
            keys += load_jwks(_read(section.jwks_file, field), field)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return JwtVerifier(
        keys,
        issuer=section.issuer,
        audience=section.audience,
        algorithms=section.algorithms,
        leeway_secs=section.leeway_secs,
        identity_claim=section.identity_claim,
        scopes_claim=section.scopes_claim,
        scope_map=section.scope_map,
        default_scopes=section.default_scopes,
    )


def build_authenticator(
    config: ManagerConfig, env: Mapping[str, str] | None = None
) -> Authenticator:
    """The authenticator for ``config``; reads key, CA and JWT key files."""
    env = os.environ if env is None else env
    auth = config.auth
    try:
        trusted = [
            parse_network(c, f"auth.trusted_proxies[{i}]")
            for i, c in enumerate(auth.trusted_proxies)
        ]
        admin = [
            parse_network(c, f"auth.admin_allowed_cidrs[{i}]")
            for i, c in enumerate(auth.admin_allowed_cidrs)
        ]
    except ValidationError as e:
        raise ConfigError.from_validation(e) from None
    providers = auth.providers if auth.enabled else ()
    certificates = None
    if "mtls" in providers and auth.mtls is not None and auth.mtls.ca_cert is not None:
        certificates = CertificateVerifier(
            read_ca_bundle(auth.mtls.ca_cert), certificate_policy(auth.mtls)
        )
    api_keys = _api_keys(auth.api_key, env) if "api_key" in providers and auth.api_key else None
    jwt = _jwt(auth.jwt) if "jwt" in providers and auth.jwt else None
    limits = config.rate_limit
    limiter = None
    if limits.enabled:
        buckets = {
            Scope(name): Bucket(bucket.requests_per_sec, bucket.burst)
            for name in SCOPES
            if (bucket := getattr(limits, name)) is not None
        }
        if buckets:
            limiter = RateLimiter(
                buckets, limits.max_tracked_clients, ipv6_prefix_bits=limits.ipv6_prefix_bits
            )
    return Authenticator(
        enabled=auth.enabled,
        providers=providers,
        api_keys=api_keys,
        certificates=certificates,
        jwt=jwt,
        require_cert_headers=auth.require_cert_headers,
        trusted_proxies=trusted,
        admin_allowed_cidrs=admin,
        public_paths=auth.public_paths,
        limiter=limiter,
    )


def build_cors(config: ManagerConfig) -> CorsPolicy:
    """The ``[cors]`` section as a policy."""
    cors = config.cors
    return CorsPolicy(
        cors.allowed_origins,
        allow_credentials=cors.allow_credentials,
        allowed_methods=cors.allowed_methods,
        allowed_headers=cors.allowed_headers,
        max_age_secs=cors.max_age_secs,
    )
