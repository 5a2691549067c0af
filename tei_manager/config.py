"""The manager's configuration and the instance configuration, with their validation.

A configuration file is TOML decoded into :class:`ManagerConfig`; environment
overrides are applied in one place (:data:`ENV_OVERRIDES`, used by
:func:`parse_config`). Validation names the field and the rule. The instance checks
raise :class:`~tei_manager.errors.ValidationError` with the REST contract's codes
(``INVALID_NAME``, ``INVALID_MODEL_ID``, ``INVALID_PORT``, ``INVALID_GPU_ID``,
``VALIDATION_ERROR``), so the REST layer uses them unchanged; file configuration
wraps them in :class:`~tei_manager.errors.ConfigError`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

import msgspec

from tei_manager.auth.settings import (
    AuthConfig,
    CorsConfig,
    RateLimitConfig,
    validate_auth_config,
    validate_cors_config,
    validate_rate_limit_config,
)
from tei_manager.core.ondemand import StartPolicy
from tei_manager.core.ports import MAX_PORT, MIN_UNPRIVILEGED_PORT
from tei_manager.errors import (
    ConfigError,
    ErrorCode,
    ValidationError,
    from_msgspec_error,
    quote,
)
from tei_manager.grpc.limits import DEFAULT_LIMITS, Limits, validate_limits

__all__ = [
    "ARROW_DTYPES",
    "DEFAULT_STREAM_BATCHES",
    "ENGINES",
    "ENV_OVERRIDES",
    "HUB_ID_SCHEMA",
    "MAX_COUNT",
    "MAX_STREAM_BATCHES",
    "MODEL_ID_SCHEMA",
    "NAME_SCHEMA",
    "POOLING_MODES",
    "ArrowDtype",
    "ConfigError",
    "DevicesConfig",
    "Engine",
    "GrpcConfig",
    "InstanceConfig",
    "ManagerConfig",
    "OtelConfig",
    "Pooling",
    "SeedInstance",
    "decode_instance_config",
    "default_state_dir",
    "load_config",
    "parse_config",
    "parse_instance_config",
    "validate_instance_config",
    "validate_manager_config",
    "validate_model_id",
    "validate_name",
    "validate_port",
]

Pooling = Literal["cls", "mean", "splade", "last-token"]
POOLING_MODES: Final[tuple[str, ...]] = ("cls", "mean", "splade", "last-token")
Engine = Literal["auto", "torch", "onnx"]
ENGINES: Final[tuple[str, ...]] = ("auto", "torch", "onnx")


# --- the rules, as the OpenAPI document states them -------------------------------
# JSON Schema for what the validators below enforce. msgspec puts ``extra_json_schema``
# into the schema and never enforces it, so decoding stays lenient and the validators
# keep their error codes (INVALID_NAME, ...); tests/test_api_schema.py checks that the
# server and these agree. ECMA-262 patterns: "$" is the end of the text.

# Counts and GPU ids are at most this: every consumer (TEI, CUDA) reads them as int32.
MAX_COUNT: Final = 2**31 - 1
#: ``grpc_stream_max_concurrent_batches``: the original's default and upper clamp.
DEFAULT_STREAM_BATCHES: Final = 4
MAX_STREAM_BATCHES: Final = 64
ArrowDtype = Literal["f32", "f16"]
ARROW_DTYPES: Final[tuple[str, ...]] = ("f32", "f16")
_HF_PART: Final = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_HUB_ID: Final = rf"(?!.*(?:--|\.\.)){_HF_PART}(?:/{_HF_PART})?"
NAME_SCHEMA: Final = {"minLength": 1, "maxLength": 63, "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]*$"}
# A Hub id ("org/name" or "name", no "--" or ".." anywhere), as the model registry takes it.
HUB_ID_SCHEMA: Final = {"minLength": 1, "maxLength": 193, "pattern": rf"^{_HUB_ID}$"}
# A Hub id, or an absolute path: not only slashes, no ".." component, no control
# character or backslash.
MODEL_ID_SCHEMA: Final = {
    "minLength": 1,
    "maxLength": 4096,
    "pattern": rf"^(?:{_HUB_ID}|/(?!/*$)(?!(?:.*/)?\.\.(?:/|$))[^\x00-\x1f\x7f\\]*)$",
}
TEXT_SCHEMA: Final = {"minLength": 1, "maxLength": 255, "pattern": r"^[^\x00-\x1f\x7f]*$"}
# TEXT_SCHEMA, and no leading or trailing whitespace.
_SERVED_NAME_SCHEMA: Final = {
    "minLength": 1,
    "maxLength": 255,
    "pattern": r"^[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f])?$",
}
_PORT_SCHEMA: Final = {
    "anyOf": [
        {"type": "integer", "const": 0},
        {"type": "integer", "minimum": 1024, "maximum": 65535},
    ]
}
_COUNT_SCHEMA: Final = {"minimum": 1, "maximum": MAX_COUNT}
_EXTRA_ARG_SCHEMA: Final = {
    "pattern": r"^(?!(?:--model-id|--revision|--port|-p|--prometheus-port|--pooling"
    r"|--max-batch-tokens|--max-concurrent-requests|--json-output|--uds-path)(?:=|$))"
    r"[^\x00]*$"
}


def _documented(description: str | None = None, **schema: object) -> msgspec.Meta:
    return msgspec.Meta(description=description, extra_json_schema=schema)


class InstanceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What one instance runs: the body of ``POST /instances`` and a state file entry.

    ``port`` and ``prometheus_port`` of 0 mean "allocate from the range"; the
    registry stores the config with the ports it chose filled in. ``None`` for
    ``prometheus_port`` means the instance exposes no metrics port. ``engine`` is the
    built-in worker's ``--engine`` (None: its default, ``auto``); TEI has no such flag and
    is started without it.
    """

    name: Annotated[str, _documented(**NAME_SCHEMA)]
    model_id: Annotated[str, _documented(**MODEL_ID_SCHEMA)]
    port: Annotated[int, _documented(**_PORT_SCHEMA)] | None = None
    # "auto": placed at each start on the GPU with the most memory left that fits.
    gpu_id: (
        Annotated[
            int,
            _documented(
                "also below this host's GPU count (else INVALID_GPU_ID)",
                minimum=0,
                maximum=MAX_COUNT,
            ),
        ]
        | Literal["auto"]
        | None
    ) = None
    # "auto": from the GPU's free memory at launch (auto_max_batch_tokens_per_gib).
    max_batch_tokens: Annotated[int, _documented(**_COUNT_SCHEMA)] | Literal["auto"] = 16384
    max_concurrent_requests: Annotated[int, _documented(**_COUNT_SCHEMA)] = 512
    pooling: Pooling | None = None
    prometheus_port: (
        Annotated[int, _documented("never the instance's port (else INVALID_PORT)", **_PORT_SCHEMA)]
        | None
    ) = None
    # None: the manager's startup_timeout_secs
    startup_timeout_secs: Annotated[float, _documented(exclusiveMinimum=0)] | None = None
    extra_args: tuple[Annotated[str, _documented(**_EXTRA_ARG_SCHEMA)], ...] = ()
    revision: Annotated[str, _documented(**TEXT_SCHEMA)] | None = None
    # The built-in worker's engine (None: its default, "auto"); TEI ignores it.
    engine: Engine | None = None
    # Another name clients may give as ``model`` on the inference routes (OpenAI's
    # ``model``, TEI's ``served_model_name``); replicas sharing one are balanced.
    served_model_name: Annotated[str, _documented(**_SERVED_NAME_SCHEMA)] | None = None
    # "on_demand": started by its first request, unloaded after idle_timeout_secs.
    start: StartPolicy = StartPolicy.ALWAYS
    # None: the manager's; 0: never unloaded
    idle_timeout_secs: Annotated[float, _documented(minimum=0)] | None = None
    pinned: bool = False  # never evicted to make room for another instance


class DevicesConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[devices]``: how much of each device's memory the manager's instances may take."""

    gpu_memory_fraction: float = 0.9  # of each GPU's total, like vLLM's gpu_memory_utilization
    cpu_memory_limit_bytes: int | None = None  # None: the host's available memory at start


class SeedInstance(InstanceConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An ``[[instances]]`` entry of the configuration file.

    ``auto_start`` only decides the desired run state of a seed when it is first
    added (absent from the state file): running if true, stopped if false. Once in
    the state file, the persisted desired state wins. It is not part of the REST
    create request, which always starts the instance.
    """

    auto_start: bool = True

    def instance_config(self) -> InstanceConfig:
        """The seed without its seed-only fields."""
        fields = msgspec.structs.asdict(self)
        del fields["auto_start"]
        return InstanceConfig(**fields)


def default_state_dir(env: Mapping[str, str]) -> str:
    """``$XDG_STATE_HOME/tei-manager``, else ``~/.local/state/tei-manager``."""
    base = env.get("XDG_STATE_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    if not os.path.isabs(base):
        home = env.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".local", "state")
    return os.path.join(base, "tei-manager")


def _default_state_file() -> str:
    return os.path.join(default_state_dir(os.environ), "state.toml")


def _default_log_dir() -> str:
    return os.path.join(default_state_dir(os.environ), "logs")


class GrpcConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``[grpc]`` section: what one client may make the multiplexer's port hold.

    The defaults are :class:`~tei_manager.grpc.limits.Limits`' (sources there); the
    stream limit stays ``grpc_max_parallel_streams``, the original's name.
    """

    max_connections: int = DEFAULT_LIMITS.max_connections
    handshake_timeout_secs: float = DEFAULT_LIMITS.handshake_timeout_secs
    idle_timeout_secs: float = DEFAULT_LIMITS.idle_timeout_secs
    max_header_list_bytes: int = DEFAULT_LIMITS.max_header_list_bytes
    stream_receive_window_bytes: int = DEFAULT_LIMITS.stream_receive_window_bytes
    connection_receive_window_bytes: int = DEFAULT_LIMITS.connection_receive_window_bytes
    max_output_buffer_bytes: int = DEFAULT_LIMITS.max_output_buffer_bytes
    min_ping_interval_secs: float = DEFAULT_LIMITS.min_ping_interval_secs
    #: For the multiplexer's connections to instances: PING after this long without
    #: news during a call (None: never).
    keepalive_interval_secs: float | None = DEFAULT_LIMITS.keepalive_interval_secs
    keepalive_timeout_secs: float = DEFAULT_LIMITS.keepalive_timeout_secs

    def limits(self, *, max_concurrent_streams: int) -> Limits:
        """These settings as the transport's ``Limits``."""
        return msgspec.structs.replace(
            DEFAULT_LIMITS,
            max_concurrent_streams=max_concurrent_streams,
            **msgspec.structs.asdict(self),
        )


class OtelConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[otel]``: OpenTelemetry tracing, with the original's names (:mod:`tei_manager.tracing`).

    Tracing is on when ``endpoint`` is set: spans are exported over OTLP/gRPC to it.
    """

    endpoint: str = ""  # OTLP/gRPC collector, e.g. "http://otel-collector:4317"; "": off
    service_name: str = "tei-manager"
    sample_ratio: float = 1.0  # of new traces; a caller's sampled flag is followed
    deployment_environment: str = ""  # resource attribute; "": unset

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint.strip())


class ManagerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything ``tei-manager serve`` is configured with; defaults work on a laptop."""

    api_host: str = "0.0.0.0"
    api_port: int = 9000  # 0: the OS picks (tests)
    # An idle keep-alive connection to the REST port is closed after this (Hypercorn's default).
    api_keep_alive_timeout_secs: float = 5.0
    # Connections the REST port serves at once; more are closed at once and counted
    # (as the gRPC port's grpc.max_connections; nginx's worker_connections default).
    api_max_connections: int = 512
    grpc_port: int = 9001  # 0: the OS picks (tests)
    grpc_enabled: bool = True
    state_file: str = msgspec.field(default_factory=_default_state_file)
    log_dir: str = msgspec.field(default_factory=_default_log_dir)
    health_check_interval_secs: float = 10.0
    # Kept for compatibility with the original's files; readiness is polled instead.
    health_check_initial_delay_secs: float = 0.0
    startup_timeout_secs: float = 300.0
    max_failures_before_restart: int = 3  # 0 disables health-triggered restarts
    # Readiness gate (DESIGN "Many nodes"): /health/ready and gRPC health stay
    # not-ready until every [[instances]] seed still wanted running (and not on
    # demand) has been running at once; off by default, the contract's readiness.
    ready_requires_instances: bool = False
    graceful_shutdown_timeout_secs: float = 30.0
    auto_restore_on_restart: bool = True
    max_instances: int | None = None  # None: unlimited
    instance_port_start: int = 8080
    instance_port_end: int = 8180  # inclusive
    instances: tuple[SeedInstance, ...] = ()
    models: tuple[str, ...] = ()
    max_concurrent_downloads: int = 2
    download_max_retries: int = 5  # per request, after failures with no progress
    smoke_load_timeout_secs: float = 600.0
    tei_binary_path: str | None = None
    grpc_max_message_size_mb: int = 40
    # HTTP/2 streams one client connection may have open (h2 and nginx: ~100).
    grpc_max_parallel_streams: int = 100
    grpc_request_timeout_secs: float = 30.0
    # Record batches of one EmbedArrowStream embedded at once; the original's name
    # and range: values outside 1-64 are clamped (stream_batch_concurrency).
    grpc_stream_max_concurrent_batches: int = DEFAULT_STREAM_BATCHES
    # Float type of dense Arrow answers whose request leaves output_dtype unspecified.
    arrow_output_dtype: ArrowDtype = "f32"
    # Inference admission, per instance, on every front door: beyond its
    # max_concurrent_requests in flight, up to this many requests wait (FIFO) for
    # at most queue_timeout_secs; the rest are refused with 429 OVERLOADED.
    max_queued_requests: int = 1024
    queue_timeout_secs: float = 10.0
    # Restarts after a crash (see DESIGN "Restart policy"): like Kubernetes'
    # CrashLoopBackOff, the delay doubles from the initial value up to the cap, and
    # the instance is retried for ever unless crash_loop_restarts is set: then that
    # many restarts within crash_loop_window_secs leave it "failed" on the next exit.
    restart_backoff_initial_secs: float = 1.0
    restart_backoff_max_secs: float = 300.0
    crash_loop_restarts: int = 0  # 0: never give up
    crash_loop_window_secs: float = 300.0
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    rate_limit: RateLimitConfig = msgspec.field(default_factory=RateLimitConfig)
    cors: CorsConfig = msgspec.field(default_factory=CorsConfig)
    devices: DevicesConfig = msgspec.field(default_factory=DevicesConfig)
    # For on-demand instances without their own idle_timeout_secs; 0: never unloaded.
    idle_timeout_secs: float = 0.0
    grpc: GrpcConfig = msgspec.field(default_factory=GrpcConfig)
    # GPU sanity (tei_manager/core/gpu.py): start-up checks, CPU fallback, "auto" batches.
    gpu_preflight: Literal["warn", "fail", "off"] = "warn"
    gpu_fallback: Literal["warn", "fail", "ignore"] = "warn"
    auto_max_batch_tokens_per_gib: int = 2048
    otel: OtelConfig = msgspec.field(default_factory=OtelConfig)

    def stream_batch_concurrency(self) -> int:
        """``grpc_stream_max_concurrent_batches`` clamped to 1-64, as the original does."""
        return min(max(self.grpc_stream_max_concurrent_batches, 1), MAX_STREAM_BATCHES)

    def grpc_limits(self) -> Limits:
        """The multiplexer port's limits: ``[grpc]`` and ``grpc_max_parallel_streams``."""
        return self.grpc.limits(max_concurrent_streams=self.grpc_max_parallel_streams)

    def manager_ports(self) -> frozenset[int]:
        """Ports the manager itself listens on, which no instance may take."""
        ports = {self.api_port}
        if self.grpc_enabled:
            ports.add(self.grpc_port)
        return frozenset(p for p in ports if p != 0)


# --- field rules -------------------------------------------------------------

_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", re.ASCII)
# One part of a Hugging Face repo id: letters, digits, "_", "-", "."; it may not
# start or end with "-" or ".", and "--" / ".." are forbidden (the Hub's own rule).
_HF_PART_RE: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?", re.ASCII)
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")
_MAX_PATH_LEN: Final = 4096
# Flags the manager sets itself from the config; passing them again through
# extra_args would make the registry and the process disagree (e.g. on the port).
_MANAGED_FLAGS: Final = frozenset(
    {
        "--model-id",
        "--revision",
        "--port",
        "-p",
        "--prometheus-port",
        "--pooling",
        "--max-batch-tokens",
        "--max-concurrent-requests",
        "--json-output",
        "--uds-path",
    }
)


def validate_name(name: str, field: str = "name") -> None:
    """An instance name: 1-63 chars of ``[A-Za-z0-9._-]``, starting alphanumeric."""
    if not name:
        raise ValidationError(field, "must not be empty", code=ErrorCode.INVALID_NAME)
    if len(name) > 63:
        raise ValidationError(
            field, f"is {len(name)} characters: use at most 63", code=ErrorCode.INVALID_NAME
        )
    if not _NAME_RE.fullmatch(name):
        raise ValidationError(
            field,
            f"{quote(name)} is not allowed: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit",
            code=ErrorCode.INVALID_NAME,
        )


def validate_model_id(model_id: str, field: str = "model_id") -> None:
    """A Hugging Face id (``org/name`` or ``name``) or an absolute local path."""

    def bad(rule: str) -> ValidationError:
        return ValidationError(field, rule, code=ErrorCode.INVALID_MODEL_ID)

    if not model_id:
        raise bad("must not be empty")
    if _CONTROL_RE.search(model_id):
        raise bad("contains a control character")
    if "\\" in model_id:
        raise bad("contains a backslash")
    if len(model_id) > _MAX_PATH_LEN:
        raise bad(f"is {len(model_id)} characters: use at most {_MAX_PATH_LEN}")
    if ".." in model_id.split("/"):
        raise bad(f"{quote(model_id)} contains a '..' component")
    if model_id.startswith("/"):
        if model_id.strip("/") == "":
            raise bad("'/' is not a model directory")
        return
    parts = model_id.split("/")
    if len(parts) > 2:
        raise bad(f"{quote(model_id)} is not 'org/name', 'name' or an absolute path")
    for part in parts:
        if ".." in part or "--" in part or not _HF_PART_RE.fullmatch(part):
            raise bad(
                f"{quote(model_id)} is not a valid Hugging Face id: use 'org/name' with letters, "
                "digits, '-', '_' and '.', or an absolute path"
            )


def validate_port(port: int, field: str = "port", *, allow_zero: bool = False) -> None:
    """A TCP port of 1024-65535; with ``allow_zero``, 0 (auto) is accepted too."""
    if port == 0 and allow_zero:
        return
    if 1 <= port < MIN_UNPRIVILEGED_PORT:
        rule = f"{port} is privileged: use {MIN_UNPRIVILEGED_PORT}-{MAX_PORT}"
    elif not MIN_UNPRIVILEGED_PORT <= port <= MAX_PORT:
        rule = f"{port} is out of range: use {MIN_UNPRIVILEGED_PORT}-{MAX_PORT}"
    else:
        return
    raise ValidationError(field, rule, code=ErrorCode.INVALID_PORT)


def _at_least(value: float, minimum: float, field: str) -> None:
    if not math.isfinite(value) or value < minimum:
        raise ValidationError(field, f"{value} is invalid: use a number >= {minimum:g}")


def _count(value: int, field: str) -> None:
    if not 1 <= value <= MAX_COUNT:
        raise ValidationError(field, f"{value} is invalid: use 1-{MAX_COUNT}")


def _positive(value: float, field: str) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValidationError(field, f"{value} is invalid: use a number > 0")


def _text(value: str, field: str, *, max_len: int = 255) -> None:
    if not value:
        raise ValidationError(field, "must not be empty")
    if _CONTROL_RE.search(value):
        raise ValidationError(field, "contains a control character")
    if len(value) > max_len:
        raise ValidationError(field, f"is {len(value)} characters: use at most {max_len}")


def validate_instance_config(config: InstanceConfig, *, gpu_count: int | None = None) -> None:
    """Check every field of ``config``; ``gpu_count`` (when known) bounds ``gpu_id``.

    Raises :class:`ValidationError` for the first broken rule, with the contract's
    code for that field.
    """
    validate_name(config.name)
    validate_model_id(config.model_id)
    if config.port is not None:
        validate_port(config.port, "port", allow_zero=True)
    if config.prometheus_port is not None:
        validate_port(config.prometheus_port, "prometheus_port", allow_zero=True)
        if config.prometheus_port != 0 and config.prometheus_port == config.port:
            raise ValidationError(
                "prometheus_port",
                f"{config.port} is also the instance's port: use another",
                code=ErrorCode.INVALID_PORT,
            )
    if isinstance(config.gpu_id, int):
        if isinstance(config.gpu_id, bool) or config.gpu_id < 0:
            raise ValidationError(
                "gpu_id", f"{config.gpu_id} is negative", code=ErrorCode.INVALID_GPU_ID
            )
        if config.gpu_id > MAX_COUNT:
            raise ValidationError(
                "gpu_id", f"{config.gpu_id} is over {MAX_COUNT}", code=ErrorCode.INVALID_GPU_ID
            )
        if gpu_count is not None and config.gpu_id >= gpu_count:
            have = f"GPUs 0-{gpu_count - 1}" if gpu_count else "no GPU"
            raise ValidationError(
                "gpu_id",
                f"{config.gpu_id} does not exist: this host has {have}",
                code=ErrorCode.INVALID_GPU_ID,
            )
    if config.max_batch_tokens != "auto":
        _count(config.max_batch_tokens, "max_batch_tokens")
    _count(config.max_concurrent_requests, "max_concurrent_requests")
    if config.startup_timeout_secs is not None:
        _positive(config.startup_timeout_secs, "startup_timeout_secs")
    if config.idle_timeout_secs is not None:
        _at_least(config.idle_timeout_secs, 0, "idle_timeout_secs")
    if config.revision is not None:
        _text(config.revision, "revision")
    if config.served_model_name is not None:
        _text(config.served_model_name, "served_model_name")
        if config.served_model_name != config.served_model_name.strip():
            raise ValidationError(
                "served_model_name", "has leading or trailing whitespace: remove it"
            )
    for i, arg in enumerate(config.extra_args):
        if "\x00" in arg:
            raise ValidationError(f"extra_args[{i}]", "contains a NUL byte")
        flag = arg.split("=", 1)[0]
        if flag in _MANAGED_FLAGS:
            raise ValidationError(
                f"extra_args[{i}]", f"{flag} is set by the manager: use the config field"
            )


def _validate_otel(otel: OtelConfig) -> None:
    if otel.enabled:
        endpoint = otel.endpoint.strip()
        _text(endpoint, "otel.endpoint", max_len=_MAX_PATH_LEN)
        try:
            url = urlsplit(endpoint)
            port = url.port
        except ValueError as e:
            raise ValidationError("otel.endpoint", f"is not a URL: {e}") from None
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValidationError(
                "otel.endpoint",
                "must be an http:// or https:// URL of an OTLP/gRPC collector, "
                "e.g. http://otel-collector:4317",
            )
        if port == 0:
            raise ValidationError("otel.endpoint", "port 0 is invalid")
    _text(otel.service_name, "otel.service_name")
    if otel.deployment_environment:
        _text(otel.deployment_environment, "otel.deployment_environment")
    ratio = otel.sample_ratio
    if not 0 <= ratio <= 1:  # NaN fails too
        raise ValidationError("otel.sample_ratio", f"{ratio:g} is not in [0, 1]")


def validate_manager_config(config: ManagerConfig) -> None:
    """Check ``config`` as a whole, seeds included; raises :class:`ValidationError`."""
    _text(config.api_host, "api_host")
    validate_port(config.api_port, "api_port", allow_zero=True)
    _positive(config.api_keep_alive_timeout_secs, "api_keep_alive_timeout_secs")
    _count(config.api_max_connections, "api_max_connections")
    validate_port(config.grpc_port, "grpc_port", allow_zero=True)
    if config.grpc_enabled and config.api_port != 0 and config.api_port == config.grpc_port:
        raise ValidationError("grpc_port", f"{config.grpc_port} is also api_port: use another")
    _text(config.state_file, "state_file", max_len=_MAX_PATH_LEN)
    _text(config.log_dir, "log_dir", max_len=_MAX_PATH_LEN)
    if config.tei_binary_path is not None:
        _text(config.tei_binary_path, "tei_binary_path", max_len=_MAX_PATH_LEN)
    _positive(config.health_check_interval_secs, "health_check_interval_secs")
    _at_least(config.health_check_initial_delay_secs, 0, "health_check_initial_delay_secs")
    _positive(config.startup_timeout_secs, "startup_timeout_secs")
    _at_least(config.max_failures_before_restart, 0, "max_failures_before_restart")
    _at_least(config.graceful_shutdown_timeout_secs, 0, "graceful_shutdown_timeout_secs")
    if config.max_instances is not None:
        _at_least(config.max_instances, 1, "max_instances")
    validate_port(config.instance_port_start, "instance_port_start")
    validate_port(config.instance_port_end, "instance_port_end")
    if config.instance_port_end < config.instance_port_start:
        raise ValidationError(
            "instance_port_end",
            f"{config.instance_port_end} is below instance_port_start {config.instance_port_start}",
        )
    _at_least(config.grpc_max_message_size_mb, 1, "grpc_max_message_size_mb")
    # gRPC message sizes are int32 byte counts.
    if config.grpc_max_message_size_mb > 2047:
        raise ValidationError(
            "grpc_max_message_size_mb",
            f"{config.grpc_max_message_size_mb} is too large: use at most 2047",
        )
    _at_least(config.grpc_max_parallel_streams, 1, "grpc_max_parallel_streams")
    _positive(config.grpc_request_timeout_secs, "grpc_request_timeout_secs")
    _at_least(config.max_queued_requests, 0, "max_queued_requests")
    _positive(config.queue_timeout_secs, "queue_timeout_secs")
    limits = config.grpc_limits()
    for field, rule in validate_limits(limits):
        raise ValidationError(f"grpc.{field}", rule)
    _validate_seeds(config)
    _validate_restarts(config)
    _at_least(config.max_concurrent_downloads, 1, "max_concurrent_downloads")
    _at_least(config.download_max_retries, 0, "download_max_retries")
    _positive(config.smoke_load_timeout_secs, "smoke_load_timeout_secs")
    seen_models: set[str] = set()
    for i, model_id in enumerate(config.models):
        validate_model_id(model_id, f"models[{i}]")
        if model_id.startswith("/"):
            raise ValidationError(
                f"models[{i}]",
                f"{quote(model_id)} is a local path: list Hugging Face ids ('org/name')",
                code=ErrorCode.INVALID_MODEL_ID,
            )
        if model_id in seen_models:
            raise ValidationError(f"models[{i}]", f"duplicate model {quote(model_id)}")
        seen_models.add(model_id)
    _at_least(config.idle_timeout_secs, 0, "idle_timeout_secs")
    _validate_otel(config.otel)
    fraction = config.devices.gpu_memory_fraction
    if not 0 < fraction <= 1:
        raise ValidationError("devices.gpu_memory_fraction", f"{fraction:g} is not in (0, 1]")
    if config.devices.cpu_memory_limit_bytes is not None:
        _at_least(config.devices.cpu_memory_limit_bytes, 1, "devices.cpu_memory_limit_bytes")
    _at_least(config.auto_max_batch_tokens_per_gib, 1, "auto_max_batch_tokens_per_gib")
    validate_auth_config(config.auth)
    validate_rate_limit_config(config.rate_limit)
    validate_cors_config(config.cors)


def _validate_restarts(config: ManagerConfig) -> None:
    _positive(config.restart_backoff_initial_secs, "restart_backoff_initial_secs")
    _positive(config.restart_backoff_max_secs, "restart_backoff_max_secs")
    if config.restart_backoff_max_secs < config.restart_backoff_initial_secs:
        raise ValidationError(
            "restart_backoff_max_secs",
            f"{config.restart_backoff_max_secs:g} is below restart_backoff_initial_secs "
            f"{config.restart_backoff_initial_secs:g}",
        )
    _at_least(config.crash_loop_restarts, 0, "crash_loop_restarts")
    _positive(config.crash_loop_window_secs, "crash_loop_window_secs")


def _validate_seeds(config: ManagerConfig) -> None:
    if config.max_instances is not None and len(config.instances) > config.max_instances:
        raise ValidationError(
            "instances",
            f"{len(config.instances)} seeds exceed max_instances = {config.max_instances}",
        )
    names: set[str] = set()
    port_owner: dict[int, str] = {config.api_port: "api_port"}
    if config.grpc_enabled:
        port_owner[config.grpc_port] = "grpc_port"
    port_owner.pop(0, None)
    for i, seed in enumerate(config.instances):
        where = f"instances[{i}]"
        try:
            validate_instance_config(seed)
        except ValidationError as e:
            raise e.at(where) from None
        if seed.name in names:
            raise ValidationError(f"{where}.name", f"duplicate name {quote(seed.name)}")
        names.add(seed.name)
        for field in ("port", "prometheus_port"):
            port = getattr(seed, field)
            if not port:  # None or 0: allocated later, from the range
                continue
            if port in port_owner:
                raise ValidationError(
                    f"{where}.{field}",
                    f"{port} is already used by {port_owner[port]}",
                    code=ErrorCode.INVALID_PORT,
                )
            port_owner[port] = f"{where}.{field}"


# --- decoding ----------------------------------------------------------------


def _from_msgspec(error: msgspec.ValidationError) -> ValidationError:
    translated = from_msgspec_error(error)
    # msgspec cannot say which values it would have accepted; we can.
    allowed = {"pooling": POOLING_MODES, "engine": ENGINES, "arrow_output_dtype": ARROW_DTYPES}.get(
        translated.field.rsplit(".", 1)[-1]
    )
    if allowed is not None:
        rule = f"{translated.rule}: use {'|'.join(allowed)}"
        return ValidationError(translated.field, rule, code=translated.code)
    return translated


def parse_instance_config(obj: object, *, gpu_count: int | None = None) -> InstanceConfig:
    """Build and validate an :class:`InstanceConfig` from decoded JSON (a dict)."""
    try:
        config = msgspec.convert(obj, InstanceConfig)
    except msgspec.ValidationError as e:
        raise _from_msgspec(e) from None
    validate_instance_config(config, gpu_count=gpu_count)
    return config


def _integral_as_int(value: object) -> object:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def decode_instance_config(body: bytes, *, gpu_count: int | None = None) -> InstanceConfig:
    """Decode a ``POST /instances`` body; bad JSON raises ``MALFORMED_JSON``."""
    try:
        raw = msgspec.json.decode(body)
        if isinstance(raw, dict):
            # JSON (and the OpenAPI schema's "integer") does not tell 512.0 from 512.
            raw = {k: _integral_as_int(v) for k, v in raw.items()}
        config = msgspec.convert(raw, InstanceConfig)
    except msgspec.ValidationError as e:
        raise _from_msgspec(e) from None
    except msgspec.DecodeError as e:
        raise ValidationError("body", f"invalid JSON: {e}", code=ErrorCode.MALFORMED_JSON) from None
    validate_instance_config(config, gpu_count=gpu_count)
    return config


def _env_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{quote(text)} is not an integer") from None


def _env_float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"{quote(text)} is not a number") from None


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _env_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{quote(text)} is not a boolean: use true or false")


def _env_str(text: str) -> str:
    return text


# The one place environment variables enter the configuration: variable, the field
# it overrides, and how its text becomes the field's type. Env beats file beats default.
ENV_OVERRIDES: Final[tuple[tuple[str, str, Callable[[str], object]], ...]] = (
    ("TEI_MANAGER_API_PORT", "api_port", _env_int),
    ("TEI_MANAGER_API_KEEP_ALIVE_TIMEOUT", "api_keep_alive_timeout_secs", _env_float),
    ("TEI_MANAGER_API_MAX_CONNECTIONS", "api_max_connections", _env_int),
    ("TEI_MANAGER_GRPC_PORT", "grpc_port", _env_int),
    ("TEI_MANAGER_GRPC_ENABLED", "grpc_enabled", _env_bool),
    ("TEI_MANAGER_STATE_FILE", "state_file", _env_str),
    ("TEI_MANAGER_LOG_DIR", "log_dir", _env_str),
    ("TEI_MANAGER_HEALTH_CHECK_INTERVAL", "health_check_interval_secs", _env_float),
    ("TEI_MANAGER_READY_REQUIRES_INSTANCES", "ready_requires_instances", _env_bool),
    ("TEI_MANAGER_GRPC_MAX_PARALLEL_STREAMS", "grpc_max_parallel_streams", _env_int),
    ("TEI_MANAGER_GRPC_MAX_CONNECTIONS", "grpc.max_connections", _env_int),
    ("TEI_MANAGER_GRPC_HANDSHAKE_TIMEOUT", "grpc.handshake_timeout_secs", _env_float),
    ("TEI_MANAGER_GRPC_IDLE_TIMEOUT", "grpc.idle_timeout_secs", _env_float),
    ("TEI_MANAGER_GRPC_KEEPALIVE_INTERVAL", "grpc.keepalive_interval_secs", _env_float),
    ("TEI_BINARY_PATH", "tei_binary_path", _env_str),
    ("TEI_MANAGER_RESTART_BACKOFF_INITIAL", "restart_backoff_initial_secs", _env_float),
    ("TEI_MANAGER_RESTART_BACKOFF_MAX", "restart_backoff_max_secs", _env_float),
    ("TEI_MANAGER_CRASH_LOOP_RESTARTS", "crash_loop_restarts", _env_int),
    ("TEI_MANAGER_CRASH_LOOP_WINDOW", "crash_loop_window_secs", _env_float),
    ("TEI_MANAGER_OTEL_ENDPOINT", "otel.endpoint", _env_str),
    ("TEI_MANAGER_OTEL_SERVICE_NAME", "otel.service_name", _env_str),
    ("TEI_MANAGER_OTEL_SAMPLE_RATIO", "otel.sample_ratio", _env_float),
)


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Put the overrides into ``raw``; returns field -> variable for error messages."""
    sources: dict[str, str] = {}
    for var, field, parse in ENV_OVERRIDES:
        text = env.get(var, "")
        # An empty variable (``VAR=`` in Compose) means unset, not "empty value".
        if not text:
            continue
        try:
            value = parse(text)
        except ValueError as e:
            raise ConfigError(f"{var}: {e}") from None
        section, _, key = field.rpartition(".")
        if section:  # a field of a [section] table
            table = raw.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{var}: [{section}] is not a table in the file")
            table[key] = value
        else:
            raw[field] = value
        sources[field] = var
    state_dir = default_state_dir(env)
    raw.setdefault("state_file", os.path.join(state_dir, "state.toml"))
    raw.setdefault("log_dir", os.path.join(state_dir, "logs"))
    return sources


def parse_config(data: bytes | str, *, env: Mapping[str, str] | None = None) -> ManagerConfig:
    """Decode TOML ``data``, apply ``env`` (default ``os.environ``) and validate.

    Raises :class:`ConfigError` whose ``str()`` is one line naming field and rule.
    """
    env = os.environ if env is None else env
    try:
        raw = msgspec.toml.decode(data)
    except msgspec.DecodeError as e:
        raise ConfigError(f"invalid TOML: {e}") from None
    if not isinstance(raw, dict):  # pragma: no cover - TOML documents are tables
        raise ConfigError("invalid TOML: the document is not a table")
    sources = _apply_env(raw, env)
    try:
        config = msgspec.convert(raw, ManagerConfig)
        validate_manager_config(config)
    except msgspec.ValidationError as e:
        raise ConfigError.from_validation(_with_source(_from_msgspec(e), sources)) from None
    except ValidationError as e:
        raise ConfigError.from_validation(_with_source(e, sources)) from None
    return config


def _with_source(error: ValidationError, sources: Mapping[str, str]) -> ValidationError:
    """Say which environment variable a bad value came from, if one did."""
    root = re.split(r"[.\[]", error.field, maxsplit=1)[0]
    for field in (error.field, root):
        if field in sources:
            source = sources[field]
            return ValidationError(f"{error.field} (from {source})", error.rule, code=error.code)
    return error


def load_config(
    path: str | os.PathLike[str] | None, *, env: Mapping[str, str] | None = None
) -> ManagerConfig:
    """Read the TOML file at ``path`` (None: defaults only), apply env, validate."""
    data = b""
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConfigError(f"{os.fspath(path)}: cannot read: {e.strerror}") from None
    return parse_config(data, env=env)
