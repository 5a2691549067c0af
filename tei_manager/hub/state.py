"""The model registry's records and the rules of their status flow. Pure and synchronous.

::

    available → downloading → downloaded → loading → verified
                     │                         │
                     └──────→ failed ←─────────┘

A model is busy while it downloads or loads: a second download or load of it is
refused (``MODEL_BUSY``). ``failed`` says why in ``verification_error``, whether the
download or the smoke load failed; a new download or load may follow. ``downloaded``
is whether the files are on disk, whatever the status.

The trio layer (:mod:`tei_manager.hub.registry`) calls these methods with no await in
between deciding and recording, so no lock is needed.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

import msgspec

from tei_manager.errors import ConflictError, ErrorCode, NotFoundError, quote

__all__ = [
    "CachedSnapshot",
    "DownloadProgress",
    "ModelInfo",
    "ModelMetadata",
    "ModelRecord",
    "ModelStatus",
    "ModelTable",
    "SmokeLoad",
    "TransferProgress",
]


class ModelStatus(enum.StrEnum):
    AVAILABLE = "available"  # known, not on disk
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    LOADING = "loading"  # a smoke load runs
    VERIFIED = "verified"  # the last smoke load answered
    FAILED = "failed"  # the last download or smoke load failed


_BUSY = frozenset({ModelStatus.DOWNLOADING, ModelStatus.LOADING})


class ModelMetadata(msgspec.Struct, frozen=True, kw_only=True):
    """What ``config.json`` says about the architecture (null where it says nothing)."""

    model_type: str | None = None
    hidden_size: int | None = None
    max_position_embeddings: int | None = None
    vocab_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelMetadata:
        """Pick the known fields out of a decoded ``config.json``; wrong types become null."""

        def integer(name: str) -> int | None:
            value = config.get(name)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        model_type = config.get("model_type")
        return cls(
            model_type=model_type if isinstance(model_type, str) else None,
            hidden_size=integer("hidden_size"),
            max_position_embeddings=integer("max_position_embeddings"),
            vocab_size=integer("vocab_size"),
            num_hidden_layers=integer("num_hidden_layers"),
            num_attention_heads=integer("num_attention_heads"),
        )


class DownloadProgress(msgspec.Struct, frozen=True, kw_only=True):
    """How far the current (or last) download got."""

    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0


class SmokeLoad(msgspec.Struct, frozen=True, kw_only=True):
    """What the last successful smoke load learnt from the running model."""

    model_kind: str  # embedding, classifier or reranker, as Info reports it
    model_dtype: str
    model_sha: str | None
    max_input_length: int
    output_size: int  # embedding dimension, or number of labels / scores
    load_secs: float
    gpu_id: int | None


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One model as the REST API shows it."""

    model_id: str
    status: ModelStatus
    revision: str
    downloaded: bool
    added_at: datetime
    cache_path: str | None
    cache_size_bytes: int
    download: DownloadProgress
    last_verified: datetime | None
    verification_error: str | None
    metadata: ModelMetadata | None
    smoke_load: SmokeLoad | None


class CachedSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """A model's snapshot found in the Hugging Face cache."""

    model_id: str
    revision: str  # the ref that points at it, else its commit
    commit: str
    path: str
    size_bytes: int
    metadata: ModelMetadata | None


class TransferProgress:
    """Counters of a running download.

    The download thread adds bytes as they arrive; readers take a
    :meth:`snapshot`. Plain attribute writes, so a reader may see a value a chunk
    old, never a torn one.
    """

    def __init__(self) -> None:
        self.bytes_done = 0
        self.bytes_total = 0
        self.files_done = 0
        self.files_total = 0

    def snapshot(self) -> DownloadProgress:
        return DownloadProgress(
            bytes_done=self.bytes_done,
            bytes_total=self.bytes_total,
            files_done=self.files_done,
            files_total=self.files_total,
        )


class ModelRecord(msgspec.Struct, kw_only=True):
    """One registered model; mutable, changed only through :class:`ModelTable`."""

    model_id: str
    revision: str | None  # as asked for; None is the default branch
    added_at: datetime
    status: ModelStatus = ModelStatus.AVAILABLE
    downloaded: bool = False
    # The files are known to be all an instance needs: the registry downloaded them
    # itself, or a smoke load ran on them. Instances then run offline.
    complete: bool = False
    commit: str | None = None
    cache_path: str | None = None
    cache_size_bytes: int = 0
    metadata: ModelMetadata | None = None
    last_verified: datetime | None = None
    verification_error: str | None = None
    smoke_load: SmokeLoad | None = None
    progress: TransferProgress = msgspec.field(default_factory=TransferProgress)

    @property
    def effective_revision(self) -> str:
        return self.revision or "main"

    def info(self) -> ModelInfo:
        return ModelInfo(
            model_id=self.model_id,
            status=self.status,
            revision=self.effective_revision,
            downloaded=self.downloaded,
            added_at=self.added_at,
            cache_path=self.cache_path,
            cache_size_bytes=self.cache_size_bytes,
            download=self.progress.snapshot(),
            last_verified=self.last_verified,
            verification_error=self.verification_error,
            metadata=self.metadata,
            smoke_load=self.smoke_load,
        )

    def found(self, snapshot: CachedSnapshot | None) -> None:
        """Record what the cache holds for this model (None: nothing)."""
        if snapshot is None:
            self.downloaded = False
            self.complete = False
            self.commit = None
            self.cache_path = None
            self.cache_size_bytes = 0
            if self.status in (ModelStatus.DOWNLOADED, ModelStatus.VERIFIED):
                self.status = ModelStatus.AVAILABLE
            return
        if self.commit != snapshot.commit:
            self.complete = False
            self.smoke_load = None
            self.last_verified = None
        self.downloaded = True
        self.commit = snapshot.commit
        self.cache_path = snapshot.path
        self.cache_size_bytes = snapshot.size_bytes
        self.metadata = snapshot.metadata
        if self.status is ModelStatus.AVAILABLE:
            self.status = ModelStatus.DOWNLOADED


class ModelTable:
    """Registered models in registration order, with the status rules enforced."""

    def __init__(self) -> None:
        self._records: dict[str, ModelRecord] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[ModelRecord]:
        return iter(list(self._records.values()))

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._records

    def find(self, model_id: str) -> ModelRecord | None:
        return self._records.get(model_id)

    def get(self, model_id: str) -> ModelRecord:
        """The record of ``model_id``; raises MODEL_NOT_FOUND."""
        record = self._records.get(model_id)
        if record is None:
            raise NotFoundError(
                ErrorCode.MODEL_NOT_FOUND,
                f"model {quote(model_id)} is not registered: POST /models to add it",
            )
        return record

    def add(
        self,
        model_id: str,
        revision: str | None,
        *,
        now: datetime,
        snapshot: CachedSnapshot | None,
    ) -> tuple[ModelRecord, bool]:
        """Register ``model_id`` (True), or return the known record (False).

        ``snapshot`` is what the cache holds of it now. A known, idle model is brought
        up to date with it; asked for another revision, it switches to that revision.
        A busy one is left alone, and cannot switch (MODEL_BUSY).
        """
        record = self._records.get(model_id)
        if record is None:
            record = ModelRecord(model_id=model_id, revision=revision, added_at=now)
            record.found(snapshot)
            self._records[model_id] = record
            return record, True
        switch = revision is not None and revision != record.revision
        if switch:
            self._check_idle(record, f"switch it to revision {quote(revision or '')}")
            record.revision = revision
            record.status = ModelStatus.AVAILABLE
            record.verification_error = None
            record.progress = TransferProgress()
        if record.status not in _BUSY:
            record.found(snapshot)
        return record, False

    def remove(self, model_id: str) -> ModelRecord:
        record = self.get(model_id)
        del self._records[model_id]
        return record

    # -- downloads -------------------------------------------------------------------
    def begin_download(self, model_id: str) -> ModelRecord:
        """``downloading``, with fresh progress; raises MODEL_NOT_FOUND or MODEL_BUSY."""
        record = self.get(model_id)
        self._check_idle(record, "download it")
        record.status = ModelStatus.DOWNLOADING
        record.verification_error = None
        record.progress = TransferProgress()
        return record

    @staticmethod
    def download_succeeded(record: ModelRecord, snapshot: CachedSnapshot) -> None:
        record.status = ModelStatus.AVAILABLE  # found() moves it on to downloaded
        record.found(snapshot)
        record.complete = True

    @staticmethod
    def download_failed(record: ModelRecord, error: str) -> None:
        record.status = ModelStatus.FAILED
        record.verification_error = f"download failed: {error}"

    @staticmethod
    def download_stopped(record: ModelRecord) -> None:
        """The download was cancelled (shutdown): back to what is on disk."""
        record.status = ModelStatus.DOWNLOADED if record.downloaded else ModelStatus.AVAILABLE

    # -- smoke loads -------------------------------------------------------------------
    def begin_load(self, model_id: str) -> ModelRecord:
        """``loading``; raises MODEL_NOT_FOUND, or MODEL_BUSY if busy or not on disk."""
        record = self.get(model_id)
        self._check_idle(record, "load it")
        if not record.downloaded:
            raise ConflictError(
                ErrorCode.MODEL_BUSY,
                f"model {quote(model_id)} is not downloaded: "
                f"POST /models/{model_id}/download first",
            )
        record.status = ModelStatus.LOADING
        record.verification_error = None
        return record

    @staticmethod
    def load_succeeded(record: ModelRecord, result: SmokeLoad, now: datetime) -> None:
        record.status = ModelStatus.VERIFIED
        record.smoke_load = result
        record.last_verified = now
        record.verification_error = None
        record.complete = True

    @staticmethod
    def load_failed(record: ModelRecord, error: str) -> None:
        record.status = ModelStatus.FAILED
        record.verification_error = error

    @staticmethod
    def load_stopped(record: ModelRecord) -> None:
        """The smoke load was cancelled (shutdown): the files are still there."""
        record.status = ModelStatus.DOWNLOADED

    @staticmethod
    def _check_idle(record: ModelRecord, action: str) -> None:
        if record.status in _BUSY:
            raise ConflictError(
                ErrorCode.MODEL_BUSY,
                f"model {quote(record.model_id)} is {record.status}: wait for it to finish "
                f"before you {action}",
            )
