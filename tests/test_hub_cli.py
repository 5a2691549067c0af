"""``tei-manager models pull|list`` on the local cache, against a local Hub, no manager."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.utils as hf_utils
import pytest
import trio

from tei_manager.cli import main
from tei_manager.hub.cache import locate
from tei_manager.hub.cli import show_progress
from tei_manager.hub.state import TransferProgress
from tests.conftest import TinyModels
from tests.hubserver import HubServer

TINY = "acme/tiny-reranker"


@pytest.fixture
def hub(tiny_models: TinyModels) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(TINY, tiny_models.reranker, revisions=("main", "v1"))
        yield server


@pytest.fixture
def cache(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The HF variables as an operator would set them."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


def test_pull_prints_the_snapshot(
    cache: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "pull", TINY, "--revision", "v1"]) == 0
    out, err = capsys.readouterr()
    snapshot = locate(str(cache), TINY, "v1")
    assert snapshot is not None
    assert out == f"{snapshot.path}\n"
    assert f"{TINY}: " in err and f"commit {hub.repos[TINY].commit}" in err
    assert (Path(snapshot.path) / "model.safetensors").is_symlink()


def test_pull_of_a_tampered_model_fails(
    cache: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.tamper(TINY, "model.safetensors")
    assert main(["models", "pull", TINY]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"download of {TINY} failed: model.safetensors: sha256 mismatch" in err
    assert locate(str(cache), TINY, None) is None


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["../etc"], "MODEL_ID: \"../etc\" contains a '..' component"),
        (["/data/m"], "is a local path"),
        ([TINY, "--revision", "../x"], '--revision: "../x" is not a valid revision'),
    ],
)
def test_pull_refuses_bad_arguments(
    cache: Path, args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "pull", *args]) == 2
    assert says in capsys.readouterr().err


def test_pull_offline(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["models", "pull", TINY]) == 1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_list_shows_the_cache(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list"]) == 0
    assert "no models in" in capsys.readouterr().err
    assert main(["models", "pull", TINY]) == 0
    capsys.readouterr()
    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["MODEL", "REVISION", "SIZE", "TYPE", "PATH"]
    assert lines[1].split()[:2] == [TINY, "main"]
    assert lines[1].split()[4] == "bert"
    assert main(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["model_id"] for m in listed] == [TINY]
    assert listed[0]["metadata"]["model_type"] == "bert"


def test_the_command_runs_without_a_manager(cache: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tei_manager", "models", "pull", TINY],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(locate(str(cache), TINY, None).path)  # type: ignore[union-attr]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_the_progress_bar_ends_where_the_pull_did(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    # Loading a model elsewhere in the run switches huggingface_hub's bars off globally.
    if hf_utils.are_progress_bars_disabled():
        hf_utils.enable_progress_bars()
        request.addfinalizer(hf_utils.disable_progress_bars)
    progress, err = TransferProgress(), Terminal()
    progress.files_total, progress.bytes_total = 10, 1000
    async with trio.open_nursery() as nursery:
        nursery.start_soon(show_progress, progress, TINY, err)
        await trio.sleep(0.25)  # a few redraws
        progress.files_done, progress.bytes_done = 8, 800
        await trio.sleep(0.25)
        # The last two files finish between two redraws, and the pull ends at once.
        progress.files_done, progress.bytes_done = 10, 1000
        nursery.cancel_scope.cancel()
    last = err.getvalue().rstrip().split("\r")[-1]
    assert "files 10/10]" in last, last
    assert "1000/1000" in last or "100%" in last, last
