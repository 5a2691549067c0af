"""Python slice semantics over the lines of an instance's log, for the logs endpoint.

``GET /instances/{name}/logs?start=&end=`` returns ``lines[start:end]`` exactly as
Python would (negatives count from the end, out-of-range values clamp) and echoes
the resolved bounds. Logs can be large, so :func:`read_log_slice` streams the file:
it never holds more than one chunk plus the lines it returns.
"""

from __future__ import annotations

import os
from typing import BinaryIO, Final

import msgspec

__all__ = ["LogSlice", "read_log_slice", "resolve_slice"]

_CHUNK: Final = 1 << 20


class LogSlice(msgspec.Struct, frozen=True, kw_only=True):
    """The logs endpoint's response: ``lines`` is ``all_lines[start:end]``."""

    lines: list[str]
    start: int
    end: int
    total_lines: int


def resolve_slice(total: int, start: int | None = None, end: int | None = None) -> tuple[int, int]:
    """``(start, end)`` such that ``seq[start:end]`` equals Python's ``seq[start:end]``.

    Both are within ``0..total`` and ``start <= end``; an empty slice reports
    ``end == start`` rather than Python's inverted ``indices()``.
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    first, stop, _ = slice(start, end).indices(total)
    return first, max(first, stop)


def read_log_slice(
    path: str | os.PathLike[str],
    start: int | None = None,
    end: int | None = None,
    *,
    chunk_size: int = _CHUNK,
) -> LogSlice:
    """``lines[start:end]`` of the file at ``path``, read without loading it whole.

    A missing file is an empty log (the instance never wrote one). Lines are
    decoded as UTF-8 (invalid bytes replaced) without their line ending; a last
    line without a newline still counts. ``chunk_size`` is the read size (tests
    shrink it to cross chunk boundaries). Blocking: run it in a worker thread.
    """
    try:
        with open(path, "rb") as f:
            total, checkpoints = _count_lines(f, chunk_size)
            first, stop = resolve_slice(total, start, end)
            lines = _read_lines(f, checkpoints, first, stop) if stop > first else []
    except FileNotFoundError:
        return LogSlice(lines=[], start=0, end=0, total_lines=0)
    # The file may have been truncated between the passes: report what was read.
    return LogSlice(lines=lines, start=first, end=first + len(lines), total_lines=total)


def _count_lines(f: BinaryIO, chunk_size: int) -> tuple[int, list[tuple[int, int]]]:
    """Count lines; also note ``(offset, lines before it)`` at each chunk start.

    The checkpoints let the second pass seek close to the first wanted line
    (one per MiB: a thousand pairs for a 1 GB log) instead of re-reading from 0.
    """
    newlines = 0
    offset = 0
    checkpoints: list[tuple[int, int]] = []
    last = b""
    while chunk := f.read(chunk_size):
        checkpoints.append((offset, newlines))
        newlines += chunk.count(b"\n")
        offset += len(chunk)
        last = chunk[-1:]
    # A final line without a newline is still a line.
    total = newlines + (1 if last not in (b"", b"\n") else 0)
    return total, checkpoints


def _read_lines(
    f: BinaryIO, checkpoints: list[tuple[int, int]], first: int, stop: int
) -> list[str]:
    # Start from the last checkpoint strictly before the first wanted line: a
    # checkpoint may sit in the middle of its line, whose start lies behind it.
    offset, line_no = 0, 0
    for cp_offset, cp_line in checkpoints:
        if cp_line >= first:
            break
        offset, line_no = cp_offset, cp_line
    if offset:
        f.seek(offset - 1)
        if f.read(1) != b"\n":
            f.readline()  # the rest of line ``line_no``
            line_no += 1
    else:
        f.seek(0)
    lines: list[str] = []
    for raw in f:
        if line_no >= stop:
            break
        if line_no >= first:
            text = raw[:-1] if raw.endswith(b"\n") else raw
            lines.append(text.removesuffix(b"\r").decode("utf-8", errors="replace"))
        line_no += 1
    return lines
