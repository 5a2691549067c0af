"""Where the Hub is and how to reach it, and how the registry paces its work.

:meth:`HubSettings.from_env` is the one place the Hugging Face environment variables
are read: ``HF_ENDPOINT`` (a mirror or a private hub), ``HF_TOKEN``,
``HF_HUB_OFFLINE``, ``HF_HUB_DOWNLOAD_TIMEOUT`` and the cache location
(``HF_HUB_CACHE``, ``HF_HOME``, ``XDG_CACHE_HOME``). They are read when the manager
starts, not when huggingface_hub was imported, and handed to huggingface_hub
explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import msgspec

from tei_manager.config import ManagerConfig
from tei_manager.hub.paths import hub_cache_dir
from tei_manager.hub.retry import RetryPolicy

__all__ = ["DEFAULT_ENDPOINT", "HubSettings", "RegistrySettings"]

DEFAULT_ENDPOINT: Final = "https://huggingface.co"
_TRUE: Final = frozenset({"1", "true", "yes", "on"})


class HubSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How to reach the Hub, and the cache to download into."""

    cache_dir: str
    endpoint: str = DEFAULT_ENDPOINT
    token: str | None = None  # None: huggingface_hub looks for one (token file)
    offline: bool = False
    timeout_secs: float = 10.0  # connecting, and waiting for each chunk

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HubSettings:
        offline = (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").lower()
        try:
            timeout = float(env.get("HF_HUB_DOWNLOAD_TIMEOUT") or 10.0)
        except ValueError:
            timeout = 10.0
        return cls(
            cache_dir=hub_cache_dir(env),
            endpoint=(env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
            token=env.get("HF_TOKEN") or None,
            offline=offline in _TRUE,
            timeout_secs=timeout if timeout > 0 else 10.0,
        )


class RegistrySettings(msgspec.Struct, frozen=True, kw_only=True):
    """Limits and timings of downloads and smoke loads; from the manager config."""

    max_concurrent_downloads: int = 2
    retry: RetryPolicy = RetryPolicy()
    smoke_load_timeout_secs: float = 600.0
    readiness_interval_secs: float = 0.25
    probe_timeout_secs: float = 2.0
    stop_grace_secs: float = 10.0

    @classmethod
    def from_config(cls, config: ManagerConfig) -> RegistrySettings:
        return cls(
            max_concurrent_downloads=config.max_concurrent_downloads,
            retry=RetryPolicy(max_retries=config.download_max_retries),
            smoke_load_timeout_secs=config.smoke_load_timeout_secs,
        )
