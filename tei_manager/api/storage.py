"""Free space on the disks that hold instance logs and the model cache, for ``GET /health``.

Instance logs grow without bound and model downloads are large, so a filling disk
is the storage failure an operator most needs to see before it stops every
instance from writing, or a download half way.
"""

from __future__ import annotations

import os
import shutil
from functools import partial
from typing import Final

import msgspec
import trio

from tei_manager.api.dto import StorageHealth, StorageStatus

__all__ = [
    "UNHEALTHY_BELOW",
    "WARNING_BELOW",
    "check_storage",
    "classify",
    "read_storage",
    "worst",
]

WARNING_BELOW: Final = 0.10
UNHEALTHY_BELOW: Final = 0.05


def classify(free_ratio: float) -> StorageStatus:
    """``ok``, ``warning`` under 10% free, ``unhealthy`` under 5% free."""
    if free_ratio < UNHEALTHY_BELOW:
        return "unhealthy"
    if free_ratio < WARNING_BELOW:
        return "warning"
    return "ok"


_SEVERITY: Final[dict[StorageStatus, int]] = {"ok": 0, "warning": 1, "unhealthy": 2}


def worst(*statuses: StorageStatus) -> StorageStatus:
    """The most severe of ``statuses``."""
    return max(statuses, key=_SEVERITY.__getitem__)


def _existing_ancestor(path: str) -> str:
    """``path`` or its nearest existing parent: the log folder may not exist yet."""
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def read_storage(path: str, *, model_cache: str | None = None) -> StorageHealth:
    """Free space on the file system holding ``path`` (and ``model_cache``, nested).

    Blocking: run it in a thread.
    """
    health = _read_one(path)
    if model_cache is None:
        return health
    cache = _read_one(model_cache)
    return msgspec.structs.replace(
        health, status=worst(health.status, cache.status), model_cache=cache
    )


def _read_one(path: str) -> StorageHealth:
    try:
        usage = shutil.disk_usage(_existing_ancestor(path))
    except OSError as error:
        return StorageHealth(
            path=path,
            free_bytes=None,
            total_bytes=None,
            free_ratio=None,
            status="unhealthy",
            error=error.strerror or type(error).__name__,
        )
    # A zero-sized file system (some pseudo file systems) has no room at all.
    ratio = usage.free / usage.total if usage.total else 0.0
    return StorageHealth(
        path=path,
        free_bytes=usage.free,
        total_bytes=usage.total,
        free_ratio=ratio,
        status=classify(ratio),
    )


async def check_storage(path: str, *, model_cache: str | None = None) -> StorageHealth:
    """:func:`read_storage` off the event loop: a stalled mount must not stall the API."""
    return await trio.to_thread.run_sync(
        partial(read_storage, path, model_cache=model_cache), abandon_on_cancel=True
    )
