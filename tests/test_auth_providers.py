"""The pure provider layer: certificates, API keys, JWTs, rate limits, CORS, the policy."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import math
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtensionOID

from tei_manager.auth.apikeys import ApiKeyStore, StoredKey
from tei_manager.auth.build import build_authenticator
from tei_manager.auth.certs import CertificatePolicy, CertificateVerifier, parse_cert_header
from tei_manager.auth.cors import CorsPolicy
from tei_manager.auth.identity import AuthRequest, Identity, Refusal, Scope, parse_peer
from tei_manager.auth.jwt import JwtError, JwtVerifier, load_jwks, load_pem_public_key
from tei_manager.auth.policy import Authenticator
from tei_manager.auth.ratelimit import Bucket, RateLimiter
from tei_manager.config import ConfigError, parse_config
from tei_manager.errors import ErrorCode
from tests.auth_pki import Pki, make_pki
from tests.jwt_tokens import jwk, public_pem, sign

LOCAL = ipaddress.ip_address("127.0.0.1")
OTHER = ipaddress.ip_address("127.0.0.2")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def verifier(pki: Pki, **policy: Any) -> CertificateVerifier:
    return CertificateVerifier([pki.ca.cert], CertificatePolicy(**policy))


# --- certificates ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "code", "words"),
    [
        ("allowed", None, ""),
        ("other_cn", ErrorCode.FORBIDDEN, "not in allowed_subjects"),
        ("other_ca", ErrorCode.UNAUTHENTICATED, "not issued by a CA in ca_cert"),
        ("expired", ErrorCode.UNAUTHENTICATED, "expired"),
        ("not_yet_valid", ErrorCode.UNAUTHENTICATED, "not valid yet"),
        ("wrong_usage", ErrorCode.UNAUTHENTICATED, "client authentication"),
        ("san_only", ErrorCode.FORBIDDEN, "not in allowed_subjects"),
    ],
)
def test_certificate_checks(pki: Pki, kind: str, code: ErrorCode | None, words: str) -> None:
    check = verifier(pki, allowed_subjects=["CN=client1"])
    verdict = check.verify_der(pki[kind].der)
    if code is None:
        assert verdict == Identity("CN=client1", "mtls", frozenset(Scope))
    else:
        assert isinstance(verdict, Refusal)
        assert verdict.code is code
        assert words in verdict.message


def test_unparsable_extension_is_refused(pki: Pki) -> None:
    # A proxy may forward a certificate it did not verify; one whose extensions
    # cannot be parsed is a refusal, never an exception that reaches the server.
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(pki.ca.cert.subject)
        .issuer_name(pki.ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.UnrecognizedExtension(ExtensionOID.BASIC_CONSTRAINTS, b"\x04\x01z"), False
        )
        .sign(key, hashes.SHA256())
    )
    header = quote(cert.public_bytes(serialization.Encoding.PEM).decode(), safe="")
    verdict = verifier(pki).verify(parse_cert_header(header), now.timestamp())
    assert isinstance(verdict, Refusal) and verdict.code is ErrorCode.UNAUTHENTICATED
    assert "cannot be parsed" in verdict.message
    der = cert.public_bytes(serialization.Encoding.DER)
    assert verifier(pki).verify_der(der).code is ErrorCode.UNAUTHENTICATED
    auth = authenticator(pki)
    refused = auth.check(AuthRequest(peer=LOCAL, cert_header=header), Scope.READ, time.time())
    assert refused.code is ErrorCode.UNAUTHENTICATED


def test_san_allowlist(pki: Pki) -> None:
    check = verifier(pki, verify_subject=False, verify_san=True,
                     allowed_sans=["DNS:Client.Example.com"])  # fmt: skip
    assert isinstance(check.verify(pki["san_only"].cert), Identity)
    assert check.verify(pki["san_only"].cert).name == "DNS:client.example.com"  # type: ignore[union-attr]
    refused = check.verify(pki["allowed"].cert)
    assert isinstance(refused, Refusal) and refused.code is ErrorCode.FORBIDDEN


def test_any_subject_the_ca_signed(pki: Pki) -> None:
    check = verifier(pki)
    assert isinstance(check.verify(pki["other_cn"].cert), Identity)
    assert isinstance(check.verify(pki["other_ca"].cert), Refusal)


def test_self_signed(pki: Pki) -> None:
    # The CA itself presented as a client certificate: self-signed, and a CA.
    assert isinstance(verifier(pki).verify(pki.ca.cert), Refusal)


def test_verdict_cached_until_expiry(pki: Pki) -> None:
    check = verifier(pki)
    der = pki["allowed"].der
    assert isinstance(check.verify_der(der), Identity)
    after = pki["allowed"].cert.not_valid_after_utc.timestamp() + 1
    refused = check.verify_der(der, now=after)
    assert isinstance(refused, Refusal) and "expired" in refused.message


def test_cert_header_forms(pki: Pki) -> None:
    cert = pki["allowed"].cert
    assert parse_cert_header(pki["allowed"].header) == cert
    folded = pki["allowed"].cert_path.read_text().replace("\n", "\n\t")
    assert parse_cert_header(folded) == cert
    with pytest.raises(ValueError, match="does not hold"):
        parse_cert_header("garbage")
    with pytest.raises(ValueError, match="over"):
        parse_cert_header("A" * 20000)


# --- API keys --------------------------------------------------------------------


def test_api_keys() -> None:
    store = ApiKeyStore(
        [
            StoredKey("ci", frozenset({Scope.INFERENCE}), hashlib.sha256(b"k1").digest()),
            StoredKey("ops", frozenset({Scope.ADMIN}), hashlib.sha256(b"k2").digest()),
        ]
    )
    assert store.identify("k1") == Identity("ci", "api_key", frozenset({Scope.INFERENCE}))
    assert store.identify("k2") is not None and store.identify("k2").name == "ops"  # type: ignore[union-attr]
    assert store.identify("k3") is None
    assert store.identify("") is None


def test_keys_from_file_and_env(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("  from-file\n")
    config = parse_config(
        f"""
[auth]
enabled = true
providers = ["api_key"]
[auth.api_key]
keys = [
  {{ name = "a", scopes = ["read"], sha256 = "{hashlib.sha256(b"digest").hexdigest()}" }},
  {{ name = "b", scopes = ["read"], file = "{tmp_path / "key"}" }},
  {{ name = "c", scopes = ["read"], env = "C_KEY" }},
]
""",
        env={},
    )
    auth = build_authenticator(config, env={"C_KEY": "from-env"})
    for token, name in (("digest", "a"), ("from-file", "b"), ("from-env", "c")):
        got = auth.authenticate(AuthRequest(peer=LOCAL, authorization=f"Bearer {token}"), 0)
        assert isinstance(got, Identity) and got.name == name
    with pytest.raises(ConfigError, match=r"^auth.api_key.keys\[2\].env: C_KEY is not set"):
        build_authenticator(config, env={})
    (tmp_path / "key").unlink()
    with pytest.raises(ConfigError, match=r"^auth.api_key.keys\[1\].file: cannot read"):
        build_authenticator(config, env={"C_KEY": "x"})


# --- JWT -------------------------------------------------------------------------

NOW = 1_800_000_000.0
CLAIMS = {"iss": "https://issuer", "aud": "tei-manager", "sub": "svc", "exp": NOW + 600,
          "scope": "inference read"}  # fmt: skip


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "rsa": rsa.generate_private_key(65537, 2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
        "stranger": ec.generate_private_key(ec.SECP256R1()),
    }


def jwt_verifier(keys: dict[str, Any], **options: Any) -> JwtVerifier:
    jwks = json.dumps({"keys": [jwk(keys["rsa"], "r1"), jwk(keys["ec"], "e1")]}).encode()
    known = [*load_jwks(jwks, "jwks"), (None, load_pem_public_key(public_pem(keys["ed"]), "pem"))]
    return JwtVerifier(known, issuer="https://issuer", audience="tei-manager", **options)


@pytest.mark.parametrize(("key", "kid"), [("rsa", "r1"), ("ec", "e1"), ("ed", None), ("ec", None)])
def test_jwt_accepted(keys: dict[str, Any], key: str, kid: str | None) -> None:
    identity = jwt_verifier(keys).verify(sign(keys[key], CLAIMS, kid=kid), NOW)
    assert identity == Identity("svc", "jwt", frozenset({Scope.INFERENCE, Scope.READ}))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"exp": NOW - 31}, "expired"),
        ({"nbf": NOW + 31}, "not valid yet"),
        ({"iss": "https://evil"}, "another issuer"),
        ({"aud": ["other"]}, "another audience"),
        ({"exp": None}, "no expiry"),
        ({"exp": math.inf}, "no expiry"),
        ({"exp": math.nan}, "no expiry"),
        ({"exp": 10**400}, "no expiry"),
        ({"nbf": math.nan}, "nbf is not a number"),
        ({"sub": None}, "no 'sub' claim"),
    ],
)
def test_jwt_claims_refused(keys: dict[str, Any], change: dict[str, Any], words: str) -> None:
    claims = {k: v for k, v in {**CLAIMS, **change}.items() if v is not None}
    with pytest.raises(JwtError, match=words):
        jwt_verifier(keys).verify(sign(keys["ec"], claims), NOW)


def test_jwt_leeway(keys: dict[str, Any]) -> None:
    token = sign(keys["ec"], {**CLAIMS, "exp": NOW - 29, "nbf": NOW + 29})
    assert jwt_verifier(keys).verify(token, NOW).name == "svc"


def test_jwt_signatures_refused(keys: dict[str, Any]) -> None:
    check = jwt_verifier(keys)
    with pytest.raises(JwtError, match="signature"):
        check.verify(sign(keys["stranger"], CLAIMS), NOW)
    with pytest.raises(JwtError, match="signature"):
        check.verify(sign(keys["stranger"], CLAIMS, kid="e1"), NOW)
    with pytest.raises(JwtError, match="algorithm is not allowed"):
        check.verify(sign(None, CLAIMS, alg="none"), NOW)
    with pytest.raises(JwtError, match="algorithm is not allowed"):
        check.verify(sign(None, CLAIMS, alg="HS256"), NOW)
    # An EC signature presented as RS256 is not tried against the RSA key's rules.
    token = sign(keys["ec"], CLAIMS, alg="RS256", kid="r1")
    with pytest.raises(JwtError, match="signature"):
        check.verify(token, NOW)
    tampered = sign(keys["ec"], CLAIMS).split(".")
    tampered[1] = sign(keys["ec"], {**CLAIMS, "sub": "admin"}).split(".")[1]
    with pytest.raises(JwtError, match="signature"):
        check.verify(".".join(tampered), NOW)
    with pytest.raises(JwtError, match="algorithm is not allowed"):
        jwt_verifier(keys, algorithms=["EdDSA"]).verify(sign(keys["ec"], CLAIMS), NOW)


def test_jwt_scope_map(keys: dict[str, Any]) -> None:
    check = jwt_verifier(
        keys, scopes_claim="groups", scope_map={"tei-admins": ["admin"]}, default_scopes=["read"]
    )
    token = sign(keys["ec"], {**CLAIMS, "groups": ["tei-admins", "other"]})
    assert check.verify(token, NOW).scopes == {Scope.ADMIN, Scope.READ}


# --- rate limits, CORS, peers ---------------------------------------------------


def test_token_bucket() -> None:
    limiter = RateLimiter({Scope.INFERENCE: Bucket(2.0, 3)}, max_clients=2)
    assert [limiter.take(Scope.INFERENCE, "a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take(Scope.INFERENCE, "a", 0.0) == pytest.approx(0.5)
    assert limiter.take(Scope.INFERENCE, "a", 0.5) == 0.0
    assert limiter.take(Scope.INFERENCE, "b", 0.5) == 0.0  # its own bucket
    assert limiter.take(Scope.READ, "a", 0.5) == 0.0  # not limited
    limiter.take(Scope.INFERENCE, "c", 0.5)
    assert len(limiter) == 2  # "a" went first
    assert limiter.refused == 1


def test_cors() -> None:
    policy = CorsPolicy(["https://ui.example.com"], allow_credentials=True)
    assert policy.response_headers("https://evil.example.com") == {}
    assert policy.response_headers("https://ui.example.com")["Access-Control-Allow-Origin"] == (
        "https://ui.example.com"
    )
    answer = policy.preflight("https://ui.example.com", "DELETE", "Authorization, Content-Type")
    assert answer is not None
    assert answer["Access-Control-Allow-Credentials"] == "true"
    assert answer["Access-Control-Allow-Methods"] == "DELETE, GET, POST"
    assert policy.preflight("https://ui.example.com", "PUT", None) is None
    assert policy.preflight("https://ui.example.com", "GET", "x-secret") is None
    assert policy.preflight("https://evil.example.com", "GET", None) is None
    assert not CorsPolicy().enabled
    assert CorsPolicy(["*"]).response_headers("https://x")["Access-Control-Allow-Origin"] == "*"


def test_parse_peer() -> None:
    assert parse_peer(("127.0.0.2", 5)) == OTHER
    assert parse_peer("127.0.0.1:80") == LOCAL
    assert parse_peer("[::1]:80") == ipaddress.ip_address("::1")
    assert parse_peer("::1:80") == ipaddress.ip_address("::1")
    assert parse_peer(("::1", 80)) == ipaddress.ip_address("::1")
    assert parse_peer(None) is None
    assert parse_peer("unix-socket") is None


# --- the policy as a whole ------------------------------------------------------


def authenticator(pki: Pki, extra: str = "", **env: str) -> Any:
    text = f"""
[auth]
enabled = true
providers = ["mtls", "api_key"]
require_cert_headers = true
trusted_proxies = ["127.0.0.1/32"]
admin_allowed_cidrs = ["10.0.0.0/8", "127.0.0.1"]
[auth.mtls]
ca_cert = "{pki.ca_path}"
allowed_subjects = ["CN=client1"]
[auth.api_key]
keys = [
  {{ name = "ci", scopes = ["inference"], sha256 = "{hashlib.sha256(b"ci-key").hexdigest()}" }},
]
{extra}
"""
    return build_authenticator(parse_config(text, env={}), env=env)


def test_proxy_mode(pki: Pki) -> None:
    auth = authenticator(pki)
    now = time.time()

    def check(peer: ipaddress.IPv4Address, scope: Scope = Scope.READ, **request: Any) -> Any:
        return auth.check(AuthRequest(peer=peer, **request), scope, now)

    assert check(LOCAL, cert_header=pki["allowed"].header).name == "CN=client1"
    # From an untrusted peer the header is refused, never ignored, even with a good key.
    refused = check(OTHER, cert_header=pki["allowed"].header, authorization="Bearer ci-key")
    assert refused.code is ErrorCode.UNAUTHENTICATED and "127.0.0.2" in refused.message
    # Bypassing the proxy: no header, no key.
    refused = check(OTHER)
    assert refused.code is ErrorCode.UNAUTHENTICATED
    assert "through the TLS proxy" in refused.message
    # A native certificate does not count in proxy mode.
    assert check(OTHER, peer_certificate=pki["allowed"].der).code is ErrorCode.UNAUTHENTICATED
    assert check(LOCAL, cert_header=pki["other_cn"].header).code is ErrorCode.FORBIDDEN
    assert check(LOCAL, cert_header=pki["other_ca"].header).code is ErrorCode.UNAUTHENTICATED
    assert check(LOCAL, cert_header=pki["expired"].header).code is ErrorCode.UNAUTHENTICATED
    assert check(LOCAL, cert_header="%%%").code is ErrorCode.UNAUTHENTICATED
    # API keys: scope and validity.
    assert check(OTHER, Scope.INFERENCE, authorization="Bearer ci-key").name == "ci"
    wrong = check(OTHER, authorization="Bearer nope")
    assert wrong.code is ErrorCode.UNAUTHENTICATED and wrong.bearer_error == "invalid_token"
    assert "nope" not in wrong.message
    lacking = check(OTHER, Scope.ADMIN, authorization="Bearer ci-key")
    assert lacking.code is ErrorCode.FORBIDDEN and lacking.identity == "ci"


def test_admin_cidrs(pki: Pki) -> None:
    auth = authenticator(pki)
    now = time.time()
    header = pki["allowed"].header
    assert isinstance(auth.check(AuthRequest(peer=LOCAL, cert_header=header), Scope.ADMIN, now),
                      Identity)  # fmt: skip
    # Behind the proxy the client is the nearest untrusted X-Forwarded-For hop.
    outside = AuthRequest(peer=LOCAL, cert_header=header, forwarded_for="10.1.1.1, 192.0.2.7")
    refused = auth.check(outside, Scope.ADMIN, now)
    assert refused.code is ErrorCode.FORBIDDEN and "192.0.2.7" in refused.message
    inside = AuthRequest(peer=LOCAL, cert_header=header, forwarded_for="192.0.2.7, 10.1.1.1")
    assert isinstance(auth.check(inside, Scope.ADMIN, now), Identity)


def test_ipv4_mapped_peers_match_ipv4_networks(pki: Pki) -> None:
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
    auth = authenticator(pki)
    now = time.time()
    mapped = parse_peer(("::ffff:127.0.0.1", 5))
    assert mapped == LOCAL
    header = pki["allowed"].header
    raw = ipaddress.ip_address("::ffff:127.0.0.1")
    assert isinstance(auth.check(AuthRequest(peer=raw, cert_header=header), Scope.ADMIN, now),
                      Identity)  # fmt: skip
    inside = AuthRequest(peer=LOCAL, cert_header=header, forwarded_for="::ffff:10.1.1.1")
    assert isinstance(auth.check(inside, Scope.ADMIN, now), Identity)
    outside = AuthRequest(peer=LOCAL, cert_header=header, forwarded_for="::ffff:192.0.2.7")
    refused = auth.check(outside, Scope.ADMIN, now)
    assert refused.code is ErrorCode.FORBIDDEN and "from 192.0.2.7" in refused.message


def test_rate_limit_per_identity_and_address(pki: Pki) -> None:
    auth = authenticator(
        pki, "[rate_limit]\nenabled = true\ninference = { requests_per_sec = 1.0, burst = 2 }"
    )
    key = AuthRequest(peer=OTHER, authorization="Bearer ci-key")
    assert [type(auth.check(key, Scope.INFERENCE, 0.0)) for _ in range(3)] == [
        Identity, Identity, Refusal,
    ]  # fmt: skip
    refused = auth.check(key, Scope.INFERENCE, 0.5)
    assert refused.code is ErrorCode.OVERLOADED
    assert refused.retry_after_secs == pytest.approx(0.5)
    assert refused.identity == "ci"
    assert isinstance(auth.check(key, Scope.INFERENCE, 1.0), Identity)


def _limited_reads(extra: str = "") -> Authenticator:
    config = parse_config(
        "[rate_limit]\nenabled = true\nread = { requests_per_sec = 1.0, burst = 1 }\n" + extra,
        env={},
    )
    return build_authenticator(config, env={})


def _allowed(auth: Authenticator, peer: str, **kwargs: Any) -> bool:
    request = AuthRequest(peer=ipaddress.ip_address(peer), **kwargs)
    return isinstance(auth.check(request, Scope.READ, 0.0), Identity)


def test_ipv6_clients_are_limited_per_64_ipv4_per_address() -> None:
    """An attacker holding a /64 cannot rotate addresses to dodge the limit."""
    auth = _limited_reads()
    assert _allowed(auth, "2001:db8:1:2::1")
    assert not _allowed(auth, "2001:db8:1:2:ffff:1234:5678:9abc")  # the same /64
    assert _allowed(auth, "2001:db8:1:3::1")  # the next /64 is someone else
    # IPv4 per address, even a neighbour; an IPv4-mapped peer is the IPv4 address.
    assert _allowed(auth, "192.0.2.7")
    assert _allowed(auth, "192.0.2.8")
    assert not _allowed(auth, "::ffff:192.0.2.7")
    # Behind a trusted proxy, the forwarded client's network counts.
    proxied = _limited_reads('[auth]\ntrusted_proxies = ["10.0.0.0/8"]\n')
    assert _allowed(proxied, "10.0.0.1", forwarded_for="2001:db8:9:9::1")
    assert not _allowed(proxied, "10.0.0.2", forwarded_for="2001:db8:9:9::2")


def test_the_ipv6_prefix_is_configurable() -> None:
    auth = _limited_reads("ipv6_prefix_bits = 128\n")
    assert _allowed(auth, "2001:db8:1:2::1")
    assert _allowed(auth, "2001:db8:1:2::2")  # every address its own client
    wide = _limited_reads("ipv6_prefix_bits = 48\n")
    assert _allowed(wide, "2001:db8:1:2::1")
    assert not _allowed(wide, "2001:db8:1:ff::1")


def test_auth_disabled_still_limits_by_address() -> None:
    config = parse_config(
        "[rate_limit]\nenabled = true\nread = { requests_per_sec = 1.0, burst = 1 }", env={}
    )
    auth = build_authenticator(config, env={})
    assert isinstance(auth.check(AuthRequest(peer=LOCAL), Scope.READ, 0.0), Identity)
    assert isinstance(auth.check(AuthRequest(peer=OTHER), Scope.READ, 0.0), Identity)
    assert auth.check(AuthRequest(peer=LOCAL), Scope.READ, 0.0).code is ErrorCode.OVERLOADED
    assert isinstance(auth.check(AuthRequest(peer=LOCAL), Scope.ADMIN, 0.0), Identity)
