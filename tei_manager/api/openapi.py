"""The OpenAPI 3.1 document of the REST API, generated from the route table.

Schemas come from the msgspec Structs via :func:`msgspec.json.schema_components`,
whose JSON Schema 2020-12 output is what OpenAPI 3.1 uses, so the document cannot
disagree with what the API actually accepts and returns.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import msgspec

from tei_manager import __version__
from tei_manager.api.inference import inference_openapi
from tei_manager.api.inference_doors import DOOR_ROUTES
from tei_manager.api.routes import JSON, OPERATIONS, Operation
from tei_manager.config import HUB_ID_SCHEMA, NAME_SCHEMA
from tei_manager.errors import ERROR_TABLE, ErrorBody, ErrorCode

__all__ = ["build_openapi", "openapi_json"]

_REF: Final = "#/components/schemas/{name}"
_ERROR_REF: Final = {"$ref": _REF.format(name="ErrorBody")}

_STATUS_TEXT: Final = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    400: "Bad request",
    404: "Not found",
    409: "Conflict",
    413: "Payload too large",
    422: "Unprocessable",
    500: "Internal error",
    503: "Not ready",
}


# Path parameters: description and schema, the rules the server checks.
_PATH_PARAMETERS: Final = {
    "name": ("instance name", {"type": "string", **NAME_SCHEMA}),
    "model_id": (
        "Hugging Face model id (org/name); its '/' may be sent raw or as %2F",
        {"type": "string", **HUB_ID_SCHEMA},
    ),
}
# Log slice bounds: an optional sign and at most 18 digits (app.py's _INT_RE).
_SLICE_BOUND: Final = 10**18 - 1


def _error_responses(codes: Iterable[ErrorCode]) -> dict[str, Any]:
    """Error answers grouped by HTTP status, each naming the codes it can carry."""
    by_status: dict[int, list[str]] = {}
    # Any route can fail unexpectedly.
    for code in (*codes, ErrorCode.INTERNAL_ERROR):
        by_status.setdefault(ERROR_TABLE[code].http_status, []).append(code.value)
    return {
        str(status): {
            "description": f"{_STATUS_TEXT.get(status, 'Error')}: {', '.join(names)}",
            "content": {JSON: {"schema": _ERROR_REF}},
        }
        for status, names in sorted(by_status.items())
    }


def _operation(op: Operation, schemas: dict[object, Any]) -> dict[str, Any]:
    success: dict[str, Any] = {"description": _STATUS_TEXT.get(op.status, "OK")}
    if op.response is not None:
        success["content"] = {op.content_type: {"schema": schemas[op.response]}}
    elif op.content_type == JSON:
        success["content"] = {JSON: {"schema": {"type": "object"}}}
    else:
        success["content"] = {op.content_type: {"schema": {"type": "string"}}}
    responses = {str(op.status): success}
    for status, description in op.also:
        responses[str(status)] = {**success, "description": description}
    doc: dict[str, Any] = {
        "operationId": op.endpoint,
        "summary": op.summary,
        "responses": {**responses, **_error_responses(op.errors)},
    }
    parameters: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "description": description,
            "schema": schema,
        }
        for name, (description, schema) in _PATH_PARAMETERS.items()
        if f"{{{name}}}" in op.path
    ]
    parameters.extend(
        {
            "name": q.name,
            "in": "query",
            "required": False,
            "description": q.description,
            "schema": {"type": "integer", "minimum": -_SLICE_BOUND, "maximum": _SLICE_BOUND},
        }
        for q in op.query
    )
    if parameters:
        doc["parameters"] = parameters
    if op.request is not None:
        doc["requestBody"] = {
            "required": True,
            "content": {op.request_content_type: {"schema": schemas[op.request]}},
        }
    return doc


def build_openapi(operations: Iterable[Operation] = OPERATIONS) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``operations``."""
    operations = tuple(operations)
    types: list[Any] = [ErrorBody]
    for op in operations:
        for t in (op.response, op.request):
            if t is not None and t not in types:
                types.append(t)
    # The inference routes: their own bodies and error shapes (OpenAI's, TEI's).
    inference_types, inference_paths = inference_openapi(DOOR_ROUTES)
    types.extend(t for t in inference_types if t not in types)
    generated, components = msgspec.json.schema_components(types, ref_template=_REF)
    schemas = dict(zip(types, generated, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, schemas)
    paths.update(inference_paths(schemas))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tei-manager",
            "version": __version__,
            "description": "Management API: run many text-embedding model servers on one "
            'host. Every error is {"error", "code", "timestamp"}, except on the inference '
            "routes (tag inference, scope inference), which answer OpenAI's or TEI's shape.",
        },
        "paths": paths,
        "components": {"schemas": components},
    }


def openapi_json() -> bytes:
    """:func:`build_openapi` encoded, for serving as is."""
    return msgspec.json.encode(build_openapi())
