"""Python slice semantics over the lines of an instance's log, for the logs endpoint.

``GET /instances/{name}/logs?start=&end=`` returns ``lines[start:end]`` exactly as
Python would (negatives count from the end, out-of-range values clamp) and echoes
the resolved bounds. Logs can be large, so :func:`read_log_slice` streams the file:
it never holds more than one chunk plus the lines it returns.
"""

from __future__ import annotations

import os
import re
from typing import BinaryIO, Final

import msgspec

__all__ = [
    "MAX_ERROR_LINE_CHARS",
    "RUN_BOUNDARY_PREFIX",
    "LogSlice",
    "last_error_line",
    "read_log_slice",
    "resolve_slice",
]

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


# Written by the supervisor before each spawn: a run's own lines follow the last one.
RUN_BOUNDARY_PREFIX: Final = "--- tei-manager "
# An error line quoted in last_error is cut here (a log line can be arbitrarily long).
MAX_ERROR_LINE_CHARS: Final = 300
_ANSI_RE: Final = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CONTROL_RE: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# Lines that frame an error rather than say it: a Python traceback's header and
# chaining notes, anyhow's "Caused by:" (TEI), caret markers under a source line.
_FRAMING: Final = (
    "Traceback (most recent call last):",
    "During handling of the above exception",
    "The above exception was the direct cause",
    "Caused by:",
    "Stack backtrace:",
)


def last_error_line(lines: list[str]) -> str | None:
    """The line of a failed run's log that best says why it failed, or None.

    Only the last run counts (the lines after the last :data:`RUN_BOUNDARY_PREFIX`
    line). From the end, blank lines, indented lines (traceback frames, source
    lines, anyhow's numbered causes) and framing lines are skipped, so a Python
    traceback yields its ``OSError: ...`` line and TEI its ``Error: ...`` line. A
    JSON log line (``--json-output``) yields its ``fields.message``. ANSI colours
    and control characters are removed and the line is cut to
    :data:`MAX_ERROR_LINE_CHARS`.
    """
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(RUN_BOUNDARY_PREFIX):
            lines = lines[i + 1 :]
            break
    for raw in reversed(lines):
        line = _CONTROL_RE.sub("", _ANSI_RE.sub("", raw)).rstrip()
        if not line or line[0].isspace() or line.startswith(_FRAMING) or set(line) <= {"^", "~"}:
            continue
        if line.startswith("{"):
            message = _json_message(line)
            if message is None:
                continue
            line = message
        if len(line) > MAX_ERROR_LINE_CHARS:
            line = line[: MAX_ERROR_LINE_CHARS - 3] + "..."
        return line
    return None


def _json_message(line: str) -> str | None:
    try:
        record = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return line  # not JSON after all: the line itself
    if not isinstance(record, dict):
        return None
    fields = record.get("fields")
    message = fields.get("message") if isinstance(fields, dict) else record.get("message")
    if not isinstance(message, str) or not message.strip():
        return None
    message = re.sub(r"[\x00-\x1f\x7f]+", " ", message).strip()
    level = record.get("level")
    return f"{level}: {message}" if isinstance(level, str) else message
