"""gRPC's headers: ``grpc-timeout``, ``grpc-status``/``grpc-message``, custom metadata."""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from tei_manager.grpc._hpack import encode_headers
from tei_manager.grpc.rpc import StatusCode

#: Custom metadata: (name, value); values of ``-bin`` names are bytes.
Metadata = Sequence[tuple[str, Any]]

CONTENT_TYPE = "application/grpc+proto"
#: ``:status 200`` and our content type, encoded once.
RESPONSE_HEADERS = encode_headers([(":status", "200"), ("content-type", CONTENT_TYPE)])
#: gRPC's mapping of an HTTP status (a response that is not 200) to a call status.
HTTP_STATUS = {
    "400": StatusCode.INTERNAL,
    "401": StatusCode.UNAUTHENTICATED,
    "403": StatusCode.PERMISSION_DENIED,
    "404": StatusCode.UNIMPLEMENTED,
    "429": StatusCode.UNAVAILABLE,
    "502": StatusCode.UNAVAILABLE,
    "503": StatusCode.UNAVAILABLE,
    "504": StatusCode.UNAVAILABLE,
}

# RFC 9113 §8.2.1 and §8.2.2: a field name is a lowercase token, and the
# connection-specific fields have no place in HTTP/2 (``te`` only as "trailers").
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_CONNECTION_SPECIFIC = frozenset(
    ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade")
)


def invalid_field_name(name: str) -> bool:
    """True when ``name`` (not a pseudo-header) makes a header block malformed:
    empty, uppercase or other characters outside a token, or connection-specific."""
    return _FIELD_NAME.fullmatch(name) is None or name in _CONNECTION_SPECIFIC


_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# grpc-message is percent-encoded: printable ASCII other than "%" stays as it is.
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def format_timeout(seconds: float) -> str:
    """A ``grpc-timeout`` value: at most 8 digits, rounded up so it never reads zero."""
    for scale, unit in ((1e6, "u"), (1e3, "m"), (1.0, "S"), (1 / 60, "M")):
        value = max(1, math.ceil(seconds * scale))
        if value < 10**8:
            return f"{value}{unit}"
    return f"{min(10**8 - 1, math.ceil(seconds / 3600))}H"


def parse_timeout(text: str) -> float | None:
    """Seconds from a ``grpc-timeout`` value; None when it is malformed."""
    scale = _TIMEOUT_UNITS.get(text[-1:])
    digits = text[:-1]
    if scale is None or not 0 < len(digits) <= 8 or not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits) * scale


def incoming_metadata(name: str, value: str) -> tuple[str, Any]:
    if not name.endswith("-bin"):
        return name, value
    # Several binary values may share one header, comma-separated, padding optional.
    return name, b"".join(
        base64.b64decode(part + "=" * (-len(part) % 4)) for part in value.split(",")
    )


def outgoing_metadata(metadata: Metadata) -> list[tuple[str, str]]:
    headers = []
    for name, value in metadata:
        if name.startswith("grpc-"):
            raise ValueError(f"metadata name {name!r}: the grpc- prefix is reserved")
        if name.endswith("-bin"):
            value = base64.b64encode(value).rstrip(b"=").decode()
        elif not isinstance(value, str):
            raise ValueError(f"metadata {name!r} has a binary value but no -bin suffix")
        headers.append((name, value))
    return headers


#: The longest ``grpc-message`` we send (in characters, before percent-encoding):
#: a status message says why, it is not a channel for data.
MAX_STATUS_MESSAGE_CHARS = 1024


def status_headers(status: int, message: str) -> list[tuple[str, str]]:
    headers = [("grpc-status", str(status))]
    if message:
        if len(message) > MAX_STATUS_MESSAGE_CHARS:
            message = message[: MAX_STATUS_MESSAGE_CHARS - 3] + "..."
        if not (message.isascii() and message.isprintable()) or "%" in message:
            message = quote(message, safe=_MESSAGE_SAFE)
        headers.append(("grpc-message", message))
    return headers
