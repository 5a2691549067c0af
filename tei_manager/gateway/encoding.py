"""Embeddings from serialized tei.v1 replies to JSON text, without a Python float each.

A dense reply's ``embeddings`` is a packed repeated float: on the wire it already
is little-endian float32, so the floats are sliced out of the reply bytes
(:func:`~tei_manager.multiplexer.arrow.embed_response_parts`, which also
hands over the reply's metadata, so a reply is read once) into one numpy
matrix. That matrix becomes JSON in one of two ways:

- many floats: Arrow casts them to their shortest round-trip decimal text and joins
  each row in C++ (no GIL held, so it runs in a worker thread), about half the bytes
  of a float64 rendering and one Python string per row;
- few floats: ``msgspec`` on ``tolist()``, because Arrow's per-call overhead (about
  a millisecond) would dominate a single embedding.

Both give valid JSON numbers that read back to the same float32 values.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from tei_manager._proto.tei.v1 import tei_pb2
from tei_manager.multiplexer.arrow import embed_response_parts

__all__ = [
    "ARROW_MIN_FLOATS",
    "Matrix",
    "base64_rows",
    "dense_embeddings",
    "json_rows",
]

Matrix = npt.NDArray[np.float32]

#: From this many floats on, Arrow renders them (see the module docstring).
ARROW_MIN_FLOATS: Final = 8192

_encode: Final = msgspec.json.encode


def dense_embeddings(replies: Sequence[bytes]) -> tuple[Matrix, int]:
    """The embeddings of serialized EmbedResponses, one row each, and the compute tokens
    they report, from one pass over each reply (ValueError if one is malformed or the
    rows are ragged)."""
    if len(replies) == 1:  # a single input, the common request: no join, no checks
        floats, metadata = embed_response_parts(replies[0])
        tokens = tei_pb2.Metadata.FromString(metadata).compute_tokens if metadata else 0
        return np.frombuffer(floats, dtype="<f4").reshape(1, len(floats) // 4), tokens
    rows: list[bytes] = []
    tokens = 0
    for reply in replies:
        floats, metadata = embed_response_parts(reply)
        rows.append(floats)
        if metadata:
            tokens += tei_pb2.Metadata.FromString(metadata).compute_tokens
    if not rows:
        return np.zeros((0, 0), dtype="<f4"), 0
    width = len(rows[0])
    if any(len(row) != width for row in rows):
        raise ValueError("the instance answered embeddings of different sizes")
    flat = np.frombuffer(b"".join(rows), dtype="<f4")
    return flat.reshape(len(rows), width // 4), tokens


def json_rows(matrix: Matrix) -> list[bytes]:
    """Each row of ``matrix`` as a JSON array's text (``[0.1,-0.2,...]``)."""
    count, width = matrix.shape
    if count * width < ARROW_MIN_FLOATS:
        return [_encode(row) for row in matrix.tolist()]
    text = pc.cast(pa.array(matrix.reshape(-1)), pa.string())
    offsets = pa.array(np.arange(0, count * width + 1, width, dtype=np.int32))
    joined = pc.binary_join(pa.ListArray.from_arrays(offsets, text), ",")
    return [b"[" + row.as_buffer().to_pybytes() + b"]" for row in joined]


def base64_rows(matrix: Matrix) -> list[bytes]:
    """Each row as OpenAI's ``encoding_format=base64``: little-endian float32, base64."""
    data = np.ascontiguousarray(matrix, dtype="<f4")
    return [b'"' + base64.b64encode(row.tobytes()) + b'"' for row in data]
