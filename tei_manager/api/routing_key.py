"""The REST doors' routing key: a request's ``model`` or its ``x-tei-*`` header.

See :mod:`tei_manager.core.routing_key` for the rule; this reads the headers and
answers in the doors' vocabulary (VALIDATION naming the fields).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from tei_manager.core.routing_key import (
    INSTANCE_HEADER,
    MAX_KEY_CHARS,
    MODEL_HEADER,
    rest_target,
)
from tei_manager.errors import ValidationError
from tei_manager.gateway.errors import InferenceError, Kind

if TYPE_CHECKING:
    from tei_manager.api.inference import InferenceRequest

__all__ = ["HEADER_PARAMETERS", "request_target"]

#: The headers in the OpenAPI document of every route that names a model.
HEADER_PARAMETERS: Final[list[dict[str, Any]]] = [
    {
        "name": header,
        "in": "header",
        "required": False,
        "description": f"{what} for a proxy to route on; the target when the body names "
        "none, else it must name the same one (400 otherwise)",
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS},
    }
    for header, what in (
        (MODEL_HEADER, "A model id or served_model_name"),
        (INSTANCE_HEADER, "An instance name"),
    )
]


_INSTANCE: Final = INSTANCE_HEADER.encode()
_MODEL: Final = MODEL_HEADER.encode()


def request_target(request: InferenceRequest, body: str | None, body_field: str = "model") -> str:
    """The name ``request`` is for: ``body`` (``model``, or the URL's name) or the
    header's, which must agree when both are given."""
    instance: str | None = None
    model: str | None = None
    for name, value in request.headers:  # names lower-cased, as ASGI gives them
        if name == _INSTANCE and instance is None:
            instance = value.decode("latin-1")
        elif name == _MODEL and model is None:
            model = value.decode("latin-1")
    try:
        return rest_target(body, body_field, instance, model)
    except ValidationError as error:
        raise InferenceError(Kind.VALIDATION, error.message, param=body_field) from None
