"""The wrapped request's wire scan against protobuf's own decoder.

``split_request`` and ``parse_target`` read one-byte tags and lengths inline and
fall back to the general varint reader otherwise; both paths must read what the
official decoder reads, and refuse what it refuses.
"""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from tei_manager._proto.tei.v1 import tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_pb2
from tei_manager.multiplexer.wire import WireError, parse_target, split_request

mux = multiplexer_pb2


def _expected(data: bytes) -> tuple[tuple[str, str | int] | None, bytes]:
    """What protobuf makes of ``data``: the target's routing choice and the inner request."""
    request = mux.EncodeRequest.FromString(data)
    routing = request.target.WhichOneof("routing") if request.HasField("target") else None
    target = None if routing is None else (routing, getattr(request.target, routing))
    return target, request.request.SerializeToString()


def _scan(data: bytes) -> tuple[tuple[str, str | int] | None, bytes]:
    target_bytes, inner = split_request(data)
    return (None if target_bytes is None else parse_target(target_bytes)), inner


targets = st.one_of(
    st.none(),
    st.builds(lambda name: mux.Target(instance_name=name), st.text(max_size=300)),
    st.builds(lambda model: mux.Target(model_id=model), st.text(max_size=300)),
    st.builds(lambda index: mux.Target(instance_index=index), st.integers(0, 2**32 - 1)),
)


@settings(max_examples=300, deadline=None)
@given(target=targets, text=st.text(max_size=400), extra=st.binary(max_size=8))
def test_the_scan_reads_what_protobuf_reads(
    target: multiplexer_pb2.Target | None, text: str, extra: bytes
) -> None:
    # Lengths under and over 127 bytes take the inline and the varint path.
    request = mux.EncodeRequest(request=tei_pb2.EncodeRequest(inputs=text))
    if target is not None:
        request.target.CopyFrom(target)
    data = request.SerializeToString()
    assert _scan(data) == _expected(data)
    # Repeated occurrences merge, the last routing member winning, as protobuf does.
    doubled = data + mux.EncodeRequest(target=mux.Target(model_id=text)).SerializeToString()
    assert _scan(doubled) == _expected(doubled)
    # Bytes cut anywhere: both refuse, or both read the same.
    cut = (data + extra)[: max(0, len(data) - len(extra))]
    try:
        expected = _expected(cut)
    except DecodeError:
        with pytest.raises(WireError):
            _scan(cut)
    else:
        assert _scan(cut) == expected


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 20_000])
@pytest.mark.parametrize("member", ["instance_name", "model_id"])
def test_lengths_of_one_byte_and_more(member: str, size: int) -> None:
    # 127 is the longest one-byte length (read inline), 128 the shortest of two.
    data = mux.EncodeRequest(
        target=mux.Target(**{member: "n" * size}),
        request=tei_pb2.EncodeRequest(inputs="t" * size),
    ).SerializeToString()
    assert _scan(data) == _expected(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a",  # a target key and nothing after it
        b"\x12",  # likewise the inner request
        b"\x0a\x05ab",  # a target shorter than its length
        b"\x0a\x80",  # a length whose varint never ends
        b"\x0a\x02\x0a",  # a target name key with no length
        b"\x0a\x03\x0a\x05a",  # a target name shorter than its length
    ],
)
def test_truncated_requests_are_refused(data: bytes) -> None:
    with pytest.raises(WireError):
        _scan(data)
