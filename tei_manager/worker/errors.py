"""Errors the worker's engine raises, each with the kind the gRPC layer maps to a status."""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """Why a request failed; the servicer turns each kind into one gRPC status."""

    VALIDATION = "validation"  # INVALID_ARGUMENT: the request itself is wrong
    OVERLOADED = "overloaded"  # RESOURCE_EXHAUSTED: too many requests in the engine
    UNSUPPORTED = "unsupported"  # the loaded model cannot do this operation
    BACKEND = "backend"  # INTERNAL: inference itself failed


class EngineError(Exception):
    """A request the engine refused or could not complete; ``message`` is for the client."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __repr__(self) -> str:
        return f"EngineError({self.kind.name}, {self.message!r})"


def validation(message: str) -> EngineError:
    """A VALIDATION error: the client sent something the limits or the model reject."""
    return EngineError(ErrorKind.VALIDATION, message)


def unsupported(message: str) -> EngineError:
    """An UNSUPPORTED error: the operation does not exist for this kind of model."""
    return EngineError(ErrorKind.UNSUPPORTED, message)


class ModelLoadError(Exception):
    """The model could not be resolved or loaded; the message says which and why."""
