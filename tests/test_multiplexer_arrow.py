"""The Arrow IPC codec of EmbedArrow / EmbedSparseArrow, read back with pyarrow."""

from __future__ import annotations

import random
import struct
from array import array
from typing import Any

import pyarrow as pa
import pytest

from tei_manager._proto.tei.v1 import tei_pb2
from tei_manager.multiplexer import arrow
from tei_manager.multiplexer.arrow import ArrowInputError

LZ4_FRAME_MAGIC = b"\x04\x22\x4d\x18"


def ipc_stream(*batches: Any, schema: Any = None, compression: str | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, schema or batches[0].schema, options=options) as writer:
        for batch in batches:
            writer.write_batch(batch)
    data: bytes = sink.getvalue().to_pybytes()
    return data


def texts_ipc(texts: list[str | None], kind: Any = None) -> bytes:
    return ipc_stream(pa.record_batch({"text": pa.array(texts, kind or pa.string())}))


def read_answer(data: bytes) -> Any:
    reader = pa.ipc.open_stream(data)
    batches = list(reader)
    assert len(batches) == 1, "an answer is exactly one record batch"
    return batches[0]


def float_row(values: list[float]) -> bytes:
    return array("f", values).tobytes()


# -- reading ---------------------------------------------------------------------
def test_reads_every_record_batch_in_order() -> None:
    schema = pa.schema([("id", pa.int32()), ("text", pa.string())])
    batches = [
        pa.record_batch([pa.array([i, i + 1]), pa.array([f"t{i}", f"t{i + 1}"])], schema=schema)
        for i in (0, 2, 4)
    ]
    column = arrow.read_texts(ipc_stream(*batches))
    assert column.num_rows == 6
    assert column.null_count == 0
    assert column.texts == ["t0", "t1", "t2", "t3", "t4", "t5"]
    assert read_answer(arrow.noop_dense(column)).num_rows == 6


def test_null_texts_are_skipped_and_counted() -> None:
    column = arrow.read_texts(texts_ipc([None, "a", None, "b"]))
    assert column.num_rows == 4
    assert column.null_count == 2
    assert column.valid_count == 2
    assert column.texts == ["a", "b"]


@pytest.mark.parametrize(
    "kind", [pa.large_string(), pa.string_view(), pa.dictionary(pa.int32(), pa.string())]
)
def test_other_string_types_are_accepted(kind: Any) -> None:
    values = pa.array(["x", None, "y", "x"], pa.string()).cast(kind)
    column = arrow.read_texts(ipc_stream(pa.record_batch({"text": values})))
    assert column.num_rows == 4
    assert column.texts == ["x", "y", "x"]


def test_compressed_requests_are_read() -> None:
    batch = pa.record_batch({"text": ["compressed"] * 50})
    assert arrow.read_texts(ipc_stream(batch, compression="zstd")).texts == ["compressed"] * 50


def test_schema_only_stream_has_no_rows() -> None:
    column = arrow.read_texts(ipc_stream(schema=pa.schema([("text", pa.string())])))
    assert column.num_rows == 0
    assert column.texts == []
    dense = read_answer(arrow.noop_dense(column))
    assert dense.num_rows == 0
    assert dense.schema.field("embeddings").type == pa.list_(pa.float32(), arrow.NOOP_DIM)
    assert read_answer(arrow.write_dense(column, [])).num_rows == 0
    assert read_answer(arrow.write_sparse(column, [])).num_rows == 0


def test_wrong_column_type_is_named() -> None:
    data = ipc_stream(pa.record_batch({"text": pa.array([1, 2], pa.int64())}))
    with pytest.raises(ArrowInputError) as error:
        arrow.read_texts(data)
    assert error.value.message == "column 'text' must be utf8, large_utf8 or utf8_view, got int64"


def test_binary_is_not_text() -> None:
    data = ipc_stream(pa.record_batch({"text": pa.array([b"a"], pa.binary())}))
    with pytest.raises(ArrowInputError, match="got binary"):
        arrow.read_texts(data)


def test_missing_column_lists_the_columns() -> None:
    data = ipc_stream(pa.record_batch({"input": ["a"], "id": [1]}))
    with pytest.raises(ArrowInputError) as error:
        arrow.read_texts(data)
    assert error.value.message == "arrow_ipc has no column 'text' (columns: 'input', 'id')"


def test_duplicate_text_columns_are_refused() -> None:
    batch = pa.RecordBatch.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["text", "text"])
    with pytest.raises(ArrowInputError, match="2 columns named 'text'"):
        arrow.read_texts(ipc_stream(batch))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x00garbage bytes that are no arrow at all", id="garbage"),
        pytest.param(texts_ipc(["a", "b", "c"])[:-24], id="truncated"),
        pytest.param(b"\xff\xff\xff\xff\x10\x00\x00\x00" + b"\x00" * 16, id="bad-metadata"),
    ],
)
def test_malformed_ipc_is_an_input_error(data: bytes) -> None:
    with pytest.raises(ArrowInputError) as error:
        arrow.read_texts(data)
    assert error.value.message.startswith("arrow_ipc is not a valid Arrow IPC stream: ")


def test_empty_bytes_are_an_input_error() -> None:
    with pytest.raises(ArrowInputError, match="arrow_ipc is empty"):
        arrow.read_texts(b"")


def test_invalid_utf8_is_an_input_error() -> None:
    offsets = pa.py_buffer(array("i", [0, 1, 3]).tobytes())
    text = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"a\xff\xfe")])
    with pytest.raises(ArrowInputError, match="column 'text' is not valid: Invalid UTF8"):
        arrow.read_texts(ipc_stream(pa.record_batch({"text": text})))


def test_file_format_gets_a_hint() -> None:
    sink = pa.BufferOutputStream()
    batch = pa.record_batch({"text": ["a"]})
    with pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    with pytest.raises(ArrowInputError, match="file format; send the stream format"):
        arrow.read_texts(sink.getvalue().to_pybytes())


# -- dense answers ---------------------------------------------------------------
def test_dense_values_round_trip_exactly() -> None:
    rng = random.Random(7)
    embeddings = [array("f", [rng.uniform(-1, 1) for _ in range(16)]) for _ in range(5)]
    column = arrow.read_texts(texts_ipc(["a", "b", "c", "d", "e"]))
    batch = read_answer(arrow.write_dense(column, [e.tobytes() for e in embeddings]))
    assert batch.schema.names == ["embeddings", "error"]
    assert batch.schema.field("embeddings").type == pa.list_(pa.float32(), 16)
    assert batch.schema.field("embeddings").nullable
    assert batch.schema.field("error").type == pa.string()
    assert batch.column(0).to_pylist() == [e.tolist() for e in embeddings]
    assert batch.column("error").to_pylist() == [None] * 5


def test_dense_nulls_land_on_the_null_texts() -> None:
    column = arrow.read_texts(texts_ipc([None, "a", None, "b", None]))
    batch = read_answer(arrow.write_dense(column, [float_row([1, 2]), float_row([3, 4])]))
    assert batch.column(0).to_pylist() == [None, [1.0, 2.0], None, [3.0, 4.0], None]
    null = arrow.NULL_TEXT
    assert batch.column("error").to_pylist() == [null, None, null, None, null]


def test_failed_rows_are_null_with_their_reason_in_order() -> None:
    column = arrow.read_texts(texts_ipc(["a", None, "", "b", "too long"]))
    rows: list[bytes | str] = [float_row([1, 2]), "empty input", float_row([3, 4]), "too long"]
    batch = read_answer(arrow.write_dense(column, rows))
    assert batch.num_rows == 5
    assert batch.column("embeddings").to_pylist() == [[1.0, 2.0], None, None, [3.0, 4.0], None]
    assert batch.column("error").to_pylist() == [
        None,
        arrow.NULL_TEXT,
        "empty input",
        None,
        "too long",
    ]


def test_every_row_failed_uses_the_given_width() -> None:
    column = arrow.read_texts(texts_ipc(["a", "b"]))
    batch = read_answer(arrow.write_dense(column, ["no", "nope"], dim=8))
    assert batch.schema.field("embeddings").type == pa.list_(pa.float32(), 8)
    assert batch.column(0).to_pylist() == [None, None]
    assert batch.column(1).to_pylist() == ["no", "nope"]


def test_f16_answers_hold_the_same_values_in_half_precision() -> None:
    column = arrow.read_texts(texts_ipc(["a", None, "b", "c"]))
    rows: list[bytes | str] = [float_row([0.5, -1.25]), "refused", float_row([1 / 3, 2.0])]
    batch = read_answer(arrow.write_dense(column, rows, dtype="f16"))
    assert batch.schema.field("embeddings").type == pa.list_(pa.float16(), 2)
    values = batch.column(0).to_pylist()
    assert values[0] == [0.5, -1.25]
    assert values[1] is None and values[2] is None
    assert values[3][1] == 2.0 and abs(values[3][0] - 1 / 3) < 1e-3 and values[3][0] != 1 / 3
    noop = read_answer(arrow.noop_dense(column, 4, dtype="f16"))
    assert noop.schema.field("embeddings").type == pa.list_(pa.float16(), 4)
    assert noop.column(0).to_pylist() == [[0.0] * 4, None, [0.0] * 4, [0.0] * 4]


def test_dense_all_null_uses_the_given_width() -> None:
    column = arrow.read_texts(texts_ipc([None, None], pa.string()))
    batch = read_answer(arrow.write_dense(column, [], dim=8))
    assert batch.schema.field("embeddings").type == pa.list_(pa.float32(), 8)
    assert batch.column(0).to_pylist() == [None, None]


def test_dense_refuses_rows_that_do_not_fit() -> None:
    column = arrow.read_texts(texts_ipc(["a", None, "b"]))
    with pytest.raises(ValueError, match="1 embeddings for 2 texts"):
        arrow.write_dense(column, [float_row([1, 2])])
    with pytest.raises(ValueError, match=r"different widths: \[2, 3\]"):
        arrow.write_dense(column, [float_row([1, 2]), float_row([1, 2, 3])])


def test_answers_are_lz4_frame_compressed_when_asked() -> None:
    column = arrow.read_texts(texts_ipc(["same text"] * 200))
    rows: list[bytes | str] = [float_row([0.5] * 64)] * 200
    compressed = arrow.write_dense(column, rows, compression="lz4")
    messages = list(pa.ipc.MessageReader.open_stream(compressed))
    assert [m.type for m in messages] == ["schema", "record batch"]
    # Each compressed buffer is its uncompressed length (int64) then an LZ4 frame.
    body = messages[1].body.to_pybytes()
    assert body[8:12] == LZ4_FRAME_MAGIC
    assert len(compressed) < 200 * 64 * 4 // 10
    assert read_answer(compressed).column(0).to_pylist() == [[0.5] * 64] * 200
    sparse = arrow.write_sparse(column, [([1], [0.5])] * 200, compression="lz4")
    assert LZ4_FRAME_MAGIC in list(pa.ipc.MessageReader.open_stream(sparse))[1].body.to_pybytes()


def test_answers_are_uncompressed_by_default() -> None:
    column = arrow.read_texts(texts_ipc(["same text"] * 200))
    plain = arrow.write_dense(column, [float_row([0.5] * 64)] * 200)
    body = list(pa.ipc.MessageReader.open_stream(plain))[1].body.to_pybytes()
    assert LZ4_FRAME_MAGIC not in body
    assert len(plain) > 200 * 64 * 4
    assert read_answer(plain).column(0).to_pylist() == [[0.5] * 64] * 200


def test_noop_dense_is_zeros_with_nulls_kept() -> None:
    column = arrow.read_texts(texts_ipc(["a", None, "c"]))
    embeddings = read_answer(arrow.noop_dense(column)).column(0)
    assert embeddings.type == pa.list_(pa.float32(), 384)
    assert embeddings.to_pylist() == [[0.0] * 384, None, [0.0] * 384]
    small = read_answer(arrow.noop_dense(column, dim=3)).column(0)
    assert small.to_pylist() == [[0.0] * 3, None, [0.0] * 3]


def test_noop_dense_large_answer() -> None:
    column = arrow.read_texts(texts_ipc([f"text {i}" for i in range(10_000)]))
    assert len(arrow.noop_dense(column)) > 10_000 * 384 * 4
    data = arrow.noop_dense(column, compression="lz4")
    assert len(data) < 1_000_000, "zeros compress"
    embeddings = read_answer(data).column(0)
    assert len(embeddings) == 10_000
    assert embeddings.values.to_pylist()[-384:] == [0.0] * 384


# -- from tei.v1 replies -------------------------------------------------------------
def test_embed_response_floats_slices_the_packed_field() -> None:
    values = [0.25, -1.5, 3.0, 1e-3]
    response = tei_pb2.EmbedResponse(
        embeddings=values, metadata=tei_pb2.Metadata(compute_tokens=7, total_time_ns=123)
    )
    assert arrow.embed_response_floats(response.SerializeToString()) == float_row(values)
    assert arrow.dense_row(response) == float_row(values)
    assert arrow.dense_row(response.SerializeToString()) == float_row(values)


def test_embed_response_floats_reads_unpacked_and_split_encodings() -> None:
    # Metadata first, then one float unpacked (wire type 5), then a packed run: a
    # decoder must accept all of these and concatenate them in order.
    metadata = tei_pb2.Metadata(compute_chars=3).SerializeToString()
    data = (
        b"\x12" + bytes([len(metadata)]) + metadata
        + b"\x0d" + struct.pack("<f", 1.0)
        + b"\x0a\x08" + struct.pack("<2f", 2.0, 3.0)
    )  # fmt: skip
    assert tei_pb2.EmbedResponse.FromString(data).embeddings == [1.0, 2.0, 3.0]
    assert arrow.embed_response_floats(data) == float_row([1.0, 2.0, 3.0])
    assert arrow.embed_response_floats(b"") == b""


@pytest.mark.parametrize(
    "data", [b"\x0a\x08\x00\x00", b"\x0a\x03abc", b"\x0a", b"\x0e\x00", b"\x0a\x80"]
)
def test_embed_response_floats_refuses_malformed_bytes(data: bytes) -> None:
    with pytest.raises(ValueError):
        arrow.embed_response_floats(data)


def test_dense_answer_from_worker_replies() -> None:
    rng = random.Random(3)
    replies = [
        tei_pb2.EmbedResponse(embeddings=[rng.random() for _ in range(32)]).SerializeToString()
        for _ in range(3)
    ]
    column = arrow.read_texts(texts_ipc(["a", "b", None, "c"]))
    batch = read_answer(arrow.write_dense(column, [arrow.dense_row(r) for r in replies]))
    expected = [list(tei_pb2.EmbedResponse.FromString(r).embeddings) for r in replies]
    assert batch.column(0).to_pylist() == [expected[0], expected[1], None, expected[2]]


# -- sparse answers --------------------------------------------------------------
def test_sparse_answer_shape_and_values() -> None:
    column = arrow.read_texts(texts_ipc(["a", None, "b", "c"]))
    rows: list[arrow.SparseRow] = [([3, 70000], [0.5, 1.25]), ([], []), ([0], [2.0])]
    batch = read_answer(arrow.write_sparse(column, rows))
    assert batch.schema.names == ["sparse_embeddings", "error"]
    kind = batch.schema.field("sparse_embeddings").type
    assert kind == arrow.SPARSE_TYPE
    assert kind.value_type.field("index").type == pa.uint32()
    assert kind.value_type.field("value").type == pa.float32()
    assert batch.column(0).to_pylist() == [
        [{"index": 3, "value": 0.5}, {"index": 70000, "value": 1.25}],
        None,
        [],
        [{"index": 0, "value": 2.0}],
    ]


def test_sparse_failed_rows_are_null_with_their_reason() -> None:
    column = arrow.read_texts(texts_ipc(["a", "bad", None, "c"]))
    rows: list[arrow.SparseRow | str] = [([3], [0.5]), "input is empty", ([], [])]
    batch = read_answer(arrow.write_sparse(column, rows))
    assert batch.schema.field("sparse_embeddings").type == arrow.SPARSE_TYPE
    assert batch.column(0).to_pylist() == [[{"index": 3, "value": 0.5}], None, None, []]
    assert batch.column(1).to_pylist() == [None, "input is empty", arrow.NULL_TEXT, None]


def test_sparse_row_from_a_reply() -> None:
    reply = tei_pb2.EmbedSparseResponse(
        sparse_embeddings=[tei_pb2.SparseValue(index=i * 11, value=i / 4) for i in range(5)]
    )
    column = arrow.read_texts(texts_ipc(["a"]))
    batch = read_answer(arrow.write_sparse(column, [arrow.sparse_row(reply)]))
    assert batch.column(0).to_pylist() == [[{"index": i * 11, "value": i / 4} for i in range(5)]]


def test_sparse_refuses_rows_that_do_not_fit() -> None:
    column = arrow.read_texts(texts_ipc(["a", "b"]))
    with pytest.raises(ValueError, match="1 sparse embeddings for 2 texts"):
        arrow.write_sparse(column, [([1], [1.0])])
    with pytest.raises(ValueError, match="more indices than values"):
        arrow.write_sparse(column, [([1, 2], [1.0]), ([], [])])


def test_noop_sparse_is_empty_rows_with_nulls_kept() -> None:
    column = arrow.read_texts(texts_ipc(["a", None, "c"]))
    data = arrow.noop_sparse(column)
    batch = read_answer(data)
    assert batch.schema.field("sparse_embeddings").type == arrow.SPARSE_TYPE
    assert batch.column(0).to_pylist() == [[], None, []]
    assert batch.column("error").to_pylist() == [None, arrow.NULL_TEXT, None]
    assert [m.type for m in pa.ipc.MessageReader.open_stream(data)] == ["schema", "record batch"]
