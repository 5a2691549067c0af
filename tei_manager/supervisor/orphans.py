"""Instance processes left behind by a manager that died, and the file that finds them.

PDEATHSIG kills an instance's first process when the manager dies, but not what
that process started (TEI's Python backend, say), and not if the manager died
between fork and prctl. So the manager keeps a small runtime file next to its
state file listing every live instance process: pid, process group and start
time. At start-up, :func:`reap_orphans` kills the groups of the previous run that
are still alive, after making sure each is really the process that was recorded
(same start time, and its command line still names the instance's model and
port) and not an unrelated process that got the same pid.

Everything here blocks; the manager calls it in a worker thread.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import msgspec

from tei_manager.supervisor.procfs import ProcStat, iter_pids, read_cmdline, read_stat

__all__ = [
    "OrphanProcess",
    "RuntimeFile",
    "RuntimeRecord",
    "read_runtime",
    "reap_orphans",
    "remove_runtime",
    "runtime_path",
    "write_runtime",
]

log = logging.getLogger("tei_manager.supervisor")

_EXIT_WAIT_SECS: Final = 5.0


class RuntimeRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One live instance process."""

    name: str
    pid: int
    pgid: int
    start_ticks: int
    port: int
    model_id: str


class RuntimeFile(msgspec.Struct, frozen=True, kw_only=True):
    """Who wrote the file, and the instance processes it had running."""

    manager_pid: int
    manager_start_ticks: int | None
    instances: tuple[RuntimeRecord, ...] = ()


class OrphanProcess(msgspec.Struct, frozen=True, kw_only=True):
    """A process found alive from an earlier run, and killed."""

    instance: str
    pid: int
    pgid: int


def runtime_path(state_file: str | os.PathLike[str]) -> Path:
    """``state.toml`` → ``state.runtime.json``, in the same directory."""
    return Path(state_file).with_suffix(".runtime.json")


def write_runtime(path: Path, runtime: RuntimeFile) -> None:
    """Replace the file atomically (no fsync: it only matters while the host is up)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(msgspec.json.encode(runtime))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_runtime(path: Path) -> None:
    path.unlink(missing_ok=True)


def read_runtime(path: Path) -> RuntimeFile | None:
    """The file's contents; None if there is none or it cannot be used (logged)."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=RuntimeFile)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as e:
        log.warning("ignoring unreadable runtime file %s: %s", path, e)
        return None


def manager_alive(runtime: RuntimeFile, *, proc: str = "/proc") -> bool:
    """Whether the manager that wrote ``runtime`` still runs (and is not this process)."""
    if runtime.manager_pid == os.getpid():
        return False
    stat = read_stat(runtime.manager_pid, proc=proc)
    return (
        stat is not None
        and stat.state != "Z"
        and runtime.manager_start_ticks is not None
        and stat.start_ticks == runtime.manager_start_ticks
    )


def _is_recorded_process(record: RuntimeRecord, stat: ProcStat, cmdline: list[str]) -> bool:
    if stat.start_ticks != record.start_ticks or stat.pgid != record.pgid:
        return False
    # The model and port are arguments of every instance command line.
    return record.model_id in cmdline and str(record.port) in cmdline


def _group_members(record: RuntimeRecord, proc: str) -> list[int]:
    """Live processes of the recorded group started no earlier than its leader."""
    members = []
    for pid in iter_pids(proc=proc):
        stat = read_stat(pid, proc=proc)
        if (
            stat is not None
            and stat.pgid == record.pgid
            and stat.sid == record.pgid
            and stat.start_ticks >= record.start_ticks
            and stat.state != "Z"
        ):
            members.append(pid)
    return members


def _find_orphans(record: RuntimeRecord, proc: str) -> list[int]:
    """Pids of ``record``'s group still alive, or [] if the ids now belong to others."""
    stat = read_stat(record.pid, proc=proc)
    if stat is not None and stat.state != "Z":
        cmdline = read_cmdline(record.pid, proc=proc) or []
        if not _is_recorded_process(record, stat, cmdline):
            return []  # the pid was reused: not ours
        return _group_members(record, proc)
    # The leader is gone. Its group id cannot have been reused while members of
    # the group live on, so those members are what the leader left behind.
    return _group_members(record, proc)


def reap_orphans(
    runtime: RuntimeFile, *, proc: str = "/proc", wait_secs: float = _EXIT_WAIT_SECS
) -> list[OrphanProcess]:
    """SIGKILL what is left of ``runtime``'s instance process groups; returns what was killed.

    Waits up to ``wait_secs`` for them to exit, so their ports are free when the
    instances are started again.
    """
    killed: list[OrphanProcess] = []
    for record in runtime.instances:
        pids = _find_orphans(record, proc)
        if not pids:
            continue
        log.warning(
            "killing %d leftover process(es) of instance %s from an earlier run (group %d)",
            len(pids),
            record.name,
            record.pgid,
            extra={"instance": record.name, "pids": pids},
        )
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed.append(OrphanProcess(instance=record.name, pid=pid, pgid=record.pgid))
    _wait_gone((k.pid for k in killed), proc, wait_secs)
    return killed


def _wait_gone(pids: Iterable[int], proc: str, wait_secs: float) -> None:
    pending = set(pids)
    deadline = time.monotonic() + wait_secs
    while pending and time.monotonic() < deadline:
        pending = {p for p in pending if (s := read_stat(p, proc=proc)) and s.state != "Z"}
        if pending:
            time.sleep(0.02)
