"""The local Hub speaks what huggingface_hub expects: its own downloads work against it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TinyModels
from tests.hubserver import HubServer

TINY = "acme/tiny-reranker"


@pytest.fixture
def hub(tiny_models: TinyModels) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(TINY, tiny_models.reranker, revisions=("main", "v1"))
        yield server


def test_huggingface_hubs_own_snapshot_download(
    hub: HubServer, tiny_models: TinyModels, tmp_path: Path
) -> None:
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(TINY, cache_dir=str(tmp_path), endpoint=hub.url))
    assert folder.name == hub.repos[TINY].commit
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).read_bytes() == (tiny_models.reranker / name).read_bytes()
    methods = {r.method for r in hub.requests}
    assert {"HEAD", "GET"} <= methods  # metadata by HEAD (ETag, X-Repo-Commit), then bodies


def test_file_metadata_and_ranges(hub: HubServer) -> None:
    from huggingface_hub import HfApi, get_hf_file_metadata, get_session, hf_hub_url

    repo = hub.repos[TINY]
    info = HfApi(endpoint=hub.url).model_info(TINY, revision="v1", files_metadata=True)
    assert info.sha == repo.commit
    siblings = {s.rfilename: s for s in info.siblings or []}
    weights = siblings["model.safetensors"]
    assert weights.lfs is not None
    assert weights.lfs.sha256 == repo.files["model.safetensors"].sha256
    assert siblings["config.json"].lfs is None
    assert siblings["config.json"].blob_id == repo.files["config.json"].blob_id

    url = hf_hub_url(TINY, "model.safetensors", revision="main", endpoint=hub.url)
    meta = get_hf_file_metadata(url)
    assert (meta.commit_hash, meta.etag) == (repo.commit, weights.lfs.sha256)
    assert meta.size == weights.lfs.size
    ranged = get_session().get(url, headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206
    assert ranged.headers["Content-Range"] == f"bytes 10-19/{weights.lfs.size}"
    assert len(ranged.content) == 10
    past = get_session().get(url, headers={"Range": f"bytes={weights.lfs.size}-"})
    assert past.status_code == 416


def test_errors_as_the_hub_gives_them(hub: HubServer) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi(endpoint=hub.url)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/nothing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(TINY, revision="v9")
    with pytest.raises(RemoteEntryNotFoundError):
        api.hf_hub_download(TINY, "missing.bin", cache_dir=None)
