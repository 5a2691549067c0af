"""Bearer JWTs verified offline: RS256, ES256 and EdDSA against configured keys.

Written on ``cryptography`` directly: the JOSE subset we accept is small (compact
JWS, three algorithms, no ``crit`` extensions) and every rule is in view. The
algorithm comes from our configuration, never from the token alone: a header's
``alg`` must be one we allow *and* match the key's type, so ``none`` and the
RS256/HS256 confusion are refused. ``iss`` and ``aud`` must match, ``exp`` is
required, ``exp``/``nbf`` allow ``leeway_secs`` of clock skew.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tei_manager.auth.identity import Identity, Scope

__all__ = [
    "MAX_TOKEN_BYTES",
    "JwtError",
    "JwtVerifier",
    "PublicKey",
    "load_jwks",
    "load_pem_public_key",
    "looks_like_jwt",
]

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

# Kubernetes and OIDC tokens are 1-2 KiB; this bounds what we decode and hash.
MAX_TOKEN_BYTES: Final = 16 * 1024
_MIN_RSA_BITS: Final = 2048
_MAX_NAME: Final = 256


class JwtError(Exception):
    """A token we refuse; ``str()`` is safe to show the client (no token content)."""


def _b64url(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise JwtError("the token is not base64url") from None


def looks_like_jwt(token: str) -> bool:
    """Three dot-separated parts, the first starting like a JSON object (``eyJ``)."""
    return token.count(".") == 2 and token.startswith("eyJ")


def _key_algorithm(key: PublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ES256"
    return "EdDSA"


def _check_key(key: object, where: str) -> PublicKey:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"{where}: RSA key of {key.key_size} bits: use at least 2048")
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"{where}: EC key on {key.curve.name}: ES256 needs P-256")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise ValueError(f"{where}: unsupported key type: use RSA, EC P-256 or Ed25519")


def load_pem_public_key(pem: bytes, where: str) -> PublicKey:
    """A PEM public key (SubjectPublicKeyInfo) usable for RS256, ES256 or EdDSA."""
    return _check_key(serialization.load_pem_public_key(pem), where)


def _jwk_int(jwk: Mapping[str, Any], name: str, where: str) -> int:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{where}: missing {name!r}")
    return int.from_bytes(_b64url(value), "big")


def load_jwks(data: bytes, where: str) -> list[tuple[str | None, PublicKey]]:
    """Keys of a JWKS document by ``kid``; RSA, EC P-256 and OKP Ed25519 keys."""
    try:
        document = json.loads(data)
    except ValueError:
        raise ValueError(f"{where}: not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError(f"{where}: not a JWKS document (no 'keys' list)")
    keys: list[tuple[str | None, PublicKey]] = []
    for i, jwk in enumerate(document["keys"]):
        at = f"{where}: keys[{i}]"
        if not isinstance(jwk, dict):
            raise ValueError(f"{at}: not an object")
        if jwk.get("use", "sig") != "sig":
            continue
        kty = jwk.get("kty")
        key: object
        try:
            if kty == "RSA":
                key = rsa.RSAPublicNumbers(
                    _jwk_int(jwk, "e", at), _jwk_int(jwk, "n", at)
                ).public_key()
            elif kty == "EC" and jwk.get("crv") == "P-256":
                key = ec.EllipticCurvePublicNumbers(
                    _jwk_int(jwk, "x", at), _jwk_int(jwk, "y", at), ec.SECP256R1()
                ).public_key()
            elif kty == "OKP" and jwk.get("crv") == "Ed25519":
                key = ed25519.Ed25519PublicKey.from_public_bytes(_b64url(str(jwk.get("x", ""))))
            else:
                raise ValueError(f"{at}: unsupported key (kty {kty!r}, crv {jwk.get('crv')!r})")
        except JwtError as e:
            raise ValueError(f"{at}: {e}") from None
        kid = jwk.get("kid")
        keys.append((kid if isinstance(kid, str) else None, _check_key(key, at)))
    if not keys:
        raise ValueError(f"{where}: no signing key")
    return keys


def _verify_signature(key: PublicKey, alg: str, signature: bytes, signed: bytes) -> bool:
    try:
        if alg == "RS256" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
        elif alg == "ES256" and isinstance(key, ec.EllipticCurvePublicKey):
            if len(signature) != 64:  # JWS ES256 is r || s, 32 bytes each (RFC 7518 3.4)
                return False
            r = int.from_bytes(signature[:32], "big")
            s = int.from_bytes(signature[32:], "big")
            key.verify(encode_dss_signature(r, s), signed, ec.ECDSA(hashes.SHA256()))
        elif alg == "EdDSA" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, signed)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _seconds(value: object) -> float | None:
    """A NumericDate claim as a finite float; None for anything else. Python's json
    reads ``NaN`` and ``Infinity``, which compare as never expired."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an int past any float
        return None
    return seconds if math.isfinite(seconds) else None


class JwtVerifier:
    """Verifies bearer JWTs and maps a claim to our scopes."""

    def __init__(
        self,
        keys: Iterable[tuple[str | None, PublicKey]],
        *,
        issuer: str,
        audience: str,
        algorithms: Sequence[str] = ("RS256", "ES256", "EdDSA"),
        leeway_secs: float = 30.0,
        identity_claim: str = "sub",
        scopes_claim: str = "scope",
        scope_map: Mapping[str, Sequence[str]] | None = None,
        default_scopes: Iterable[str] = (),
    ) -> None:
        # Keys from a JWKS have a kid; PEM keys have none and are tried for any token.
        self._keys = tuple(keys)
        self._issuer = issuer
        self._audience = audience
        self._algorithms = frozenset(algorithms)
        self._leeway = leeway_secs
        self._identity_claim = identity_claim
        self._scopes_claim = scopes_claim
        self._scope_map = {k: frozenset(Scope(s) for s in v) for k, v in (scope_map or {}).items()}
        self._default_scopes = frozenset(Scope(s) for s in default_scopes)

    def _candidates(self, kid: object) -> list[PublicKey]:
        if not isinstance(kid, str):
            return [key for _, key in self._keys]
        # A named key is that key; an unknown name can still be one of the unnamed keys.
        return [key for key_id, key in self._keys if key_id == kid or key_id is None]

    def verify(self, token: str, now: float) -> Identity:
        """The identity in a valid token; raises :class:`JwtError` saying what is wrong."""
        if len(token) > MAX_TOKEN_BYTES:
            raise JwtError("the token is too long")
        parts = token.split(".")
        if len(parts) != 3:
            raise JwtError("the token is not a compact JWS (header.payload.signature)")
        header = self._json(parts[0], "header")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise JwtError("the token's algorithm is not allowed")
        if "crit" in header:
            raise JwtError("the token has critical header extensions we do not support")
        signature = _b64url(parts[2])
        signed = f"{parts[0]}.{parts[1]}".encode("ascii", "replace")
        keys = [k for k in self._candidates(header.get("kid")) if _key_algorithm(k) == alg]
        if not any(_verify_signature(k, alg, signature, signed) for k in keys):
            raise JwtError("the token's signature does not verify with any configured key")
        claims = self._json(parts[1], "payload")
        self._check_claims(claims, now)
        name = claims.get(self._identity_claim)
        if not isinstance(name, str) or not name:
            raise JwtError(f"the token has no {self._identity_claim!r} claim")
        name = name if len(name) <= _MAX_NAME else name[:_MAX_NAME] + "..."
        return Identity(name, "jwt", self._scopes(claims))

    @staticmethod
    def _json(part: str, what: str) -> dict[str, Any]:
        try:
            value = json.loads(_b64url(part))
        except ValueError:
            raise JwtError(f"the token's {what} is not JSON") from None
        if not isinstance(value, dict):
            raise JwtError(f"the token's {what} is not a JSON object")
        return value

    def _check_claims(self, claims: Mapping[str, Any], now: float) -> None:
        if claims.get("iss") != self._issuer:
            raise JwtError("the token is from another issuer")
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if self._audience not in audiences:
            raise JwtError("the token is for another audience")
        expires = _seconds(claims.get("exp"))
        if expires is None:
            raise JwtError("the token has no expiry (exp)")
        if now > expires + self._leeway:
            raise JwtError("the token has expired")
        if "nbf" in claims:
            not_before = _seconds(claims["nbf"])
            if not_before is None:
                raise JwtError("the token's nbf is not a number")
            if now + self._leeway < not_before:
                raise JwtError("the token is not valid yet")

    def _scopes(self, claims: Mapping[str, Any]) -> frozenset[Scope]:
        raw = claims.get(self._scopes_claim)
        values: list[str] = []
        if isinstance(raw, str):
            values = raw.split()
        elif isinstance(raw, list):
            values = [v for v in raw if isinstance(v, str)]
        scopes = set(self._default_scopes)
        for value in values:
            mapped = self._scope_map.get(value)
            if mapped is not None:
                scopes |= mapped
            elif value in Scope.__members__.values():
                scopes.add(Scope(value))
        return frozenset(scopes)
