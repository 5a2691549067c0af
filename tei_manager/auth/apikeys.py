"""API keys: bearer secrets checked against SHA-256 digests in constant time.

Only digests are held: a key given through a file or an environment variable is
hashed as it is read, so no plaintext key is kept in memory, state or logs.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

import msgspec

from tei_manager.auth.identity import Identity, Scope

__all__ = ["ApiKeyStore", "StoredKey", "digest"]


def digest(key: str) -> bytes:
    """The SHA-256 digest of ``key`` (its UTF-8 bytes)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class StoredKey(msgspec.Struct, frozen=True):
    """One configured key: its name, scopes and digest."""

    name: str
    scopes: frozenset[Scope]
    sha256: bytes


class ApiKeyStore:
    """Answers "which key is this?" for a presented bearer token."""

    def __init__(self, keys: Iterable[StoredKey]) -> None:
        self._keys = tuple((key.sha256, Identity(key.name, "api_key", key.scopes)) for key in keys)

    def __len__(self) -> int:
        return len(self._keys)

    def identify(self, token: str) -> Identity | None:
        """The key's identity, or None. Every stored digest is compared, so the time
        taken says nothing about which key (or how much of one) matched."""
        presented = digest(token)
        found: Identity | None = None
        for sha256, identity in self._keys:
            if hmac.compare_digest(presented, sha256):
                found = identity
        return found
