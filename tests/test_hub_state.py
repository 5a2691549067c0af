"""The model records and their status flow, without any I/O."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from tei_manager.errors import ErrorCode, TeiError
from tei_manager.hub.state import (
    CachedSnapshot,
    ModelMetadata,
    ModelStatus,
    ModelTable,
    SmokeLoad,
)

S = ModelStatus
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
# The contract's ModelInfo fields, in its order (smoke_load is ours, last).
MODEL_FIELDS = [
    "model_id", "status", "revision", "downloaded", "added_at", "cache_path",
    "cache_size_bytes", "download", "last_verified", "verification_error", "metadata",
    "smoke_load",
]  # fmt: skip
SMOKE = SmokeLoad(
    model_kind="embedding",
    model_dtype="float32",
    model_sha="c" * 40,
    max_input_length=256,
    output_size=384,
    load_secs=1.5,
    gpu_id=None,
)


def _snapshot(commit: str = "a" * 40, model_id: str = "org/m") -> CachedSnapshot:
    return CachedSnapshot(
        model_id=model_id,
        revision="main",
        commit=commit,
        path=f"/cache/models--org--m/snapshots/{commit}",
        size_bytes=1234,
        metadata=ModelMetadata(model_type="bert", hidden_size=384),
    )


def _code(call: object, *args: object) -> ErrorCode:
    with pytest.raises(TeiError) as error:
        call(*args)  # type: ignore[operator]
    return error.value.code


def test_info_has_the_contract_fields() -> None:
    table = ModelTable()
    record, created = table.add("org/m", None, now=NOW, snapshot=None)
    assert created
    body = msgspec.json.decode(msgspec.json.encode(record.info()))
    assert list(body) == MODEL_FIELDS
    assert body["status"] == "available"
    assert body["revision"] == "main"
    assert body["download"] == {"bytes_done": 0, "bytes_total": 0, "files_done": 0,
                                "files_total": 0}  # fmt: skip
    assert body["added_at"] == "2025-01-02T03:04:05Z"


def test_a_cached_model_is_downloaded() -> None:
    table = ModelTable()
    record, _ = table.add("org/m", None, now=NOW, snapshot=_snapshot())
    info = record.info()
    assert info.status is S.DOWNLOADED
    assert info.downloaded
    assert info.cache_size_bytes == 1234
    assert info.metadata == ModelMetadata(model_type="bert", hidden_size=384)
    assert not record.complete  # found in the cache: nobody checked it is all there


def test_the_whole_flow() -> None:
    table = ModelTable()
    table.add("org/m", "v1", now=NOW, snapshot=None)
    record = table.begin_download("org/m")
    assert record.status is S.DOWNLOADING
    record.progress.bytes_done = 10
    assert record.info().download.bytes_done == 10
    ModelTable.download_succeeded(record, _snapshot())
    assert (record.status, record.downloaded, record.complete) == (S.DOWNLOADED, True, True)
    table.begin_load("org/m")
    assert record.status is S.LOADING
    ModelTable.load_succeeded(record, SMOKE, NOW)
    info = record.info()
    assert info.status is S.VERIFIED
    assert info.last_verified == NOW
    assert info.smoke_load == SMOKE
    assert info.revision == "v1"


def test_failures_say_why_and_can_be_retried() -> None:
    table = ModelTable()
    table.add("org/m", None, now=NOW, snapshot=None)
    record = table.begin_download("org/m")
    ModelTable.download_failed(record, "model.safetensors: sha256 mismatch")
    assert record.status is S.FAILED
    assert record.verification_error == "download failed: model.safetensors: sha256 mismatch"
    assert not record.downloaded
    table.begin_download("org/m")
    assert record.verification_error is None
    ModelTable.download_succeeded(record, _snapshot())
    table.begin_load("org/m")
    ModelTable.load_failed(record, "the model server exited with code 1")
    assert record.status is S.FAILED
    assert record.downloaded  # the files are still there: a load may be tried again
    table.begin_load("org/m")


def test_busy_models_refuse_more_work() -> None:
    table = ModelTable()
    table.add("org/m", None, now=NOW, snapshot=_snapshot())
    table.begin_download("org/m")
    assert _code(table.begin_download, "org/m") is ErrorCode.MODEL_BUSY
    assert _code(table.begin_load, "org/m") is ErrorCode.MODEL_BUSY
    with pytest.raises(TeiError, match="is downloading") as error:
        table.add("org/m", "other", now=NOW, snapshot=None)
    assert error.value.code is ErrorCode.MODEL_BUSY


def test_a_load_needs_the_files() -> None:
    table = ModelTable()
    table.add("org/m", None, now=NOW, snapshot=None)
    with pytest.raises(TeiError, match="not downloaded: POST /models/org/m/download first"):
        table.begin_load("org/m")


def test_unknown_models() -> None:
    table = ModelTable()
    assert _code(table.get, "org/x") is ErrorCode.MODEL_NOT_FOUND
    assert _code(table.begin_download, "org/x") is ErrorCode.MODEL_NOT_FOUND
    assert _code(table.remove, "org/x") is ErrorCode.MODEL_NOT_FOUND


def test_cancelled_work_goes_back_to_what_is_on_disk() -> None:
    table = ModelTable()
    table.add("org/m", None, now=NOW, snapshot=None)
    record = table.begin_download("org/m")
    ModelTable.download_stopped(record)
    assert record.status is S.AVAILABLE
    ModelTable.download_succeeded(table.begin_download("org/m"), _snapshot())
    table.begin_load("org/m")
    ModelTable.load_stopped(record)
    assert record.status is S.DOWNLOADED


def test_adding_again_refreshes_from_the_cache_or_switches_revision() -> None:
    table = ModelTable()
    record, _ = table.add("org/m", None, now=NOW, snapshot=None)
    again, created = table.add("org/m", None, now=NOW, snapshot=_snapshot())
    assert again is record and not created
    assert record.status is S.DOWNLOADED
    ModelTable.load_succeeded(record, SMOKE, NOW)
    # Another revision: what the cache holds of that one, and nothing verified.
    table.add("org/m", "v2", now=NOW, snapshot=_snapshot("b" * 40))
    assert (record.revision, record.commit, record.status) == ("v2", "b" * 40, S.DOWNLOADED)
    assert record.smoke_load is None and record.last_verified is None
    table.add("org/m", None, now=NOW, snapshot=None)  # no revision given: stays on v2
    assert record.revision == "v2"
    assert (record.status, record.downloaded) == (S.AVAILABLE, False)


def test_metadata_from_config_json() -> None:
    config = {
        "model_type": "bert",
        "hidden_size": 384,
        "max_position_embeddings": 512,
        "vocab_size": 30522,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "architectures": ["BertModel"],
    }
    assert ModelMetadata.from_config(config) == ModelMetadata(
        model_type="bert",
        hidden_size=384,
        max_position_embeddings=512,
        vocab_size=30522,
        num_hidden_layers=6,
        num_attention_heads=12,
    )
    odd = ModelMetadata.from_config({"model_type": 3, "hidden_size": "384", "vocab_size": True})
    assert odd == ModelMetadata()
