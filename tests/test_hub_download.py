"""Downloads into the cache from a local Hub over real HTTP: selection, checksums,
resumption after dropped connections, retries, cancellation.

The Hub is ``tests/hubserver.py`` serving the packaged all-MiniLM-L6-v2 and the tiny
random models; nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from tei_manager.hub.cache import locate, scan_cache
from tei_manager.hub.client import Listing, Sink, Transfer, TransientHubError
from tei_manager.hub.download import Downloader, DownloadError, inline
from tei_manager.hub.integrity import Digest, RemoteFile
from tei_manager.hub.retry import RetryPolicy
from tei_manager.hub.settings import HubSettings
from tei_manager.hub.state import TransferProgress
from tests.conftest import TinyModels
from tests.hubserver import HubServer
from tests.waiting import wait_for

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TINY = "acme/tiny-reranker"
FAST = RetryPolicy(max_retries=3, initial_delay_secs=0.01)
MINILM_FILES = {
    "modules.json", "config.json", "sentence_bert_config.json",
    "config_sentence_transformers.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.txt", "model.safetensors", "1_Pooling/config.json",
}  # fmt: skip


@pytest.fixture
def hub(minilm_dir: Path, tiny_models: TinyModels) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(MINILM, minilm_dir, revisions=("main", "v1.0"))
        server.add_repo(TINY, tiny_models.reranker)
        yield server


@pytest.fixture
def settings(hub: HubServer, tmp_path: Path) -> HubSettings:
    return HubSettings(cache_dir=str(tmp_path / "cache"), endpoint=hub.url)


def _files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}


async def test_downloads_what_an_instance_needs_with_progress(
    hub: HubServer, settings: HubSettings, minilm_dir: Path
) -> None:
    progress = TransferProgress()
    snapshot = await Downloader(settings, FAST).download(MINILM, None, progress)

    assert snapshot.commit == hub.repos[MINILM].commit
    assert snapshot.revision == "main"
    folder = Path(snapshot.path)
    assert _files_in(folder) == MINILM_FILES  # no README, train script or data config
    for name in MINILM_FILES:
        assert (folder / name).read_bytes() == (minilm_dir / name).read_bytes()
    total = sum((minilm_dir / name).stat().st_size for name in MINILM_FILES)
    assert progress.snapshot().bytes_done == progress.bytes_total == total
    assert progress.files_done == progress.files_total == len(MINILM_FILES)
    assert snapshot.size_bytes == total
    assert snapshot.metadata is not None
    assert (snapshot.metadata.model_type, snapshot.metadata.hidden_size) == ("bert", 384)
    got = {r.path.rsplit("/", 1)[-1] for r in hub.gets(MINILM)}
    assert "README.md" not in got and "data_config.json" not in got
    # As the worker resolves it: offline, from the cache.
    assert locate(settings.cache_dir, MINILM, None) == snapshot


async def test_a_second_download_fetches_nothing_again(
    hub: HubServer, settings: HubSettings
) -> None:
    downloader = Downloader(settings, FAST)
    await downloader.download(TINY, None, TransferProgress())
    before = len(hub.gets(TINY))
    progress = TransferProgress()
    await downloader.download(TINY, None, progress)
    assert len(hub.gets(TINY)) == before
    assert progress.files_done == progress.files_total > 0


async def test_revision_is_recorded_as_a_ref(hub: HubServer, settings: HubSettings) -> None:
    snapshot = await Downloader(settings, FAST).download(MINILM, "v1.0", TransferProgress())
    refs = Path(settings.cache_dir) / "models--sentence-transformers--all-MiniLM-L6-v2" / "refs"
    assert (refs / "v1.0").read_text() == snapshot.commit
    assert not (refs / "main").exists()
    with pytest.raises(DownloadError, match="revision not found"):
        await Downloader(settings, FAST).download(MINILM, "v9", TransferProgress())


@pytest.mark.parametrize(
    ("path", "says"),
    [("model.safetensors", "sha256 mismatch"), ("tokenizer.json", "git blob id mismatch")],
)
async def test_a_tampered_file_fails_and_leaves_nothing_that_looks_complete(
    hub: HubServer, settings: HubSettings, path: str, says: str
) -> None:
    hub.tamper(TINY, path)
    with pytest.raises(DownloadError, match=f"{path}: {says}: got [0-9a-f]+, the Hub says"):
        await Downloader(settings, FAST).download(TINY, None, TransferProgress())
    repo = Path(settings.cache_dir) / "models--acme--tiny-reranker"
    # No blob, no snapshot link, no ref, and no partial file either.
    assert _files_in(repo) == set()
    assert scan_cache(settings.cache_dir) == []
    assert locate(settings.cache_dir, TINY, None) is None


async def test_a_dropped_connection_is_resumed_with_a_range(
    hub: HubServer, settings: HubSettings, minilm_dir: Path
) -> None:
    hub.drop_once(MINILM, "model.safetensors", after=3_000_000)
    snapshot = await Downloader(settings, FAST).download(MINILM, None, TransferProgress())
    weights = [r for r in hub.gets(MINILM) if r.path.endswith("model.safetensors")]
    assert len(weights) == 2
    assert weights[0].range is None
    assert weights[1].range is not None and weights[1].range.startswith("bytes=")
    assert int(weights[1].range[6:-1]) > 0  # it continued, it did not start over
    got = (Path(snapshot.path) / "model.safetensors").read_bytes()
    assert (
        hashlib.sha256(got).digest()
        == hashlib.sha256((minilm_dir / "model.safetensors").read_bytes()).digest()
    )


async def test_transient_hub_errors_are_retried(hub: HubServer, settings: HubSettings) -> None:
    hub.fail_api(TINY, 503, 502)
    await Downloader(settings, FAST).download(TINY, None, TransferProgress())
    assert len([r for r in hub.requests if r.path.startswith("/api/models/")]) == 3


async def test_retries_run_out(hub: HubServer, settings: HubSettings) -> None:
    hub.fail_api(TINY, 503, 503, 503, 503)
    with pytest.raises(DownloadError, match=r"HTTP 503 \(gave up after 3 retries\)"):
        await Downloader(settings, FAST).download(TINY, None, TransferProgress())


async def test_permanent_errors_are_not_retried(hub: HubServer, settings: HubSettings) -> None:
    with pytest.raises(DownloadError, match="repository not found"):
        await Downloader(settings, FAST).download("acme/nothing", None, TransferProgress())
    assert len(hub.requests) == 1


async def test_the_token_goes_with_every_request(hub: HubServer, settings: HubSettings) -> None:
    with_token = HubSettings(cache_dir=settings.cache_dir, endpoint=hub.url, token="hf_secret")
    await Downloader(with_token, FAST).download(TINY, None, TransferProgress())
    assert hub.requests
    assert {r.authorization for r in hub.requests} == {"Bearer hf_secret"}


async def test_offline_mode_asks_nothing(hub: HubServer, settings: HubSettings) -> None:
    offline = HubSettings(cache_dir=settings.cache_dir, endpoint=hub.url, offline=True)
    with pytest.raises(DownloadError, match="offline mode"):
        await Downloader(offline, FAST).download(TINY, None, TransferProgress())
    assert hub.requests == []


async def test_cancelling_stops_the_transfer_and_the_next_download_resumes(
    hub: HubServer, settings: HubSettings
) -> None:
    hold = hub.hold(MINILM, "model.safetensors", after=5_000_000)
    progress = TransferProgress()
    downloader = Downloader(settings, FAST)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(downloader.download, MINILM, None, progress)
        await trio.to_thread.run_sync(hold.reached.wait)
        # The other files come first (under 1 MB together): wait until the transfer
        # thread wrote part of the weights too.
        await wait_for(lambda: progress.bytes_done > 2_000_000, within=30, what="weights")
        nursery.cancel_scope.cancel()
        # The transfer notices the cancellation at its next chunk.
        hold.release()
    repo = Path(settings.cache_dir) / "models--sentence-transformers--all-MiniLM-L6-v2"
    weights = hub.repos[MINILM].files["model.safetensors"]
    partial = repo / "blobs" / f"{weights.sha256}.incomplete"
    size = partial.stat().st_size
    assert 0 < size < weights.size
    assert not (repo / "blobs" / weights.sha256).exists()
    assert not (repo / "snapshots").exists()
    assert locate(settings.cache_dir, MINILM, None) is None

    await downloader.download(MINILM, None, TransferProgress())
    last = [r for r in hub.gets(MINILM) if r.path.endswith("model.safetensors")][-1]
    assert last.range == f"bytes={size}-"
    assert locate(settings.cache_dir, MINILM, None) is not None


async def test_disk_space_is_checked_first(
    hub: HubServer, settings: HubSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100, 90, 10))
    with pytest.raises(DownloadError, match="not enough disk space in the model cache"):
        await Downloader(settings, FAST).download(TINY, None, TransferProgress())
    assert not any(r.path.endswith(".safetensors") for r in hub.gets(TINY))


# --- the retry loop on the mock clock, with a fake Hub --------------------------------------


class _FlakyHub:
    """A Hub whose file transfer fails ``failures`` times, sending ``step`` bytes before
    the failures listed in ``progress_on``."""

    def __init__(self, data: bytes, failures: int, progress_on: set[int]) -> None:
        self.data = data
        self.failures = failures
        self.progress_on = progress_on
        self.attempts: list[float] = []
        self.file = RemoteFile(
            path="model.safetensors",
            size=len(data),
            digest=Digest("sha256", hashlib.sha256(data).hexdigest()),
        )

    def listing(self, hub: HubSettings, model_id: str, revision: str | None) -> Listing:
        config = RemoteFile(path="config.json", size=2, digest=self._blob(b"{}"))
        return Listing(commit="c" * 40, files=(config, self.file))

    @staticmethod
    def _blob(data: bytes) -> Digest:
        return Digest("git-sha1", hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest())

    def fetch(
        self,
        hub: HubSettings,
        model_id: str,
        commit: str,
        transfer: Transfer,
        sink: Sink,
        check: object,
    ) -> None:
        from tei_manager.hub.integrity import StreamHasher

        if transfer.file.path == "config.json":
            transfer.partial.parent.mkdir(parents=True, exist_ok=True)
            transfer.partial.write_bytes(b"{}")
            return
        attempt = len(self.attempts)
        self.attempts.append(trio.current_time())
        if attempt < self.failures:
            if attempt in self.progress_on:
                hasher = transfer.hasher or StreamHasher(transfer.file.digest, transfer.file.size)
                hasher.update(b"x")  # a byte arrived before the drop
                transfer.hasher = hasher
            raise TransientHubError(f"connection dropped (attempt {attempt})")
        transfer.partial.write_bytes(self.data)


async def test_backoff_doubles_on_the_clock(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    flaky = _FlakyHub(b"weights", failures=3, progress_on=set())
    downloader = Downloader(
        HubSettings(cache_dir=str(tmp_path)),
        RetryPolicy(max_retries=5, initial_delay_secs=1.0),
        blocking=inline,
        fetch_listing=flaky.listing,
        fetch_file=flaky.fetch,
    )
    start = trio.current_time()
    await downloader.download("org/m", None, TransferProgress())
    assert [t - start for t in flaky.attempts] == [0, 1, 3, 7]


async def test_progress_resets_the_failure_count(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # Three failures in a row with max_retries=2 give up, but bytes arrived before the
    # second, so the count starts again there.
    flaky = _FlakyHub(b"weights", failures=3, progress_on={1})
    downloader = Downloader(
        HubSettings(cache_dir=str(tmp_path)),
        RetryPolicy(max_retries=2, initial_delay_secs=1.0),
        blocking=inline,
        fetch_listing=flaky.listing,
        fetch_file=flaky.fetch,
    )
    start = trio.current_time()
    await downloader.download("org/m", None, TransferProgress())
    assert [t - start for t in flaky.attempts] == [0, 1, 2, 4]
