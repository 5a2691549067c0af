"""The Hugging Face cache on disk: layout written by downloads, scans, look-ups, removal."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tei_manager.hub.cache import RepoCache, locate, read_metadata, remove_model, scan_cache
from tei_manager.hub.integrity import Digest, RemoteFile
from tests.models import fake_hub_cache

COMMIT = "1" * 40
OTHER = "2" * 40
CONFIG = json.dumps({"model_type": "bert", "hidden_size": 32, "vocab_size": 99}).encode()


def _file(path: str, data: bytes, *, lfs: bool = False) -> tuple[RemoteFile, bytes]:
    if lfs:
        digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    else:
        blob = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        digest = Digest("git-sha1", blob)
    return RemoteFile(path=path, size=len(data), digest=digest), data


def _install(
    cache: Path, model_id: str, commit: str, revision: str | None, **files: bytes
) -> RepoCache:
    repo = RepoCache(str(cache), model_id)
    remote = []
    for name, data in files.items():
        file, _ = _file(name.replace("__", "/"), data, lfs=name.endswith("safetensors"))
        repo.partial(file).parent.mkdir(parents=True, exist_ok=True)
        repo.partial(file).write_bytes(data)
        repo.commit_file(file)
        remote.append(file)
    repo.install(commit, revision, remote)
    return repo


def test_install_writes_huggingface_hubs_layout(tmp_path: Path) -> None:
    from huggingface_hub import snapshot_download

    _install(tmp_path, "org/m", COMMIT, None, **{
        "config.json": CONFIG, "model.safetensors": b"weights", "1_Pooling__config.json": b"{}",
    })  # fmt: skip
    snapshot = tmp_path / "models--org--m" / "snapshots" / COMMIT
    link = snapshot / "1_Pooling" / "config.json"
    assert link.is_symlink()
    assert os.readlink(link) == os.path.join(
        "..", "..", "..", "blobs", _file("x", b"{}")[0].blob_name or ""
    )
    assert (tmp_path / "models--org--m" / "refs" / "main").read_text() == COMMIT
    assert not list((tmp_path / "models--org--m" / "blobs").glob("*.incomplete"))
    # huggingface_hub itself (as the worker calls it, offline) finds the snapshot.
    found = snapshot_download("org/m", cache_dir=str(tmp_path), local_files_only=True)
    assert Path(found) == snapshot
    assert (Path(found) / "model.safetensors").read_bytes() == b"weights"


def test_locate_by_branch_tag_or_commit(tmp_path: Path) -> None:
    _install(tmp_path, "org/m", COMMIT, "v1.0", **{"config.json": CONFIG})
    by_tag = locate(str(tmp_path), "org/m", "v1.0")
    assert by_tag is not None
    assert (by_tag.revision, by_tag.commit) == ("v1.0", COMMIT)
    assert by_tag.size_bytes == len(CONFIG)
    assert by_tag.metadata is not None and by_tag.metadata.hidden_size == 32
    assert locate(str(tmp_path), "org/m", COMMIT) is not None
    assert locate(str(tmp_path), "org/m", None) is None  # no main ref
    assert locate(str(tmp_path), "org/other", None) is None
    assert locate(str(tmp_path), "org/m", "9" * 40) is None


def test_a_snapshot_without_config_is_no_model(tmp_path: Path) -> None:
    _install(tmp_path, "org/m", COMMIT, None, **{"README.md": b"# hi"})
    assert locate(str(tmp_path), "org/m", None) is None


def test_scan_registers_each_model_once_preferring_main(tmp_path: Path, minilm_dir: Path) -> None:
    _install(tmp_path, "org/m", COMMIT, "v1", **{"config.json": CONFIG})
    _install(tmp_path, "org/m", OTHER, None, **{"config.json": CONFIG, "vocab.txt": b"a\nb\n"})
    fake_hub_cache(minilm_dir, tmp_path, "sentence-transformers/all-MiniLM-L6-v2", "3" * 40)
    (tmp_path / "models--broken" / "blobs").mkdir(parents=True)  # no snapshots: skipped
    (tmp_path / "datasets--org--d" / "snapshots").mkdir(parents=True)  # not a model
    found = {s.model_id: s for s in scan_cache(str(tmp_path))}
    assert set(found) == {"org/m", "sentence-transformers/all-MiniLM-L6-v2"}
    assert (found["org/m"].revision, found["org/m"].commit) == ("main", OTHER)
    minilm = found["sentence-transformers/all-MiniLM-L6-v2"]
    assert minilm.size_bytes > 90_000_000
    assert minilm.metadata is not None
    assert (minilm.metadata.model_type, minilm.metadata.hidden_size) == ("bert", 384)


def test_scan_of_a_cache_that_does_not_exist(tmp_path: Path) -> None:
    assert scan_cache(str(tmp_path / "nothing")) == []


def test_metadata_of_a_broken_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{oops")
    assert read_metadata(tmp_path) is None


def test_remove_model_takes_every_revision_and_its_locks(tmp_path: Path) -> None:
    _install(tmp_path, "org/m", COMMIT, None, **{"config.json": CONFIG})
    _install(tmp_path, "org/keep", COMMIT, None, **{"config.json": CONFIG})
    (tmp_path / ".locks" / "models--org--m").mkdir(parents=True)
    assert remove_model(str(tmp_path), "org/m")
    assert not (tmp_path / "models--org--m").exists()
    assert not (tmp_path / ".locks" / "models--org--m").exists()
    assert (tmp_path / "models--org--keep").exists()
    assert not remove_model(str(tmp_path), "org/m")


def test_remove_model_leaves_a_symlinked_folder_alone(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models--org--m").symlink_to(elsewhere)
    with pytest.raises(OSError, match="not a folder inside the model cache"):
        remove_model(str(cache), "org/m")
    assert elsewhere.exists()


def test_discard_removes_only_partial_files(tmp_path: Path) -> None:
    repo = _install(tmp_path, "org/m", COMMIT, None, **{"config.json": CONFIG})
    half, _ = _file("model.safetensors", b"half", lfs=True)
    repo.partial(half).write_bytes(b"ha")
    config, _ = _file("config.json", CONFIG)
    repo.discard([half, config])
    assert not repo.partial(half).exists()
    assert repo.has(config)
