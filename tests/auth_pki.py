"""Certificates for the auth tests, made with ``cryptography``: a CA, a server
certificate for 127.0.0.1, and clients of every kind the checks must tell apart."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = datetime.timedelta(days=1)


def name(common_name: str | None) -> x509.Name:
    if common_name is None:
        return x509.Name([])
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def make(cls, common_name: str) -> Authority:
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(common_name))
            .issuer_name(name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY)
            .not_valid_after(now + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )  # fmt: skip
        return cls(cert, key)

    def issue(
        self,
        common_name: str | None,
        *,
        sans: tuple[x509.GeneralName, ...] = (),
        usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - DAY)
            .not_valid_after(not_after or now + 10 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(list(sans)), critical=common_name is None
            )
        return builder.sign(self.key, hashes.SHA256()), key


@dataclass
class Client:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def header(self) -> str:
        """As nginx's ``$ssl_client_escaped_cert`` sends it."""
        return quote(pem(self.cert).decode(), safe="")


@dataclass
class Pki:
    directory: Path
    ca: Authority
    other_ca: Authority
    ca_path: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, Client] = field(default_factory=dict)

    def __getitem__(self, kind: str) -> Client:
        return self.clients[kind]

    def write_server(self, common_name: str = "localhost") -> x509.Certificate:
        """(Re)issue the server certificate for 127.0.0.1 into the same files."""
        cert, key = self.ca.issue(
            common_name,
            sans=(x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")),
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
        )
        # Key first, then the certificate, each by rename: a reader never sees a
        # half-written file (what kubelet's atomic writer does for secrets).
        for path, data in ((self.server_key, key_pem(key)), (self.server_cert, pem(cert))):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return cert


def make_pki(directory: Path) -> Pki:
    now = datetime.datetime.now(datetime.UTC)
    ca = Authority.make("test-ca")
    other_ca = Authority.make("other-ca")
    pki = Pki(
        directory, ca, other_ca, directory / "ca.pem", directory / "server.pem",
        directory / "server-key.pem",
    )  # fmt: skip
    pki.ca_path.write_bytes(pem(ca.cert))
    pki.write_server()
    dns = x509.DNSName("client.example.com")
    kinds = {
        "allowed": (ca, "client1", {}),
        "other_cn": (ca, "intruder", {}),
        "other_ca": (other_ca, "client1", {}),
        "expired": (ca, "client1", {"not_before": now - 10 * DAY, "not_after": now - DAY}),
        "not_yet_valid": (ca, "client1", {"not_before": now + DAY, "not_after": now + 10 * DAY}),
        "wrong_usage": (ca, "client1", {"usage": ExtendedKeyUsageOID.SERVER_AUTH}),
        "san_only": (ca, None, {"sans": (dns,)}),
    }
    for kind, (authority, common_name, options) in kinds.items():
        cert, key = authority.issue(common_name, **options)  # type: ignore[arg-type]
        client = Client(cert, key, directory / f"{kind}.pem", directory / f"{kind}-key.pem")
        client.cert_path.write_bytes(pem(cert))
        client.key_path.write_bytes(key_pem(key))
        pki.clients[kind] = client
    return pki


def proxy_toml(pki: Pki, trusted: str = "127.0.0.1") -> str:
    """An ``[auth]`` section for proxy mode: certificates only through ``trusted``."""
    return f"""
[auth]
enabled = true
providers = ["mtls"]
require_cert_headers = true
trusted_proxies = ["{trusted}"]
[auth.mtls]
ca_cert = "{pki.ca_path}"
allowed_subjects = ["CN=client1"]
"""
