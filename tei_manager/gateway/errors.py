"""Inference failures, in one vocabulary every front door maps to its own shape.

OpenAI's door answers ``{"error": {message, type, param, code}}``, TEI's door
``{"error", "error_type"}`` with TEI's statuses, gRPC a status code: each has a
table from :class:`Kind`. Routing errors (:class:`~tei_manager.errors.TeiError`)
and the instance's gRPC statuses are translated here, where they enter.
"""

from __future__ import annotations

import enum
from typing import Final

from tei_manager.errors import ErrorCode, TeiError
from tei_manager.grpc.rpc import GrpcError, StatusCode

__all__ = ["InferenceError", "Kind", "from_instance", "from_routing"]


class Kind(enum.StrEnum):
    """What went wrong, as a client should read it."""

    VALIDATION = "validation"  # a bad field, input over a limit
    EMPTY = "empty"  # no input at all
    TOO_LARGE = "too_large"  # the request body is over the limit
    NOT_FOUND = "not_found"  # no instance, alias or model of that name
    UNSUPPORTED = "unsupported"  # the model cannot do this (rerank on an embedder)
    OVERLOADED = "overloaded"  # admission refused it: retry after ``retry_after``
    UNAVAILABLE = "unavailable"  # the instance is not running or cannot be reached
    TIMEOUT = "timeout"  # no answer in time
    BACKEND = "backend"  # the instance failed


class InferenceError(Exception):
    """An inference request failed; ``message`` is safe to show the client."""

    def __init__(
        self,
        kind: Kind,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.retry_after = retry_after

    @property
    def code(self) -> ErrorCode:
        """The manager's machine code for this failure."""
        return _CODES[self.kind]

    def __repr__(self) -> str:
        return f"InferenceError({self.kind.value!r}, {self.message!r})"


_CODES: Final = {
    Kind.VALIDATION: ErrorCode.VALIDATION_ERROR,
    Kind.EMPTY: ErrorCode.VALIDATION_ERROR,
    Kind.TOO_LARGE: ErrorCode.PAYLOAD_TOO_LARGE,
    Kind.NOT_FOUND: ErrorCode.MODEL_NOT_FOUND,
    Kind.UNSUPPORTED: ErrorCode.VALIDATION_ERROR,
    Kind.OVERLOADED: ErrorCode.OVERLOADED,
    Kind.UNAVAILABLE: ErrorCode.BACKEND_UNAVAILABLE,
    Kind.TIMEOUT: ErrorCode.TIMEOUT,
    Kind.BACKEND: ErrorCode.INTERNAL_ERROR,
}

_ROUTING: Final = {
    ErrorCode.INSTANCE_NOT_FOUND: Kind.NOT_FOUND,
    ErrorCode.MODEL_NOT_FOUND: Kind.NOT_FOUND,
    ErrorCode.BACKEND_UNAVAILABLE: Kind.UNAVAILABLE,
    # Models on demand: a start that found no memory, took too long, or came while
    # the manager was not running.
    ErrorCode.CAPACITY_EXHAUSTED: Kind.UNAVAILABLE,
    ErrorCode.NOT_READY: Kind.UNAVAILABLE,
    ErrorCode.TIMEOUT: Kind.TIMEOUT,
}

# TEI's gRPC server: validation and tokenizer errors are INVALID_ARGUMENT, a full
# queue RESOURCE_EXHAUSTED, an operation the model cannot do FAILED_PRECONDITION.
_STATUSES: Final = {
    StatusCode.INVALID_ARGUMENT: Kind.VALIDATION,
    StatusCode.OUT_OF_RANGE: Kind.VALIDATION,
    StatusCode.RESOURCE_EXHAUSTED: Kind.OVERLOADED,
    StatusCode.FAILED_PRECONDITION: Kind.UNSUPPORTED,
    StatusCode.UNIMPLEMENTED: Kind.UNSUPPORTED,
    StatusCode.UNAVAILABLE: Kind.UNAVAILABLE,
    StatusCode.DEADLINE_EXCEEDED: Kind.TIMEOUT,
}


def from_routing(error: TeiError) -> InferenceError:
    """A routing failure (unknown model, instance not running, empty name), or an
    on-demand start that failed."""
    kind = _ROUTING.get(error.code, Kind.VALIDATION)
    param = "model" if kind in (Kind.VALIDATION, Kind.NOT_FOUND) else None
    return InferenceError(kind, error.message, param=param)


def from_instance(error: GrpcError) -> InferenceError:
    """A status from the instance (or from the relay to it), as an inference failure."""
    return InferenceError(_STATUSES.get(error.code, Kind.BACKEND), error.message)
