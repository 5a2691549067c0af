"""Worker lifecycle: health while loading, SIGTERM drains and exits 0, JSON logs."""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path

import pytest
import trio

from tei_manager._proto.grpc.health.v1 import health_grpc, health_pb2
from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.cli import build_parser
from tei_manager.grpc.channel import open_channel
from tei_manager.grpc.rpc import GrpcError, StatusCode
from tei_manager.testing import run_worker_process
from tei_manager.worker import main as worker_main
from tei_manager.worker.engine import Engine
from tei_manager.worker.options import parse_options
from tests.conftest import TinyModels

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_health_is_not_serving_until_the_model_is_loaded(
    tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch, onnx_graphs: None
) -> None:
    release = threading.Event()
    real_load = Engine.load

    def slow_load(options: object) -> Engine:
        release.wait(60)
        return real_load(options)  # type: ignore[arg-type]

    monkeypatch.setattr(worker_main.Engine, "load", staticmethod(slow_load))
    port = _free_port()
    options = parse_options(["--model-id", str(tiny_models.classifier), "--port", str(port)])
    worker = worker_main.Worker(options)
    check = health_pb2.HealthCheckRequest(service="tei.v1.Predict")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run)
        await worker.server.listening.wait()
        async with open_channel("127.0.0.1", port) as channel:
            reply = await channel.unary_unary(health_grpc.Health.Check, check)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(GrpcError) as loading:
                await channel.unary_unary(tei_grpc.Info.Info, tei_pb2.InfoRequest())
            assert loading.value.code == StatusCode.UNAVAILABLE
            release.set()
            with trio.fail_after(60):
                async with channel.open_call(health_grpc.Health.Watch) as watch:
                    await watch.send(check)
                    await watch.done_writing()
                    async for update in watch:
                        if update.status == health_pb2.HealthCheckResponse.SERVING:
                            break
            info = await channel.unary_unary(tei_grpc.Info.Info, tei_pb2.InfoRequest())
            assert info.model_type == tei_pb2.MODEL_TYPE_CLASSIFIER
        worker.shutdown(grace=1)


def test_sigterm_exits_zero_with_json_logs(
    tiny_models: TinyModels, tmp_path: Path, onnx_graphs: None
) -> None:
    with run_worker_process(tiny_models.reranker, tmp_path / "worker.log") as worker:
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(30) == 0
        lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    messages = [entry["message"] for entry in lines]
    assert "Ready" in messages and "shutting down" in messages and messages[-1] == "stopped"
    assert all({"timestamp", "level", "target", "message"} <= entry.keys() for entry in lines)


def test_a_failed_grpc_server_ends_the_worker_non_zero(tiny_models: TinyModels) -> None:
    """The gRPC server is the worker's reason to live: when its task fails (here it
    cannot bind), the process exits 1 for its supervisor to restart it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        model = str(tiny_models.classifier)
        argv = ["worker", "--model-id", model, "--hostname", "127.0.0.1", "--port", str(port)]
        args = build_parser().parse_args(argv)
        assert worker_main.run_worker_from_args(args) == 1
