from __future__ import annotations

import os
import tempfile
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tei_manager.core.logslice import LogSlice, last_error_line, read_log_slice, resolve_slice

bounds = st.none() | st.integers(min_value=-300, max_value=300)


# derandomize: the same examples on every run, so CI results are reproducible.
@settings(derandomize=True, max_examples=500)
@given(total=st.integers(min_value=0, max_value=200), start=bounds, end=bounds)
def test_resolve_slice_matches_python_slicing(
    total: int, start: int | None, end: int | None
) -> None:
    items = list(range(total))
    first, stop = resolve_slice(total, start, end)
    assert 0 <= first <= stop <= total
    assert items[first:stop] == items[start:end]


@pytest.mark.parametrize(
    ("total", "start", "end", "expected"),
    [
        (10, None, None, (0, 10)),
        (10, -3, None, (7, 10)),
        (10, -100, None, (0, 10)),
        (10, 2, 5, (2, 5)),
        (10, 5, 2, (5, 5)),
        (10, 20, None, (10, 10)),
        (10, None, -1, (0, 9)),
        (10, -2, -5, (8, 8)),
        (0, -100, None, (0, 0)),
        (0, 5, 10, (0, 0)),
    ],
)
def test_resolve_slice_examples(
    total: int, start: int | None, end: int | None, expected: tuple[int, int]
) -> None:
    assert resolve_slice(total, start, end) == expected


def test_resolve_slice_rejects_negative_total() -> None:
    with pytest.raises(ValueError):
        resolve_slice(-1)


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "instance.log"
    path.write_bytes(data)
    return path


def test_reads_a_slice(tmp_path: Path) -> None:
    path = write(tmp_path, b"".join(b"line %d\n" % i for i in range(10)))
    assert read_log_slice(path, 2, 4) == LogSlice(
        lines=["line 2", "line 3"], start=2, end=4, total_lines=10
    )
    assert read_log_slice(path, -2).lines == ["line 8", "line 9"]
    assert read_log_slice(path).total_lines == 10


def test_response_json_shape(tmp_path: Path) -> None:
    path = write(tmp_path, b"a\nb\n")
    assert msgspec.json.decode(msgspec.json.encode(read_log_slice(path, -1))) == {
        "lines": ["b"],
        "start": 1,
        "end": 2,
        "total_lines": 2,
    }


def test_missing_file_is_an_empty_log(tmp_path: Path) -> None:
    assert read_log_slice(tmp_path / "none.log", -100) == LogSlice(
        lines=[], start=0, end=0, total_lines=0
    )


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        (b"", []),
        (b"\n", [""]),
        (b"a", ["a"]),
        (b"a\nb", ["a", "b"]),
        (b"a\n\nb\n", ["a", "", "b"]),
        (b"crlf\r\nline\r\n", ["crlf", "line"]),
        (b"bad \xff utf8\n", ["bad \ufffd utf8"]),
    ],
)
def test_line_splitting(tmp_path: Path, data: bytes, lines: list[str]) -> None:
    result = read_log_slice(write(tmp_path, data))
    assert result.lines == lines
    assert result.total_lines == len(lines)


def reference_lines(data: bytes) -> list[str]:
    parts = data.split(b"\n")
    if parts[-1] == b"":
        parts.pop()
    return [p.decode() for p in parts]


@settings(derandomize=True, deadline=None, max_examples=300)
@given(
    lines=st.lists(st.text(alphabet="ab\u00e9 ", max_size=12), max_size=40),
    trailing_newline=st.booleans(),
    start=bounds,
    end=bounds,
    chunk_size=st.integers(min_value=1, max_value=20),
)
def test_read_matches_python_slicing_across_chunk_boundaries(
    lines: list[str],
    trailing_newline: bool,
    start: int | None,
    end: int | None,
    chunk_size: int,
) -> None:
    data = "\n".join(lines).encode()
    if lines and trailing_newline:
        data += b"\n"
    expected_all = reference_lines(data) if data else []
    fd, name = tempfile.mkstemp()
    try:
        os.write(fd, data)
        os.close(fd)
        result = read_log_slice(name, start, end, chunk_size=chunk_size)
    finally:
        os.unlink(name)
    assert result.total_lines == len(expected_all)
    assert result.lines == expected_all[start:end]
    assert result.lines == expected_all[result.start : result.end]


def test_large_file_tail_is_read_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    with path.open("wb") as f:
        for i in range(200_000):
            f.write(b"%08d some log text that makes the line longer\n" % i)
    result = read_log_slice(path, -3, chunk_size=64 * 1024)
    assert result.total_lines == 200_000
    assert [line[:8] for line in result.lines] == ["00199997", "00199998", "00199999"]
    assert (result.start, result.end) == (199_997, 200_000)
    middle = read_log_slice(path, 123_456, 123_458, chunk_size=4096)
    assert [line[:8] for line in middle.lines] == ["00123456", "00123457"]


# --- the error line of a failed run ---------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            [
                "Traceback (most recent call last):",
                '  File "/app/x.py", line 3, in <module>',
                "    load(path)",
                "    ^^^^^^^^^^",
                "OSError: /tmp/nonexistent does not appear to have a file named config.json",
                "",
            ],
            "OSError: /tmp/nonexistent does not appear to have a file named config.json",
        ),
        (
            [
                "\x1b[2m2026-01-01T00:00:00Z\x1b[0m INFO starting",
                "Error: Could not download model artifacts",
                "",
                "Caused by:",
                "    0: request error: HTTP status client error (404 Not Found)",
            ],
            "Error: Could not download model artifacts",
        ),
        (
            [
                '{"level":"INFO","fields":{"message":"Starting"}}',
                '{"level":"ERROR","fields":{"message":"Could not\\nstart backend"}}',
            ],
            "ERROR: Could not start backend",
        ),
        (["--- tei-manager 2026: starting a", "ValueError: old", "--- tei-manager 2026: b"], None),
        ([], None),
        (["   ", "\t"], None),
        (["x" * 1000], "x" * 297 + "..."),
    ],
)
def test_last_error_line(lines: list[str], expected: str | None) -> None:
    assert last_error_line(lines) == expected
