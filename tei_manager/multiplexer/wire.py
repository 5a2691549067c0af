"""Just enough protobuf to relay a wrapped request without decoding it.

Every ``tei_multiplexer.v1`` request is ``{1: Target, 2: tei.v1 request}``. The
multiplexer needs the target and the inner request's bytes, which it forwards to
the instance as they are: decoding and re-encoding the inner message would only
cost time. Protobuf merges repeated occurrences of a message field, so the
occurrences of field 1 (and of field 2) are concatenated, which is exactly how the
official decoders read such input.
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = ["Target", "WireError", "parse_target", "split_request"]

TargetKind = Literal["instance_name", "model_id", "instance_index"]
Target = tuple[TargetKind, str | int]
"""What a request's ``Target`` names: ``("instance_name", "a")``, ``("instance_index", 2)``…"""

_VARINT: Final = 0
_I64: Final = 1
_LEN: Final = 2
_I32: Final = 5


class WireError(ValueError):
    """The bytes are not a valid encoding of the expected message."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    end = len(data)
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise WireError("varint is too long")


def _skip(data: bytes, pos: int, wire_type: int) -> int:
    if wire_type == _VARINT:
        return _varint(data, pos)[1]
    if wire_type == _LEN:
        length, pos = _varint(data, pos)
        pos += length
    elif wire_type == _I64:
        pos += 8
    elif wire_type == _I32:
        pos += 4
    else:
        raise WireError(f"unsupported wire type {wire_type}")
    if pos > len(data):
        raise WireError("truncated field")
    return pos


def split_request(data: bytes) -> tuple[bytes | None, bytes]:
    """A wrapper message's ``target`` bytes (None when absent) and inner request bytes."""
    pos = 0
    end = len(data)
    target: bytes | None = None
    inner = b""
    while pos < end:
        key = data[pos]
        if key == 0x0A or key == 0x12:  # field 1 or 2, length-delimited, one-byte key
            length = data[pos + 1] if pos + 1 < end else 0x80
            if length < 0x80:  # a one-byte length: the target's, a small request's
                start = pos + 2
            else:
                length, start = _varint(data, pos + 1)
            pos = start + length
            if pos > end:
                raise WireError("truncated field")
            if key == 0x0A:
                value = data[start:pos]
                target = value if target is None else target + value
            elif inner:
                inner += data[start:pos]
            else:
                inner = data[start:pos]
            continue
        tag, pos = _varint(data, pos)
        field, wire_type = tag >> 3, tag & 7
        if field in (1, 2) or field == 0:
            raise WireError(f"field {field} has the wrong wire type {wire_type}")
        pos = _skip(data, pos, wire_type)  # an unknown field: protobuf ignores it
    return target, inner


def parse_target(data: bytes) -> Target | None:
    """The routing choice in a ``Target`` message; None when no member is set.

    The members form a ``oneof``: the last one on the wire wins.
    """
    pos = 0
    end = len(data)
    found: Target | None = None
    while pos < end:
        tag = data[pos]
        if tag < 0x80:  # one-byte tags and lengths read inline: the usual target
            pos += 1
        else:
            tag, pos = _varint(data, pos)
        field, wire_type = tag >> 3, tag & 7
        if field in (1, 2) and wire_type == _LEN:
            length = data[pos] if pos < end else 0x80
            if length < 0x80:
                pos += 1
            else:
                length, pos = _varint(data, pos)
            stop = pos + length
            if stop > end:
                raise WireError("truncated field")
            try:
                text = data[pos:stop].decode()
            except UnicodeDecodeError:
                name = "instance_name" if field == 1 else "model_id"
                raise WireError(f"target.{name} is not valid UTF-8") from None
            found = ("instance_name" if field == 1 else "model_id", text)
            pos = stop
        elif field == 3 and wire_type == _VARINT:
            value, pos = _varint(data, pos)
            found = ("instance_index", value & 0xFFFFFFFF)  # uint32 keeps the low 32 bits
        elif field in (1, 2, 3) or field == 0:
            raise WireError(f"target field {field} has the wrong wire type {wire_type}")
        else:
            pos = _skip(data, pos, wire_type)
    return found
