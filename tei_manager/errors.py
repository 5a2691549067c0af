"""One error hierarchy for the whole manager, and the one table that maps it outward.

Every failure the manager reports carries a machine code (``INSTANCE_NOT_FOUND``,
``PORT_CONFLICT``, ...). :data:`ERROR_TABLE` maps each code to the HTTP status the
REST API answers with and the gRPC status the multiplexer answers with, so the two
front doors can never disagree about what a failure means.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import ClassVar, Final, NamedTuple

import msgspec

from tei_manager.grpc.rpc import StatusCode

__all__ = [
    "ERROR_TABLE",
    "ConfigError",
    "ConflictError",
    "ErrorBody",
    "ErrorCode",
    "ErrorMapping",
    "LimitError",
    "NotFoundError",
    "TeiError",
    "ValidationError",
    "error_body",
    "from_msgspec_error",
    "quote",
    "retry_after",
    "rfc3339_utc",
]


class ErrorCode(enum.StrEnum):
    """Machine codes of the REST contract; the string value is what clients see."""

    INVALID_CONFIG = "INVALID_CONFIG"
    INVALID_PORT = "INVALID_PORT"
    INVALID_GPU_ID = "INVALID_GPU_ID"
    INVALID_NAME = "INVALID_NAME"
    INVALID_MODEL_ID = "INVALID_MODEL_ID"
    VALIDATION_ERROR = "VALIDATION_ERROR"
    MALFORMED_JSON = "MALFORMED_JSON"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    FORBIDDEN = "FORBIDDEN"
    INSTANCE_NOT_FOUND = "INSTANCE_NOT_FOUND"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    NOT_FOUND = "NOT_FOUND"
    # Not in the contract's table, which gives 405 no code: a known path, wrong method.
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    INSTANCE_EXISTS = "INSTANCE_EXISTS"
    PORT_CONFLICT = "PORT_CONFLICT"
    ALREADY_RUNNING = "ALREADY_RUNNING"
    NOT_RUNNING = "NOT_RUNNING"
    MODEL_BUSY = "MODEL_BUSY"
    MODEL_IN_USE = "MODEL_IN_USE"
    # A start that fits no device, even by evicting idle on-demand instances.
    INSUFFICIENT_MEMORY = "INSUFFICIENT_MEMORY"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    MAX_INSTANCES_REACHED = "MAX_INSTANCES_REACHED"
    PORT_ALLOCATION_FAILED = "PORT_ALLOCATION_FAILED"
    OVERLOADED = "OVERLOADED"
    BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"
    # A request needs an on-demand instance started and no memory can be made for it.
    CAPACITY_EXHAUSTED = "CAPACITY_EXHAUSTED"
    NOT_READY = "NOT_READY"
    TIMEOUT = "TIMEOUT"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    IO_ERROR = "IO_ERROR"


class ErrorMapping(NamedTuple):
    """How one code leaves the manager: the HTTP status and the gRPC status."""

    http_status: int
    grpc_status: StatusCode


_S = StatusCode
# The HTTP column is the REST contract's table. The gRPC column follows the gRPC
# status guide: ALREADY_EXISTS for "what you asked to create is taken",
# FAILED_PRECONDITION for "not in the state this needs, retrying won't help until
# someone changes it", ABORTED for "busy right now, retry later", and
# RESOURCE_EXHAUSTED for every limit (size, count, ports, load).
ERROR_TABLE: Final[Mapping[ErrorCode, ErrorMapping]] = MappingProxyType(
    {
        ErrorCode.INVALID_CONFIG: ErrorMapping(400, _S.INVALID_ARGUMENT),
        ErrorCode.INVALID_PORT: ErrorMapping(400, _S.INVALID_ARGUMENT),
        ErrorCode.INVALID_GPU_ID: ErrorMapping(400, _S.INVALID_ARGUMENT),
        ErrorCode.INVALID_NAME: ErrorMapping(400, _S.INVALID_ARGUMENT),
        ErrorCode.INVALID_MODEL_ID: ErrorMapping(400, _S.INVALID_ARGUMENT),
        ErrorCode.VALIDATION_ERROR: ErrorMapping(400, _S.INVALID_ARGUMENT),
        ErrorCode.MALFORMED_JSON: ErrorMapping(400, _S.INVALID_ARGUMENT),
        ErrorCode.UNAUTHENTICATED: ErrorMapping(401, _S.UNAUTHENTICATED),
        ErrorCode.FORBIDDEN: ErrorMapping(403, _S.PERMISSION_DENIED),
        ErrorCode.INSTANCE_NOT_FOUND: ErrorMapping(404, _S.NOT_FOUND),
        ErrorCode.MODEL_NOT_FOUND: ErrorMapping(404, _S.NOT_FOUND),
        ErrorCode.NOT_FOUND: ErrorMapping(404, _S.NOT_FOUND),
        ErrorCode.METHOD_NOT_ALLOWED: ErrorMapping(405, _S.UNIMPLEMENTED),
        ErrorCode.INSTANCE_EXISTS: ErrorMapping(409, _S.ALREADY_EXISTS),
        ErrorCode.PORT_CONFLICT: ErrorMapping(409, _S.ALREADY_EXISTS),
        ErrorCode.ALREADY_RUNNING: ErrorMapping(409, _S.FAILED_PRECONDITION),
        ErrorCode.NOT_RUNNING: ErrorMapping(409, _S.FAILED_PRECONDITION),
        ErrorCode.MODEL_BUSY: ErrorMapping(409, _S.ABORTED),
        ErrorCode.MODEL_IN_USE: ErrorMapping(409, _S.FAILED_PRECONDITION),
        ErrorCode.INSUFFICIENT_MEMORY: ErrorMapping(409, _S.RESOURCE_EXHAUSTED),
        ErrorCode.PAYLOAD_TOO_LARGE: ErrorMapping(413, _S.RESOURCE_EXHAUSTED),
        ErrorCode.MAX_INSTANCES_REACHED: ErrorMapping(422, _S.RESOURCE_EXHAUSTED),
        ErrorCode.PORT_ALLOCATION_FAILED: ErrorMapping(422, _S.RESOURCE_EXHAUSTED),
        ErrorCode.OVERLOADED: ErrorMapping(429, _S.RESOURCE_EXHAUSTED),
        ErrorCode.BACKEND_UNAVAILABLE: ErrorMapping(503, _S.UNAVAILABLE),
        ErrorCode.CAPACITY_EXHAUSTED: ErrorMapping(503, _S.RESOURCE_EXHAUSTED),
        ErrorCode.NOT_READY: ErrorMapping(503, _S.UNAVAILABLE),
        ErrorCode.TIMEOUT: ErrorMapping(504, _S.DEADLINE_EXCEEDED),
        ErrorCode.INTERNAL_ERROR: ErrorMapping(500, _S.INTERNAL),
        ErrorCode.IO_ERROR: ErrorMapping(500, _S.INTERNAL),
    }
)


class TeiError(Exception):
    """A failure with a machine code; ``str()`` is the human sentence.

    Subclasses group codes by HTTP status so callers can ``except NotFoundError``;
    each refuses a code from another group, which catches mistakes at the raise site.
    """

    # HTTP status every code of this class must map to; None admits any code.
    _http_status: ClassVar[int | None] = None

    def __init__(self, code: ErrorCode, message: str) -> None:
        code = ErrorCode(code)
        expected = type(self)._http_status
        if expected is not None and ERROR_TABLE[code].http_status != expected:
            raise ValueError(f"{type(self).__name__} cannot carry code {code}")
        super().__init__(message)
        self.code: ErrorCode = code
        self.message: str = message

    @property
    def http_status(self) -> int:
        """HTTP status the REST API answers with."""
        return ERROR_TABLE[self.code].http_status

    @property
    def grpc_status(self) -> StatusCode:
        """gRPC status the multiplexer answers with."""
        return ERROR_TABLE[self.code].grpc_status

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value!r}, {self.message!r})"


class ValidationError(TeiError):
    """Bad input: names the offending ``field`` and the ``rule`` it broke (HTTP 400).

    The message is ``"<field>: <rule>"``, e.g. ``"port: 80 is privileged: use
    1024-65535"``; ``field`` is empty for input that is wrong as a whole.
    """

    _http_status = 400

    def __init__(
        self, field: str, rule: str, *, code: ErrorCode = ErrorCode.VALIDATION_ERROR
    ) -> None:
        super().__init__(code, f"{field}: {rule}" if field else rule)
        self.field: str = field
        self.rule: str = rule

    def at(self, prefix: str) -> ValidationError:
        """The same error with ``prefix`` put before the field (``instances[1]``)."""
        field = f"{prefix}.{self.field}" if self.field else prefix
        return ValidationError(field, self.rule, code=self.code)


class NotFoundError(TeiError):
    """The named thing does not exist (HTTP 404)."""

    _http_status = 404


class ConflictError(TeiError):
    """The request clashes with the current state (HTTP 409)."""

    _http_status = 409


class LimitError(TeiError):
    """A configured limit or an exhausted resource refuses the request (HTTP 422)."""

    _http_status = 422


class ConfigError(TeiError):
    """The manager's configuration is unusable; ``str()`` is one line naming field and rule.

    The CLI prints it and exits with status 2.
    """

    _http_status = 400

    def __init__(self, message: str) -> None:
        # One line, whatever the source: a TOML parser message may carry newlines.
        super().__init__(ErrorCode.INVALID_CONFIG, " ".join(message.splitlines()))

    @classmethod
    def from_validation(cls, error: ValidationError) -> ConfigError:
        """Wrap a field validation error raised while checking the configuration."""
        wrapped = cls(error.message)
        wrapped.__cause__ = error
        return wrapped


# "<message> - at `$.path`": where msgspec says a value was wrong. Non-greedy, so a
# value that itself contains " - at `$" cannot hide the real path at the end.
_MSGSPEC_AT_RE: Final = re.compile(r"^(?P<msg>.*?)(?: - at `\$\.?(?P<path>[^`]*)`)?$", re.DOTALL)
_MSGSPEC_ENUM_RE: Final = re.compile(r"^Invalid enum value '(?P<value>.*)'$", re.DOTALL)
_MSGSPEC_FIELD_RE: Final = re.compile(
    r"^Object (?P<what>contains unknown|missing required) field `(?P<field>[^`]*)`$"
)


def from_msgspec_error(error: msgspec.ValidationError, *, root: str = "body") -> ValidationError:
    """Translate msgspec's typing error into a field name and a rule in our words.

    ``$.instances[0].port`` becomes the field ``instances[0].port``; an error about
    the document as a whole is reported against ``root``.
    """
    m = _MSGSPEC_AT_RE.match(str(error))
    msg, path = (m["msg"], m["path"] or "") if m else (str(error), "")
    f = _MSGSPEC_FIELD_RE.match(msg)
    if f and f["what"] == "contains unknown":
        return ValidationError(path, f"unknown field {quote(f['field'])}")
    if f:
        field = f"{path}.{f['field']}" if path else f["field"]
        return ValidationError(field, "required field is missing")
    enum_value = _MSGSPEC_ENUM_RE.match(msg)
    if enum_value:
        rule = f"{quote(enum_value['value'])} is not allowed"
    else:
        rule = msg.replace("`", "")
        rule = rule[:1].lower() + rule[1:]
    return ValidationError(path or root, rule)


class ErrorBody(msgspec.Struct, frozen=True):
    """The JSON body of every error response."""

    error: str
    code: str
    timestamp: str


def rfc3339_utc(moment: datetime | None = None) -> str:
    """``moment`` (default: now) as RFC 3339 in UTC with a ``Z``, to the second."""
    if moment is None:
        moment = datetime.now(UTC)
    elif moment.tzinfo is None:
        # A naive time inside the manager is always UTC; never guess the local zone.
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def retry_after(seconds: float) -> str:
    """A retry delay as an HTTP ``Retry-After`` value: whole seconds, rounded up and at
    least 1, so a client that waits exactly that long never retries before the delay is
    over (gRPC's ``pushback_ms`` rounds up the same way)."""
    return str(max(1, math.ceil(seconds)))


def quote(text: str) -> str:
    """``text`` in double quotes with JSON escapes, safe inside a one-line message."""
    return msgspec.json.encode(text).decode()


def error_body(error: TeiError, *, now: datetime | None = None) -> ErrorBody:
    """The response body for ``error``, stamped with ``now`` (default: the current time)."""
    return ErrorBody(error=error.message, code=error.code.value, timestamp=rfc3339_utc(now))
