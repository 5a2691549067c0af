"""Free space on the disk that holds instance logs, for ``GET /health``.

Instance logs grow without bound, so a filling disk is the storage failure an
operator most needs to see before it stops every instance from writing.
"""

from __future__ import annotations

import os
import shutil
from typing import Final

import trio

from tei_manager.api.dto import StorageHealth, StorageStatus

__all__ = ["UNHEALTHY_BELOW", "WARNING_BELOW", "check_storage", "classify", "read_storage"]

WARNING_BELOW: Final = 0.10
UNHEALTHY_BELOW: Final = 0.05


def classify(free_ratio: float) -> StorageStatus:
    """``ok``, ``warning`` under 10% free, ``unhealthy`` under 5% free."""
    if free_ratio < UNHEALTHY_BELOW:
        return "unhealthy"
    if free_ratio < WARNING_BELOW:
        return "warning"
    return "ok"


def _existing_ancestor(path: str) -> str:
    """``path`` or its nearest existing parent: the log folder may not exist yet."""
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def read_storage(path: str) -> StorageHealth:
    """Free space on the file system holding ``path``. Blocking: run it in a thread."""
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


async def check_storage(path: str) -> StorageHealth:
    """:func:`read_storage` off the event loop: a stalled mount must not stall the API."""
    return await trio.to_thread.run_sync(read_storage, path, abandon_on_cancel=True)
