"""Downloading one model into the cache: plan, fetch with retries, check, then install.

::

    download_model
    ├── file list + checksums        model info with files_metadata      (retried)
    ├── manifests                    modules.json, weight indexes        (retried)
    ├── plan                         only what an instance reads         (pure)
    ├── each file not yet cached     GET, resumed with Range after drops (retried)
    │                                hashed as it arrives, checked at the end
    └── install                      partial files → blobs, snapshot links, then the ref

Each blocking step runs in a worker thread that polls for cancellation between
chunks, so cancelling the task (``DELETE /models/{id}``, shutdown) stops the transfer
within a chunk. Transient failures wait with exponential backoff on the Trio clock.

A failure (a checksum mismatch, a missing file, retries used up) discards every
partial file of the download: no new blob, link or ref was written, so the cache
holds nothing of it. A cancellation keeps the partial files (``.incomplete``: they
do not look complete), and the next download resumes them.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol, TypeVar

import trio

from tei_manager.errors import quote
from tei_manager.hub import cache as cache_io
from tei_manager.hub.cache import RepoCache
from tei_manager.hub.client import HubError, Listing, Sink, Transfer, TransientHubError
from tei_manager.hub.client import fetch_file as hub_fetch_file
from tei_manager.hub.client import fetch_listing as hub_fetch_listing
from tei_manager.hub.integrity import IntegrityError, RemoteFile
from tei_manager.hub.retry import RetryPolicy, RetryState
from tei_manager.hub.selection import PlanError, plan_files
from tei_manager.hub.settings import HubSettings
from tei_manager.hub.state import CachedSnapshot, TransferProgress

__all__ = [
    "Blocking",
    "DownloadError",
    "Downloader",
    "FileFetcher",
    "ListingFetcher",
    "in_thread",
    "inline",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
CheckCancelled = Callable[[], None]


class Blocking(Protocol):
    """Runs ``fn(check_cancelled)`` off the event loop and returns its result."""

    def __call__(self, fn: Callable[[CheckCancelled], T], /) -> Awaitable[T]: ...


async def in_thread(fn: Callable[[CheckCancelled], T]) -> T:
    """In a worker thread that sees this task's cancellation between chunks."""
    return await trio.to_thread.run_sync(fn, trio.from_thread.check_cancelled)


async def inline(fn: Callable[[CheckCancelled], T]) -> T:
    """On the event loop itself (tests on the mock clock, where threads would let
    virtual time run ahead)."""
    await trio.lowlevel.checkpoint()
    return fn(lambda: None)


ListingFetcher = Callable[[HubSettings, str, "str | None"], Listing]
FileFetcher = Callable[[HubSettings, str, str, Transfer, Sink, CheckCancelled], None]


class DownloadError(Exception):
    """The download failed for good; ``str()`` is the reason for the user."""


class _ProgressSink:
    """Turns a transfer's position into the model's byte count, and counts traffic."""

    def __init__(self, progress: TransferProgress, base: int, on_bytes: Callable[[int], None]):
        self._progress = progress
        self._base = base
        self._on_bytes = on_bytes

    def position(self, done: int) -> None:
        self._progress.bytes_done = self._base + done

    def received(self, count: int) -> None:
        self._on_bytes(count)


class Downloader:
    """Downloads models into ``hub.cache_dir``; see the module notes."""

    def __init__(
        self,
        hub: HubSettings,
        retry: RetryPolicy,
        *,
        blocking: Blocking = in_thread,
        on_bytes: Callable[[int], None] = lambda count: None,
        fetch_listing: ListingFetcher = hub_fetch_listing,
        fetch_file: FileFetcher = hub_fetch_file,
    ) -> None:
        self.hub = hub
        self._retry = retry
        self._blocking = blocking
        self._on_bytes = on_bytes
        self._fetch_listing = fetch_listing
        self._fetch_file = fetch_file

    async def download(
        self, model_id: str, revision: str | None, progress: TransferProgress
    ) -> CachedSnapshot:
        """Download what an instance of ``model_id`` needs; the installed snapshot.

        ``progress`` is updated as bytes arrive. Raises :class:`DownloadError`.
        """
        try:
            return await self._download(model_id, revision, progress)
        except (HubError, IntegrityError, PlanError) as e:
            raise DownloadError(str(e)) from None
        except OSError as e:
            raise DownloadError(f"model cache: {e.strerror or e}") from None

    async def _download(
        self, model_id: str, revision: str | None, progress: TransferProgress
    ) -> CachedSnapshot:
        listing = await self._retrying(
            f"model info of {quote(model_id)}",
            lambda check: self._fetch_listing(self.hub, model_id, revision),
        )
        repo = RepoCache(self.hub.cache_dir, model_id)
        available = listing.by_path()
        manifests: dict[str, bytes] = {}
        fetched: list[RemoteFile] = []  # checked, waiting to be installed
        try:
            while True:
                plan = plan_files(available.keys(), manifests)
                if not plan.pending_manifests:
                    break
                for name in plan.pending_manifests:
                    file = _checkable(available[name])
                    await self._fetch(model_id, listing.commit, repo, file, progress, 0)
                    fetched.append(file)
                    manifests[name] = await self._blocking(partial(_read_fetched, repo, file))
            files = [_checkable(available[name]) for name in plan.files]
            progress.files_total = len(files)
            progress.bytes_total = sum(f.size for f in files)
            missing = [f for f in files if f not in fetched]
            await self._blocking(partial(_check_space, repo, missing))
            done = [f for f in files if f in fetched]
            progress.files_done = len(done)
            progress.bytes_done = base = sum(f.size for f in done)
            for file in missing:
                await self._fetch(model_id, listing.commit, repo, file, progress, base)
                fetched.append(file)
                base += file.size
                progress.files_done += 1
                progress.bytes_done = base
            return await self._blocking(
                partial(_install, repo, model_id, listing.commit, revision, files, self.hub)
            )
        except (HubError, IntegrityError, PlanError, OSError):
            with trio.CancelScope(shield=True):
                await self._blocking(lambda check: repo.discard(listing.files))
            raise

    async def _fetch(
        self,
        model_id: str,
        commit: str,
        repo: RepoCache,
        file: RemoteFile,
        progress: TransferProgress,
        base: int,
    ) -> None:
        if await self._blocking(lambda check: repo.has(file)):
            return
        transfer = Transfer(file, repo.partial(file))
        sink = _ProgressSink(progress, base, self._on_bytes)
        await self._retrying(
            file.path,
            lambda check: self._fetch_file(self.hub, model_id, commit, transfer, sink, check),
            progress=lambda: transfer.hasher.bytes_hashed if transfer.hasher else 0,
        )

    async def _retrying(
        self,
        what: str,
        call: Callable[[CheckCancelled], T],
        *,
        progress: Callable[[], int] = lambda: 0,
    ) -> T:
        """``call`` in a thread, retried after transient failures with backoff."""
        state = RetryState(self._retry)
        while True:
            before = progress()
            try:
                return await self._blocking(call)
            except TransientHubError as e:
                if progress() > before:
                    state.progressed()
                delay = state.failed()
                if delay is None:
                    retries = state.policy.max_retries
                    raise HubError(f"{e} (gave up after {retries} retries)") from None
                log.warning("%s; retrying in %g s", e, delay)
                await trio.sleep(delay)


def _checkable(file: RemoteFile) -> RemoteFile:
    """``file``, if the Hub gave a checksum for it: an unchecked file is never installed."""
    if file.digest is None or not file.digest.valid():
        raise HubError(f"{file.path}: the Hub gave no valid checksum, so it cannot be checked")
    return file


def _read_fetched(repo: RepoCache, file: RemoteFile, check: CheckCancelled) -> bytes:
    path = repo.partial(file)
    return (path if path.exists() else repo.blob(file)).read_bytes()


def _check_space(repo: RepoCache, files: list[RemoteFile], check: CheckCancelled) -> None:
    needed = sum(f.size for f in files if not repo.has(f))
    if not needed:
        return
    repo.blobs.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(repo.blobs).free
    if free < needed:
        raise HubError(
            f"not enough disk space in the model cache: {needed} bytes needed, {free} free"
        )


def _install(
    repo: RepoCache,
    model_id: str,
    commit: str,
    revision: str | None,
    files: list[RemoteFile],
    hub: HubSettings,
    check: CheckCancelled,
) -> CachedSnapshot:
    for file in files:
        repo.commit_file(file)
    repo.install(commit, revision, files)
    snapshot = cache_io.locate(hub.cache_dir, model_id, revision)
    if snapshot is None:  # pragma: no cover - install just wrote it
        raise HubError(f"the snapshot of {quote(model_id)} is not in the cache after install")
    return snapshot
