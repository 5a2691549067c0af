"""``tei-manager serve`` with its multiplexer, as a user runs it: two instances of the
packaged model created over REST, then a plain grpcio client on the gRPC port."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import tomli_w

from tei_manager._proto.tei.v1 import tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tests import grpcio_client
from tests.e2e.test_manager_processes import READY_TIMEOUT, _free_port, _free_port_range

pytestmark = pytest.mark.slow

M = multiplexer_grpc.TeiMultiplexer
mux = multiplexer_pb2


class Served:
    def __init__(self, process: subprocess.Popen[bytes], api: int, grpc_port: int, log: Path):
        self.process = process
        self.api = api
        self.grpc_port = grpc_port
        self.log = log

    def request(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                payload = response.read()
                status = response.status
        except urllib.error.HTTPError as error:
            payload, status = error.read(), error.code
        text = payload.decode()
        return status, json.loads(text) if text.startswith(("{", "[")) else text

    def wait(self, what: str, probe: Any, within: float = READY_TIMEOUT) -> Any:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited: {self.log.read_text()[-3000:]}")
            try:
                found = probe()
            except OSError:
                found = None
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{what} not within {within} s: {self.log.read_text()[-3000:]}")

    def running(self, name: str, not_pid: int | None = None) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            status, info = self.request("GET", f"/instances/{name}")
            if status == 200 and info["status"] == "running" and info["pid"] != not_pid:
                return dict(info)
            return None

        return dict(self.wait(f"{name} running", probe))

    def requests_served(self, instance: str, method: str) -> float:
        _, text = self.request("GET", "/metrics")
        pattern = (
            rf'tei_manager_grpc_requests_total\{{instance="{instance}",method="{method}"\}} (\S+)'
        )
        found = re.search(pattern, text)
        return float(found.group(1)) if found else 0.0


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    api, grpc_port = _free_port(), _free_port()
    start = _free_port_range(6)
    settings = {
        "api_host": "127.0.0.1",
        "api_port": api,
        "grpc_port": grpc_port,
        "state_file": str(tmp_path / "state.toml"),
        "log_dir": str(tmp_path / "logs"),
        "instance_port_start": start,
        "instance_port_end": start + 5,
        "startup_timeout_secs": READY_TIMEOUT,
        "graceful_shutdown_timeout_secs": 4.0,
    }
    config = tmp_path / "config.toml"
    config.write_text(tomli_w.dumps(settings))
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEI_")}
    env["HF_HUB_OFFLINE"] = "1"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tei_manager", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    served = Served(process, api, grpc_port, log)
    try:
        served.wait("ready", lambda: served.request("GET", "/health/ready")[0] == 200, 30)
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                assert process.wait(30) == 0, log.read_text()[-3000:]
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()


def _embed(stub: Any, target: multiplexer_pb2.Target, text: str = "route me") -> list[float]:
    request = mux.EmbedRequest(target=target, request=tei_pb2.EmbedRequest(inputs=text))
    return list(stub(request, timeout=60).embeddings)


def test_two_replicas_by_name_model_and_index_then_restart_mid_stream(
    served: Served, minilm_dir: Path
) -> None:
    for name in ("a", "b"):
        status, body = served.request(
            "POST", "/instances", {"name": name, "model_id": str(minilm_dir)}
        )
        assert status == 201, body
    a, b = served.running("a"), served.running("b")
    assert a["model_id"] == b["model_id"] == str(minilm_dir)

    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        embed = grpcio_client.stub(channel, M.Embed)
        by_name = _embed(embed, mux.Target(instance_name="a"))
        assert len(by_name) == 384
        for _ in range(6):
            assert _embed(embed, mux.Target(model_id=str(minilm_dir))) == pytest.approx(
                by_name, abs=1e-5
            )
        assert served.requests_served("a", "Embed") >= 2
        assert served.requests_served("b", "Embed") >= 3  # both replicas took traffic
        before = served.requests_served("b", "Embed")
        _embed(embed, mux.Target(instance_index=1))
        assert served.requests_served("b", "Embed") == before + 1

        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
            ProtoReflectionDescriptorDatabase,
        )

        assert M.NAME in set(ProtoReflectionDescriptorDatabase(channel).get_services())

        # A stream open on "a" while "a" restarts ends with a clean status...
        stream = grpcio_client.stub(channel, M.EmbedStream)
        outbox: queue.Queue[multiplexer_pb2.EmbedRequest | None] = queue.Queue()

        def requests() -> Iterator[multiplexer_pb2.EmbedRequest]:
            while (item := outbox.get()) is not None:
                yield item

        outbox.put(
            mux.EmbedRequest(
                target=mux.Target(instance_name="a"), request=tei_pb2.EmbedRequest(inputs="one")
            )
        )
        replies = stream(requests(), timeout=120)
        assert len(next(replies).embeddings) == 384
        status, _ = served.request("POST", "/instances/a/restart")
        assert status == 200
        with pytest.raises(grpc.RpcError) as broken:
            next(replies)
        outbox.put(None)
        assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
        assert 'instance "a"' in (broken.value.details() or "")
        # ...and once it runs again, the next call succeeds.
        served.running("a", not_pid=a["pid"])
        assert len(_embed(embed, mux.Target(instance_name="a"))) == 384
