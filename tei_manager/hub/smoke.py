"""A smoke load: start the model the way an instance would, ask it one thing, stop it.

The configured backend (TEI or the built-in worker) is launched with the same command
line and environment builder as an instance (:func:`~tei_manager.supervisor.launch.launch_spec`),
on a free port, offline (``HF_HUB_OFFLINE=1``: the smoke load tests what is on disk,
nothing more), and with its output in ``<log_dir>/models/``. Then:

1. tei.v1 ``Info`` is polled until it answers (or the process exits, or time is up);
2. one request that fits the model type: ``Embed`` for an embedding model,
   ``Predict`` for a classifier, ``Rerank`` for a reranker, whose answer must have
   the right shape and finite numbers;
3. the process is stopped (SIGTERM, grace, SIGKILL of its group), whatever happened.

A failure raises :class:`SmokeLoadError` with the reason and the last lines the
process logged.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Callable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Final, Protocol

import msgspec
import trio

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.config import InstanceConfig
from tei_manager.core.logslice import read_log_slice
from tei_manager.grpc.channel import open_channel
from tei_manager.grpc.rpc import GrpcError
from tei_manager.hub.paths import repo_folder_name
from tei_manager.hub.settings import RegistrySettings
from tei_manager.hub.state import SmokeLoad
from tei_manager.supervisor.instance import ProcessHandle
from tei_manager.supervisor.launch import INSTANCE_HOST, LaunchSpec, Program, launch_spec
from tei_manager.supervisor.process import SpawnError, describe_exit, spawn

__all__ = ["SmokeLoadError", "SmokeRunner", "free_port", "smoke_load", "smoke_log_path"]

_TEXT: Final = "tei-manager smoke load: is this model whole and loadable?"
_LOG_TAIL_LINES: Final = 20
_MAX_LINE: Final = 1000
_KINDS: Final = {
    tei_pb2.MODEL_TYPE_EMBEDDING: "embedding",
    tei_pb2.MODEL_TYPE_CLASSIFIER: "classifier",
    tei_pb2.MODEL_TYPE_RERANKER: "reranker",
}

Spawn = Callable[[LaunchSpec], ProcessHandle]


class SmokeRunner(Protocol):
    """:func:`~tei_manager.hub.smoke.smoke_load`'s signature (tests pass a stand-in)."""

    async def __call__(
        self,
        model_id: str,
        revision: str | None,
        *,
        gpu_id: int | None,
        program: Program,
        log_dir: str,
        env: dict[str, str],
        settings: RegistrySettings,
    ) -> SmokeLoad: ...


class SmokeLoadError(Exception):
    """The model did not load or did not answer properly; ``str()`` says why."""


def free_port() -> int:
    """A port of 127.0.0.1 that is free now.

    TEI cannot report a port it picked itself, so one is picked here; another
    program could take it before the backend binds it, in which case the smoke
    load fails with the backend's bind error in its log and can be run again.
    """
    with socket.socket() as sock:
        sock.bind((INSTANCE_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def smoke_log_path(log_dir: str | os.PathLike[str], model_id: str) -> Path:
    """Where the smoke load of ``model_id`` logs: ``<log_dir>/models/models--org--name.log``."""
    return Path(log_dir) / "models" / f"{repo_folder_name(model_id)}.log"


async def smoke_load(
    model_id: str,
    revision: str | None,
    *,
    gpu_id: int | None,
    program: Program,
    log_dir: str | os.PathLike[str],
    env: Mapping[str, str],
    settings: RegistrySettings,
    spawner: Spawn = spawn,
) -> SmokeLoad:
    """Load ``model_id`` in the backend and run one request; what it reported.

    Must run in the thread that runs Trio (the process is forked from it, see
    :mod:`tei_manager.supervisor.process`).
    """
    log_path = smoke_log_path(log_dir, model_id)
    config = InstanceConfig(
        name=log_path.stem, model_id=model_id, port=free_port(), revision=revision, gpu_id=gpu_id
    )
    spec = launch_spec(config, program, log_dir=log_path.parent, base_env=env)
    await trio.to_thread.run_sync(_fresh_log, Path(spec.log_path))
    started = trio.current_time()
    try:
        process = spawner(spec)
    except SpawnError as e:
        raise SmokeLoadError(str(e)) from None
    failure: str | None = None
    result: SmokeLoad | None = None
    try:
        async with trio.open_nursery() as nursery:

            async def watch_exit() -> None:
                nonlocal failure
                code = await process.wait()
                failure = failure or f"the model server {describe_exit(code)} before it answered"
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_exit)
            with trio.move_on_after(settings.smoke_load_timeout_secs):
                info = await _wait_for_info(config.port or 0, settings)
                try:
                    result = await _exercise(config.port or 0, info, gpu_id)
                except SmokeLoadError as e:
                    failure = str(e)
            if result is None and failure is None:
                failure = f"no answer within {settings.smoke_load_timeout_secs:g} s"
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await process.terminate(settings.stop_grace_secs)
    if failure is not None or result is None:
        tail = await trio.to_thread.run_sync(_log_tail, Path(spec.log_path))
        raise SmokeLoadError(f"{failure}; last log lines:\n{tail}" if tail else f"{failure}")
    elapsed = trio.current_time() - started
    return msgspec.structs.replace(result, load_secs=round(elapsed, 3))


def _fresh_log(path: Path) -> None:
    """One log per model, holding its latest smoke load only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with suppress(FileNotFoundError):
        path.unlink()


def _log_tail(path: Path) -> str:
    """The last lines the backend logged, JSON lines made readable."""
    try:
        lines = read_log_slice(path, -_LOG_TAIL_LINES).lines
    except OSError:
        return ""
    return "\n".join(_readable(line) for line in lines)


def _readable(line: str) -> str:
    """A JSON log line (the worker's, TEI's) as ``LEVEL message: last exception line``."""
    entry = None
    if line.startswith("{"):
        with suppress(ValueError):
            entry = json.loads(line)
    if not isinstance(entry, dict):
        return line[:_MAX_LINE]
    fields = entry.get("fields")
    fields = fields if isinstance(fields, dict) else {}
    message = str(entry.get("message") or fields.get("message") or line)
    error = entry.get("exception")
    if isinstance(error, str):
        # A traceback's last line is the exception itself (group borders aside).
        last = [text.strip(" |+-") for text in error.splitlines() if text.strip(" |+-.")]
        if last:
            message = f"{message}: {last[-1]}"
    level = entry.get("level")
    return f"{level} {message}"[:_MAX_LINE] if level else message[:_MAX_LINE]


async def _wait_for_info(port: int, settings: RegistrySettings) -> tei_pb2.InfoResponse:
    """Poll Info until the server answers (the caller bounds the wait)."""
    while True:
        with trio.move_on_after(settings.probe_timeout_secs):
            try:
                async with open_channel(INSTANCE_HOST, port) as channel:
                    return await channel.unary_unary(tei_grpc.Info.Info, tei_pb2.InfoRequest())
            except (GrpcError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        # Another process is starting up: there is nothing to wait on but time.
        await trio.sleep(settings.readiness_interval_secs)


async def _exercise(port: int, info: tei_pb2.InfoResponse, gpu_id: int | None) -> SmokeLoad:
    """One request that fits the model type; raises SmokeLoadError for a bad answer."""
    kind = _KINDS.get(info.model_type, "embedding")
    try:
        async with open_channel(INSTANCE_HOST, port) as channel:
            if kind == "embedding":
                embedded = await channel.unary_unary(
                    tei_grpc.Embed.Embed, tei_pb2.EmbedRequest(inputs=_TEXT, truncate=True)
                )
                values = list(embedded.embeddings)
                method = "Embed"
            elif kind == "classifier":
                predicted = await channel.unary_unary(
                    tei_grpc.Predict.Predict, tei_pb2.PredictRequest(inputs=_TEXT, truncate=True)
                )
                values = [p.score for p in predicted.predictions]
                method = "Predict"
            else:
                reranked = await channel.unary_unary(
                    tei_grpc.Rerank.Rerank,
                    tei_pb2.RerankRequest(
                        query=_TEXT, texts=["a model", "a server"], truncate=True
                    ),
                )
                values = [r.score for r in reranked.ranks]
                method = "Rerank"
    except GrpcError as e:
        raise SmokeLoadError(f"{kind} model: {e}") from None
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
        raise SmokeLoadError(f"{kind} model: connection failed: {e}") from None
    if not values:
        raise SmokeLoadError(f"{method} answered nothing")
    if not all(math.isfinite(v) for v in values):
        raise SmokeLoadError(f"{method} answered non-finite numbers")
    return SmokeLoad(
        model_kind=kind,
        model_dtype=info.model_dtype,
        model_sha=info.model_sha if info.HasField("model_sha") else None,
        max_input_length=info.max_input_length,
        output_size=1 if kind == "reranker" else len(values),
        load_secs=0.0,
        gpu_id=gpu_id,
    )
