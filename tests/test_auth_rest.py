"""Auth on the REST port with real clients: native mTLS, API keys, JWT, proxy mode, CORS,
rate limits and certificate reload, through ``serve_api`` on real sockets.

Peers are told apart by their loopback source address: 127.0.0.1 is the trusted
proxy (and the admin network), 127.0.0.2 anyone else.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tei_manager.api import serve_api
from tei_manager.auth.security import Security, build_security
from tei_manager.config import parse_config
from tests.auth_pki import Pki, make_pki, proxy_toml
from tests.fake_manager import FakeManager
from tests.jwt_tokens import public_pem, sign

KEYS = {"ci": "ci-secret", "ops": "ops-secret", "reader": "reader-secret"}
SCOPES = {"ci": ["inference"], "ops": ["admin", "read"], "reader": ["read"]}

PORTS = "api_port = 0\ngrpc_port = 0\n"


def keys_toml() -> str:
    rows = ",\n".join(
        f'  {{ name = "{n}", scopes = {SCOPES[n]!r}, '
        f'sha256 = "{hashlib.sha256(k.encode()).hexdigest()}" }}'
        for n, k in KEYS.items()
    )
    return f"[auth.api_key]\nkeys = [\n{rows}\n]\n".replace("'", '"')


def native_toml(pki: Pki, extra: str = "") -> str:
    return f"""
api_port = 0
grpc_port = 0
[auth]
enabled = true
providers = ["mtls", "api_key"]
admin_allowed_cidrs = ["127.0.0.1/32"]
[auth.mtls]
ca_cert = "{pki.ca_path}"
server_cert = "{pki.server_cert}"
server_key = "{pki.server_key}"
allowed_subjects = ["CN=client1"]
{keys_toml()}
{extra}
"""


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def manager_for(tmp_path: Path, toml: str) -> tuple[FakeManager, Security]:
    top = f'state_file = "{tmp_path / "state.toml"}"\nlog_dir = "{tmp_path / "logs"}"\n'
    config = parse_config(top + toml, env={})
    manager = FakeManager(config)
    return manager, build_security(config, manager.metrics.prometheus)


async def serve(nursery: trio.Nursery, manager: FakeManager, security: Security) -> int:
    port: int = await nursery.start(
        lambda task_status: serve_api(
            manager, "127.0.0.1", 0, security=security, task_status=task_status
        )
    )
    return port


class Client:
    """httpx against the served port, from a chosen loopback address."""

    def __init__(self, port: int, pki: Pki, *, tls: bool) -> None:
        self.port = port
        self.pki = pki
        self.tls = tls

    def context(self, kind: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_path))
        if kind is not None:
            client = self.pki[kind]
            context.load_cert_chain(client.cert_path, client.key_path)
        return context

    async def __call__(
        self,
        method: str,
        path: str,
        *,
        cert: str | None = None,
        key: str | None = None,
        source: str = "127.0.0.1",
        headers: dict[str, str] | None = None,
        json: Any = None,
    ) -> httpx2.Response:
        verify: ssl.SSLContext | bool = self.context(cert) if self.tls else False
        transport = httpx2.AsyncHTTPTransport(verify=verify, local_address=source)
        headers = dict(headers or {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        scheme = "https" if self.tls else "http"
        async with httpx2.AsyncClient(transport=transport) as client:
            return await client.request(
                method, f"{scheme}://127.0.0.1:{self.port}{path}", headers=headers, json=json
            )


def assert_error(response: httpx2.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "code", "timestamp"}
    assert body["code"] == code
    return body


def rejections(manager: FakeManager, code: str, identity: str = "") -> float:
    value = manager.metrics.prometheus.get_sample_value(
        "tei_manager_auth_rejections_total", {"port": "rest", "code": code, "identity": identity}
    )
    return value or 0.0


@pytest.fixture
async def native(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> AsyncIterator[tuple[Client, FakeManager]]:
    manager, security = manager_for(tmp_path, native_toml(pki))
    yield Client(await serve(nursery, manager, security), pki, tls=True), manager


async def test_native_certificate_accepted(
    native: tuple[Client, FakeManager], caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = native
    caplog.set_level(logging.INFO, "tei_manager.access")
    response = await client("GET", "/instances", cert="allowed")
    assert response.status_code == 200
    created = await client(
        "POST", "/instances", cert="allowed", json={"name": "a", "model_id": "BAAI/bge"}
    )
    assert created.status_code == 201
    assert any("identity=CN=client1" in r.getMessage() for r in caplog.records)
    # The path arrives percent-decoded: a newline in it must not forge a log line.
    caplog.clear()
    await client("GET", "/x%0A127.0.0.9%20GET%20/instances%20200", cert="allowed")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "tei_manager.access"]
    assert "\n" not in line and "/x\\x0a127.0.0.9" in line


async def test_native_rejections(native: tuple[Client, FakeManager]) -> None:
    client, manager = native
    body = assert_error(await client("GET", "/instances"), 401, "UNAUTHENTICATED")
    assert "client certificate" in body["error"]
    response = await client("GET", "/no-such-path")
    assert_error(response, 401, "UNAUTHENTICATED")
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="tei-manager"'
    body = assert_error(await client("GET", "/instances", cert="other_cn"), 403, "FORBIDDEN")
    assert "allowed_subjects" in body["error"]
    assert_error(await client("GET", "/instances", cert="san_only"), 403, "FORBIDDEN")
    assert rejections(manager, "UNAUTHENTICATED") == 2
    assert rejections(manager, "FORBIDDEN", "CN=intruder") == 1


@pytest.mark.parametrize("kind", ["other_ca", "expired", "not_yet_valid", "wrong_usage"])
async def test_native_bad_certificates_fail_the_handshake(
    native: tuple[Client, FakeManager], kind: str
) -> None:
    client, _ = native
    with pytest.raises(httpx2.TransportError):
        await client("GET", "/instances", cert=kind)
    # The server goes on serving.
    assert (await client("GET", "/instances", cert="allowed")).status_code == 200


async def test_native_port_speaks_only_tls(native: tuple[Client, FakeManager]) -> None:
    client, _ = native
    plain = Client(client.port, client.pki, tls=False)
    with pytest.raises(httpx2.TransportError):
        await plain("GET", "/health/live")


async def test_api_keys_and_scopes(native: tuple[Client, FakeManager]) -> None:
    client, manager = native
    assert (await client("GET", "/instances", key=KEYS["reader"])).status_code == 200
    body = assert_error(await client("GET", "/instances", key=KEYS["ci"]), 403, "FORBIDDEN")
    assert "read scope" in body["error"]
    reader_post = await client(
        "POST", "/instances", key=KEYS["reader"], json={"name": "a", "model_id": "BAAI/bge"}
    )
    assert_error(reader_post, 403, "FORBIDDEN")
    wrong = await client("GET", "/instances", key="not-a-key")
    body = assert_error(wrong, 401, "UNAUTHENTICATED")
    assert wrong.headers["WWW-Authenticate"] == 'Bearer realm="tei-manager", error="invalid_token"'
    assert "not-a-key" not in wrong.text
    ops = await client(
        "POST", "/instances", key=KEYS["ops"], json={"name": "b", "model_id": "BAAI/bge"}
    )
    assert ops.status_code == 201
    # Admin from outside admin_allowed_cidrs: refused, reads still fine.
    outside = await client("DELETE", "/instances/b", key=KEYS["ops"], source="127.0.0.2")
    body = assert_error(outside, 403, "FORBIDDEN")
    assert "127.0.0.2" in body["error"]
    assert (await client("GET", "/instances", key=KEYS["ops"], source="127.0.0.2")).is_success
    assert rejections(manager, "FORBIDDEN", "ops") == 1


async def test_probes_public_metrics_not(native: tuple[Client, FakeManager]) -> None:
    client, _ = native
    # Probes answer without credentials (ready and startup say 503 until the fake is).
    assert (await client("GET", "/health/live")).status_code == 200
    for path in ("/health/ready", "/health/startup"):
        assert_error(await client("GET", path), 503, "NOT_READY")
    assert_error(await client("GET", "/metrics"), 401, "UNAUTHENTICATED")
    assert_error(await client("GET", "/health"), 401, "UNAUTHENTICATED")


async def test_metrics_made_public(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> None:
    toml = native_toml(pki).replace(
        "[auth]\n", '[auth]\npublic_paths = ["/health/live", "/metrics"]\n'
    )
    manager, security = manager_for(tmp_path, toml)
    client = Client(await serve(nursery, manager, security), pki, tls=True)
    response = await client("GET", "/metrics")
    assert response.status_code == 200
    assert "tei_manager_auth_rejections_total" in response.text
    assert_error(await client("GET", "/health/ready"), 401, "UNAUTHENTICATED")


async def test_proxy_mode(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> None:
    manager, security = manager_for(tmp_path, PORTS + proxy_toml(pki))
    client = Client(await serve(nursery, manager, security), pki, tls=False)

    def header(kind: str) -> dict[str, str]:
        return {"X-SSL-Client-Cert": pki[kind].header}

    assert (await client("GET", "/instances", headers=header("allowed"))).status_code == 200
    # The same header from a peer that is not the proxy: refused, never ignored.
    body = assert_error(
        await client("GET", "/instances", headers=header("allowed"), source="127.0.0.2"),
        401,
        "UNAUTHENTICATED",
    )
    assert "not a trusted proxy" in body["error"]
    # Bypassing the proxy (the deployment guide's attack): no header, no entry.
    bypass = await client("GET", "/instances", source="127.0.0.2")
    assert "through the TLS proxy" in assert_error(bypass, 401, "UNAUTHENTICATED")["error"]
    assert "WWW-Authenticate" not in bypass.headers  # no bearer provider to offer
    assert_error(await client("GET", "/instances"), 401, "UNAUTHENTICATED")
    for kind in ("other_ca", "expired", "not_yet_valid", "wrong_usage"):
        refused = await client("GET", "/instances", headers=header(kind))
        assert_error(refused, 401, "UNAUTHENTICATED")
    assert_error(await client("GET", "/instances", headers=header("other_cn")), 403, "FORBIDDEN")
    forged = {"X-SSL-Client-Cert": pki["allowed"].header.replace("MII", "MIJ", 1)}
    assert_error(await client("GET", "/instances", headers=forged), 401, "UNAUTHENTICATED")
    assert (await client("GET", "/health/live", source="127.0.0.2")).status_code == 200


async def test_repeated_proxy_headers_are_read_whole(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # A proxy that appends its own header line (HAProxy's add-header, say) leaves
    # the client's forged one first: reading only the first would believe it.
    toml = (PORTS + proxy_toml(pki)).replace(
        'trusted_proxies = ["127.0.0.1"]',
        'trusted_proxies = ["127.0.0.1"]\nadmin_allowed_cidrs = ["10.0.0.0/8"]',
    )
    manager, security = manager_for(tmp_path, toml)
    port = await serve(nursery, manager, security)
    allowed = ("X-SSL-Client-Cert", pki["allowed"].header)

    async def get(method: str, headers: list[tuple[str, str]]) -> httpx2.Response:
        async with httpx2.AsyncClient() as client:
            return await client.request(
                method, f"http://127.0.0.1:{port}/instances", headers=headers, json={}
            )

    forwarded = [allowed, ("X-Forwarded-For", "10.9.9.9"), ("X-Forwarded-For", "192.0.2.7")]
    body = assert_error(await get("POST", forwarded), 403, "FORBIDDEN")
    assert "192.0.2.7" in body["error"]
    two_certs = [allowed, ("X-SSL-Client-Cert", pki["other_cn"].header)]
    body = assert_error(await get("GET", two_certs), 401, "UNAUTHENTICATED")
    assert "more than one certificate header" in body["error"]


async def test_cors(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> None:
    extra = '[cors]\nallowed_origins = ["https://ui.example.com"]\n'
    manager, security = manager_for(tmp_path, native_toml(pki, extra))
    client = Client(await serve(nursery, manager, security), pki, tls=True)
    preflight = await client(
        "OPTIONS",
        "/instances",
        headers={
            "Origin": "https://ui.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://ui.example.com"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    refused = await client(
        "OPTIONS",
        "/instances",
        headers={"Origin": "https://evil.example.com", "Access-Control-Request-Method": "GET"},
    )
    assert_error(refused, 403, "FORBIDDEN")
    assert "Access-Control-Allow-Origin" not in refused.headers
    response = await client(
        "GET", "/instances", key=KEYS["reader"], headers={"Origin": "https://ui.example.com"}
    )
    assert response.headers["Access-Control-Allow-Origin"] == "https://ui.example.com"


async def test_rate_limit(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> None:
    extra = "[rate_limit]\nenabled = true\nread = { requests_per_sec = 0.01, burst = 2 }\n"
    manager, security = manager_for(tmp_path, native_toml(pki, extra))
    client = Client(await serve(nursery, manager, security), pki, tls=True)
    for _ in range(2):
        assert (await client("GET", "/instances", key=KEYS["reader"])).status_code == 200
    limited = await client("GET", "/instances", key=KEYS["reader"])
    assert_error(limited, 429, "OVERLOADED")
    assert 90 <= int(limited.headers["Retry-After"]) <= 100
    # Another identity has its own bucket.
    assert (await client("GET", "/instances", cert="allowed")).status_code == 200
    assert rejections(manager, "OVERLOADED", "reader") == 1


async def server_certificate(port: int, pki: Pki) -> x509.Certificate:
    context = ssl.create_default_context(cafile=str(pki.ca_path))
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    async with stream:
        await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def watch_reloads(
    nursery: trio.Nursery, security: Security
) -> trio.MemoryReceiveChannel[bool]:
    """Start the reloader; the channel gives the outcome of each reload attempt."""
    assert security.tls is not None
    send, receive = trio.open_memory_channel[bool](10)
    await nursery.start(partial(security.tls.run, on_reload=send.send_nowait))
    return receive


async def test_certificate_reload_on_sighup(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    manager, security = manager_for(tmp_path, native_toml(pki))
    port = await serve(nursery, manager, security)
    reloads = await watch_reloads(nursery, security)
    before = await server_certificate(port, pki)
    transport = httpx2.AsyncHTTPTransport(verify=Client(port, pki, tls=True).context("allowed"))
    async with httpx2.AsyncClient(transport=transport) as kept:
        url = f"https://127.0.0.1:{port}/instances"
        assert (await kept.get(url)).status_code == 200
        rotated = pki.write_server("rotated")
        os.kill(os.getpid(), signal.SIGHUP)
        with trio.fail_after(5):
            assert await reloads.receive()
        # The connection opened before the rotation goes on; new ones get the new cert.
        assert (await kept.get(url)).status_code == 200
    after = await server_certificate(port, pki)
    assert before.serial_number != after.serial_number == rotated.serial_number


async def test_certificate_reload_when_files_change(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    toml = native_toml(pki).replace("[auth.mtls]\n", "[auth.mtls]\nreload_check_secs = 0.05\n")
    manager, security = manager_for(tmp_path, toml)
    port = await serve(nursery, manager, security)
    reloads = await watch_reloads(nursery, security)
    rotated = pki.write_server("rotated")
    with trio.fail_after(5):
        assert await reloads.receive()
    assert (await server_certificate(port, pki)).serial_number == rotated.serial_number
    # A broken pair is refused and the served certificate stays.
    pki.server_key.write_text("not a key")
    with trio.fail_after(5):
        assert not await reloads.receive()
    assert (await server_certificate(port, pki)).serial_number == rotated.serial_number


async def test_jwt_bearer_tokens(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "jwt.pem").write_bytes(public_pem(key))
    toml = native_toml(pki).replace(
        'providers = ["mtls", "api_key"]', 'providers = ["mtls", "api_key", "jwt"]'
    ) + (
        f'[auth.jwt]\nissuer = "https://issuer"\naudience = "tei-manager"\n'
        f'public_keys = ["{tmp_path / "jwt.pem"}"]\n'
    )
    manager, security = manager_for(tmp_path, toml)
    client = Client(await serve(nursery, manager, security), pki, tls=True)
    now = time.time()
    claims = {"iss": "https://issuer", "aud": "tei-manager", "sub": "system:serviceaccount:a:b",
              "exp": now + 600, "scope": "read"}  # fmt: skip
    good = await client("GET", "/instances", key=sign(key, claims))
    assert good.status_code == 200
    assert (await client("GET", "/instances", key=KEYS["reader"])).status_code == 200
    for token in (
        sign(key, {**claims, "exp": now - 3600}),
        sign(key, {**claims, "aud": "other"}),
        sign(ec.generate_private_key(ec.SECP256R1()), claims),
        sign(None, claims, alg="none"),
    ):
        refused = await client("GET", "/instances", key=token)
        assert_error(refused, 401, "UNAUTHENTICATED")
        assert 'error="invalid_token"' in refused.headers["WWW-Authenticate"]
    admin = await client("DELETE", "/instances/x", key=sign(key, claims))
    assert_error(admin, 403, "FORBIDDEN")


async def tls_handshake(port: int, pki: Pki) -> trio.SSLStream[trio.SocketStream] | None:
    """A TLS connection to ``port`` once its handshake is done; None when the server
    closed it first."""
    context = ssl.create_default_context(cafile=str(pki.ca_path))
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError:
        await trio.aclose_forcefully(stream)
        return None
    return stream


async def test_tls_connections_count_against_api_max_connections(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    manager, security = manager_for(
        tmp_path,
        native_toml(pki).replace("grpc_port = 0\n", "grpc_port = 0\napi_max_connections = 1\n"),
    )
    port = await serve(nursery, manager, security)
    held = await tls_handshake(port, pki)
    assert held is not None
    with trio.fail_after(5):
        assert await tls_handshake(port, pki) is None  # closed before its handshake
        # Once the held one ends, the next is served.
        await held.send_all(b"GET /health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        answer = b""
        with contextlib.suppress(trio.BrokenResourceError):
            while chunk := await held.receive_some(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        await held.aclose()
        while True:
            fresh = await tls_handshake(port, pki)
            if fresh is not None:
                break
            await trio.sleep(0.01)  # the server has not yet seen the held one end
    await fresh.aclose()
