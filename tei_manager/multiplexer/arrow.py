"""The Arrow IPC payloads of EmbedArrow and EmbedSparseArrow.

A request is an Arrow IPC *stream* whose record batches carry a string column
``text``; every batch is read, and each row gets one output row, in order. Answers
are one record batch of two nullable columns, uncompressed unless the caller asks
for LZ4_FRAME:

- dense: ``embeddings: fixed_size_list<float32 | float16>[dim]``
- sparse: ``sparse_embeddings: list<struct<index: uint32, value: float32>>``
- ``error: utf8``: why that row has no embedding (its text is null, or the instance
  refused it), else null.

Embeddings come from the instances as tei.v1 replies. A dense reply's ``embeddings``
is a packed repeated float, which on the wire already is little-endian float32, so
:func:`embed_response_floats` slices it out of the serialized reply without decoding
it: ~2 µs a row, where turning a parsed ``repeated float`` into bytes costs ~25 µs.

Pure code: no trio, no I/O. The work is CPU-bound and mostly inside Arrow, which
releases the GIL, so a caller may run large payloads in a worker thread.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any, Final, Literal

import pyarrow as pa
import pyarrow.compute as pc

from tei_manager._proto.tei.v1 import tei_pb2

__all__ = [
    "DENSE_COLUMN",
    "ERROR_COLUMN",
    "NOOP_DIM",
    "NULL_TEXT",
    "SPARSE_COLUMN",
    "SPARSE_TYPE",
    "TEXT_COLUMN",
    "ArrowInputError",
    "Compression",
    "Dtype",
    "SparseRow",
    "TextColumn",
    "dense_row",
    "embed_response_floats",
    "embed_response_parts",
    "noop_dense",
    "noop_sparse",
    "read_texts",
    "sparse_row",
    "write_dense",
    "write_sparse",
    "write_texts",
]

TEXT_COLUMN: Final = "text"
DENSE_COLUMN: Final = "embeddings"
SPARSE_COLUMN: Final = "sparse_embeddings"
ERROR_COLUMN: Final = "error"
#: The ``error`` of a row whose text is null.
NULL_TEXT: Final = "text is null"

Dtype = Literal["f32", "f16"]
#: IPC buffer compression of an answer: None or "lz4" (LZ4_FRAME).
Compression = Literal["lz4"] | None

#: Width of ``noop`` dense answers: that of all-MiniLM-L6-v2 and the other small
#: sentence-transformers models, so a noop answer has the shape of a common real one.
NOOP_DIM: Final = 384

SPARSE_TYPE: Final = pa.list_(
    pa.struct(
        [pa.field("index", pa.uint32(), nullable=False), pa.field("value", pa.float32(), False)]
    )
)

_LZ4: Final = pa.ipc.IpcWriteOptions(compression="lz4")
_FLOAT_BYTES: Final = 4
# Noop answers are zeros; one read-only zero buffer, grown on demand, spares a fresh
# allocation (and its page faults) per call.
_ZEROS_CAP: Final = 64 * 1024 * 1024

SparseRow = tuple[Sequence[int], Sequence[float]]
"""One sparse embedding: its indices and, in the same order, their values."""


class ArrowInputError(ValueError):
    """The request's ``arrow_ipc`` cannot be used; the message says why (INVALID_ARGUMENT)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TextColumn:
    """The ``text`` column of a request, all record batches in order."""

    __slots__ = ("_array", "_row_map", "_texts")

    def __init__(self, array: Any) -> None:
        self._array = array
        self._texts: list[str] | None = None
        self._row_map: Any = None

    @property
    def num_rows(self) -> int:
        return len(self._array)

    @property
    def null_count(self) -> int:
        return int(self._array.null_count)

    @property
    def valid_count(self) -> int:
        """How many rows have a text, i.e. how many embeddings an answer needs."""
        return self.num_rows - self.null_count

    @property
    def texts(self) -> list[str]:
        """The non-null texts in row order (decoded to ``str`` on first use)."""
        if self._texts is None:
            array = self._array.drop_null() if self.null_count else self._array
            self._texts = array.to_pylist()
        return self._texts

    def null_mask(self) -> Any:
        """A boolean array, true where the text is null; None when none is."""
        return self._array.is_null() if self.null_count else None

    def expand(self, compact: Any) -> Any:
        """Spread an array of one row per text over all rows, with nulls where text is null."""
        if not self.null_count:
            return compact
        if self._row_map is None:
            valid = self._array.is_valid()
            position = pc.subtract(pc.cumulative_sum(valid.cast(pa.int32())), 1)
            self._row_map = pc.if_else(valid, position, pa.scalar(None, pa.int32()))
        return compact.take(self._row_map)


def read_texts(ipc: bytes) -> TextColumn:
    """Read the ``text`` column from every record batch of an Arrow IPC stream."""
    if not ipc:
        raise ArrowInputError("arrow_ipc is empty: expected an Arrow IPC stream")
    try:
        reader = pa.ipc.open_stream(ipc)
    except (pa.ArrowException, OSError) as error:
        raise _not_a_stream(ipc, error) from None
    _check_schema(reader.schema)
    try:
        column = reader.read_all().column(TEXT_COLUMN)
    except (pa.ArrowException, OSError) as error:
        raise _not_a_stream(ipc, error) from None
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_string_view(column.type):
        # Not every compute kernel takes views (filter does not).
        column = column.cast(pa.large_string())
    array = column.combine_chunks()
    try:
        # The IPC reader checks offsets but not UTF-8; a bad byte would otherwise
        # surface later, as a decoding error in the caller.
        array.validate(full=True)
    except pa.ArrowInvalid as error:
        raise ArrowInputError(f"column 'text' is not valid: {error}") from None
    return TextColumn(array)


def _not_a_stream(ipc: bytes, error: Exception) -> ArrowInputError:
    hint = " (this is the Arrow IPC file format; send the stream format)"
    return ArrowInputError(
        f"arrow_ipc is not a valid Arrow IPC stream: {error}"
        + (hint if ipc.startswith(b"ARROW1") else "")
    )


def _check_schema(schema: Any) -> None:
    names: list[str] = schema.names
    count = names.count(TEXT_COLUMN)
    if count == 0:
        found = ", ".join(repr(n) for n in names) or "none"
        raise ArrowInputError(f"arrow_ipc has no column 'text' (columns: {found})")
    if count > 1:
        raise ArrowInputError(f"arrow_ipc has {count} columns named 'text'")
    kind = schema.field(TEXT_COLUMN).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    ):
        raise ArrowInputError(
            f"column 'text' must be utf8, large_utf8 or utf8_view, got {schema.field('text').type}"
        )


# -- from tei.v1 replies -------------------------------------------------------------
def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise ValueError("varint is too long")


def embed_response_floats(data: bytes) -> bytes:
    """The ``embeddings`` of a serialized tei.v1 EmbedResponse as little-endian float32 bytes.

    Reads the wire format directly (packed or not); ValueError when it is malformed.
    """
    return embed_response_parts(data)[0]


def embed_response_parts(data: bytes) -> tuple[bytes, bytes]:
    """A serialized tei.v1 EmbedResponse's ``embeddings`` (little-endian float32 bytes)
    and its serialized ``metadata``, in one pass over the wire format (ValueError when
    it is malformed)."""
    parts: list[bytes] = []
    metadata: list[bytes] = []
    pos = 0
    end = len(data)
    try:
        while pos < end:
            key, pos = _varint(data, pos)
            field, wire_type = key >> 3, key & 7
            if wire_type == 2:
                length, pos = _varint(data, pos)
                if field == 1:
                    if length % _FLOAT_BYTES:
                        raise ValueError("packed floats are not a multiple of 4 bytes")
                    parts.append(data[pos : pos + length])
                elif field == 2:
                    metadata.append(data[pos : pos + length])  # repeated: protobuf merges
                pos += length
            elif wire_type == 5:
                if field == 1:
                    parts.append(data[pos : pos + 4])
                pos += 4
            elif wire_type == 0:
                pos = _varint(data, pos)[1]
            elif wire_type == 1:
                pos += 8
            else:
                raise ValueError(f"unexpected wire type {wire_type}")
    except IndexError:
        pos = end + 1
    if pos > end:
        raise ValueError("EmbedResponse is truncated")
    floats = parts[0] if len(parts) == 1 else b"".join(parts)
    return floats, metadata[0] if len(metadata) == 1 else b"".join(metadata)


def dense_row(response: tei_pb2.EmbedResponse | bytes) -> bytes:
    """One embedding's float32 bytes, from a tei.v1 EmbedResponse or its serialization."""
    if isinstance(response, bytes):
        return embed_response_floats(response)
    return embed_response_floats(response.SerializeToString())


def sparse_row(response: tei_pb2.EmbedSparseResponse) -> SparseRow:
    """One sparse embedding from a tei.v1 EmbedSparseResponse."""
    values = response.sparse_embeddings
    return array("I", [v.index for v in values]), array("f", [v.value for v in values])


# -- answers ---------------------------------------------------------------------
def write_dense(
    column: TextColumn,
    rows: Sequence[bytes | str],
    *,
    dim: int = NOOP_DIM,
    dtype: Dtype = "f32",
    compression: Compression = None,
) -> bytes:
    """The dense answer: ``rows`` holds, per text in order, its embedding (float32
    bytes) or why it failed (a str, the row's ``error``).

    The width comes from the embeddings; ``dim`` is used only when there are none.
    A row count or width that does not fit is the backend's fault: ValueError.
    """
    if len(rows) != column.valid_count:
        raise ValueError(f"{len(rows)} embeddings for {column.valid_count} texts")
    embeddings = [row for row in rows if not isinstance(row, str)]
    failed = len(embeddings) != len(rows)
    if embeddings:
        row_bytes = len(embeddings[0])
        if row_bytes % _FLOAT_BYTES or any(len(row) != row_bytes for row in embeddings):
            widths = sorted({len(row) // _FLOAT_BYTES for row in embeddings})
            raise ValueError(f"embeddings of different widths: {widths}")
        dim = row_bytes // _FLOAT_BYTES
    if failed:  # a failed row's slot holds zeros under its null
        zeros = bytes(dim * _FLOAT_BYTES)
        data = b"".join(zeros if isinstance(row, str) else row for row in rows)
    else:
        data = b"".join(embeddings)
    values = pa.Array.from_buffers(pa.float32(), len(rows) * dim, [None, pa.py_buffer(data)])
    if dtype == "f16":
        values = values.cast(pa.float16())
    mask = pa.array([isinstance(row, str) for row in rows]) if failed else None
    compact = pa.FixedSizeListArray.from_arrays(values, dim, mask=mask)
    errors = _compact_errors(rows) if failed else None
    return _answer(DENSE_COLUMN, column, compact, errors, compression)


def write_sparse(
    column: TextColumn, rows: Sequence[SparseRow | str], *, compression: Compression = None
) -> bytes:
    """The sparse answer: ``rows`` holds, per text in order, its sparse embedding or
    why it failed (a str)."""
    if len(rows) != column.valid_count:
        raise ValueError(f"{len(rows)} sparse embeddings for {column.valid_count} texts")
    indices = array("I")
    values = array("f")
    offsets = array("i", [0])
    failed = False
    for row in rows:
        if isinstance(row, str):
            failed = True
        else:
            row_indices, row_values = row
            if len(row_indices) != len(row_values):
                raise ValueError("a sparse embedding has more indices than values or fewer")
            indices.extend(row_indices)
            values.extend(row_values)
        offsets.append(len(indices))
    mask = pa.array([isinstance(row, str) for row in rows]) if failed else None
    compact = _sparse_array(offsets, indices, values, mask=mask)
    errors = _compact_errors(rows) if failed else None
    return _answer(SPARSE_COLUMN, column, compact, errors, compression)


def _compact_errors(rows: Sequence[object]) -> Any:
    return pa.array([row if isinstance(row, str) else None for row in rows], pa.string())


def noop_dense(
    column: TextColumn,
    dim: int = NOOP_DIM,
    *,
    dtype: Dtype = "f32",
    compression: Compression = None,
) -> bytes:
    """A dense answer of zeros (``dim`` wide), shaped as a real one would be."""
    count = column.num_rows * dim
    kind, width = (pa.float16(), 2) if dtype == "f16" else (pa.float32(), _FLOAT_BYTES)
    values = pa.Array.from_buffers(kind, count, [None, _zeros(count * width)])
    embeddings = pa.FixedSizeListArray.from_arrays(values, dim, mask=column.null_mask())
    return _write([DENSE_COLUMN, ERROR_COLUMN], [embeddings, _null_errors(column)], compression)


def noop_sparse(column: TextColumn, *, compression: Compression = None) -> bytes:
    """A sparse answer of empty embeddings (all zeros), null where the text is null."""
    offsets = array("i", [0]) * (column.num_rows + 1)
    empty = _sparse_array(offsets, array("I"), array("f"), mask=column.null_mask())
    return _write([SPARSE_COLUMN, ERROR_COLUMN], [empty, _null_errors(column)], compression)


def _answer(
    name: str, column: TextColumn, compact: Any, errors: Any, compression: Compression
) -> bytes:
    """Both columns of an answer, spread from one row per text over every row."""
    if errors is None and not column.null_count:
        errors = pa.nulls(column.num_rows, pa.string())
    elif errors is None:
        errors = _null_errors(column)
    elif column.null_count:
        errors = pc.if_else(column.null_mask(), NULL_TEXT, column.expand(errors))
    return _write([name, ERROR_COLUMN], [column.expand(compact), errors], compression)


def _null_errors(column: TextColumn) -> Any:
    """The ``error`` column where only null texts failed."""
    mask = column.null_mask()
    if mask is None:
        return pa.nulls(column.num_rows, pa.string())
    return pc.if_else(mask, NULL_TEXT, pa.scalar(None, pa.string()))


def _sparse_array(
    offsets: array[int], indices: array[int], values: array[float], *, mask: Any = None
) -> Any:
    count = len(indices)
    structs = pa.StructArray.from_arrays(
        [
            pa.Array.from_buffers(pa.uint32(), count, [None, pa.py_buffer(indices)]),
            pa.Array.from_buffers(pa.float32(), count, [None, pa.py_buffer(values)]),
        ],
        fields=list(SPARSE_TYPE.value_type),
    )
    offset_array = pa.Array.from_buffers(pa.int32(), len(offsets), [None, pa.py_buffer(offsets)])
    return pa.ListArray.from_arrays(offset_array, structs, SPARSE_TYPE, mask=mask)


_zero_buffer: Any = pa.py_buffer(b"")


def _zeros(nbytes: int) -> Any:
    global _zero_buffer
    if nbytes > _ZEROS_CAP:
        return pa.py_buffer(bytes(nbytes))
    if nbytes > _zero_buffer.size:
        _zero_buffer = pa.py_buffer(bytes(nbytes))
    return _zero_buffer.slice(0, nbytes)


def write_texts(texts: Sequence[str | None]) -> bytes:
    """A request's ``arrow_ipc``: one uncompressed record batch with a ``text`` column."""
    return _write([TEXT_COLUMN], [pa.array(texts, pa.string())], None)


def _write(names: list[str], arrays: list[Any], compression: Compression) -> bytes:
    batch = pa.RecordBatch.from_arrays(arrays, names=names)
    options = _LZ4 if compression == "lz4" else None
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=options) as writer:
        writer.write_batch(batch)
    data: bytes = sink.getvalue().to_pybytes()
    return data
