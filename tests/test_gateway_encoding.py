"""Embeddings from serialized replies to JSON: exact float32 values on both rendering paths."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tei_manager._proto.tei.v1 import tei_pb2
from tei_manager.gateway.encoding import (
    ARROW_MIN_FLOATS,
    base64_rows,
    dense_embeddings,
    json_rows,
)


def replies(matrix: np.ndarray) -> list[bytes]:
    return [
        tei_pb2.EmbedResponse(
            embeddings=row.tolist(), metadata=tei_pb2.Metadata(compute_tokens=i + 1)
        ).SerializeToString()
        for i, row in enumerate(matrix)
    ]


@pytest.mark.parametrize("rows", [1, 3, ARROW_MIN_FLOATS // 64 + 1])  # the last: Arrow
def test_json_rows_read_back_to_the_same_float32(rows: int) -> None:
    rng = np.random.default_rng(rows)
    matrix = (rng.standard_normal((rows, 64)) * 10.0 ** rng.integers(-8, 8, (rows, 64))).astype(
        np.float32
    )
    matrix[0, :3] = [0.0, -0.0, 1.0]
    got, tokens = dense_embeddings(replies(matrix))
    assert np.array_equal(got, matrix)
    assert tokens == sum(range(1, rows + 1))
    rendered = json_rows(got)
    back = np.array([json.loads(r) for r in rendered], dtype=np.float32)
    assert np.array_equal(back, matrix)


def test_base64_rows_are_little_endian_float32() -> None:
    matrix = np.array([[1.5, -2.25], [3.0, 0.125]], dtype=np.float32)
    rows = base64_rows(matrix)
    assert [np.frombuffer(base64.b64decode(json.loads(r)), "<f4").tolist() for r in rows] == (
        matrix.tolist()
    )


def test_ragged_replies_are_refused() -> None:
    ragged = [
        tei_pb2.EmbedResponse(embeddings=[1.0, 2.0]).SerializeToString(),
        tei_pb2.EmbedResponse(embeddings=[1.0]).SerializeToString(),
    ]
    with pytest.raises(ValueError, match="different sizes"):
        dense_embeddings(ragged)
    matrix, tokens = dense_embeddings([])
    assert matrix.shape == (0, 0) and tokens == 0


def test_metadata_split_over_the_wire_is_merged() -> None:
    # Protobuf merges a message field that occurs twice; the one-pass reader must too.
    first = tei_pb2.EmbedResponse(
        embeddings=[1.0], metadata=tei_pb2.Metadata(compute_tokens=7)
    ).SerializeToString()
    second = tei_pb2.EmbedResponse(metadata=tei_pb2.Metadata(total_time_ns=5)).SerializeToString()
    assert tei_pb2.EmbedResponse.FromString(first + second).metadata.compute_tokens == 7
    matrix, tokens = dense_embeddings([first + second])
    assert matrix.tolist() == [[1.0]] and tokens == 7
