"""The Hugging Face cache on disk: finding models in it, adding files, removing models.

The layout is huggingface_hub's own, so instances (TEI or the worker) find what the
registry downloaded, and the registry finds what they downloaded::

    <cache>/models--org--name/
        blobs/<sha256 or git blob id>        the files' contents
        snapshots/<commit>/<path>            symlinks into blobs/
        refs/<revision>                      the commit a branch or tag pointed at

A file being downloaded is ``blobs/<id>.incomplete`` (huggingface_hub names its own
``<id>.<random>.incomplete``, so the two never write the same file). A file becomes
``blobs/<id>`` only once its hash was checked, and a snapshot only ever links to
such blobs; the ref is written last. So nothing in the cache looks complete that
was not checked, and huggingface_hub's cache scan skips whatever is half done.

Blocking: call these from a worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from tei_manager.hub.integrity import RemoteFile
from tei_manager.hub.paths import (
    is_commit_hash,
    repo_folder_name,
    safe_repo_path,
)
from tei_manager.hub.state import CachedSnapshot, ModelMetadata

__all__ = [
    "RepoCache",
    "local_model_problem",
    "locate",
    "read_metadata",
    "remove_model",
    "scan_cache",
]

log = logging.getLogger(__name__)

_PARTIAL_SUFFIX: Final = ".incomplete"
# config.json of a sentence-transformers model can sit in its transformer module.
_CONFIG_CANDIDATES: Final = ("config.json", "0_Transformer/config.json")


def local_model_problem(path: str) -> str | None:
    """Why the local folder ``path`` is no model an instance could load; None if it is one.

    A model folder holds a ``config.json`` (transformers, TEI) or a ``modules.json``
    (sentence-transformers), as a cached snapshot must (:func:`locate`). Checked as
    the manager's user, who is also the instance's.
    """
    folder = Path(path)
    try:
        if not folder.exists():
            return "does not exist"
        if not folder.is_dir():
            return "is not a folder"
        if not os.access(folder, os.R_OK | os.X_OK):
            return "is not readable"
        for name in (*_CONFIG_CANDIDATES, "modules.json"):
            if (folder / name).is_file():
                return None if os.access(folder / name, os.R_OK) else f"has an unreadable {name}"
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    return "holds no config.json or modules.json: not a model folder"


def read_metadata(snapshot: Path) -> ModelMetadata | None:
    """The architecture fields of the snapshot's ``config.json``; None if unreadable."""
    for name in _CONFIG_CANDIDATES:
        try:
            data = json.loads((snapshot / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            return ModelMetadata.from_config(data)
    return None


def _snapshot_size(snapshot: Path) -> int:
    """Bytes of the distinct files the snapshot links to."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, _, files in os.walk(snapshot):
        for name in files:
            try:
                st = os.stat(os.path.join(folder, name))
            except OSError:
                continue  # a broken link: counts for nothing
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _snapshot(model_id: str, revision: str, commit: str, path: Path) -> CachedSnapshot:
    return CachedSnapshot(
        model_id=model_id,
        revision=revision,
        commit=commit,
        path=str(path),
        size_bytes=_snapshot_size(path),
        metadata=read_metadata(path),
    )


def locate(cache_dir: str, model_id: str, revision: str | None) -> CachedSnapshot | None:
    """The cached snapshot of ``model_id`` at ``revision`` (default ``main``), if any.

    A branch or tag is resolved through ``refs/``; a snapshot counts only if it
    holds a ``config.json`` or ``modules.json`` (a folder with just a README, left
    by some tool, is no model).
    """
    repo = Path(cache_dir) / repo_folder_name(model_id)
    wanted = revision or "main"
    if is_commit_hash(wanted):
        commit = wanted
    else:
        try:
            commit = (repo / "refs" / wanted).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not is_commit_hash(commit):
            return None
    snapshot = repo / "snapshots" / commit
    if not any((snapshot / name).exists() for name in (*_CONFIG_CANDIDATES, "modules.json")):
        return None
    return _snapshot(model_id, wanted, commit, snapshot)


def scan_cache(cache_dir: str) -> list[CachedSnapshot]:
    """Every model in the cache: one snapshot each, that of ``main`` where there is one.

    Uses huggingface_hub's own scan; repositories it finds broken (a download that
    never got a snapshot, say) are logged and skipped.
    """
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    for warning in info.warnings:
        log.info("model cache: skipped %s", warning)
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        chosen = next((r for r in revisions if "main" in r.refs), None)
        chosen = chosen or next((r for r in revisions if r.refs), None) or revisions[0]
        ref = "main" if "main" in chosen.refs else min(chosen.refs, default=chosen.commit_hash)
        found.append(_snapshot(repo.repo_id, ref, chosen.commit_hash, Path(chosen.snapshot_path)))
    return found


def remove_model(cache_dir: str, model_id: str) -> bool:
    """Delete the model's folder (every revision) and its lock folder; False if absent."""
    root = Path(cache_dir)
    folder = root / repo_folder_name(model_id)
    # The id was validated, but a folder that resolves elsewhere (a symlink) is left alone.
    if folder.is_symlink() or not folder.resolve().is_relative_to(root.resolve()):
        raise OSError(f"{folder} is not a folder inside the model cache")
    existed = folder.exists()
    if existed:
        shutil.rmtree(folder)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(root / ".locks" / repo_folder_name(model_id))
    return existed


class RepoCache:
    """One repository's folder in the cache, as a download writes it."""

    def __init__(self, cache_dir: str, model_id: str) -> None:
        self.root = Path(cache_dir) / repo_folder_name(model_id)
        self.blobs = self.root / "blobs"

    def blob(self, file: RemoteFile) -> Path:
        assert file.blob_name is not None
        return self.blobs / file.blob_name

    def partial(self, file: RemoteFile) -> Path:
        """Where ``file`` is written while it downloads."""
        return self.blobs / (f"{file.blob_name}{_PARTIAL_SUFFIX}")

    def has(self, file: RemoteFile) -> bool:
        """Whether the checked file is already among the blobs (another revision's, say)."""
        try:
            return self.blob(file).stat().st_size == file.size
        except OSError:
            return False

    def discard(self, files: Iterable[RemoteFile]) -> None:
        """Remove the partial files of ``files``: nothing half-written is left behind.

        One that another process is writing (it holds the lock) is its to finish.
        """
        for file in files:
            path = self.partial(file)
            try:
                with open(path, "rb") as held:
                    fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    path.unlink()
            except (FileNotFoundError, BlockingIOError):
                continue

    def commit_file(self, file: RemoteFile) -> None:
        """Make a fully downloaded and checked partial file the blob."""
        partial = self.partial(file)
        if partial.exists():
            os.replace(partial, self.blob(file))

    def install(self, commit: str, revision: str | None, files: Iterable[RemoteFile]) -> Path:
        """Link ``files`` (all blobs by now) into the commit's snapshot; then the ref.

        Returns the snapshot folder.
        """
        snapshot = self.root / "snapshots" / commit
        for file in files:
            pointer = snapshot / safe_repo_path(file.path)
            pointer.parent.mkdir(parents=True, exist_ok=True)
            target = os.path.relpath(self.blob(file), pointer.parent)
            # Replace atomically: a reader sees the old link or the new one, never none.
            temporary = pointer.with_name(f".{pointer.name}.{uuid.uuid4().hex[:8]}.link")
            os.symlink(target, temporary)
            os.replace(temporary, pointer)
        wanted = revision or "main"
        if wanted != commit:
            ref = self.root / "refs" / wanted
            ref.parent.mkdir(parents=True, exist_ok=True)
            temporary = ref.with_name(f".{ref.name}.{uuid.uuid4().hex[:8]}.tmp")
            temporary.write_text(commit, encoding="ascii")
            os.replace(temporary, ref)
        return snapshot
