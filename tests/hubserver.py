"""A local Hugging Face Hub: the part of its HTTP API that huggingface_hub uses to download.

A real HTTP/1.1 server (``http.server``, one thread per connection) on a port of
127.0.0.1 chosen by the OS. Point ``HF_ENDPOINT`` (or ``HubSettings.endpoint``) at
:attr:`HubServer.url`. It serves repositories built from local folders:

- ``GET /api/models/{repo}[/revision/{rev}]``: model info; with ``?blobs=true``
  (``files_metadata``) every sibling has its size, git blob id and, for LFS files,
  ``lfs {size, sha256, pointerSize}``;
- ``GET /api/models/{repo}/tree/{rev}``: the recursive file listing;
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: the file itself, served directly (no
  CDN redirect) with ``X-Repo-Commit``, ``ETag`` (git blob id, or the sha256 for LFS
  files, also in ``X-Linked-Etag`` with ``X-Linked-Size``), ``Content-Length``, and
  ``Range`` support (206 / 416);
- errors as the Hub gives them: 404 with ``X-Error-Code`` RepoNotFound,
  RevisionNotFound or EntryNotFound.

Faults, for tests: :meth:`HubServer.tamper` (serve other bytes than the checksums
describe), :meth:`HubServer.drop_once` (cut the connection mid-file),
:meth:`HubServer.hold` (stop mid-file until released) and
:meth:`HubServer.fail_api` (answer model info with an error status).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["Hold", "HubRepo", "HubRequest", "HubServer"]

_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".h5", ".onnx", ".ot", ".msgpack", ".model")
_CHUNK = 1 << 20
_RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)")
_hash_cache: dict[tuple[str, int, int], tuple[str, str]] = {}
_hash_lock = threading.Lock()


def _hashes(content: bytes | Path) -> tuple[str, str]:
    """(git blob id, sha256) of a file's content; file hashes are cached per session."""
    if isinstance(content, bytes):
        blob = hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()
        return blob, hashlib.sha256(content).hexdigest()
    st = content.stat()
    key = (str(content), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key not in _hash_cache:
            sha1 = hashlib.sha1(f"blob {st.st_size}\0".encode())
            sha256 = hashlib.sha256()
            with content.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    sha1.update(chunk)
                    sha256.update(chunk)
            _hash_cache[key] = (sha1.hexdigest(), sha256.hexdigest())
        return _hash_cache[key]


@dataclass
class HubFile:
    path: str
    content: bytes | Path
    size: int
    blob_id: str
    sha256: str
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id

    def read(self, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``[start, end)`` in chunks."""
        if isinstance(self.content, bytes):
            yield self.content[start:end]
            return
        with self.content.open("rb") as f:
            f.seek(start)
            remaining = end - start
            while remaining > 0:
                chunk = f.read(min(_CHUNK, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk


@dataclass
class HubRepo:
    repo_id: str
    commit: str
    files: dict[str, HubFile]
    revisions: dict[str, str]  # branch or tag -> commit


@dataclass
class Hold:
    """A transfer stopped after ``after`` bytes until :meth:`release`."""

    after: int
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


@dataclass(frozen=True)
class HubRequest:
    method: str
    path: str
    range: str | None
    authorization: str | None = None


class HubServer:
    """See the module notes. Use as a context manager; the server runs inside it."""

    def __init__(self, *, port: int = 0) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[HubRequest] = []
        self._tampered: set[tuple[str, str]] = set()
        self._drops: dict[tuple[str, str], int] = {}
        self._holds: dict[tuple[str, str], Hold] = {}
        self._api_failures: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for hold in self._holds.values():
            hold.release()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    # -- content ------------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        folder: Path | None = None,
        *,
        files: dict[str, bytes] | None = None,
        revisions: Iterable[str] = ("main",),
    ) -> HubRepo:
        """Serve ``folder``'s files (and ``files``) as ``repo_id`` at one commit."""
        contents: dict[str, bytes | Path] = {}
        if folder is not None:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    contents[path.relative_to(folder).as_posix()] = path
        contents.update(files or {})
        hub_files = {}
        commit_hash = hashlib.sha1(repo_id.encode())
        for name, content in sorted(contents.items()):
            blob_id, sha256 = _hashes(content)
            size = len(content) if isinstance(content, bytes) else content.stat().st_size
            hub_files[name] = HubFile(
                path=name,
                content=content,
                size=size,
                blob_id=blob_id,
                sha256=sha256,
                lfs=name.endswith(_LFS_SUFFIXES),
            )
            commit_hash.update(f"{name}:{blob_id}".encode())
        commit = commit_hash.hexdigest()
        repo = HubRepo(
            repo_id=repo_id,
            commit=commit,
            files=hub_files,
            revisions=dict.fromkeys(revisions, commit),
        )
        self.repos[repo_id] = repo
        return repo

    # -- faults -----------------------------------------------------------------------------
    def tamper(self, repo_id: str, path: str) -> None:
        """Serve ``path`` with its bytes changed; the checksums still describe the original."""
        self._tampered.add((repo_id, path))

    def drop_once(self, repo_id: str, path: str, after: int) -> None:
        """Cut the next GET of ``path`` after ``after`` bytes of its body."""
        self._drops[(repo_id, path)] = after

    def hold(self, repo_id: str, path: str, after: int) -> Hold:
        """Stop every GET of ``path`` after ``after`` bytes until the hold is released."""
        hold = Hold(after)
        self._holds[(repo_id, path)] = hold
        return hold

    def fail_api(self, repo_id: str, *statuses: int) -> None:
        """Answer the next model-info requests of ``repo_id`` with these statuses."""
        self._api_failures.setdefault(repo_id, []).extend(statuses)

    def gets(self, repo_id: str | None = None) -> list[HubRequest]:
        """The file GETs received (of ``repo_id``'s files, if given)."""
        prefix = f"/{repo_id}/resolve/" if repo_id else ""
        return [
            r for r in self.requests if r.method == "GET" and "/resolve/" in r.path
            and r.path.startswith(prefix)
        ]  # fmt: skip

    # -- used by the handler ------------------------------------------------------------------
    def _take_drop(self, key: tuple[str, str]) -> int | None:
        with self._lock:
            return self._drops.pop(key, None)

    def _take_api_failure(self, repo_id: str) -> int | None:
        with self._lock:
            pending = self._api_failures.get(repo_id)
            return pending.pop(0) if pending else None

    def _find_repo(self, parts: list[str]) -> tuple[HubRepo | None, str, list[str]]:
        """The repository a path starts with, its id, and the parts after it."""
        for length in (2, 1):
            repo_id = "/".join(parts[:length])
            if repo_id in self.repos:
                return self.repos[repo_id], repo_id, parts[length:]
        return None, "/".join(parts[:2]), parts[2:]


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away mid-answer (a cancelled download) is no error here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        server_hub = hub

    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: HubServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests read HubServer.requests instead

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    # -- routing ----------------------------------------------------------------------------
    def _route(self, *, head: bool) -> None:
        hub = self.server_hub
        url = urlsplit(self.path)
        hub.requests.append(
            HubRequest(
                self.command,
                url.path,
                self.headers.get("Range"),
                self.headers.get("Authorization"),
            )
        )
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        if parts[:2] == ["api", "models"]:
            self._api(parts[2:], parse_qs(url.query))
        elif "resolve" in parts:
            self._resolve(parts, head=head)
        else:
            self._error(404, "NotFound", "no such route")

    def _api(self, parts: list[str], query: dict[str, list[str]]) -> None:
        hub = self.server_hub
        repo, repo_id, rest = hub._find_repo(parts)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return
        failure = hub._take_api_failure(repo_id)
        if failure is not None:
            self._error(failure, None, "try again later")
            return
        revision = "main"
        tree = False
        if rest[:1] == ["revision"] and len(rest) >= 2:
            revision = "/".join(rest[1:])
        elif rest[:1] == ["tree"] and len(rest) >= 2:
            revision, tree = rest[1], True
        elif rest:
            self._error(404, "NotFound", "no such route")
            return
        commit = self._commit(repo, revision)
        if commit is None:
            return
        if tree:
            self._json(
                [
                    {
                        "type": "file",
                        "oid": f.blob_id,
                        "size": f.size,
                        "path": f.path,
                        **(
                            {"lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134}}
                            if f.lfs
                            else {}
                        ),
                    }
                    for f in repo.files.values()
                ]
            )
            return
        blobs = query.get("blobs", [""])[0].lower() == "true"
        siblings: list[dict[str, Any]] = []
        for f in repo.files.values():
            sibling: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                sibling["size"] = f.size
                sibling["blobId"] = f.blob_id
                if f.lfs:
                    sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
            siblings.append(sibling)
        self._json(
            {
                "_id": commit[:24],
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": False,
                "disabled": False,
                "gated": False,
                "tags": [],
                "siblings": siblings,
            }
        )

    def _resolve(self, parts: list[str], *, head: bool) -> None:
        hub = self.server_hub
        at = parts.index("resolve")
        repo, repo_id, _ = hub._find_repo(parts[:at])
        if repo is None or len(parts) < at + 3:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return
        commit = self._commit(repo, parts[at + 1])
        if commit is None:
            return
        path = "/".join(parts[at + 2 :])
        file = repo.files.get(path)
        if file is None:
            self._error(404, "EntryNotFound", f"{path} not found", commit=commit)
            return
        start, end = 0, file.size
        status = 200
        requested = self.headers.get("Range")
        if requested:
            match = _RANGE_RE.fullmatch(requested.strip())
            if match is None or int(match[1]) >= max(file.size, 1):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{file.size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(match[1])
            end = min(file.size, int(match[2]) + 1) if match[2] else file.size
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{file.etag}"')
        if file.lfs:
            self.send_header("X-Linked-Etag", f'"{file.sha256}"')
            self.send_header("X-Linked-Size", str(file.size))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{file.size}")
        self.end_headers()
        if head:
            return
        self._send_body(repo_id, file, start, end)

    def _send_body(self, repo_id: str, file: HubFile, start: int, end: int) -> None:
        hub = self.server_hub
        key = (repo_id, file.path)
        drop = hub._take_drop(key)
        hold = hub._holds.get(key)
        cut = drop if drop is not None else (hold.after if hold is not None else None)
        tampered = key in hub._tampered and start == 0
        sent = 0
        for chunk in file.read(start, end):
            if tampered and sent == 0:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
            if cut is not None and sent <= cut < sent + len(chunk):
                self.wfile.write(chunk[: cut - sent])
                self.wfile.flush()
                if drop is not None:
                    self._cut()
                    return
                assert hold is not None
                hold.reached.set()
                hold.released.wait(60)
                chunk = chunk[cut - sent :]
                sent = cut
                cut = None
            self.wfile.write(chunk)
            sent += len(chunk)
        self.wfile.flush()

    def _cut(self) -> None:
        """End the connection abruptly, mid-body."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    # -- answers --------------------------------------------------------------------------------
    def _commit(self, repo: HubRepo, revision: str) -> str | None:
        if revision in repo.revisions:
            return repo.revisions[revision]
        if revision == repo.commit:
            return revision
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return None

    def _json(self, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(
        self, status: int, code: str | None, message: str, commit: str | None = None
    ) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code is not None:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def main(argv: list[str] | None = None) -> None:
    """Serve the packaged all-MiniLM-L6-v2 (and ``--repo ID=FOLDER``s) until interrupted.

    ``python -m tests.hubserver --port 8900``, then ``HF_ENDPOINT=http://127.0.0.1:8900``
    for the manager: a whole download, verification and instance with no network.
    """
    import argparse

    from tei_manager.testing import packaged_model_dir

    parser = argparse.ArgumentParser(description="a local Hugging Face Hub for tests and demos")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--repo", action="append", default=[], metavar="ID=FOLDER")
    args = parser.parse_args(argv)
    server = HubServer(port=args.port)
    server.add_repo("sentence-transformers/all-MiniLM-L6-v2", packaged_model_dir())
    for item in args.repo:
        repo_id, _, folder = item.partition("=")
        server.add_repo(repo_id, Path(folder))
    with server:
        print(f"HF_ENDPOINT={server.url}", flush=True)
        print("repositories:", ", ".join(sorted(server.repos)), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
