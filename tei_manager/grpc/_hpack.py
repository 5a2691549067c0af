"""HPACK (RFC 7541) for our HTTP/2 layer: a stateless encoder and a caching decoder.

Encoding never touches the dynamic table: a header is a static-table index when
name and value match an entry, else a literal without indexing (static name index or
literal name, no Huffman). That is valid HPACK whatever the peer's table size, and it
makes a header's encoding a pure function of the header, so encodings are cached and
constant header blocks cost a dictionary lookup. The first block of a connection
starts with a dynamic table size update to 0 (see ``H2Connection``), which keeps us
clear of the rules for shrinking the peer's table.

Decoding must follow the peer's dynamic table (grpcio indexes and Huffman-codes):
``HeaderDecoder`` keeps the table and decodes each representation, with the literal
fields (whose Huffman decoding is the slow part) cached by their bytes. Whole blocks
are cached too, while the table stays as it is: a peer's blocks repeat byte for byte
once its table holds what it sends (grpcio's request headers, a server's response
headers and OK trailers), so most blocks cost one lookup. Only the ``hpack``
package's static table and Huffman code are used.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import hpack
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

Header = tuple[str, str]

_STATIC: tuple[Header, ...] = tuple(
    (name.decode(), value.decode()) for name, value in HeaderTable.STATIC_TABLE
)
_STATIC_SIZE = len(_STATIC)
Entry = tuple[Header, int]


def _sized(header: Header) -> Entry:
    """``header`` with its size (RFC 7541 §4.1, RFC 9113 §6.5.2): name, value and 32."""
    return header, len(header[0]) + len(header[1]) + 32


_STATIC_ENTRIES = tuple(_sized(header) for header in _STATIC)
_FULL_INDEX: dict[Header, int] = {}
_NAME_INDEX: dict[str, int] = {}
for _index, (_name, _value) in enumerate(_STATIC, start=1):
    _FULL_INDEX.setdefault((_name, _value), _index)
    _NAME_INDEX.setdefault(_name, _index)

#: Headers whose values change from call to call: caching them would only churn.
_VOLATILE = frozenset({"grpc-timeout", "grpc-message"})
#: The encoder's cache is shared by the process and filled from values a peer may
#: choose (relayed metadata): only small headers, and a bounded number of bytes.
_ENCODE_CACHE_ENTRY_MAX_BYTES = 256
_ENCODE_CACHE_BYTES = 256 * 1024
#: SETTINGS_HEADER_TABLE_SIZE's initial value (RFC 9113 §6.5.2); we never change ours.
DEFAULT_TABLE_SIZE = 4096


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
_encoded_bytes = 0


def encode_headers(headers: Iterable[Header]) -> bytes:
    """A header block for ``headers``; constant headers come from a cache."""
    global _encoded_bytes
    parts = []
    cache = _encoded
    for header in headers:
        data = cache.get(header)
        if data is None:
            data = encode_header(*header)
            size = len(data)
            if (
                size <= _ENCODE_CACHE_ENTRY_MAX_BYTES
                and _encoded_bytes + size <= _ENCODE_CACHE_BYTES
                and header[0] not in _VOLATILE
            ):
                cache[header] = data
                # The header's strings are held too: count them as well.
                _encoded_bytes += 2 * size
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
    """Decodes the header blocks of one connection, following the peer's dynamic table."""

    def __init__(
        self,
        max_block_list_size: int,
        max_table_size: int = DEFAULT_TABLE_SIZE,
        *,
        cache_bytes: int = 64 * 1024,
        cache_entry_max_bytes: int = 512,
    ) -> None:
        # A guard against HPACK bombs, set above the limit that refuses a single stream:
        # a block decoding to more than this fails the connection.
        self._max_block_list_size = max_block_list_size
        # The caches are bounded in bytes (encoded plus decoded), only small entries
        # go in, and once full they take nothing more: a peer sending ever-new large
        # blocks pins at most ``cache_bytes``.
        self._cache_limit = cache_bytes
        self._cache_room = cache_bytes
        self._cache_entry_max = cache_entry_max_bytes
        self._table_limit = max_table_size  # what our SETTINGS allow the peer
        self._table_max = max_table_size  # the size the peer last chose, <= the limit
        self._table: deque[Entry] = deque()  # newest first: index 62 is [0]
        self._table_size = 0
        self._literals: dict[bytes, Entry] = {}
        # Blocks that left the table as it was, by their bytes; emptied when it changes.
        self._blocks: dict[bytes, tuple[list[Header], int]] = {}
        self._blocks_bytes = 0
        self._table_changes = 0

    @property
    def cached_bytes(self) -> int:
        """What the caches hold now, in the bytes they are bounded by."""
        return self._cache_limit - self._cache_room

    def decode(self, block: bytes) -> tuple[list[Header], int]:
        """The block's headers, in order, as text, and the header list's size.

        The list may be shared with later calls for the same bytes: do not change it.
        """
        cached = self._blocks.get(block)
        if cached is not None:
            return cached
        changes = self._table_changes
        try:
            decoded = self._decode(block)
        except (hpack.HPACKError, IndexError, UnicodeDecodeError) as error:
            raise HeaderDecodeError(f"cannot decode a header block: {error}") from None
        if self._table_changes != changes:
            # Cached blocks may index entries that have moved or gone.
            if self._blocks:
                self._cache_room += self._blocks_bytes
                self._blocks_bytes = 0
                self._blocks.clear()
        elif len(block) <= self._cache_entry_max:
            cost = len(block) + decoded[1]
            if cost <= self._cache_room and not any(name in _VOLATILE for name, _ in decoded[0]):
                self._blocks[block] = decoded
                self._blocks_bytes += cost
                self._cache_room -= cost
        return decoded

    def _decode(self, block: bytes) -> tuple[list[Header], int]:
        headers: list[Header] = []
        size = 0
        pos = 0
        end = len(block)
        limit = self._max_block_list_size
        while pos < end:
            octet = block[pos]
            if octet & 0x80:  # indexed field
                if octet == 0xFF:
                    index, pos = _read_integer(block, pos, 0x7F)
                else:
                    index = octet & 0x7F
                    pos += 1
                entry = self._entry(index)
            elif octet & 0x40:  # literal with incremental indexing
                entry, pos = self._literal(block, pos, 0x3F)
                self._insert(entry)
            elif octet & 0x20:  # dynamic table size update
                if headers:
                    raise HeaderDecodeError("a table size update after the first header field")
                new_max, pos = _read_integer(block, pos, 0x1F)
                if new_max > self._table_limit:
                    raise HeaderDecodeError(
                        f"table size update to {new_max} over the limit {self._table_limit}"
                    )
                self._table_max = new_max
                self._evict(new_max)
                self._table_changes += 1
                continue
            else:  # literal without indexing, or never indexed
                entry, pos = self._literal(block, pos, 0x0F)
            headers.append(entry[0])
            size += entry[1]
            if size > limit:
                raise HeaderDecodeError(f"header list over {limit} bytes")
        return headers, size

    def _entry(self, index: int) -> Entry:
        if 0 < index <= _STATIC_SIZE:
            return _STATIC_ENTRIES[index - 1]
        dynamic = index - _STATIC_SIZE - 1
        if index == 0 or dynamic >= len(self._table):
            raise HeaderDecodeError(f"header index {index} is not in the table")
        return self._table[dynamic]

    def _literal(self, block: bytes, pos: int, mask: int) -> tuple[Entry, int]:
        """The literal field at ``pos`` (name index prefix ``mask``), and where it ends.

        A field's text depends on its bytes alone unless its name comes from the dynamic
        table, so decoded fields are cached by their bytes: grpcio sends the same
        literals on every call, and Huffman decoding is the slow part.
        """
        start = pos
        index, pos = _read_integer(block, pos, mask)
        if index > _STATIC_SIZE:  # a name from the dynamic table: not cacheable
            name = self._entry(index)[0][0]
            raw, pos = _read_string(block, pos)
            return _sized((name, raw.decode())), pos
        if index == 0:
            name_length, pos = _read_integer(block, pos, 0x7F)
            pos += name_length
        value_length, pos = _read_integer(block, pos, 0x7F)
        pos += value_length
        if pos > len(block):
            raise HeaderDecodeError("truncated header block")
        representation = block[start:pos]
        entry = self._literals.get(representation)
        if entry is None:
            entry = _sized(_literal_text(representation, mask))
            if len(representation) <= self._cache_entry_max:
                cost = len(representation) + entry[1]
                if cost <= self._cache_room and entry[0][0] not in _VOLATILE:
                    self._literals[representation] = entry
                    self._cache_room -= cost
        return entry, pos

    def _insert(self, entry: Entry) -> None:
        # RFC 7541 §4.4: make room first; an entry larger than the table empties it.
        self._table_changes += 1
        entry_size = entry[1]
        self._evict(self._table_max - entry_size)
        if entry_size <= self._table_max:
            self._table.appendleft(entry)
            self._table_size += entry_size

    def _evict(self, keep: int) -> None:
        """Drop the oldest entries until the table holds at most ``keep`` bytes."""
        while self._table and self._table_size > keep:
            self._table_size -= self._table.pop()[1]


def _literal_text(data: bytes, mask: int) -> Header:
    index, pos = _read_integer(data, 0, mask)
    if index:
        name = _STATIC[index - 1][0]
    else:
        raw_name, pos = _read_string(data, pos)
        name = raw_name.decode()
    value, _ = _read_string(data, pos)
    return name, value.decode()
