"""Auth on the multiplexer's port with grpcio: native mTLS, API keys, JWTs, proxy mode,
rate limits and certificate reload, relaying to an in-process tei.v1 backend.

grpcio cannot choose its source address, so proxy mode tells trusted from untrusted
peers by configuration: the client always comes from 127.0.0.1, which is the trusted
proxy in one set-up and not in the other.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import msgspec
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.empty_pb2 import Empty
from prometheus_client import CollectorRegistry

from tei_manager._proto.grpc.health.v1 import health_grpc, health_pb2
from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tei_manager.auth.security import Security, build_security
from tei_manager.config import InstanceConfig, parse_config
from tei_manager.core.instances import InstanceStatus, InstanceTable
from tei_manager.core.ports import PortAllocator
from tei_manager.grpc.calls import CallContext
from tei_manager.grpc.rpc import Cardinality, MethodSpec
from tei_manager.grpc.server import GrpcServer
from tei_manager.multiplexer.metrics import MultiplexerMetrics
from tei_manager.multiplexer.server import MultiplexerServer
from tests.auth_pki import Pki, make_pki, pem, proxy_toml
from tests.grpcio_client import stub
from tests.jwt_tokens import jwk, sign

M = multiplexer_grpc.TeiMultiplexer
KEYS = {"ci": "ci-secret", "reader": "reader-secret"}


class Backend(tei_grpc.EmbedServicer):
    async def Embed(
        self, request: tei_pb2.EmbedRequest, context: CallContext
    ) -> tei_pb2.EmbedResponse:
        return tei_pb2.EmbedResponse(embeddings=[float(len(request.inputs))])


@dataclass
class Answer:
    code: grpc.StatusCode
    details: str
    trailers: dict[str, str]


@dataclass
class Mux:
    port: int
    pki: Pki
    prometheus: CollectorRegistry
    server: MultiplexerServer
    tls: bool
    server_ca: bytes = b""  # what the client trusts the server with

    def __post_init__(self) -> None:
        self.server_ca = self.server_ca or self.pki.ca_path.read_bytes()

    def _channel(self, cert: str | None, token: str | None) -> grpc.Channel:
        target = f"127.0.0.1:{self.port}"
        if not self.tls:
            return grpc.insecure_channel(target)
        private_key = chain = None
        if cert is not None:
            private_key = self.pki[cert].key_path.read_bytes()
            chain = self.pki[cert].cert_path.read_bytes()
        credentials = grpc.ssl_channel_credentials(
            self.server_ca, private_key=private_key, certificate_chain=chain
        )
        if token is not None:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(token)
            )
        return grpc.secure_channel(
            target, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
        )

    def _call(
        self,
        spec: Any,
        request: Any,
        cert: str | None,
        token: str | None,
        metadata: Sequence[tuple[str, str]],
    ) -> Answer:
        metadata = list(metadata)
        if token is not None and not self.tls:  # call credentials need TLS in grpcio
            metadata.append(("authorization", f"Bearer {token}"))
            token = None
        with self._channel(cert, token) as channel:
            try:
                _, call = stub(channel, spec).with_call(request, timeout=10, metadata=metadata)
            except grpc.RpcError as error:
                trailers = {k: v for k, v in (error.trailing_metadata() or ())}  # type: ignore[attr-defined]
                return Answer(error.code(), error.details() or "", trailers)  # type: ignore[attr-defined]
            return Answer(call.code(), "", {})

    async def embed(
        self,
        *,
        cert: str | None = None,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Answer:
        request = multiplexer_pb2.EmbedRequest(
            target=multiplexer_pb2.Target(instance_name="b"),
            request=tei_pb2.EmbedRequest(inputs="four"),
        )
        return await trio.to_thread.run_sync(self._call, M.Embed, request, cert, token, metadata)

    async def call(self, spec: Any, request: Any, *, token: str | None = None) -> Answer:
        return await trio.to_thread.run_sync(self._call, spec, request, None, token, ())

    async def health(self) -> Answer:
        return await trio.to_thread.run_sync(
            self._call, health_grpc.Health.Check, health_pb2.HealthCheckRequest(), None, None, ()
        )

    def rejections(self, code: str, identity: str = "") -> float:
        value = self.prometheus.get_sample_value(
            "tei_manager_auth_rejections_total",
            {"port": "grpc", "code": code, "identity": identity},
        )
        return value or 0.0


def keys_toml() -> str:
    digest = {n: hashlib.sha256(k.encode()).hexdigest() for n, k in KEYS.items()}
    return f"""
[auth.api_key]
keys = [
  {{ name = "ci", scopes = ["inference"], sha256 = "{digest["ci"]}" }},
  {{ name = "reader", scopes = ["read"], sha256 = "{digest["reader"]}" }},
]
"""


def native_toml(pki: Pki) -> str:
    return f"""
[auth]
enabled = true
providers = ["mtls", "api_key"]
[auth.mtls]
ca_cert = "{pki.ca_path}"
server_cert = "{pki.server_cert}"
server_key = "{pki.server_key}"
allowed_subjects = ["CN=client1"]
{keys_toml()}
"""


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


async def start_mux(nursery: trio.Nursery, pki: Pki, toml: str) -> tuple[Mux, Security]:
    backend = GrpcServer([Backend()])
    backend_port = await nursery.start(backend.run)
    instances = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    record = instances.add(InstanceConfig(name="b", model_id="m/b"), created_at=datetime.now(UTC))
    record.config = msgspec.structs.replace(record.config, port=backend_port)
    record.status = InstanceStatus.RUNNING
    record.pid = 1
    config = parse_config('api_host = "127.0.0.1"\ngrpc_port = 0\n' + toml, env={})
    prometheus = CollectorRegistry()
    security = build_security(config, prometheus)
    server = MultiplexerServer(config, instances, MultiplexerMetrics(prometheus), security)
    port = await nursery.start(server.run)
    return Mux(port, pki, prometheus, server, security.tls is not None), security


async def test_native_mtls_and_api_keys(nursery: trio.Nursery, pki: Pki) -> None:
    mux, _ = await start_mux(nursery, pki, native_toml(pki))
    assert (await mux.embed(cert="allowed")).code == grpc.StatusCode.OK
    assert (await mux.embed(token=KEYS["ci"])).code == grpc.StatusCode.OK
    none = await mux.embed()
    assert none.code == grpc.StatusCode.UNAUTHENTICATED
    assert "client certificate" in none.details
    other = await mux.embed(cert="other_cn")
    assert other.code == grpc.StatusCode.PERMISSION_DENIED
    assert "allowed_subjects" in other.details
    assert (await mux.embed(cert="san_only")).code == grpc.StatusCode.PERMISSION_DENIED
    reader = await mux.embed(token=KEYS["reader"])
    assert reader.code == grpc.StatusCode.PERMISSION_DENIED
    assert "inference scope" in reader.details
    wrong = await mux.embed(token="not-a-key")
    assert wrong.code == grpc.StatusCode.UNAUTHENTICATED
    assert "not-a-key" not in wrong.details
    # A good certificate and a bad key: the certificate is enough.
    assert (await mux.embed(cert="allowed", token="not-a-key")).code == grpc.StatusCode.OK
    # Health checks stay public.
    assert (await mux.health()).code == grpc.StatusCode.OK
    assert mux.rejections("UNAUTHENTICATED") == 2
    assert mux.rejections("FORBIDDEN", "CN=intruder") == 1
    assert mux.rejections("FORBIDDEN", "reader") == 1


@pytest.mark.parametrize("kind", ["other_ca", "expired", "not_yet_valid", "wrong_usage"])
async def test_native_bad_certificates_fail_the_handshake(
    nursery: trio.Nursery, pki: Pki, kind: str
) -> None:
    mux, _ = await start_mux(nursery, pki, native_toml(pki))
    assert (await mux.embed(cert=kind)).code == grpc.StatusCode.UNAVAILABLE
    assert (await mux.embed(cert="allowed")).code == grpc.StatusCode.OK


async def test_tls_only_tls12_up_and_h2(nursery: trio.Nursery, pki: Pki) -> None:
    mux, _ = await start_mux(nursery, pki, native_toml(pki))
    plain = Mux(mux.port, pki, mux.prometheus, mux.server, tls=False)
    assert (await plain.embed(token=KEYS["ci"])).code == grpc.StatusCode.UNAVAILABLE
    # TLS 1.0/1.1 are refused by the context itself (a client for them is hard to
    # build on a current OpenSSL, so the setting is what is checked).
    assert mux.server.server.ssl_context is not None
    assert mux.server.server.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2
    modern = ssl.create_default_context(cafile=str(pki.ca_path))
    modern.set_alpn_protocols(["h2"])
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", mux.port, ssl_context=modern)
    async with stream:
        await stream.do_handshake()
        assert stream.selected_alpn_protocol() == "h2"
        assert stream.version() in ("TLSv1.2", "TLSv1.3")


async def test_jwt(nursery: trio.Nursery, pki: Pki, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    stranger = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk(key, "k1")]}))
    toml = native_toml(pki).replace('providers = ["mtls", "api_key"]',
                                    'providers = ["mtls", "api_key", "jwt"]') + f"""
[auth.jwt]
issuer = "https://issuer"
audience = "tei-manager"
jwks_file = "{tmp_path / "jwks.json"}"
"""  # fmt: skip
    mux, _ = await start_mux(nursery, pki, toml)
    now = time.time()
    good = {"iss": "https://issuer", "aud": "tei-manager", "sub": "svc", "exp": now + 600,
            "scope": "inference"}  # fmt: skip
    assert (await mux.embed(token=sign(key, good, kid="k1"))).code == grpc.StatusCode.OK
    assert (await mux.embed(token=KEYS["ci"])).code == grpc.StatusCode.OK  # keys still work
    bad = {
        "expired": sign(key, {**good, "exp": now - 3600}, kid="k1"),
        "another issuer": sign(key, {**good, "iss": "https://evil"}, kid="k1"),
        "another audience": sign(key, {**good, "aud": "other"}, kid="k1"),
        "signature": sign(stranger, good, kid="k1"),
        "algorithm": sign(None, good, alg="none"),
    }
    for words, token in bad.items():
        answer = await mux.embed(token=token)
        assert answer.code == grpc.StatusCode.UNAUTHENTICATED, words
        assert words in answer.details
    no_scope = await mux.embed(token=sign(key, {**good, "scope": "read"}, kid="k1"))
    assert no_scope.code == grpc.StatusCode.PERMISSION_DENIED


async def test_proxy_mode_from_the_trusted_proxy(nursery: trio.Nursery, pki: Pki) -> None:
    mux, _ = await start_mux(nursery, pki, proxy_toml(pki, "127.0.0.1"))

    def header(kind: str) -> list[tuple[str, str]]:
        return [("x-ssl-client-cert", pki[kind].header)]

    assert (await mux.embed(metadata=header("allowed"))).code == grpc.StatusCode.OK
    for kind in ("other_ca", "expired", "wrong_usage"):
        assert (await mux.embed(metadata=header(kind))).code == grpc.StatusCode.UNAUTHENTICATED
    assert (await mux.embed(metadata=header("other_cn"))).code == grpc.StatusCode.PERMISSION_DENIED
    # No header: what a client bypassing the proxy sends.
    assert (await mux.embed()).code == grpc.StatusCode.UNAUTHENTICATED
    # A forged header first and the proxy's own after it: never the first alone.
    twice = await mux.embed(metadata=header("allowed") + header("other_cn"))
    assert twice.code == grpc.StatusCode.UNAUTHENTICATED
    assert "more than one certificate header" in twice.details


async def test_proxy_mode_from_an_untrusted_peer(nursery: trio.Nursery, pki: Pki) -> None:
    mux, _ = await start_mux(nursery, pki, proxy_toml(pki, "127.0.0.2"))
    answer = await mux.embed(metadata=[("x-ssl-client-cert", pki["allowed"].header)])
    assert answer.code == grpc.StatusCode.UNAUTHENTICATED
    assert "not a trusted proxy" in answer.details
    assert (await mux.embed()).code == grpc.StatusCode.UNAUTHENTICATED


UNKNOWN = (
    # A method the service lacks, a service we do not serve, one under health's name.
    MethodSpec("tei_multiplexer.v1.TeiMultiplexer", "Nope", Cardinality.UNARY_UNARY, Empty, Empty),
    MethodSpec("secret.v1.Admin", "Drop", Cardinality.UNARY_UNARY, Empty, Empty),
    MethodSpec("grpc.health.v1.Health", "Nope", Cardinality.UNARY_UNARY, Empty, Empty),
)


@pytest.mark.parametrize("spec", UNKNOWN, ids=lambda spec: spec.path)
async def test_unknown_methods_are_authenticated_first(
    nursery: trio.Nursery, pki: Pki, spec: MethodSpec[Empty, Empty]
) -> None:
    """No probing for methods without credentials: UNAUTHENTICATED whatever the path,
    UNIMPLEMENTED only for a caller who may call."""
    toml = '[auth]\nenabled = true\nproviders = ["api_key"]\n' + keys_toml()
    mux, _ = await start_mux(nursery, pki, toml)
    for token in (None, "not-a-key"):
        answer = await mux.call(spec, Empty(), token=token)
        assert answer.code == grpc.StatusCode.UNAUTHENTICATED, (token, answer)
        assert "Nope" not in answer.details and "Drop" not in answer.details
    allowed = KEYS["reader"] if spec.service.startswith("grpc.") else KEYS["ci"]
    answer = await mux.call(spec, Empty(), token=allowed)
    assert answer.code == grpc.StatusCode.UNIMPLEMENTED
    assert mux.rejections("UNAUTHENTICATED") == 2


async def test_rate_limit_pushback(nursery: trio.Nursery, pki: Pki) -> None:
    toml = native_toml(pki) + (
        "[rate_limit]\nenabled = true\ninference = { requests_per_sec = 0.5, burst = 1 }\n"
    )
    mux, _ = await start_mux(nursery, pki, toml)
    assert (await mux.embed(token=KEYS["ci"])).code == grpc.StatusCode.OK
    limited = await mux.embed(token=KEYS["ci"])
    assert limited.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate limit" in limited.details
    # One token every 2 s: the client is told to wait (nearly) that long.
    assert 1000 < int(limited.trailers["grpc-retry-pushback-ms"]) <= 2000
    assert mux.rejections("OVERLOADED", "ci") == 1


async def server_certificate(port: int, pki: Pki) -> x509.Certificate:
    context = ssl.create_default_context(cafile=str(pki.ca_path))
    context.set_alpn_protocols(["h2"])
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    async with stream:
        await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def test_rotated_certificate(nursery: trio.Nursery, pki: Pki) -> None:
    mux, security = await start_mux(nursery, pki, native_toml(pki))
    assert security.tls is not None
    rotated = pki.write_server("rotated")
    assert security.tls.reload()
    assert (await server_certificate(mux.port, pki)).serial_number == rotated.serial_number
    assert (await mux.embed(cert="allowed")).code == grpc.StatusCode.OK
    # A new CA: clients of the old one are refused by our check even though OpenSSL's
    # store, which only grows, still knows the old CA; clients of the new one pass.
    pki.ca_path.write_bytes(pem(pki.other_ca.cert))
    assert security.tls.reload()
    refused = await mux.embed(cert="allowed")
    assert refused.code == grpc.StatusCode.UNAUTHENTICATED
    assert "not issued by a CA in ca_cert" in refused.details
    assert (await mux.embed(cert="other_ca")).code == grpc.StatusCode.OK
