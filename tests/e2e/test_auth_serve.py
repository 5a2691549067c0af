"""``tei-manager serve`` with native mTLS and API keys on both ports, as a user runs it:
curl-like HTTPS calls and a grpcio client, then a certificate rotated with SIGHUP."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx2
import pytest
from cryptography import x509

from tei_manager._proto.grpc.health.v1 import health_grpc, health_pb2
from tei_manager._proto.tei.v1 import tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tests.auth_pki import Pki, make_pki
from tests.e2e.test_manager_processes import READY_TIMEOUT, _free_port, _free_port_range
from tests.grpcio_client import stub

pytestmark = pytest.mark.slow

KEY = "ci-key-from-a-file"


def config(pki: Pki, tmp_path: Path, api: int, grpc_port: int) -> str:
    (tmp_path / "ci.key").write_text(KEY + "\n")
    start = _free_port_range(4)
    ops = hashlib.sha256(b"ops-key").hexdigest()
    return f"""
api_host = "127.0.0.1"
api_port = {api}
grpc_port = {grpc_port}
state_file = "{tmp_path / "state" / "state.toml"}"
log_dir = "{tmp_path / "logs"}"
instance_port_start = {start}
instance_port_end = {start + 3}
[auth]
enabled = true
providers = ["mtls", "api_key"]
admin_allowed_cidrs = ["127.0.0.1"]
[auth.mtls]
ca_cert = "{pki.ca_path}"
server_cert = "{pki.server_cert}"
server_key = "{pki.server_key}"
allowed_subjects = ["CN=client1"]
[auth.api_key]
keys = [
  {{ name = "ci", scopes = ["inference"], file = "{tmp_path / "ci.key"}" }},
  {{ name = "ops", scopes = ["admin", "read"], sha256 = "{ops}" }},
]
"""


def https(pki: Pki, cert: str | None = None) -> httpx2.Client:
    context = ssl.create_default_context(cafile=str(pki.ca_path))
    if cert is not None:
        context.load_cert_chain(pki[cert].cert_path, pki[cert].key_path)
    return httpx2.Client(verify=context, timeout=30)


def embed(pki: Pki, port: int, *, cert: str | None = None, key: str | None = None) -> str:
    credentials = grpc.ssl_channel_credentials(
        pki.ca_path.read_bytes(),
        private_key=pki[cert].key_path.read_bytes() if cert else None,
        certificate_chain=pki[cert].cert_path.read_bytes() if cert else None,
    )
    if key is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(key)
        )
    request = multiplexer_pb2.EmbedRequest(
        target=multiplexer_pb2.Target(instance_name="none"),
        request=tei_pb2.EmbedRequest(inputs="hi"),
    )
    with grpc.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    ) as channel:
        try:
            stub(channel, multiplexer_grpc.TeiMultiplexer.Embed)(request, timeout=30)
        except grpc.RpcError as error:
            return str(error.code().name)  # type: ignore[attr-defined]
    return "OK"


def served_serial(port: int, pki: Pki) -> int:
    context = ssl.create_default_context(cafile=str(pki.ca_path))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_serve_with_mtls_and_api_keys(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    api, grpc_port = _free_port(), _free_port()
    config_file = tmp_path / "config.toml"
    config_file.write_text(config(pki, tmp_path, api, grpc_port))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEI_")}
    env["HF_HUB_OFFLINE"] = "1"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tei_manager", "serve", "--config", str(config_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    base = f"https://localhost:{api}"
    try:
        with https(pki) as anonymous, https(pki, "allowed") as client1:
            deadline = time.monotonic() + READY_TIMEOUT
            while True:  # the probe is public
                assert process.poll() is None, log.read_text()[-3000:]
                try:
                    if anonymous.get(f"{base}/health/ready").status_code == 200:
                        break
                except httpx2.TransportError:
                    pass
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            # REST
            assert client1.get(f"{base}/instances").status_code == 200
            assert anonymous.get(f"{base}/instances").status_code == 401
            bearer = {"Authorization": f"Bearer {KEY}"}
            assert anonymous.get(f"{base}/instances", headers=bearer).status_code == 403
            ops = {"Authorization": "Bearer ops-key"}
            assert anonymous.get(f"{base}/instances", headers=ops).status_code == 200
            with https(pki, "other_cn") as intruder:
                assert intruder.get(f"{base}/instances").status_code == 403
            with https(pki, "expired") as expired, pytest.raises(httpx2.TransportError):
                expired.get(f"{base}/instances")
            metrics = anonymous.get(f"{base}/metrics", headers=ops).text
            labels = '{code="FORBIDDEN",identity="ci",port="rest"}'
            assert f"tei_manager_auth_rejections_total{labels} 1.0" in metrics
            # gRPC: past authentication a call meets routing (NOT_FOUND: no such instance).
            assert embed(pki, grpc_port, cert="allowed") == "NOT_FOUND"
            assert embed(pki, grpc_port, key=KEY) == "NOT_FOUND"
            assert embed(pki, grpc_port) == "UNAUTHENTICATED"
            assert embed(pki, grpc_port, key="ops-key") == "PERMISSION_DENIED"
            assert embed(pki, grpc_port, cert="other_cn") == "PERMISSION_DENIED"
            assert embed(pki, grpc_port, cert="other_ca") == "UNAVAILABLE"
            with grpc.secure_channel(
                f"127.0.0.1:{grpc_port}",
                grpc.ssl_channel_credentials(pki.ca_path.read_bytes()),
                options=[("grpc.ssl_target_name_override", "localhost")],
            ) as channel:
                health = stub(channel, health_grpc.Health.Check)(health_pb2.HealthCheckRequest())
                assert health.status == health_pb2.HealthCheckResponse.SERVING
            # Rotation: SIGHUP, and both ports serve the new certificate; an open
            # connection keeps working.
            rotated = pki.write_server("rotated")
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while "TLS certificates reloaded" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            assert client1.get(f"{base}/instances").status_code == 200
            assert served_serial(api, pki) == rotated.serial_number
            assert served_serial(grpc_port, pki) == rotated.serial_number
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert KEY not in text and "ops-key" not in text
    assert "identity=CN=client1" in text
