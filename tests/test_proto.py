"""The committed generated code is fresh, and the protocol matches the wire contract."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from tei_manager._proto.tei.v1 import tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "_proto"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    committed = ROOT / "tei_manager" / "_proto"
    fresh = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    current = sorted(
        p.relative_to(committed)
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh == current, "run: python scripts/gen_proto.py"
    stale = [str(p) for p in fresh if not filecmp.cmp(out / p, committed / p, shallow=False)]
    assert not stale, f"stale generated files {stale}: run python scripts/gen_proto.py"


T = FieldDescriptor
# (message, field number, name, type, label) from wire-contract.md; "opt" = proto3 optional.
TEI_FIELDS = """
InfoResponse 1 version string; 2 sha string opt; 3 docker_label string opt; 4 model_id string;
 5 model_sha string opt; 6 model_dtype string; 7 model_type enum; 8 max_concurrent_requests uint32;
 9 max_input_length uint32; 10 max_batch_tokens uint32; 11 max_batch_requests uint32 opt;
 12 max_client_batch_size uint32; 13 tokenization_workers uint32
Metadata 1 compute_chars uint32; 2 compute_tokens uint32; 3 total_time_ns uint64;
 4 tokenization_time_ns uint64; 5 queue_time_ns uint64; 6 inference_time_ns uint64
EmbedRequest 1 inputs string; 2 truncate bool; 3 normalize bool opt; 4 truncation_direction enum;
 5 prompt_name string opt; 6 dimensions uint32 opt
EmbedResponse 1 embeddings float rep; 2 metadata message
EmbedSparseRequest 1 inputs string; 2 truncate bool; 3 truncation_direction enum;
 4 prompt_name string opt
SparseValue 1 index uint32; 2 value float
EmbedSparseResponse 1 sparse_embeddings message rep; 2 metadata message
EmbedAllRequest 1 inputs string; 2 truncate bool; 3 truncation_direction enum;
 4 prompt_name string opt
TokenEmbedding 1 embeddings float rep
EmbedAllResponse 1 token_embeddings message rep; 2 metadata message
PredictRequest 1 inputs string; 2 truncate bool; 3 raw_scores bool; 4 truncation_direction enum
PredictPairRequest 1 inputs string rep; 2 truncate bool; 3 raw_scores bool;
 4 truncation_direction enum
Prediction 1 score float; 2 label string
PredictResponse 1 predictions message rep; 2 metadata message
RerankRequest 1 query string; 2 texts string rep; 3 truncate bool; 4 raw_scores bool;
 5 return_text bool; 6 truncation_direction enum
RerankStreamRequest 1 query string; 2 text string; 3 truncate bool; 4 raw_scores bool;
 5 return_text bool; 6 truncation_direction enum
Rank 1 index uint32; 2 text string opt; 3 score float
RerankResponse 1 ranks message rep; 2 metadata message
EncodeRequest 1 inputs string; 2 add_special_tokens bool; 3 prompt_name string opt
SimpleToken 1 id uint32; 2 text string; 3 special bool; 4 start uint32 opt; 5 stop uint32 opt
EncodeResponse 1 tokens message rep
DecodeRequest 1 ids uint32 rep; 2 skip_special_tokens bool
DecodeResponse 1 text string
"""
TYPES = {
    "string": T.TYPE_STRING,
    "bool": T.TYPE_BOOL,
    "uint32": T.TYPE_UINT32,
    "uint64": T.TYPE_UINT64,
    "float": T.TYPE_FLOAT,
    "enum": T.TYPE_ENUM,
    "message": T.TYPE_MESSAGE,
    "bytes": T.TYPE_BYTES,
}


def _contract(text: str) -> list[tuple[str, int, str, str, set[str]]]:
    rows = []
    for block in text.replace("\n ", " ").strip().splitlines():
        message, _, fields = block.partition(" ")
        for field in fields.split(";"):
            number, name, kind, *flags = field.split()
            rows.append((message, int(number), name, kind, set(flags)))
    return rows


@pytest.mark.parametrize("row", _contract(TEI_FIELDS), ids=lambda r: f"{r[0]}.{r[2]}")
def test_tei_field_matches_contract(row: tuple[str, int, str, str, set[str]]) -> None:
    message, number, name, kind, flags = row
    field = tei_pb2.DESCRIPTOR.message_types_by_name[message].fields_by_number[number]
    assert field.name == name
    assert field.type == TYPES[kind]
    assert field.is_repeated == ("rep" in flags)
    assert field.has_presence == ("opt" in flags or (kind == "message" and "rep" not in flags))


def test_services_and_shapes_match_contract() -> None:
    tei = {s.name: s for s in tei_pb2.DESCRIPTOR.services_by_name.values()}
    shapes = {
        (s, m.name): (m.client_streaming, m.server_streaming, m.input_type.name, m.output_type.name)
        for s, svc in tei.items()
        for m in svc.methods
    }
    assert len(shapes) == 17
    assert shapes[("Rerank", "RerankStream")] == (
        True,
        False,
        "RerankStreamRequest",
        "RerankResponse",
    )
    assert shapes[("Tokenize", "Tokenize")] == (False, False, "EncodeRequest", "EncodeResponse")
    assert shapes[("Embed", "EmbedStream")] == (True, True, "EmbedRequest", "EmbedResponse")
    assert tei_pb2.DESCRIPTOR.package == "tei.v1"

    mux = multiplexer_pb2.DESCRIPTOR.services_by_name["TeiMultiplexer"]
    assert multiplexer_pb2.DESCRIPTOR.package == "tei_multiplexer.v1"
    methods = {m.name: m for m in mux.methods}
    assert methods["RerankStream"].client_streaming and not methods["RerankStream"].server_streaming
    assert methods["EmbedArrow"].output_type.full_name == "tei_multiplexer.v1.EmbedArrowResponse"
    assert methods["Embed"].output_type.full_name == "tei.v1.EmbedResponse"
    target = multiplexer_pb2.Target.DESCRIPTOR
    assert [(f.number, f.name) for f in target.oneofs_by_name["routing"].fields] == [
        (1, "instance_name"),
        (2, "model_id"),
        (3, "instance_index"),
    ]
    arrow = multiplexer_pb2.EmbedArrowRequest.DESCRIPTOR
    assert [(f.number, f.name) for f in arrow.fields] == [
        (1, "target"),
        (2, "arrow_ipc"),
        (3, "truncate"),
        (4, "normalize"),
        (5, "noop"),
        (6, "truncation_direction"),
        (7, "prompt_name"),
        (8, "dimensions"),
        (9, "compression"),
        (10, "output_dtype"),
    ]
    optional = {f.name for f in arrow.fields if f.has_presence and f.message_type is None}
    assert optional == {"prompt_name", "dimensions"}
    assert arrow.fields_by_name["dimensions"].type == FieldDescriptor.TYPE_UINT32
    assert (
        arrow.fields_by_name["truncation_direction"].enum_type.full_name
        == "tei.v1.TruncationDirection"
    )
    sparse = multiplexer_pb2.EmbedSparseArrowRequest.DESCRIPTOR
    assert [(f.number, f.name) for f in sparse.fields] == [
        (1, "target"),
        (2, "arrow_ipc"),
        (3, "truncate"),
        (4, "noop"),
        (5, "truncation_direction"),
        (6, "prompt_name"),
        (7, "compression"),
    ]
    assert sparse.fields_by_name["prompt_name"].has_presence
    assert sparse.fields_by_name["compression"].enum_type.full_name == (
        "tei_multiplexer.v1.ArrowCompression"
    )
    enums = multiplexer_pb2.DESCRIPTOR.enum_types_by_name
    assert [(v.name, v.number) for v in enums["ArrowCompression"].values] == [
        ("ARROW_COMPRESSION_NONE", 0),
        ("ARROW_COMPRESSION_LZ4", 1),
    ]
    assert [(v.name, v.number) for v in enums["OutputDtype"].values] == [
        ("OUTPUT_DTYPE_UNSPECIFIED", 0),
        ("OUTPUT_DTYPE_F32", 1),
        ("OUTPUT_DTYPE_F16", 2),
    ]
    stream = methods["EmbedArrowStream"]
    assert stream.client_streaming and stream.server_streaming
    assert stream.input_type.full_name == "tei_multiplexer.v1.EmbedArrowRequest"
    assert stream.output_type.full_name == "tei_multiplexer.v1.EmbedArrowResponse"
    assert len(methods) == 20
    for wrapper in ("EmbedRequest", "PredictPairRequest", "RerankStreamRequest", "DecodeRequest"):
        fields = multiplexer_pb2.DESCRIPTOR.message_types_by_name[wrapper].fields_by_number
        assert fields[1].message_type.full_name == "tei_multiplexer.v1.Target"
        assert fields[2].message_type.full_name == f"tei.v1.{wrapper}"
