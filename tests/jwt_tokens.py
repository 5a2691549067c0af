"""Signing JWTs for tests (the server side only ever verifies)."""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk(key: PrivateKey, kid: str) -> dict[str, str]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
        return {"kty": "RSA", "kid": kid, "n": b64(n), "e": b64(numbers.e.to_bytes(3, "big"))}
    if isinstance(public, ec.EllipticCurvePublicKey):
        nums = public.public_numbers()
        return {
            "kty": "EC", "crv": "P-256", "kid": kid,
            "x": b64(nums.x.to_bytes(32, "big")), "y": b64(nums.y.to_bytes(32, "big")),
        }  # fmt: skip
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(raw)}


def sign(
    key: PrivateKey | None,
    claims: dict[str, Any],
    *,
    alg: str | None = None,
    kid: str | None = None,
) -> str:
    """A compact JWS; ``key`` None makes an unsigned ``alg: none`` token."""
    if alg is None:
        alg = {
            rsa.RSAPrivateKey: "RS256",
            ec.EllipticCurvePrivateKey: "ES256",
            ed25519.Ed25519PrivateKey: "EdDSA",
        }[next(t for t in (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey,
                           ed25519.Ed25519PrivateKey) if isinstance(key, t))]  # fmt: skip
    header: dict[str, str] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signed = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    data = signed.encode()
    if key is None:
        signature = b""
    elif isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        signature = key.sign(data)
    return f"{signed}.{b64(signature)}"
