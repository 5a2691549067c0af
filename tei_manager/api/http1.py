"""A strict, sans-IO reader of HTTP/1.1 request heads, and the answer's bytes.

The REST port's lean front (:mod:`tei_manager.api.front`) serves the inference
routes itself, and h11 cost it about as much CPU per request as the rest of the
front together: an event object per message part, a state machine per call, every
header normalised and validated again on the way out. The front needs much less:
the requests it serves are small JSON POSTs and GETs that every client sends the
same plain way. So this module reads only that plain shape, and calls *everything
else* "not mine": the front then hands the connection, with every byte read, to
Hypercorn (h11), whose full rules answer it. What this module accepts, h11 accepts
too, and reads the same way; ``tests/test_api_http1.py`` checks that against h11
on well-formed, hostile and random heads. A head is "plain" when:

- it ends with an empty line, every line ended by CRLF (a bare LF is h11's);
- its request line is ``GET`` or ``POST``, an origin-form target (``/`` then
  visible ASCII), and ``HTTP/1.1`` or ``HTTP/1.0``, separated by single spaces;
- every header line is a token, a colon, and a value of visible characters (obs-text
  included) with optional blanks around it; no line folding (obs-fold);
- at most one ``Host``, and HTTP/1.1 has one (RFC 9112 §3.2);
- the body, if any, is framed by one ``Content-Length`` of at most 18 digits, and
  there is no ``Transfer-Encoding`` (chunked bodies go to Hypercorn: that framing,
  and what a smuggler does with two of them, is h11's to judge);
- no ``Upgrade`` (h2c, WebSocket).

A head that is too large is the front's to refuse (431) before this module sees it.
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Final, NamedTuple

__all__ = ["CONTINUE", "Head", "encode_answer", "head_end", "parse_head"]

#: The interim answer to ``Expect: 100-continue``.
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

# RFC 9110 §5.6.2 token; §5.5 field value (visible ASCII and obs-text, inner blanks).
_REQUEST_LINE: Final = re.compile(rb"(GET|POST) (/[\x21-\x7e]*) HTTP/1\.([01])")
_FIELD: Final = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*"
    rb"((?:[\x21-\x7e\x80-\xff](?:[ \t\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?)[ \t]*"
)
_LENGTH: Final = re.compile(rb"[0-9]{1,18}")
_TOKENS: Final = re.compile(rb"[ \t]*,[ \t]*")
_NAME: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")


class Head(NamedTuple):
    """A plain request head (see the module docstring)."""

    method: str  # "GET" or "POST"
    target: bytes  # origin-form, query included
    headers: list[tuple[bytes, bytes]]  # names lower-cased, values stripped, in order
    length: int  # the body's Content-Length; 0 without one
    keep_alive: bool  # HTTP/1.1 without ``Connection: close``
    expects_continue: bool  # ``Expect: 100-continue``


def head_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """Where the head in ``buffer`` ends (the index past its empty line), or -1 if not yet.

    ``start`` is how far an earlier call looked: a head read a byte at a time is
    scanned once, not once per byte. An empty line as h11 finds one (``\\n\\r?\\n``,
    bare LFs included) ends the head, so that a head with bare LFs goes to Hypercorn
    at once instead of waiting for a CRLF that never comes; :func:`parse_head` then
    calls it not plain.
    """
    start = max(0, start - 2)
    crlf = buffer.find(b"\n\r\n", start)
    lf = buffer.find(b"\n\n", start)
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf + 2
    return -1 if crlf < 0 else crlf + 3


def parse_head(head: bytes) -> Head | None:
    """``head`` (up to :func:`head_end`) read, or None when it is not plain."""
    if not head.endswith(b"\r\n\r\n"):
        return None
    lines = head[:-4].split(b"\r\n")
    line = _REQUEST_LINE.fullmatch(lines[0])
    if line is None:
        return None
    http11 = line[3] == b"1"
    headers: list[tuple[bytes, bytes]] = []
    length: bytes | None = None
    hosts = 0
    keep_alive = http11
    expects_continue = False
    for raw in lines[1:]:
        field = _FIELD.fullmatch(raw)
        if field is None:
            return None  # a malformed line, a bare CR or LF, or obs-fold
        name = field[1].lower()
        value = field[2]
        if name == b"content-length":
            if length is not None or _LENGTH.fullmatch(value) is None:
                return None
            length = value
        elif name == b"transfer-encoding" or name == b"upgrade":
            return None
        elif name == b"host":
            hosts += 1
        elif name == b"connection":
            if b"close" in _TOKENS.split(value.lower()):
                keep_alive = False
        elif name == b"expect":  # as h11 reads it: a token of a comma list, HTTP/1.1 only
            expects_continue |= http11 and b"100-continue" in _TOKENS.split(value.lower())
        headers.append((name, value))
    if hosts > 1 or (http11 and hosts == 0):
        return None
    return Head(
        line[1].decode("ascii"),
        line[2],
        headers,
        0 if length is None else int(length),
        keep_alive,
        expects_continue,
    )


_REASONS: Final = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


class _Clock:
    """The ``Date`` header, formatted once a second (as nginx does), not per answer."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode("ascii")
        return self._value


_CLOCK: Final = _Clock()


def encode_answer(
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    *,
    date: bool = True,
    server: bytes | None = None,
    close: bool = False,
) -> bytes:
    """A whole answer, head and body, for one socket write.

    ``headers`` are the answer's own (names lower-cased) beyond ``Content-Length``,
    ``Date``, ``Server`` and ``Connection``, which this adds. A header whose name is
    not a token or whose value holds CR, LF or NUL is left out: an answer never
    carries a line a value could split.
    """
    out = [
        b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\n" % (status, _REASONS.get(status, b""), len(body))
    ]
    for name, value in headers:
        if b"\r" in value or b"\n" in value or b"\0" in value or not _NAME.fullmatch(name):
            continue
        out.append(b"%s: %s\r\n" % (name, value))
    if date:
        out.append(b"date: %s\r\n" % _CLOCK.date())
    if server is not None:
        out.append(b"server: %s\r\n" % server)
    if close:
        out.append(b"connection: close\r\n")
    out.append(b"\r\n")
    out.append(body)
    return b"".join(out)
