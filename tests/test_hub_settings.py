"""The Hugging Face variables, read in one place."""

from __future__ import annotations

import pytest

from tei_manager.config import ConfigError, ManagerConfig, parse_config
from tei_manager.hub.settings import DEFAULT_ENDPOINT, HubSettings, RegistrySettings


def test_defaults() -> None:
    hub = HubSettings.from_env({"HOME": "/home/u"})
    assert hub == HubSettings(
        cache_dir="/home/u/.cache/huggingface/hub", endpoint=DEFAULT_ENDPOINT, timeout_secs=10.0
    )


def test_variables() -> None:
    hub = HubSettings.from_env(
        {
            "HF_ENDPOINT": "http://mirror.local:8080/",
            "HF_TOKEN": "hf_x",
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DOWNLOAD_TIMEOUT": "30",
            "HF_HOME": "/data/hf",
        }
    )
    assert hub == HubSettings(
        cache_dir="/data/hf/hub",
        endpoint="http://mirror.local:8080",
        token="hf_x",
        offline=True,
        timeout_secs=30.0,
    )
    assert HubSettings.from_env({"TRANSFORMERS_OFFLINE": "true", "HOME": "/"}).offline
    assert not HubSettings.from_env({"HF_HUB_OFFLINE": "0", "HOME": "/"}).offline
    assert HubSettings.from_env({"HF_HUB_DOWNLOAD_TIMEOUT": "x", "HOME": "/"}).timeout_secs == 10


def test_registry_settings_from_the_config() -> None:
    config = ManagerConfig(
        max_concurrent_downloads=4, download_max_retries=7, smoke_load_timeout_secs=90
    )
    settings = RegistrySettings.from_config(config)
    assert settings.max_concurrent_downloads == 4
    assert settings.retry.max_retries == 7
    assert settings.smoke_load_timeout_secs == 90


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        ("max_concurrent_downloads = 0", "max_concurrent_downloads: 0 is invalid: use a"),
        ("download_max_retries = -1", "download_max_retries: -1 is invalid: use a number >= 0"),
        ("smoke_load_timeout_secs = 0", "smoke_load_timeout_secs: 0.0 is invalid: use a"),
        ('models = ["/data/bge"]', 'models[0]: "/data/bge" is a local path'),
    ],
)  # fmt: skip
def test_config_rules(toml: str, says: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(toml, env={})
    assert says in str(error.value)
