"""The model registry: what the Hugging Face cache holds, checked downloads, smoke loads.

Pure (no I/O):

- :mod:`~tei_manager.hub.paths`: model ids, revisions and file names on their way
  into cache paths.
- :mod:`~tei_manager.hub.selection`: which files of a repository an instance needs.
- :mod:`~tei_manager.hub.integrity`: the checksum a file must have, checked as it arrives.
- :mod:`~tei_manager.hub.retry`: backoff between retries.
- :mod:`~tei_manager.hub.state`: model records and their status flow.

I/O:

- :mod:`~tei_manager.hub.settings`: the Hub and cache settings, from the HF variables.
- :mod:`~tei_manager.hub.cache`: the cache on disk: scan, look-up, install, removal.
- :mod:`~tei_manager.hub.client`: the Hub over HTTP, through huggingface_hub (threads).
- :mod:`~tei_manager.hub.download`: one model's download: plan, fetch, check, install.
- :mod:`~tei_manager.hub.smoke`: launch the backend on a model, one request, stop.
- :mod:`~tei_manager.hub.registry`: the service the manager runs; jobs and their rules.
- :mod:`~tei_manager.hub.metrics`, :mod:`~tei_manager.hub.cli` (``tei-manager models``).
"""

from __future__ import annotations

from tei_manager.hub.registry import ModelRegistry
from tei_manager.hub.settings import HubSettings, RegistrySettings
from tei_manager.hub.state import ModelInfo, ModelStatus

__all__ = ["HubSettings", "ModelInfo", "ModelRegistry", "ModelStatus", "RegistrySettings"]
