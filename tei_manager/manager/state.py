"""The persisted desired state: which instances exist, configured how, wanted running or not.

Written as TOML on every change, atomically: a crash at any moment leaves either
the old file or the new one, never a torn one (and, at worst, a temp file, removed
at the next start by :func:`remove_stale_temp_files`). Loading never raises and
never silently drops data: an unreadable file is moved aside with a timestamp,
logged, and reported on ``/health`` (:class:`StateFileReport`). Runtime facts
(pids, statuses, counters) are not persisted; after a restart every process is new.

The functions block on file I/O; the Trio side runs them via ``trio.to_thread``.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Final, Literal

import msgspec
import tomli_w

from tei_manager.config import (
    Engine,
    InstanceConfig,
    Pooling,
    SeedInstance,
    validate_instance_config,
)
from tei_manager.core.instances import DesiredState, InstanceRecord
from tei_manager.errors import ErrorCode, TeiError, ValidationError, quote

__all__ = [
    "STATE_VERSION",
    "LoadedState",
    "MeasuredFootprint",
    "PersistedInstance",
    "PersistedState",
    "StateFileReport",
    "decode_state",
    "encode_state",
    "load_state",
    "merge_seeds",
    "remove_stale_temp_files",
    "save_state",
    "state_from_instances",
]

logger = logging.getLogger(__name__)

STATE_VERSION: Final = 1
# A decode error quotes the file; /health repeats the message, so it is bounded.
_MAX_ERROR_CHARS: Final = 500


class PersistedInstance(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One instance in the state file."""

    config: InstanceConfig
    desired_state: DesiredState
    created_at: datetime


class MeasuredFootprint(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The most memory an instance of this model and configuration was measured to hold,
    kept so admission uses it (not the estimate) after the manager restarts too."""

    model_id: str
    revision: str | None = None
    max_batch_tokens: int | Literal["auto"]
    pooling: Pooling | None = None
    extra_args: tuple[str, ...] = ()
    gpu: bool
    engine: Engine | None = None  # the instance's engine field (None: the worker's default)
    bytes: int


class PersistedState(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole state file; instances in creation order."""

    version: int = STATE_VERSION
    instances: tuple[PersistedInstance, ...] = ()
    footprints: tuple[MeasuredFootprint, ...] = ()

    def names(self) -> list[str]:
        return [i.config.name for i in self.instances]


class LoadedState(msgspec.Struct, frozen=True, kw_only=True):
    """What :func:`load_state` found.

    ``corrupt`` is true when a file existed but could not be used; ``moved_to`` is
    where it was put aside (None if even that failed; the error is logged).
    """

    state: PersistedState
    corrupt: bool = False
    moved_to: str | None = None
    error: str | None = None  # why the file could not be used

    def report(self) -> StateFileReport:
        """What ``/health`` says about the state file."""
        if not self.corrupt:
            return StateFileReport(status="ok")
        return StateFileReport(status="moved_aside", moved_aside_to=self.moved_to, error=self.error)


class StateFileReport(msgspec.Struct, frozen=True, kw_only=True):
    """The state file as found at start-up, for ``GET /health``.

    ``ok``: read (or absent: a first start). ``moved_aside``: it could not be used,
    was renamed to ``moved_aside_to`` and the manager started from its seeds;
    ``error`` says what was wrong. (A file that cannot even be moved aside stops
    the start-up: the manager never overwrites what it could not keep.)
    """

    status: Literal["ok", "moved_aside"]
    moved_aside_to: str | None = None
    error: str | None = None


def _drop_none(value: Any) -> Any:
    # TOML has no null: an absent key means None (every optional field defaults to it).
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_drop_none(v) for v in value]
    return value


def encode_state(state: PersistedState) -> bytes:
    """``state`` as TOML bytes; ``created_at`` becomes a native TOML datetime."""
    builtins = msgspec.to_builtins(state, builtin_types=(datetime,))
    return tomli_w.dumps(_drop_none(builtins)).encode()


def decode_state(data: bytes) -> PersistedState:
    """Parse and check state file contents; raises ``ValueError`` saying what is wrong."""
    try:
        state = msgspec.toml.decode(data, type=PersistedState)
    except msgspec.DecodeError as e:
        raise ValueError(str(e)) from None
    if state.version != STATE_VERSION:
        raise ValueError(f"version {state.version} is not supported (expected {STATE_VERSION})")
    seen: set[str] = set()
    for i, inst in enumerate(state.instances):
        try:
            validate_instance_config(inst.config)
        except ValidationError as e:
            raise ValueError(f"instances[{i}].config.{e.message}") from None
        if inst.config.name in seen:
            raise ValueError(f"instances[{i}]: duplicate name {quote(inst.config.name)}")
        seen.add(inst.config.name)
    return state


def save_state(path: str | os.PathLike[str], state: PersistedState) -> None:
    """Replace the file at ``path`` with ``state``, atomically and durably.

    Temp file in the same directory, write, flush, fsync, rename over the old
    file, fsync the directory (so the rename itself survives a power cut). On
    failure the old file is untouched and ``IO_ERROR`` is raised.
    """
    target = Path(path)
    data = encode_state(state)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: never write through a file or link someone else put there.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
    except OSError as e:
        raise TeiError(
            ErrorCode.IO_ERROR, f"cannot write state file {target}: {e.strerror or e}"
        ) from e


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems cannot fsync a directory; the rename is still atomic there.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def load_state(path: str | os.PathLike[str], *, now: datetime | None = None) -> LoadedState:
    """Read the state file; never raises.

    A missing file is an empty state. A file that cannot be read or decoded is
    renamed to ``<name>.corrupt-<UTC timestamp>`` (``now``, default: the current
    time), logged, and an empty state is returned with ``corrupt=True``, so the
    manager starts from its seeds without destroying what was there.
    """
    target = Path(path)
    try:
        data = target.read_bytes()
        return LoadedState(state=decode_state(data))
    except FileNotFoundError:
        return LoadedState(state=PersistedState())
    except (OSError, ValueError) as e:
        problem = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    moved_to = _move_aside(target, now or datetime.now(UTC))
    if moved_to is None:
        logger.error("state file %s is unusable (%s) and could not be moved aside", target, problem)
    else:
        logger.error(
            "state file %s is unusable (%s); moved to %s, starting from the seeds",
            target,
            problem,
            moved_to,
        )
    return LoadedState(
        state=PersistedState(), corrupt=True, moved_to=moved_to, error=problem[:_MAX_ERROR_CHARS]
    )


def remove_stale_temp_files(path: str | os.PathLike[str]) -> list[str]:
    """Remove the temp files that saves of ``path`` interrupted by a crash left behind.

    Only call it while no other process saves that state file (the manager checks
    that first). Returns the paths removed; one that cannot be removed is logged.
    """
    target = Path(path)
    removed = []
    try:
        candidates = list(target.parent.glob(f".{glob_escape(target.name)}.*.tmp"))
    except OSError as e:  # pragma: no cover - the folder was just created
        logger.warning("cannot list %s: %s", target.parent, e)
        return []
    for tmp in candidates:
        try:
            tmp.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            logger.warning("cannot remove %s: %s", tmp, e.strerror or e)
            continue
        removed.append(str(tmp))
    if removed:
        logger.info("removed %d temp file(s) left by an interrupted save", len(removed))
    return removed


def _move_aside(target: Path, now: datetime) -> str | None:
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = target.with_name(f"{target.name}.corrupt-{stamp}")
    candidate, n = base, 0
    # Two failures within one second must not overwrite the first file put aside.
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    try:
        os.rename(target, candidate)
        _fsync_dir(target.parent)
    except OSError as e:
        logger.error("cannot move %s to %s: %s", target, candidate, e)
        return None
    return str(candidate)


def merge_seeds(
    state: PersistedState, seeds: Iterable[SeedInstance], *, now: datetime
) -> tuple[PersistedState, list[str]]:
    """Append each seed whose name is absent from ``state``; returns the names added.

    A seed already present keeps its persisted config and desired state (the file
    records what the user did since). A new seed is wanted running if its
    ``auto_start`` is true, stopped otherwise, and is created at ``now``.
    """
    present = set(state.names())
    added: list[PersistedInstance] = []
    for seed in seeds:
        if seed.name in present:
            continue
        present.add(seed.name)
        added.append(
            PersistedInstance(
                config=seed.instance_config(),
                desired_state=DesiredState.RUNNING if seed.auto_start else DesiredState.STOPPED,
                created_at=now,
            )
        )
    merged = msgspec.structs.replace(state, instances=state.instances + tuple(added))
    return merged, [a.config.name for a in added]


def state_from_instances(
    records: Iterable[InstanceRecord], footprints: Iterable[MeasuredFootprint] = ()
) -> PersistedState:
    """The desired state of each record (an :class:`InstanceTable` iterates in creation
    order), and the measured footprints."""
    return PersistedState(
        instances=tuple(
            PersistedInstance(
                config=record.config, desired_state=record.desired, created_at=record.created_at
            )
            for record in records
        ),
        footprints=tuple(footprints),
    )
