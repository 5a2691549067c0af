"""The REST doors' routing key: a request's ``model`` or its ``x-tei-*`` header.

See :mod:`tei_manager.core.routing_key` for the rule; this reads the headers and
answers in the doors' vocabulary (VALIDATION naming the fields).
"""

from __future__ import annotations

from typing import Any, Final

from quart import request

from tei_manager.core.routing_key import (
    INSTANCE_HEADER,
    MAX_KEY_CHARS,
    MODEL_HEADER,
    rest_target,
)
from tei_manager.errors import ValidationError
from tei_manager.gateway.errors import InferenceError, Kind

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


def request_target(body: str | None, body_field: str = "model") -> str:
    """The name this request is for: ``body`` (``model``, or the URL's name) or the
    header's, which must agree when both are given."""
    headers = request.headers
    try:
        return rest_target(
            body, body_field, headers.get(INSTANCE_HEADER), headers.get(MODEL_HEADER)
        )
    except ValidationError as error:
        raise InferenceError(Kind.VALIDATION, error.message, param=body_field) from None
