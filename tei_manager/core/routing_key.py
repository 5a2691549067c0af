"""The routing key a request carries in a header, so an L7 proxy can route on it.

A proxy in front of several pools (nginx's ``map``, Envoy, a Gateway API
``HTTPRoute``/``GRPCRoute``) picks the pool from a header without reading bodies;
the manager behind it takes the same header as the request's target:

- ``x-tei-instance``: an instance name (gRPC: ``Target.instance_name``);
- ``x-tei-model``: a model id or ``served_model_name`` (gRPC: ``Target.model_id``).

A header is the target when the request names none itself. When both do, they
must name the same one (the same field on gRPC, the same string on REST), else the
request is refused naming both fields: a client whose proxy route and body
disagree would otherwise be served by a pool it did not mean. The two headers
together are one target given twice, so they are refused too. Pure: the doors
read their headers and translate :class:`~tei_manager.errors.ValidationError`.
"""

from __future__ import annotations

from typing import Final, Literal, TypeVar

from tei_manager.core.routing import TargetChoice
from tei_manager.errors import ValidationError, quote

__all__ = [
    "INSTANCE_HEADER",
    "MAX_KEY_CHARS",
    "MODEL_HEADER",
    "HeaderTarget",
    "grpc_target",
    "rest_target",
]

INSTANCE_HEADER: Final = "x-tei-instance"
MODEL_HEADER: Final = "x-tei-model"
#: The longest header value taken: a model id may be an absolute path, and paths are
#: bounded at 4096 characters everywhere else (config, ``model`` in a body).
MAX_KEY_CHARS: Final = 4096
#: Characters of a client's value shown in an error message.
_SHOWN_CHARS: Final = 64

HeaderTarget = tuple[Literal["instance_name", "model_id"], str]
"""The ``Target`` a header names."""
T = TypeVar("T", bound=TargetChoice)

_FIELDS: Final[dict[str, Literal["instance_name", "model_id"]]] = {
    INSTANCE_HEADER: "instance_name",
    MODEL_HEADER: "model_id",
}


def _shown(value: str | int) -> str:
    if isinstance(value, int):
        return str(value)
    if len(value) > _SHOWN_CHARS:
        return quote(value[:_SHOWN_CHARS]) + f" (+{len(value) - _SHOWN_CHARS} characters)"
    return quote(value)


def _header(instance: str | None, model: str | None) -> tuple[str, str] | None:
    """The header that names the target, and its value; None when neither is given."""
    given = [(h, v) for h, v in ((INSTANCE_HEADER, instance), (MODEL_HEADER, model)) if v]
    if not given:
        return None
    if len(given) == 2:
        raise ValidationError(
            f"{INSTANCE_HEADER}, {MODEL_HEADER}",
            f"both given ({_shown(given[0][1])}, {_shown(given[1][1])}): "
            "they name one target, give one",
        )
    header, value = given[0]
    if len(value) > MAX_KEY_CHARS:
        raise ValidationError(header, f"is {len(value)} characters: use at most {MAX_KEY_CHARS}")
    return header, value


def rest_target(body: str | None, body_field: str, instance: str | None, model: str | None) -> str:
    """The name a REST request is for: ``body`` (its ``model``, or the URL's name,
    called ``body_field`` in errors), else the header's value.

    Every name ``model`` takes (instance, alias, model id) is one string on REST, so
    a header and the body agree when they are equal.
    """
    header = _header(instance, model)
    if header is None:
        if not body:
            raise ValidationError(
                body_field,
                f"is required (or the {INSTANCE_HEADER} or {MODEL_HEADER} header)",
            )
        return body
    name, value = header
    if not body:
        return value
    if body != value:
        raise ValidationError(
            f"{body_field}, {name}",
            f"{body_field} {_shown(body)} and header {name} {_shown(value)} "
            "name different targets: give one, or the same in both",
        )
    return body


def grpc_target(
    target: T | None, instance: str | None, model: str | None
) -> T | HeaderTarget | None:
    """The call's target: the message's ``Target`` if it names one, else the header's.

    ``x-tei-instance`` agrees with ``target.instance_name`` of the same value,
    ``x-tei-model`` with ``target.model_id``; anything else is a disagreement.
    """
    if instance is None and model is None:  # the common case: no header, no work
        return target
    header = _header(instance, model)
    if header is None:
        return target
    name, value = header
    field = _FIELDS[name]
    if target is None:
        return field, value
    kind, given = target
    if kind != field or given != value:
        raise ValidationError(
            f"target.{kind}, {name}",
            f"target.{kind} {_shown(given)} and metadata {name} {_shown(value)} "
            f"name different targets: give one, or {name} equal to target.{field}",
        )
    return target
