"""The REST API's bodies as msgspec Structs: one definition for JSON and the OpenAPI schema.

Request and response types owned elsewhere are re-exported here so the API's
vocabulary is in one place: the create request is the instance configuration
itself (unknown fields rejected), an instance is :class:`InstanceInfo`, a log
window is :class:`LogSlice`, and every error is :class:`ErrorBody`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from tei_manager.config import HUB_ID_SCHEMA, InstanceConfig
from tei_manager.core.instances import InstanceInfo
from tei_manager.core.logslice import LogSlice
from tei_manager.errors import ErrorBody
from tei_manager.hub.paths import REVISION_SCHEMA
from tei_manager.hub.state import ModelInfo
from tei_manager.manager.ondemand import DevicesReport, DeviceView
from tei_manager.manager.state import StateFileReport

__all__ = [
    "AddModelRequest",
    "DeviceView",
    "DevicesReport",
    "ErrorBody",
    "HealthResponse",
    "InstanceConfig",
    "InstanceCounts",
    "InstanceInfo",
    "LogSlice",
    "ModelInfo",
    "ProbeStatus",
    "StateFileReport",
    "StorageHealth",
    "StorageStatus",
]

StorageStatus = Literal["ok", "warning", "unhealthy"]


class InstanceCounts(msgspec.Struct, frozen=True, kw_only=True):
    """Instances by status, as ``GET /health`` reports them."""

    total: int
    running: int
    starting: int
    failed: int
    stopped: int
    idle: int  # on-demand instances with no process, started by their next request


class StorageHealth(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Free space where instance logs are written, and in the model cache.

    ``status`` is ``warning`` under 10% free and ``unhealthy`` under 5% (or when
    the space cannot be read, in which case the numbers are null and ``error``
    says why). The top level is the log folder; ``model_cache`` is the Hugging Face
    cache models are downloaded into, and the top-level ``status`` is the worse of
    the two.
    """

    path: str
    free_bytes: int | None
    total_bytes: int | None
    free_ratio: float | None
    status: StorageStatus
    error: str | None = None
    model_cache: StorageHealth | None = None


class HealthResponse(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /health``: always 200 while the manager serves; details say how it is."""

    status: str
    version: str
    uptime_secs: int
    instances: InstanceCounts
    # The state file as start-up found it: moved aside (and why) if it was unusable.
    state: StateFileReport
    storage: StorageHealth
    # Each device's memory: total, free, our cap, reserved by our instances (GET /devices).
    devices: list[DeviceView]


class AddModelRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /models``: a Hugging Face model to register, at a revision (default: main)."""

    model_id: Annotated[str, msgspec.Meta(extra_json_schema=HUB_ID_SCHEMA)]
    revision: Annotated[str, msgspec.Meta(extra_json_schema=REVISION_SCHEMA)] | None = None


class ProbeStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The body of a passing probe (``/health/live``, ``/ready``, ``/startup``)."""

    status: Literal["ok"] = "ok"
