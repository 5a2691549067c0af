"""The multiplexer's routing key: a call's ``Target``, or its ``x-tei-*`` metadata.

See :mod:`tei_manager.core.routing_key` for the rule. A disagreement is a
:class:`~tei_manager.errors.ValidationError`, which the service answers as
INVALID_ARGUMENT like any routing failure.
"""

from __future__ import annotations

from tei_manager.core.routing_key import INSTANCE_HEADER, MODEL_HEADER, grpc_target
from tei_manager.grpc.channel import Metadata
from tei_manager.multiplexer.wire import Target

__all__ = ["call_target"]


def call_target(target: Target | None, metadata: Metadata) -> Target | None:
    """The target a call goes to: ``target`` (from its message), or its metadata's."""
    instance: str | None = None
    model: str | None = None
    for key, value in metadata:  # a repeated key: the first value counts
        if key == INSTANCE_HEADER:
            instance = value if instance is None else instance
        elif key == MODEL_HEADER:
            model = value if model is None else model
    if instance is None and model is None:
        return target
    return grpc_target(target, instance, model)
