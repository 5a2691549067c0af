"""Client certificates: chain to ``ca_cert``, validity, client-auth usage, allowlists.

The same checks run for a certificate from a native TLS handshake and for one a
trusted proxy forwards in ``X-SSL-Client-Cert``: the chain is verified with
``cryptography`` signature by signature (never trusted from its subject text), the
validity dates and key usages are checked, then ``allowed_subjects`` /
``allowed_sans``. Problems with the certificate itself are UNAUTHENTICATED; a
good certificate outside the allowlists is FORBIDDEN.

Verdicts are cached per certificate (DER bytes), so a gRPC connection making
thousands of calls verifies its certificate once; an accepted certificate's verdict
lasts until it expires, a refusal's for a minute.
"""

from __future__ import annotations

import datetime
import ipaddress
import time
from collections.abc import Sequence
from typing import Final
from urllib.parse import unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from tei_manager.auth.identity import Identity, Refusal, Scope
from tei_manager.auth.settings import parse_subject
from tei_manager.errors import ErrorCode

__all__ = [
    "MAX_CERT_HEADER_BYTES",
    "CertificatePolicy",
    "CertificateVerifier",
    "load_certificates",
    "parse_cert_header",
    "san_strings",
]

# A PEM client certificate is 1-3 KiB; a forwarded chain of a few is still far below this.
MAX_CERT_HEADER_BYTES: Final = 16 * 1024
MAX_CHAIN_DEPTH: Final = 8
_CACHE_SIZE: Final = 1024
_REFUSAL_CACHE_SECS: Final = 60.0
# Identities end up in logs and metric labels: keep them short.
_MAX_NAME: Final = 256


def load_certificates(pem: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle; ValueError if there is none."""
    return x509.load_pem_x509_certificates(pem)


def parse_cert_header(value: str) -> x509.Certificate:
    """The certificate in an ``X-SSL-Client-Cert`` value: nginx's URL-escaped PEM
    (``$ssl_client_escaped_cert``), or PEM whose lines were folded with tabs."""
    if len(value) > MAX_CERT_HEADER_BYTES:
        raise ValueError(f"the certificate header is over {MAX_CERT_HEADER_BYTES} bytes")
    if "," in value:  # never in PEM, escaped or not: the header came more than once
        raise ValueError("more than one certificate header was sent")
    text = unquote(value) if "%" in value else value
    lines = [line.strip() for line in text.replace("\t", "\n").splitlines()]
    pem = "\n".join(line for line in lines if line).encode("ascii", "replace")
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise ValueError("the certificate header does not hold a PEM certificate") from None


def san_strings(cert: x509.Certificate) -> list[str]:
    """The subject alternative names as ``DNS:x``, ``IP:x``, ``URI:x``, ``email:x``."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
    names += [f"IP:{n}" for n in san.get_values_for_type(x509.IPAddress)]
    names += [f"URI:{n}" for n in san.get_values_for_type(x509.UniformResourceIdentifier)]
    names += [f"email:{n}" for n in san.get_values_for_type(x509.RFC822Name)]
    return names


def _normal_san(text: str) -> str:
    if text.startswith("IP:"):
        try:
            return f"IP:{ipaddress.ip_address(text[3:])}"
        except ValueError:
            return text
    if text.startswith("DNS:"):
        return text.lower()
    return text


class CertificatePolicy:
    """What a client certificate must satisfy, from ``[auth.mtls]``."""

    def __init__(
        self,
        *,
        allow_self_signed: bool = False,
        verify_subject: bool = True,
        allowed_subjects: Sequence[str] = (),
        verify_san: bool = False,
        allowed_sans: Sequence[str] = (),
        scopes: frozenset[Scope] = frozenset(Scope),
    ) -> None:
        self.allow_self_signed = allow_self_signed
        self.subjects = (
            [parse_subject(s, "allowed_subjects") for s in allowed_subjects]
            if verify_subject
            else []
        )
        self.sans = {_normal_san(s) for s in allowed_sans} if verify_san else set()
        self.scopes = scopes

    def allows(self, cert: x509.Certificate) -> str | None:
        """None if the allowlists admit ``cert``, else why not."""
        if self.subjects:
            have = {(attr.rfc4514_attribute_name.upper(), str(attr.value)) for attr in cert.subject}
            if not any(all(pair in have for pair in wanted) for wanted in self.subjects):
                return "its subject is not in allowed_subjects"
        if self.sans and not any(_normal_san(s) in self.sans for s in san_strings(cert)):
            return "none of its subject alternative names is in allowed_sans"
        return None


class CertificateVerifier:
    """Verifies client certificates against the trust anchors in ``ca_cert``.

    Immutable once built: a reload builds a new verifier (and so a new cache).
    """

    def __init__(self, ca_bundle: Sequence[x509.Certificate], policy: CertificatePolicy) -> None:
        self._anchors = list(ca_bundle)
        self._policy = policy
        self._cache: dict[bytes, tuple[Identity | Refusal, float]] = {}

    def verify_der(self, der: bytes, now: float | None = None) -> Identity | Refusal:
        """Verify a DER certificate (a native TLS peer's), with the verdict cached."""
        now = time.time() if now is None else now
        cached = self._cache.get(der)
        if cached is not None and now < cached[1]:
            return cached[0]
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            verdict: Identity | Refusal = Refusal(
                ErrorCode.UNAUTHENTICATED, "the client certificate cannot be parsed"
            )
            until = now + _REFUSAL_CACHE_SECS
        else:
            verdict = self.verify(cert, now)
            until = (
                cert.not_valid_after_utc.timestamp()
                if isinstance(verdict, Identity)
                else now + _REFUSAL_CACHE_SECS
            )
        if len(self._cache) >= _CACHE_SIZE:
            del self._cache[next(iter(self._cache))]
        self._cache[der] = (verdict, until)
        return verdict

    def verify(
        self,
        cert: x509.Certificate,
        now: float | None = None,
        intermediates: Sequence[x509.Certificate] = (),
    ) -> Identity | Refusal:
        """The identity ``cert`` proves, or why it proves none."""
        moment = datetime.datetime.fromtimestamp(time.time() if now is None else now, datetime.UTC)
        # cryptography parses names and extensions when they are first read; a
        # certificate a proxy forwarded unverified may hold ones that do not parse.
        try:
            problem = self._problem(cert, moment, intermediates)
            if problem is None:
                name = _identity_name(cert)
                not_allowed = self._policy.allows(cert)
        except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
            problem = "its names or extensions cannot be parsed"
        if problem is not None:
            return Refusal(ErrorCode.UNAUTHENTICATED, f"client certificate refused: {problem}")
        if not_allowed is not None:
            return Refusal(
                ErrorCode.FORBIDDEN, f"client certificate {name} refused: {not_allowed}", name
            )
        return Identity(name, "mtls", self._policy.scopes)

    def _problem(
        self,
        leaf: x509.Certificate,
        now: datetime.datetime,
        intermediates: Sequence[x509.Certificate],
    ) -> str | None:
        if now < leaf.not_valid_before_utc:
            return "it is not valid yet"
        if now > leaf.not_valid_after_utc:
            return "it has expired"
        usage = _leaf_usage_problem(leaf)
        if usage is not None:
            return usage
        if _self_signed(leaf):
            if not self._policy.allow_self_signed:
                return "it is self-signed"
            return None if leaf in self._anchors else "it is self-signed and not in ca_cert"
        return self._chain_problem(leaf, now, intermediates)

    def _chain_problem(
        self,
        leaf: x509.Certificate,
        now: datetime.datetime,
        intermediates: Sequence[x509.Certificate],
    ) -> str | None:
        pool = [*self._anchors, *intermediates]
        current = leaf
        for _ in range(MAX_CHAIN_DEPTH):
            if current is not leaf and current in self._anchors:
                return None
            issuer = next(
                (
                    candidate
                    for candidate in pool
                    if candidate.subject == current.issuer
                    and _is_ca(candidate)
                    and candidate.not_valid_before_utc <= now <= candidate.not_valid_after_utc
                    and _signed_by(current, candidate)
                ),
                None,
            )
            if issuer is None:
                return "it is not issued by a CA in ca_cert"
            if issuer in self._anchors:
                return None
            current = issuer
        return "its chain is too long"


def _identity_name(cert: x509.Certificate) -> str:
    name = cert.subject.rfc4514_string()
    if not name:
        sans = san_strings(cert)
        name = sans[0] if sans else "(no subject)"
    return name if len(name) <= _MAX_NAME else name[:_MAX_NAME] + "..."


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject and _signed_by(cert, cert)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not constraints.ca:
        return False
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return usage.key_cert_sign


def _leaf_usage_problem(cert: x509.Certificate) -> str | None:
    """A client certificate must not be a CA and, where it limits its use, allow client auth."""
    extensions = cert.extensions
    try:
        if extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "it is a CA certificate"
    except x509.ExtensionNotFound:
        pass
    try:
        eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        pass
    else:
        if ExtendedKeyUsageOID.CLIENT_AUTH not in eku and (
            ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku
        ):
            return "its extended key usage does not include client authentication"
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if not (usage.digital_signature or usage.key_agreement):
        return "its key usage allows neither digital signature nor key agreement"
    return None
