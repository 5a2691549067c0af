"""Every REST route, once: the app registers its handlers from this table and the
OpenAPI document is generated from it, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

from tei_manager.api.dto import (
    AddModelRequest,
    DevicesReport,
    HealthResponse,
    InstanceConfig,
    InstanceInfo,
    LogSlice,
    ModelInfo,
    ProbeStatus,
)
from tei_manager.errors import ErrorCode
from tei_manager.manager.backup import Backup

__all__ = [
    "BODY_ERRORS",
    "JSON",
    "MAX_BODY_BYTES",
    "OPERATIONS",
    "PROMETHEUS_TEXT",
    "Operation",
    "QueryParam",
    "quart_rule",
]

JSON: Final = "application/json"
# What Prometheus scrapers ask for; the body is the classic text format.
PROMETHEUS_TEXT: Final = "text/plain; version=0.0.4; charset=utf-8"

# Instance configs are a few hundred bytes; a megabyte is generous and still
# bounds what one request can make the server buffer.
MAX_BODY_BYTES: Final = 1 << 20

# A JSON body can always fail these ways, before the manager sees it.
BODY_ERRORS: Final = (
    ErrorCode.MALFORMED_JSON,
    ErrorCode.VALIDATION_ERROR,
    ErrorCode.PAYLOAD_TOO_LARGE,
)


class QueryParam(NamedTuple):
    """An optional integer query parameter."""

    name: str
    description: str


class Operation(NamedTuple):
    """One route: method, path template, success answer and the error codes it can give."""

    endpoint: str  # handler name in app.py; also the OpenAPI operationId
    method: str
    path: str  # OpenAPI template, e.g. /instances/{name}; also the metrics route label
    summary: str
    status: int  # success status
    response: object  # msgspec-typed body of the success answer; None for non-JSON
    content_type: str = JSON
    request: object = None  # msgspec type of the request body, if any
    request_content_type: str = JSON
    errors: tuple[ErrorCode, ...] = ()
    query: tuple[QueryParam, ...] = ()
    also: tuple[tuple[int, str], ...] = ()  # other success statuses, same body


_NOT_FOUND = (ErrorCode.INSTANCE_NOT_FOUND,)
_MODEL_NOT_FOUND = (ErrorCode.INVALID_MODEL_ID, ErrorCode.MODEL_NOT_FOUND)

OPERATIONS: Final[tuple[Operation, ...]] = (
    Operation(
        "list_instances", "GET", "/instances", "List instances in creation order",
        200, list[InstanceInfo],
    ),
    Operation(
        "create_instance", "POST", "/instances", "Create and start an instance",
        201, InstanceInfo,
        request=InstanceConfig,
        errors=(
            *BODY_ERRORS,
            ErrorCode.INVALID_NAME,
            ErrorCode.INVALID_MODEL_ID,
            ErrorCode.INVALID_PORT,
            ErrorCode.INVALID_GPU_ID,
            ErrorCode.INSTANCE_EXISTS,
            ErrorCode.PORT_CONFLICT,
            ErrorCode.MAX_INSTANCES_REACHED,
            ErrorCode.PORT_ALLOCATION_FAILED,
            ErrorCode.MODEL_NOT_FOUND,
            ErrorCode.INSUFFICIENT_MEMORY,
        ),
    ),
    Operation(
        "get_instance", "GET", "/instances/{name}", "Get one instance",
        200, InstanceInfo, errors=_NOT_FOUND,
    ),
    Operation(
        "delete_instance", "DELETE", "/instances/{name}",
        "Stop and delete an instance; answers it as it was",
        200, InstanceInfo, errors=_NOT_FOUND,
    ),
    Operation(
        "start_instance", "POST", "/instances/{name}/start",
        "Start a stopped, idle or failed instance; evicts idle on-demand ones if memory is short",
        200, InstanceInfo,
        errors=(*_NOT_FOUND, ErrorCode.ALREADY_RUNNING, ErrorCode.INSUFFICIENT_MEMORY),
    ),
    Operation(
        "stop_instance", "POST", "/instances/{name}/stop", "Stop an instance",
        200, InstanceInfo, errors=(*_NOT_FOUND, ErrorCode.NOT_RUNNING),
    ),
    Operation(
        "restart_instance", "POST", "/instances/{name}/restart", "Restart an instance",
        200, InstanceInfo, errors=(*_NOT_FOUND, ErrorCode.INSUFFICIENT_MEMORY),
    ),
    Operation(
        "instance_logs", "GET", "/instances/{name}/logs",
        "Lines of the instance's combined stdout/stderr, sliced like Python's lines[start:end]",
        200, LogSlice,
        errors=(ErrorCode.VALIDATION_ERROR, *_NOT_FOUND),
        query=(
            QueryParam("start", "first line (default 0); negative counts from the end"),
            QueryParam("end", "line after the last (default: end of log); negative counts "
                       "from the end"),
        ),
    ),
    Operation(
        "list_models", "GET", "/models",
        "List models: those in the Hugging Face cache, configured, or added",
        200, list[ModelInfo],
    ),
    Operation(
        "add_model", "POST", "/models",
        "Register a model (201 when new; 200 with the known model otherwise)",
        201, ModelInfo,
        request=AddModelRequest,
        errors=(*BODY_ERRORS, ErrorCode.INVALID_MODEL_ID, ErrorCode.MODEL_BUSY),
        also=((200, "Already known: the model as it is"),),
    ),
    Operation(
        "get_model", "GET", "/models/{model_id}", "Get one model, with its download progress",
        200, ModelInfo, errors=_MODEL_NOT_FOUND,
    ),
    Operation(
        "download_model", "POST", "/models/{model_id}/download",
        "Start downloading the model into the cache; answers at once (status downloading)",
        202, ModelInfo,
        errors=(*_MODEL_NOT_FOUND, ErrorCode.MODEL_BUSY, ErrorCode.NOT_READY,
                ErrorCode.BACKEND_UNAVAILABLE),
    ),
    Operation(
        "load_model", "POST", "/models/{model_id}/load",
        "Start a smoke load (launch, one request, stop); answers at once (status loading)",
        202, ModelInfo, errors=(*_MODEL_NOT_FOUND, ErrorCode.MODEL_BUSY, ErrorCode.NOT_READY),
    ),
    Operation(
        "delete_model", "DELETE", "/models/{model_id}",
        "Cancel its download or smoke load, forget it and remove it from the cache",
        200, ModelInfo,
        errors=(*_MODEL_NOT_FOUND, ErrorCode.MODEL_IN_USE, ErrorCode.IO_ERROR),
    ),
    # Reset, backup and restore (scope admin, GET included: an export holds every config).
    Operation(
        "reset_state", "POST", "/state/reset",
        "Stop and delete every instance, clear the state file, re-create the config's seeds",
        200, list[InstanceInfo], errors=(ErrorCode.NOT_READY,),
    ),
    Operation(
        "export_state", "GET", "/state/export",
        "The desired state (instances, run states, models) as TOML, for state import",
        200, Backup, content_type="application/toml",
    ),
    Operation(
        "import_state", "POST", "/state/import",
        "Replace every instance with those of an exported state; checked whole first",
        200, list[InstanceInfo], request=Backup, request_content_type="application/toml",
        errors=(ErrorCode.VALIDATION_ERROR, ErrorCode.INVALID_NAME, ErrorCode.INVALID_MODEL_ID,
                ErrorCode.INVALID_PORT, ErrorCode.INVALID_GPU_ID, ErrorCode.PAYLOAD_TOO_LARGE,
                ErrorCode.NOT_READY),
    ),
    Operation(
        "devices", "GET", "/devices",
        "Each device's memory: total, free, our cap, reserved by our instances, and who is there",
        200, DevicesReport,
    ),
    Operation(
        "health", "GET", "/health", "Manager, instance and storage health (always 200)",
        200, HealthResponse,
    ),
    Operation(
        "health_live", "GET", "/health/live", "Liveness probe: 200 while the process serves",
        200, ProbeStatus,
    ),
    Operation(
        "health_ready", "GET", "/health/ready",
        "Readiness probe: 200 once config is loaded, state restored and listeners up "
        "(with ready_requires_instances, once the declared instances ran too)",
        200, ProbeStatus, errors=(ErrorCode.NOT_READY,),
    ),
    Operation(
        "health_startup", "GET", "/health/startup",
        "Startup probe: 200 once restore and seed launches finished",
        200, ProbeStatus, errors=(ErrorCode.NOT_READY,),
    ),
    Operation(
        "metrics", "GET", "/metrics", "Prometheus text exposition",
        200, None, content_type=PROMETHEUS_TEXT,
    ),
    Operation(
        "openapi", "GET", "/openapi.json", "This OpenAPI 3.1 document",
        200, None,
    ),
)  # fmt: skip

_PARAM_RE: Final = re.compile(r"\{(\w+)\}")


# Path parameters that need a converter: a model id contains "/".
_CONVERTERS: Final = {"model_id": "model_id:"}


def quart_rule(path: str) -> str:
    """The OpenAPI template as a Quart rule: ``/instances/{name}`` → ``/instances/<name>``,
    ``/models/{model_id}`` → ``/models/<model_id:model_id>``."""
    return _PARAM_RE.sub(lambda m: f"<{_CONVERTERS.get(m[1], '')}{m[1]}>", path)
