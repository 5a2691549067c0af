"""What every front door shares, built once from the configuration."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from tei_manager.auth.build import build_authenticator, build_cors
from tei_manager.auth.cors import CorsPolicy
from tei_manager.auth.metrics import AuthMetrics
from tei_manager.auth.policy import Authenticator
from tei_manager.auth.tls import ServerTls, server_tls
from tei_manager.config import ManagerConfig

__all__ = ["Security", "build_security"]


@dataclass
class Security:
    """One authenticator (so one set of rate-limit buckets and one certificate
    verifier for both ports), the CORS policy, the refusal counters, and the
    reloadable TLS contexts when ``[auth.mtls]`` names a server certificate."""

    authenticator: Authenticator
    cors: CorsPolicy
    metrics: AuthMetrics
    tls: ServerTls | None


def build_security(
    config: ManagerConfig,
    registry: CollectorRegistry | None,
    env: Mapping[str, str] | None = None,
) -> Security:
    """Read the security files of ``config``; raises ConfigError naming the field."""
    authenticator = build_authenticator(config, os.environ if env is None else env)
    return Security(
        authenticator,
        build_cors(config),
        AuthMetrics(registry),
        server_tls(config.auth, authenticator),
    )
