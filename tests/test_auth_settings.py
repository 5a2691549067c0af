"""[auth], [rate_limit] and [cors]: the original's files load, mistakes name the field."""

from __future__ import annotations

import pytest

from tei_manager.auth.settings import DEFAULT_PUBLIC_PATHS, parse_subject
from tei_manager.config import ConfigError, ManagerConfig, parse_config
from tei_manager.errors import ValidationError

ENV = {"HOME": "/home/u"}

# The original's deployment guide and design, verbatim.
ORIGINAL = """
[auth]
enabled = true
providers = ["mtls"]
require_cert_headers = false
[auth.mtls]
ca_cert = "/etc/tei-manager/ca.pem"
server_cert = "/etc/tei-manager/server.pem"
server_key = "/etc/tei-manager/server.key"
allow_self_signed = false
verify_subject = true
allowed_subjects = ["CN=client1"]
verify_san = false
allowed_sans = ["DNS:client.example.com"]
"""

PROXY = """
[auth]
enabled = true
providers = ["mtls"]
require_cert_headers = true
trusted_proxies = ["10.0.0.0/8"]
[auth.mtls]
ca_cert = "/etc/tei-manager/ca.pem"
"""

KEY = "a" * 64


def parse(text: str) -> ManagerConfig:
    return parse_config(text, env=ENV)


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


def test_original_config_loads_unchanged() -> None:
    config = parse(ORIGINAL)
    assert config.auth.enabled
    assert config.auth.providers == ("mtls",)
    assert config.auth.mtls is not None
    assert config.auth.mtls.allowed_subjects == ("CN=client1",)
    assert config.auth.public_paths == DEFAULT_PUBLIC_PATHS
    assert parse(PROXY).auth.require_cert_headers


def test_defaults_are_off() -> None:
    config = parse("")
    assert not config.auth.enabled
    assert not config.rate_limit.enabled
    assert config.cors.allowed_origins == ()


def test_everything_decodes() -> None:
    config = parse(
        ORIGINAL.replace('providers = ["mtls"]', 'providers = ["mtls", "api_key", "jwt"]')
        + f"""
[auth.api_key]
keys = [
  {{ name = "ci", scopes = ["inference"], sha256 = "{KEY}" }},
  {{ name = "ops", scopes = ["admin", "read"], file = "/run/secrets/ops" }},
  {{ name = "bot", scopes = ["read"], env = "BOT_KEY" }},
]
[auth.jwt]
issuer = "https://kubernetes.default.svc"
audience = "tei-manager"
jwks_file = "/etc/tei-manager/jwks.json"
scope_map = {{ "tei.admin" = ["admin", "read"] }}
[rate_limit]
enabled = true
inference = {{ requests_per_sec = 100.0, burst = 200 }}
[cors]
allowed_origins = ["https://ui.example.com"]
allow_credentials = true
"""
    )
    assert config.auth.api_key is not None and len(config.auth.api_key.keys) == 3
    assert config.auth.jwt is not None
    assert config.auth.jwt.scope_map == {"tei.admin": ("admin", "read")}
    assert config.rate_limit.inference is not None
    assert config.rate_limit.inference.burst == 200
    assert config.rate_limit.admin is None


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[auth]\nenabled = true", "auth.providers"),
        ('[auth]\nproviders = ["oauth"]', "auth.providers[0]"),
        ('[auth]\nproviders = ["mtls", "mtls"]', "auth.providers[1]"),
        ('[auth]\nenabled = true\nproviders = ["mtls"]', "auth.mtls"),
        ('[auth]\nenabled = true\nproviders = ["api_key"]', "auth.api_key"),
        ('[auth]\nenabled = true\nproviders = ["jwt"]', "auth.jwt"),
        ('[auth]\ntrusted_proxies = ["10.0.0.300/8"]', "auth.trusted_proxies[0]"),
        ('[auth]\nadmin_allowed_cidrs = ["bastion"]', "auth.admin_allowed_cidrs[0]"),
        ('[auth]\npublic_paths = ["metrics"]', "auth.public_paths[0]"),
        (PROXY.replace('trusted_proxies = ["10.0.0.0/8"]', ""), "auth.trusted_proxies"),
        (ORIGINAL.replace('ca_cert = "/etc/tei-manager/ca.pem"', ""), "auth.mtls.ca_cert"),
        (ORIGINAL.replace('server_key = "/etc/tei-manager/server.key"', ""),
         "auth.mtls.server_key"),
        (
            ORIGINAL.replace("server_cert = ", "#").replace("server_key = ", "#"),
            "auth.mtls.server_cert",
        ),
        (ORIGINAL.replace('["CN=client1"]', '["client1"]'), "auth.mtls.allowed_subjects[0]"),
        (ORIGINAL.replace('["DNS:client.example.com"]', '["x"]'), "auth.mtls.allowed_sans[0]"),
        (ORIGINAL.replace('["DNS:client.example.com"]', '["IP:x"]'), "auth.mtls.allowed_sans[0]"),
        (
            ORIGINAL.replace("allow_self_signed = false", "allow_self_signed = true").replace(
                '["CN=client1"]', "[]"
            ),
            "auth.mtls.allow_self_signed",
        ),
        (ORIGINAL + "unknown = 1", "auth.mtls"),
        ('[auth.api_key]\nkeys = []', "auth.api_key.keys"),
        (f'[auth.api_key]\nkeys = [{{ name = "", scopes = ["read"], sha256 = "{KEY}" }}]',
         "auth.api_key.keys[0].name"),
        ('[auth.api_key]\nkeys = [{ name = "a", scopes = ["read"] }]', "auth.api_key.keys[0]"),
        (f'[auth.api_key]\nkeys = [{{ name = "a", scopes = [], sha256 = "{KEY}" }}]',
         "auth.api_key.keys[0].scopes"),
        ('[auth.api_key]\nkeys = [{ name = "a", scopes = ["read"], sha256 = "xyz" }]',
         "auth.api_key.keys[0].sha256"),
        ('[auth.api_key]\nkeys = [{ name = "a", scopes = ["read"], key = "secret" }]',
         "auth.api_key.keys[0]"),
        ('[auth.api_key]\nkeys = [{ name = "a", scopes = ["read"], env = "1X" }]',
         "auth.api_key.keys[0].env"),
        (f'[auth.api_key]\nkeys = [{{ name = "a", scopes = ["root"], sha256 = "{KEY}" }}]',
         "auth.api_key.keys[0].scopes[0]"),
        (
            f'[auth.api_key]\nkeys = [{{ name = "a", scopes = ["read"], sha256 = "{KEY}" }},'
            f' {{ name = "a", scopes = ["read"], sha256 = "{KEY}" }}]',
            "auth.api_key.keys[1].name",
        ),
        ('[auth.jwt]\nissuer = "i"\naudience = "a"', "auth.jwt.public_keys"),
        ('[auth.jwt]\nissuer = ""\naudience = "a"\njwks_file = "j"', "auth.jwt.issuer"),
        ('[auth.jwt]\nissuer = "i"\naudience = "a"\njwks_file = "j"\nalgorithms = ["HS256"]',
         "auth.jwt.algorithms[0]"),
        ('[auth.jwt]\nissuer = "i"\naudience = "a"\njwks_file = "j"\nalgorithms = ["none"]',
         "auth.jwt.algorithms[0]"),
        ('[auth.jwt]\nissuer = "i"\naudience = "a"\njwks_file = "j"\nleeway_secs = 3600',
         "auth.jwt.leeway_secs"),
        ("[rate_limit.read]\nrequests_per_sec = 0\nburst = 1", "rate_limit.read.requests_per_sec"),
        ("[rate_limit.admin]\nrequests_per_sec = 1\nburst = 0", "rate_limit.admin.burst"),
        ("[rate_limit]\nmax_tracked_clients = 0", "rate_limit.max_tracked_clients"),
        ("[rate_limit]\nipv6_prefix_bits = 0", "rate_limit.ipv6_prefix_bits"),
        ("[rate_limit]\nipv6_prefix_bits = 129", "rate_limit.ipv6_prefix_bits"),
        ('[cors]\nallowed_origins = ["ui.example.com"]', "cors.allowed_origins[0]"),
        ('[cors]\nallowed_origins = ["*"]\nallow_credentials = true', "cors.allow_credentials"),
        ('[cors]\nallowed_methods = ["GET POST"]', "cors.allowed_methods[0]"),
        ("[cors]\nmax_age_secs = -1", "cors.max_age_secs"),
    ],
)  # fmt: skip
def test_mistakes_name_the_field(text: str, field: str) -> None:
    message = error(text)
    assert message.startswith(f"{field}: "), message
    assert "secret" not in message


def test_subject_parsing() -> None:
    assert parse_subject("CN=client1", "f") == (("CN", "client1"),)
    assert parse_subject("cn=a\\,b, O=Acme", "f") == (("CN", "a,b"), ("O", "Acme"))
    with pytest.raises(ValidationError):
        parse_subject("CN=", "f")
