"""What a downloaded file must hash to, and the incremental hasher that checks it.

The Hub gives every file an identity: an LFS file's SHA-256, or, for a file kept in
git itself, its git blob id (SHA-1 of ``"blob <size>\\0"`` and the content). Both are
in the model info (``files_metadata``) and both name the file's blob in the cache,
so a file is checked against the very name it will be stored under.

Pure: hashing bytes handed in, no I/O.
"""

from __future__ import annotations

import hashlib
from typing import Final, Literal

import msgspec

__all__ = ["Digest", "IntegrityError", "RemoteFile", "StreamHasher"]

Algorithm = Literal["sha256", "git-sha1"]
_HEX_LENGTH: Final = {"sha256": 64, "git-sha1": 40}


class IntegrityError(Exception):
    """A downloaded file is not the file the Hub described; ``str()`` says how."""


class Digest(msgspec.Struct, frozen=True):
    """An expected hash: the algorithm and its lower-case hex value."""

    algorithm: Algorithm
    hexdigest: str

    def valid(self) -> bool:
        """Whether the value has the algorithm's length and only hex digits."""
        value = self.hexdigest
        return len(value) == _HEX_LENGTH[self.algorithm] and all(
            c in "0123456789abcdef" for c in value
        )


class RemoteFile(msgspec.Struct, frozen=True, kw_only=True):
    """One file of a repository at a commit, as the Hub describes it."""

    path: str
    size: int
    digest: Digest | None  # None: the Hub gave nothing to check it against

    @property
    def blob_name(self) -> str | None:
        """The file's name in the cache's ``blobs/`` folder (its etag), if known."""
        return None if self.digest is None else self.digest.hexdigest

    @property
    def is_lfs(self) -> bool:
        return self.digest is not None and self.digest.algorithm == "sha256"


class StreamHasher:
    """Hashes a file as its bytes arrive, to compare with a :class:`Digest` at the end."""

    def __init__(self, digest: Digest | None, size: int) -> None:
        self.expected = digest
        self.size = size
        self.bytes_hashed = 0
        if digest is None:
            self._hash = None
        elif digest.algorithm == "sha256":
            self._hash = hashlib.sha256()
        else:
            self._hash = hashlib.sha1(usedforsecurity=False)
            # git hashes the object header first; the size is the Hub's.
            self._hash.update(f"blob {size}\0".encode())

    def update(self, chunk: bytes) -> None:
        if self._hash is not None:
            self._hash.update(chunk)
        self.bytes_hashed += len(chunk)

    def check(self, name: str) -> None:
        """Raise :class:`IntegrityError` unless the bytes seen are the expected file."""
        if self.bytes_hashed != self.size:
            raise IntegrityError(
                f"{name}: size mismatch: got {self.bytes_hashed} bytes, the Hub says {self.size}"
            )
        if self._hash is None or self.expected is None:
            return
        actual = self._hash.hexdigest()
        if actual != self.expected.hexdigest:
            what = "sha256" if self.expected.algorithm == "sha256" else "git blob id"
            raise IntegrityError(
                f"{name}: {what} mismatch: got {actual}, the Hub says {self.expected.hexdigest}"
            )
