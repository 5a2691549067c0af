"""``tei-manager models pull|list``: the local model cache, without a running manager.

``pull`` downloads what an instance needs, exactly as the manager's registry does
(same file selection, checksums, retries and cache layout), with a progress bar on
stderr and the snapshot folder on stdout. ``list`` shows what the cache holds.
Both use the Hugging Face environment variables (``HF_ENDPOINT``, ``HF_TOKEN``,
``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``/``HF_HOME``) as the manager does.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any, Final, TextIO

import msgspec
import trio

from tei_manager.errors import ValidationError
from tei_manager.hub.cache import scan_cache
from tei_manager.hub.download import Downloader, DownloadError
from tei_manager.hub.paths import validate_hub_model_id, validate_revision
from tei_manager.hub.retry import RetryPolicy
from tei_manager.hub.settings import HubSettings
from tei_manager.hub.state import CachedSnapshot, TransferProgress

__all__ = ["add_arguments", "list_models", "main", "pull"]

# How often the progress bar is redrawn.
_REFRESH_SECS: Final = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``models`` subcommands, on ``parser``."""
    actions = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    pull_parser = actions.add_parser(
        "pull",
        help="download a model into the Hugging Face cache, checked, with a progress bar",
        description="Download the files an instance needs (config, tokenizer, safetensors "
        "weights, sentence-transformers modules), check every checksum, and print the "
        "snapshot folder.",
    )
    pull_parser.add_argument("model_id", metavar="MODEL_ID", help="Hugging Face id: org/name")
    pull_parser.add_argument("--revision", help="branch, tag or commit (default: main)")
    list_parser = actions.add_parser("list", help="list the models in the Hugging Face cache")
    list_parser.add_argument("--json", action="store_true", help="one JSON array, for scripts")


def main(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    """Run the parsed ``models`` command; the exit status."""
    hub = HubSettings.from_env(os.environ if env is None else env)
    if args.models_command == "pull":
        return pull(hub, args.model_id, args.revision)
    return list_models(hub, as_json=args.json)


def pull(
    hub: HubSettings,
    model_id: str,
    revision: str | None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    retry: RetryPolicy | None = None,
) -> int:
    """Download ``model_id``; 0 with the snapshot folder on ``out``, 1 if it failed, 2 for
    a bad argument."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        validate_hub_model_id(model_id, "MODEL_ID")
        if revision is not None:
            validate_revision(revision, "--revision")
    except ValidationError as e:
        print(f"tei-manager: {e}", file=err)
        return 2
    if hub.offline:
        print(f"tei-manager: cannot download {model_id}: HF_HUB_OFFLINE is set", file=err)
        return 1
    downloader = Downloader(hub, retry or RetryPolicy())
    progress = TransferProgress()
    snapshot = trio.run(_pull, downloader, model_id, revision, progress, err)
    if isinstance(snapshot, DownloadError):
        print(f"tei-manager: download of {model_id} failed: {snapshot}", file=err)
        return 1
    print(
        f"{model_id}: {progress.files_total} files, {_size(progress.bytes_total)}, "
        f"commit {snapshot.commit}",
        file=err,
    )
    print(snapshot.path, file=out)
    return 0


async def _pull(
    downloader: Downloader,
    model_id: str,
    revision: str | None,
    progress: TransferProgress,
    err: TextIO,
) -> CachedSnapshot | DownloadError:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(show_progress, progress, model_id, err)
        try:
            result: CachedSnapshot | DownloadError = await downloader.download(
                model_id, revision, progress
            )
        except DownloadError as e:
            result = e
        nursery.cancel_scope.cancel()
    return result


async def show_progress(progress: TransferProgress, model_id: str, err: TextIO) -> None:
    """Draw ``progress`` on ``err`` as a tqdm bar until cancelled, then once more, final.

    huggingface_hub's tqdm: HF_HUB_DISABLE_PROGRESS_BARS turns it off.
    """
    # Public (documented) API; the package's lazy __init__ hides it from mypy.
    from huggingface_hub.utils import tqdm  # type: ignore[attr-defined]

    progress_bar: Any = tqdm
    bar = progress_bar(desc=model_id, unit="B", unit_scale=True, unit_divisor=1024, file=err)
    try:
        while True:
            _draw(bar, progress)
            # Redraw the bar: a display refresh, nothing waits on it.
            await trio.sleep(_REFRESH_SECS)
    finally:
        # The last files may finish between two redraws: the bar ends where the pull did.
        _draw(bar, progress)
        bar.close()


def _draw(bar: Any, progress: TransferProgress) -> None:
    if progress.bytes_total and bar.total != progress.bytes_total:
        bar.total = progress.bytes_total
    bar.set_postfix_str(f"files {progress.files_done}/{progress.files_total}", refresh=False)
    bar.update(progress.bytes_done - bar.n)


def list_models(hub: HubSettings, *, as_json: bool = False, out: TextIO | None = None) -> int:
    """Print the models in the cache: a table, or a JSON array."""
    out = out or sys.stdout
    found = scan_cache(hub.cache_dir)
    if as_json:
        print(msgspec.json.encode(found).decode(), file=out)
        return 0
    if not found:
        print(f"no models in {hub.cache_dir}", file=sys.stderr)
        return 0
    rows = [("MODEL", "REVISION", "SIZE", "TYPE", "PATH")]
    for snapshot in found:
        kind = snapshot.metadata.model_type if snapshot.metadata else None
        rows.append(
            (
                snapshot.model_id,
                snapshot.revision,
                _size(snapshot.size_bytes),
                kind or "-",
                snapshot.path,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]), file=out)
    return 0


def _size(count: int) -> str:
    """``123 B``, ``86.7 MiB``."""
    if count < 1024:
        return f"{count} B"
    units = ("KiB", "MiB", "GiB", "TiB")
    value = count / 1024
    index = 0
    while value >= 1024 and index < len(units) - 1:
        value /= 1024
        index += 1
    return f"{value:.1f} {units[index]}"
