"""HPACK (RFC 7541) for our HTTP/2 layer: a stateless encoder and a caching decoder.

Encoding never touches the dynamic table: a header is a static-table index when
name and value match an entry, else a literal without indexing (static name index or
literal name, no Huffman). That is valid HPACK whatever the peer's table size, and it
makes a header's encoding a pure function of the header, so encodings are cached and
constant header blocks cost a dictionary lookup. The first block of a connection
starts with a dynamic table size update to 0 (see ``H2Connection``), which keeps us
clear of the rules for shrinking the peer's table.

Decoding must follow the peer's dynamic table (grpcio indexes and Huffman-codes), so
the ``hpack`` package's ``Decoder`` decodes any block that uses the table. A block that
does not (what our own encoder sends) is decoded here, representation by
representation through a cache, leaving the ``Decoder``'s state as it was.
"""

from __future__ import annotations

from collections.abc import Iterable

import hpack  # type: ignore[import-untyped]
from hpack.huffman_table import decode_huffman  # type: ignore[import-untyped]
from hpack.table import HeaderTable  # type: ignore[import-untyped]

Header = tuple[str, str]

_STATIC: tuple[Header, ...] = tuple(
    (name.decode(), value.decode()) for name, value in HeaderTable.STATIC_TABLE
)
_STATIC_SIZE = len(_STATIC)
# RFC 9113 §6.5.2: a header's size in a header list is its name, its value and 32.
_STATIC_ENTRY_SIZES = tuple(len(name) + len(value) + 32 for name, value in _STATIC)
_FULL_INDEX: dict[Header, int] = {}
_NAME_INDEX: dict[str, int] = {}
for _index, (_name, _value) in enumerate(_STATIC, start=1):
    _FULL_INDEX.setdefault((_name, _value), _index)
    _NAME_INDEX.setdefault(_name, _index)

#: Headers whose values change from call to call: caching them would only churn.
_VOLATILE = frozenset({"grpc-timeout", "grpc-message"})
_CACHE_LIMIT = 4096


class HeaderDecodeError(Exception):
    """A header block that cannot be decoded (the connection is beyond repair)."""


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """``value`` as an HPACK integer with ``first``'s high bits in the prefix octet."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    return _integer(len(data), 7, 0) + data


def encode_header(name: str, value: str) -> bytes:
    """One header field, encoded without touching the dynamic table."""
    index = _FULL_INDEX.get((name, value))
    if index is not None:
        return _integer(index, 7, 0x80)
    raw = value.encode()
    index = _NAME_INDEX.get(name)
    if index is not None:
        return _integer(index, 4, 0) + _string(raw)
    return b"\x00" + _string(name.encode()) + _string(raw)


_encoded: dict[Header, bytes] = {}


def encode_headers(headers: Iterable[Header]) -> bytes:
    """A header block for ``headers``; constant headers come from a cache."""
    parts = []
    cache = _encoded
    for header in headers:
        data = cache.get(header)
        if data is None:
            data = encode_header(*header)
            if header[0] not in _VOLATILE and len(cache) < _CACHE_LIMIT:
                cache[header] = data
        parts.append(data)
    return b"".join(parts)


def _read_integer(data: bytes, pos: int, mask: int) -> tuple[int, int]:
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        octet = data[pos]
        pos += 1
        value += (octet & 0x7F) << shift
        if not octet & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise HeaderDecodeError("HPACK integer too large")


def _read_string(data: bytes, pos: int) -> tuple[bytes, int]:
    huffman = data[pos] & 0x80
    length, pos = _read_integer(data, pos, 0x7F)
    end = pos + length
    if end > len(data):
        raise HeaderDecodeError("truncated header block")
    raw = data[pos:end]
    return (decode_huffman(raw) if huffman else raw), end


class HeaderDecoder:
    """Decodes the header blocks of one connection."""

    def __init__(self, max_block_list_size: int) -> None:
        # The Decoder stops half-way through a block over this size, leaving its
        # state unusable: it is a guard against HPACK bombs, set above the limit
        # that refuses a single stream.
        self._decoder = hpack.Decoder(max_header_list_size=max_block_list_size)
        self._literals: dict[bytes, tuple[Header, int]] = {}

    def decode(self, block: bytes) -> tuple[list[Header], int]:
        """The block's headers, in order, as text, and the header list's size."""
        try:
            decoded = self._decode_stateless(block)
            if decoded is not None:
                return decoded
            raw = self._decoder.decode(block, raw=True)
            headers = [(name.decode(), value.decode()) for name, value in raw]
            return headers, sum(len(name) + len(value) + 32 for name, value in headers)
        except (hpack.HPACKError, IndexError, UnicodeDecodeError) as error:
            raise HeaderDecodeError(f"cannot decode a header block: {error}") from None

    def _decode_stateless(self, block: bytes) -> tuple[list[Header], int] | None:
        """As ``decode``, or None when the block uses or changes the dynamic table."""
        headers: list[Header] = []
        size = 0
        literals = self._literals
        pos = 0
        end = len(block)
        while pos < end:
            octet = block[pos]
            if octet & 0x80:
                index = octet & 0x7F
                if not 0 < index <= _STATIC_SIZE:
                    return None  # the dynamic table (or an index the Decoder will reject)
                headers.append(_STATIC[index - 1])
                size += _STATIC_ENTRY_SIZES[index - 1]
                pos += 1
                continue
            if octet & 0x60:
                return None  # incremental indexing or a table size update
            # Literal without indexing / never indexed: 4-bit name index, then strings.
            start = pos
            index, pos = _read_integer(block, pos, 0x0F)
            if index > _STATIC_SIZE:
                return None  # a name from the dynamic table
            if index == 0:
                name_length, pos = _read_integer(block, pos, 0x7F)
                pos += name_length
            value_length, pos = _read_integer(block, pos, 0x7F)
            pos += value_length
            if pos > end:
                raise HeaderDecodeError("truncated header block")
            representation = block[start:pos]
            entry = literals.get(representation)
            if entry is None:
                header = self._literal(representation)
                entry = header, len(header[0]) + len(header[1]) + 32
                if len(literals) < _CACHE_LIMIT:
                    literals[representation] = entry
            headers.append(entry[0])
            size += entry[1]
        return headers, size

    @staticmethod
    def _literal(data: bytes) -> Header:
        index, pos = _read_integer(data, 0, 0x0F)
        if index:
            name = _STATIC[index - 1][0]
        else:
            raw_name, pos = _read_string(data, pos)
            name = raw_name.decode()
        value, _ = _read_string(data, pos)
        return name, value.decode()
