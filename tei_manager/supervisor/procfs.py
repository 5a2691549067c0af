"""Just enough of Linux's /proc to recognise a process again: group, start time, command.

A pid alone does not identify a process across a manager crash: the kernel reuses
pids. A pid together with its start time (in clock ticks since boot) does.
Blocking reads of small files; callers on the Trio side use a worker thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import msgspec

__all__ = ["ProcStat", "iter_pids", "read_cmdline", "read_stat"]


class ProcStat(msgspec.Struct, frozen=True, kw_only=True):
    """The fields of ``/proc/PID/stat`` the supervisor uses."""

    pid: int
    state: str  # "Z" for a zombie: dead, waiting to be reaped
    ppid: int
    pgid: int
    sid: int
    start_ticks: int


def read_stat(pid: int, *, proc: str = "/proc") -> ProcStat | None:
    """``/proc/PID/stat`` parsed, or None if the process does not exist (any more)."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces and
    # parentheses: the fields we want start after the last ")".
    end = text.rfind(")")
    fields = text[end + 2 :].split()
    try:
        # fields[0] is field 3 of proc(5): state; ppid 4, pgrp 5, session 6, starttime 22.
        return ProcStat(
            pid=pid,
            state=fields[0],
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            sid=int(fields[3]),
            start_ticks=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def read_cmdline(pid: int, *, proc: str = "/proc") -> list[str] | None:
    """The process's arguments, or None if it does not exist (a zombie has none)."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode("utf-8", errors="replace") for a in raw.split(b"\0")[:-1]]


def iter_pids(*, proc: str = "/proc") -> Iterator[int]:
    """Every pid currently listed in ``/proc``."""
    try:
        names = os.listdir(proc)
    except OSError:
        return
    for name in names:
        if name.isdigit():
            yield int(name)
