"""Models on demand with real workers: three on-demand instances under a memory cap that
fits two, a grpcio client rotating over them by name through the multiplexer."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tomli_w

from tei_manager._proto.tei.v1 import tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tei_manager.manager.ondemand import REFRESH_SECS
from tests import grpcio_client
from tests.e2e.test_manager_processes import READY_TIMEOUT, _free_port, _free_port_range
from tests.e2e.test_multiplexer_serve import Served

pytestmark = pytest.mark.slow

M = multiplexer_grpc.TeiMultiplexer
mux = multiplexer_pb2
MIB = 1 << 20
# What the instances of the test share (the measured footprint is kept per such config).
_INSTANCE = {"max_batch_tokens": 512}


@contextlib.contextmanager
def _serve(tmp_path: Path, limit_bytes: int | None) -> Iterator[Served]:
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
        "grpc_request_timeout_secs": READY_TIMEOUT,
        "devices": {} if limit_bytes is None else {"cpu_memory_limit_bytes": limit_bytes},
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


def _measured_footprint(tmp_path: Path, minilm_dir: Path) -> int:
    """What the manager measures an instance of the test's configuration to hold.

    Admission sizes an instance by its estimate until one like it was measured, then
    by the measurement (the worker's engine decides which is larger), so a cap that
    fits exactly two must come from the measured figure: one manager runs an instance
    until it is measured and keeps the figure in the state file, which the test's
    manager then starts from.
    """
    with _serve(tmp_path, None) as served:
        probe = {**_INSTANCE, "name": "probe", "model_id": str(minilm_dir)}
        status, body = served.request("POST", "/instances", probe)
        assert status == 201, body
        served.wait("running", lambda: _statuses(served)["probe"] == "running")

        # Measured every REFRESH_SECS; reserved then becomes what the process holds
        # (unless it was measured already by the time of the first reading).
        def reserved() -> int:
            return int(served.request("GET", "/devices")[1]["devices"][0]["reserved_bytes"])

        first = reserved()
        deadline = time.monotonic() + 3 * REFRESH_SECS
        while reserved() == first and time.monotonic() < deadline:
            time.sleep(0.2)
        assert served.request("DELETE", "/instances/probe")[0] in (200, 204)
    state = tomllib.loads((tmp_path / "state.toml").read_text())
    (footprint,) = state["footprints"]
    return int(footprint["bytes"])


@pytest.fixture
def cap_bytes(tmp_path: Path, minilm_dir: Path) -> int:
    """Two instances fit, three do not, with room for the measured peak to grow by a quarter."""
    return _measured_footprint(tmp_path, minilm_dir) * 5 // 2


@pytest.fixture
def served(tmp_path: Path, cap_bytes: int) -> Iterator[Served]:
    with _serve(tmp_path, cap_bytes) as served:
        yield served


def _metric(served: Served, name: str, labels: str) -> float:
    _, text = served.request("GET", "/metrics")
    found = re.search(rf"^{name}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _statuses(served: Served) -> dict[str, str]:
    _, infos = served.request("GET", "/instances")
    return {i["name"]: i["status"] for i in infos}


def test_three_on_demand_models_rotate_through_a_cap_that_fits_two(
    served: Served, minilm_dir: Path, cap_bytes: int
) -> None:
    for name in ("a", "b", "c"):
        status, body = served.request(
            "POST",
            "/instances",
            {**_INSTANCE, "name": name, "model_id": str(minilm_dir), "start": "on_demand"},
        )
        assert status == 201, body
        assert body["status"] == "idle"
    _, devices = served.request("GET", "/devices")
    assert devices["devices"][0]["cap_bytes"] == cap_bytes

    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        embed = grpcio_client.stub(channel, M.Embed)

        def ask(name: str) -> None:
            request = mux.EmbedRequest(
                target=mux.Target(instance_name=name), request=tei_pb2.EmbedRequest(inputs=name)
            )
            assert len(embed(request, timeout=READY_TIMEOUT).embeddings) == 384

        ask("a")
        ask("b")
        assert _statuses(served) == {"a": "running", "b": "running", "c": "idle"}
        ask("c")  # a is the least recently used: it makes room
        statuses = _statuses(served)
        assert statuses["b"] == statuses["c"] == "running"
        assert statuses["a"] in ("stopping", "idle")
        ask("a")  # now b is
        statuses = _statuses(served)
        assert statuses["c"] == statuses["a"] == "running"
        assert statuses["b"] in ("stopping", "idle")

    for name, starts in (("a", 2), ("b", 1), ("c", 1)):
        assert _metric(served, "tei_manager_cold_starts_total", f'instance="{name}"') == starts
    for name, evicted in (("a", 1), ("b", 1)):
        labels = f'instance="{name}",reason="memory"'
        assert _metric(served, "tei_manager_evictions_total", labels) == evicted
    _, text = served.request("GET", "/metrics")
    assert re.search(r"^tei_manager_cold_start_seconds_count 4\.0$", text, re.MULTILINE)
    reserved = re.search(
        r'^tei_manager_device_memory_bytes\{device="cpu",kind="reserved"\} (\S+)$',
        text,
        re.MULTILINE,
    )
    assert reserved is not None and 0 < float(reserved.group(1)) <= cap_bytes
