"""What an instance process is started with: program, flags, environment, log file.

Pure apart from :func:`resolve_program`, which looks at the filesystem once at
start-up. The manager runs text-embeddings-router (TEI) when it is configured or on
PATH, and the built-in worker otherwise; both take the same flags and speak tei.v1.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

import msgspec

from tei_manager.config import InstanceConfig, OtelConfig
from tei_manager.core.gpu import DEFAULT_MAX_BATCH_TOKENS
from tei_manager.errors import ConfigError, quote

__all__ = [
    "INSTANCE_HOST",
    "TEI_BINARY_NAME",
    "LaunchSpec",
    "Program",
    "build_command",
    "build_env",
    "describe",
    "instance_log_path",
    "launch_spec",
    "resolve_program",
    "worker_program",
]

TEI_BINARY_NAME: Final = "text-embeddings-router"
# Instances listen on loopback only: clients reach them through the manager.
INSTANCE_HOST: Final = "127.0.0.1"


class Program(msgspec.Struct, frozen=True, kw_only=True):
    """The command prefix that starts an instance, and whether it is TEI itself."""

    argv: tuple[str, ...]
    is_tei: bool


class LaunchSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything needed to spawn one instance process."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    log_path: str


def worker_program() -> Program:
    """The built-in worker, run by this interpreter (so it sees the same packages)."""
    return Program(argv=(sys.executable, "-m", "tei_manager", "worker"), is_tei=False)


def resolve_program(
    tei_binary_path: str | None,
    *,
    which: Callable[[str], str | None] = shutil.which,
) -> Program:
    """TEI if ``tei_binary_path`` names it or it is on PATH, else the built-in worker.

    ``tei_binary_path`` (the config field; ``TEI_BINARY_PATH`` overrides it) is a path
    or a name looked up on PATH; one that cannot be run is a :class:`ConfigError`,
    since silently running another engine than the one configured would surprise.
    """
    if tei_binary_path:
        found = which(tei_binary_path)
        if found is None:
            raise ConfigError(
                f"tei_binary_path: {quote(tei_binary_path)} is not an executable file "
                "(or not on PATH)"
            )
        return Program(argv=(os.path.abspath(found),), is_tei=True)
    found = which(TEI_BINARY_NAME)
    if found is not None:
        return Program(argv=(os.path.abspath(found),), is_tei=True)
    return worker_program()


def build_command(
    config: InstanceConfig, program: Program, *, otel: OtelConfig | None = None
) -> list[str]:
    """The full command line of ``config``'s process; its port must be resolved.

    With tracing on (``otel``), TEI exports its own spans to the same collector
    (``--otlp-endpoint``) as service ``{service_name}-{instance}``; the relayed
    calls carry ``traceparent``, so its spans join the manager's traces. An
    ``--otlp-endpoint`` in the instance's ``extra_args`` wins.
    """
    if not config.port:
        raise ValueError(f"instance {config.name!r} has no port assigned")
    argv = [
        *program.argv,
        "--model-id",
        config.model_id,
        "--hostname",
        INSTANCE_HOST,
        "--port",
        str(config.port),
        "--max-batch-tokens",
        str(_batch_tokens(config)),
        "--max-concurrent-requests",
        str(config.max_concurrent_requests),
        "--json-output",
    ]
    if config.pooling is not None:
        argv += ["--pooling", config.pooling]
    if config.prometheus_port:
        argv += ["--prometheus-port", str(config.prometheus_port)]
    if config.revision is not None:
        argv += ["--revision", config.revision]
    if config.engine is not None and not program.is_tei:
        argv += ["--engine", config.engine]  # the built-in worker's flag; TEI has none
    if program.is_tei:
        # TEI's Python backends talk to the router over a unix socket whose default
        # path is the same for every TEI on the host: give each instance its own.
        argv += ["--uds-path", os.path.join(tempfile.gettempdir(), f"tei-manager-{config.port}")]
        if otel is not None and otel.enabled and "--otlp-endpoint" not in config.extra_args:
            service = f"{otel.service_name}-{config.name}"
            argv += ["--otlp-endpoint", otel.endpoint.strip(), "--otlp-service-name", service]
    argv += config.extra_args
    return argv


def _batch_tokens(config: InstanceConfig) -> int:
    # The manager resolves "auto" from the GPU's free memory before launching; left
    # unresolved (no GPU known), it is TEI's default.
    if config.max_batch_tokens == "auto":
        return DEFAULT_MAX_BATCH_TOKENS
    return config.max_batch_tokens


def build_env(config: InstanceConfig, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` plus what the instance needs: its GPU, and unbuffered Python output."""
    env = dict(base)
    if isinstance(config.gpu_id, int):  # "auto" was placed before the spawn
        env["CUDA_VISIBLE_DEVICES"] = str(config.gpu_id)
    # Log lines must reach the log file as they are written, not when a buffer fills.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def instance_log_path(log_dir: str | os.PathLike[str], name: str) -> Path:
    """``{log_dir}/{name}.log``; the name was validated, so it has no path separator."""
    return Path(log_dir) / f"{name}.log"


def launch_spec(
    config: InstanceConfig,
    program: Program,
    *,
    log_dir: str | os.PathLike[str],
    base_env: Mapping[str, str] | None = None,
    otel: OtelConfig | None = None,
) -> LaunchSpec:
    """Command, environment and log file of ``config``'s process."""
    return LaunchSpec(
        argv=tuple(build_command(config, program, otel=otel)),
        env=build_env(config, os.environ if base_env is None else base_env),
        log_path=str(instance_log_path(log_dir, config.name)),
    )


def describe(argv: Sequence[str]) -> str:
    """A command line as one readable string for logs."""
    return " ".join(quote(a) if (not a or any(c.isspace() for c in a)) else a for a in argv)
