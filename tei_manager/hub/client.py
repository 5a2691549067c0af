"""Talking to the Hub through huggingface_hub: a repository's file list, and one file.

Blocking: each call runs in a worker thread. huggingface_hub provides the HTTP client
(its shared session, with its proxy and TLS settings), the auth and user-agent
headers, the URLs and the translation of the Hub's error answers; the endpoint,
token and timeout come from :class:`~tei_manager.hub.settings.HubSettings`.

Failures leave as one of three exceptions: :class:`TransientHubError` (worth a retry:
connection trouble, 408/429/5xx), :class:`HubError` (it will not get better: no such
repository, revision or file, no access, a malformed answer) and
:class:`~tei_manager.hub.integrity.IntegrityError` (the bytes are not the file the Hub
described). A transfer calls ``check_cancelled`` between chunks: in a thread of
``trio.to_thread.run_sync`` that is ``trio.from_thread.check_cancelled``, so cancelling
the waiting task ends the transfer at the next chunk, its files closed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol

import msgspec

from tei_manager import __version__
from tei_manager.errors import quote
from tei_manager.hub.integrity import Digest, IntegrityError, RemoteFile, StreamHasher
from tei_manager.hub.paths import is_commit_hash, safe_repo_path
from tei_manager.hub.settings import HubSettings

__all__ = [
    "HubError",
    "Listing",
    "Sink",
    "Transfer",
    "TransientHubError",
    "fetch_file",
    "fetch_listing",
]

_CHUNK: Final = 1 << 20
_RETRYABLE_STATUS: Final = frozenset({408, 429, 500, 502, 503, 504})
_CONTENT_RANGE_RE: Final = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class HubError(Exception):
    """The Hub refused or answered something unusable; retrying will not help."""


class TransientHubError(Exception):
    """A failure that may pass: connection trouble, timeouts, 408, 429, 5xx."""


class Listing(msgspec.Struct, frozen=True, kw_only=True):
    """A repository at a commit: every file with its size and checksum."""

    commit: str
    files: tuple[RemoteFile, ...]

    def by_path(self) -> dict[str, RemoteFile]:
        return {f.path: f for f in self.files}


class Sink(Protocol):
    """Where a transfer reports how far it got."""

    def position(self, done: int) -> None:
        """Bytes of the file now on disk (may go back if the server ignored a Range)."""

    def received(self, count: int) -> None:
        """``count`` more bytes came over the network."""


class Transfer:
    """One file's download across attempts: the partial file and the running hash."""

    def __init__(self, file: RemoteFile, partial: Path) -> None:
        self.file = file
        self.partial = partial
        self.hasher: StreamHasher | None = None


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    detail = text[0] if text else ""
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """huggingface_hub's and httpx's exceptions, as ours."""
    import httpx2
    from huggingface_hub import errors

    try:
        yield
    except (HubError, TransientHubError, IntegrityError):
        raise
    except errors.OfflineModeIsEnabled:
        raise HubError(f"{what}: offline mode (HF_HUB_OFFLINE) is on") from None
    except errors.GatedRepoError:
        raise HubError(
            f"{what}: the repository is gated: accept its terms on the Hub and set HF_TOKEN"
        ) from None
    except errors.RepositoryNotFoundError:
        raise HubError(
            f"{what}: repository not found (or private: set HF_TOKEN to a token with access)"
        ) from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{what}: revision not found") from None
    except errors.RemoteEntryNotFoundError:
        raise HubError(f"{what}: file not found on the Hub") from None
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        message = f"{what}: the Hub answered HTTP {status}"
        if status in _RETRYABLE_STATUS:
            raise TransientHubError(message) from None
        raise HubError(message) from None
    except httpx2.TransportError as e:
        raise TransientHubError(f"{what}: {_describe(e)}") from None
    except httpx2.HTTPError as e:
        raise HubError(f"{what}: {_describe(e)}") from None
    except OSError as e:
        # A local file system error while writing: out of space, permissions.
        raise HubError(f"{what}: {e.strerror or _describe(e)}") from None


def fetch_listing(hub: HubSettings, model_id: str, revision: str | None) -> Listing:
    """The commit ``revision`` (default: the main branch) points at, and its files."""
    from huggingface_hub import HfApi

    what = f"model info of {quote(model_id)}"
    if hub.offline:
        raise HubError(f"{what}: offline mode (HF_HUB_OFFLINE) is on")
    with _translated(what):
        api = HfApi(endpoint=hub.endpoint, token=hub.token, library_name="tei-manager")
        info = api.model_info(
            model_id, revision=revision, files_metadata=True, timeout=hub.timeout_secs
        )
    commit = info.sha
    if not isinstance(commit, str) or not is_commit_hash(commit):
        raise HubError(f"{what}: the Hub gave no commit hash")
    files = []
    for sibling in info.siblings or ():
        try:
            path = safe_repo_path(sibling.rfilename)
        except ValueError as e:
            raise HubError(f"{what}: {e}") from None
        files.append(_remote_file(path, sibling))
    return Listing(commit=commit, files=tuple(files))


def _remote_file(path: str, sibling: Any) -> RemoteFile:
    lfs = sibling.lfs
    if lfs is not None:
        return RemoteFile(
            path=path, size=int(lfs.size), digest=Digest("sha256", str(lfs.sha256).lower())
        )
    digest = Digest("git-sha1", str(sibling.blob_id).lower()) if sibling.blob_id else None
    return RemoteFile(path=path, size=int(sibling.size or 0), digest=digest)


def _lock(out: BinaryIO, name: str) -> None:
    # Two writers appending to one partial file would interleave; a second manager or
    # a `models pull` next to the manager waits its turn (and then finds the blob).
    try:
        fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise TransientHubError(f"{name} is being downloaded by another process") from None


def _rehash(
    out: BinaryIO, transfer: Transfer, length: int, check_cancelled: Callable[[], None]
) -> None:
    """Hash the first ``length`` bytes already in the partial file (a resumed download)."""
    hasher = StreamHasher(transfer.file.digest, transfer.file.size)
    out.seek(0)
    remaining = length
    while remaining:
        check_cancelled()
        chunk = out.read(min(_CHUNK, remaining))
        if not chunk:
            break
        hasher.update(chunk)
        remaining -= len(chunk)
    transfer.hasher = hasher


def fetch_file(
    hub: HubSettings,
    model_id: str,
    commit: str,
    transfer: Transfer,
    sink: Sink,
    check_cancelled: Callable[[], None],
) -> None:
    """Download the rest of ``transfer``'s file into its partial file, then check it.

    Resumes after whatever the partial file already holds (a Range request). On a
    checksum mismatch the partial file is deleted and IntegrityError raised; on
    success it is flushed to disk and holds exactly the file the Hub described.
    """
    from huggingface_hub import get_session, hf_hub_url, hf_raise_for_status

    # Public (documented) API; the package's lazy __init__ hides it from mypy.
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    file = transfer.file
    if hub.offline:
        raise HubError(f"{file.path}: offline mode (HF_HUB_OFFLINE) is on")
    with _translated(file.path):
        transfer.partial.parent.mkdir(parents=True, exist_ok=True)
        with open(transfer.partial, "a+b") as out:
            _lock(out, file.path)
            offset = out.seek(0, os.SEEK_END)
            if offset > file.size:
                out.truncate(0)
                offset = 0
            hasher = transfer.hasher
            if hasher is None or hasher.bytes_hashed != offset:
                _rehash(out, transfer, offset, check_cancelled)
                hasher = transfer.hasher
            assert hasher is not None
            sink.position(offset)
            if offset < file.size:
                url = hf_hub_url(model_id, file.path, revision=commit, endpoint=hub.endpoint)
                headers = build_hf_headers(
                    token=hub.token, library_name="tei-manager", library_version=__version__
                )
                # The bytes are hashed as they arrive: they must be the file's own.
                headers["Accept-Encoding"] = "identity"
                if offset:
                    headers["Range"] = f"bytes={offset}-"
                with get_session().stream(
                    "GET", url, headers=headers, timeout=hub.timeout_secs
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        hf_raise_for_status(response)
                    start = _start_of(response.status_code, response.headers)
                    if start is None or (start != offset and start != 0):
                        raise HubError(
                            f"{file.path}: asked for bytes from {offset}, the server answered "
                            f"{response.headers.get('Content-Range')!r}"
                        )
                    if start != offset:
                        # The server ignored the Range and sends the whole file: start over.
                        out.truncate(0)
                        offset = 0
                        hasher = StreamHasher(file.digest, file.size)
                        transfer.hasher = hasher
                        sink.position(0)
                    out.seek(0, os.SEEK_END)
                    for chunk in response.iter_bytes(_CHUNK):
                        check_cancelled()
                        if offset + len(chunk) > file.size:
                            transfer.hasher = None
                            out.truncate(0)
                            raise IntegrityError(
                                f"{file.path}: the server sent more than the {file.size} bytes "
                                "the Hub says the file has"
                            )
                        out.write(chunk)
                        hasher.update(chunk)
                        offset += len(chunk)
                        sink.position(offset)
                        sink.received(len(chunk))
                if offset < file.size:
                    raise TransientHubError(
                        f"{file.path}: the connection ended after {offset} of {file.size} bytes"
                    )
            out.flush()
            os.fsync(out.fileno())
    try:
        hasher.check(file.path)
    except IntegrityError:
        transfer.hasher = None
        with contextlib.suppress(FileNotFoundError):
            transfer.partial.unlink()
        raise


def _start_of(status: int, headers: Any) -> int | None:
    """Where the body starts in the file: 0 for 200, the Content-Range start for 206."""
    if status != 206:
        return 0
    match = _CONTENT_RANGE_RE.fullmatch(headers.get("Content-Range", "").strip())
    return None if match is None else int(match[1])
