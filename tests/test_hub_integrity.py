"""Checking downloaded bytes against the Hub's checksums (git blob ids, LFS sha256)."""

from __future__ import annotations

import hashlib

import pytest

from tei_manager.hub.integrity import Digest, IntegrityError, RemoteFile, StreamHasher

# `printf 'hello\n' | git hash-object --stdin`
HELLO_BLOB = "ce013625030ba8dba906f756967f9e9ca394464a"


def test_git_blob_id_is_what_git_computes() -> None:
    hasher = StreamHasher(Digest("git-sha1", HELLO_BLOB), 6)
    hasher.update(b"hel")
    hasher.update(b"lo\n")
    hasher.check("hello.txt")


def test_sha256_in_chunks() -> None:
    data = bytes(range(256)) * 1000
    hasher = StreamHasher(Digest("sha256", hashlib.sha256(data).hexdigest()), len(data))
    for i in range(0, len(data), 4096):
        hasher.update(data[i : i + 4096])
    hasher.check("weights")


def test_mismatches_say_which_file_and_what() -> None:
    wrong = StreamHasher(Digest("sha256", "0" * 64), 3)
    wrong.update(b"abc")
    with pytest.raises(IntegrityError, match=r"model.safetensors: sha256 mismatch: got ba7816bf"):
        wrong.check("model.safetensors")
    blob = StreamHasher(Digest("git-sha1", "0" * 40), 6)
    blob.update(b"hello\n")
    with pytest.raises(IntegrityError, match=r"vocab\.txt: git blob id mismatch"):
        blob.check("vocab.txt")
    short = StreamHasher(Digest("git-sha1", HELLO_BLOB), 6)
    short.update(b"hell")
    with pytest.raises(IntegrityError, match="size mismatch: got 4 bytes, the Hub says 6"):
        short.check("hello.txt")


def test_digest_validity_and_blob_names() -> None:
    assert Digest("sha256", "a" * 64).valid()
    assert not Digest("sha256", "a" * 40).valid()
    assert not Digest("git-sha1", "g" * 40).valid()
    lfs = RemoteFile(path="m.safetensors", size=1, digest=Digest("sha256", "b" * 64))
    assert lfs.is_lfs and lfs.blob_name == "b" * 64
    plain = RemoteFile(path="config.json", size=1, digest=Digest("git-sha1", HELLO_BLOB))
    assert not plain.is_lfs and plain.blob_name == HELLO_BLOB
