"""Many nodes behind one ordinary proxy, as ``deploy/nginx/tei-pools.conf`` ships it.

Two ``tei-manager serve`` processes are two "nodes" with different model sets
(pool-a-1: bge-small and minilm; pool-b-1: bge-base and minilm), their instances the
fake TEI of ``benches/fake_tei.py``. The config's second member of each pool points
at a port nobody listens on, a node that is down from the start. A real nginx runs
the shipped config (only addresses, ports, certificate paths and the pid file
rewritten) and routes on the ``x-tei-model`` / ``x-tei-instance`` header. Through
its one TLS address the OpenAI SDK and grpcio must reach the right model; killing
pool-a-1's manager must move minilm's requests to pool-b-1 (nginx's next upstream)
and leave bge-small with no node at all.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tei_manager.testing import packaged_model_dir
from tests import grpcio_client
from tests.auth_pki import make_pki

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benches"))

import control_plane as cp  # noqa: E402  (a bench helper: managers as subprocesses)
from chaos import fake_binary  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed"),
]

CONF = ROOT / "deploy" / "nginx" / "tei-pools.conf"
SMALL = "BAAI/bge-small-en-v1.5"
BASE = "BAAI/bge-base-en-v1.5"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
NODES = {
    "pool-a-1": [("bge-small", SMALL), ("minilm", MINILM)],
    "pool-b-1": [("bge-base", BASE), ("minilm", MINILM)],
}
DOWN = ("pool-a-2", "pool-b-2")  # in the config, never started
READY_SECS = 60.0


@dataclass
class Node:
    manager: cp.Manager
    grpc_port: int

    def requests_for(self, model: str) -> float:
        """``tei_manager_inference_requests_total`` for ``model`` on this node."""
        _, text = self.manager.api.exchange("GET", "/metrics")
        total = 0.0
        for line in text.decode().splitlines():
            if line.startswith("tei_manager_inference_requests_total{") and f'"{model}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total


def _fake_cache(root: Path) -> Path:
    """A Hugging Face cache holding each model id (the fake TEI never reads it)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    for model_id in (SMALL, BASE, MINILM):
        repo = root / ("models--" + model_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        shutil.copy(packaged_model_dir() / "config.json", snapshot / "config.json")
    return root


def _wait_running(node: Node, names: list[str]) -> None:
    deadline = time.monotonic() + READY_SECS
    while time.monotonic() < deadline:
        body = node.manager.api.get("/instances")
        items = body["instances"] if isinstance(body, dict) else body
        if {i["name"] for i in items if i["status"] == "running"} >= set(names):
            return
        time.sleep(0.05)
    raise TimeoutError(f"instances {names} not running:\n{node.manager.log_tail()}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _render(nodes: dict[str, Node], port: int, pki: Any, prefix: Path) -> str:
    """The shipped config with this test's addresses, ports, certificates and pid file."""
    conf = CONF.read_text()
    for name, node in nodes.items():
        conf = conf.replace(f"{name}.internal:9000", f"127.0.0.1:{node.manager.api.port}")
        conf = conf.replace(f"{name}.internal:9001", f"127.0.0.1:{node.grpc_port}")
    for name in DOWN:  # a node that is down: connections are refused
        for port_in_conf in (9000, 9001):
            conf = conf.replace(f"{name}.internal:{port_in_conf}", f"127.0.0.1:{_free_port()}")
    assert ".internal:" not in conf
    version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version)
    assert found is not None, version
    listen = f"listen 127.0.0.1:{port} ssl"
    if tuple(map(int, found.groups())) < (1, 25, 1):  # "http2 on" arrived in 1.25.1
        conf = conf.replace("listen 443 ssl;\n        http2 on;", f"{listen} http2;")
    else:
        conf = conf.replace("listen 443 ssl;", f"{listen};")
    conf = conf.replace("/etc/nginx/pki/server.pem", str(pki.server_cert))
    conf = conf.replace("/etc/nginx/pki/server.key", str(pki.server_key))
    conf = conf.replace("/tmp/nginx-tei-pools.pid", str(prefix / "nginx.pid"))
    assert f"127.0.0.1:{port}" in conf and "/etc/nginx" not in conf
    return f"daemon off;\nerror_log {prefix / 'error.log'} warn;\n" + conf


@pytest.fixture
def front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The two nodes and nginx in front of them; everything stopped afterwards."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_binary(bin_dir)  # text-embeddings-router on PATH: the managers run it
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HF_HUB_CACHE", str(_fake_cache(tmp_path / "hub")))
    with ExitStack() as stack:
        nodes: dict[str, Node] = {}
        for name, instances in NODES.items():
            workdir = tmp_path / name
            workdir.mkdir()
            grpc_port = _free_port()
            seeds = [{"name": n, "model_id": m} for n, m in instances]
            manager, _ = stack.enter_context(
                cp.run_manager(workdir, seeds=seeds, grpc_port=grpc_port)
            )
            nodes[name] = Node(manager, grpc_port)
        for name, node in nodes.items():
            _wait_running(node, [n for n, _ in NODES[name]])
        pki = make_pki(tmp_path)
        prefix = tmp_path / "nginx"
        (prefix / "logs").mkdir(parents=True)
        port = _free_port()
        (prefix / "nginx.conf").write_text(_render(nodes, port, pki, prefix))
        command = ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
        command += ["-e", str(prefix / "error.log")]
        nginx = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(_stop, nginx)
        deadline = time.monotonic() + 10
        while True:
            assert nginx.poll() is None, (prefix / "error.log").read_text(errors="replace")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not listen"
                time.sleep(0.05)
        yield {"nodes": nodes, "port": port, "ca": pki.ca_path}


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()  # nginx: fast shutdown
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _embed(client: openai.OpenAI, model: str, header: tuple[str, str], text: str) -> list[float]:
    reply = client.embeddings.create(model=model, input=text, extra_headers={header[0]: header[1]})
    return list(reply.data[0].embedding)


def _info(channel: grpc.Channel, header: tuple[str, str]) -> str:
    """The model id of the instance an untargeted Info call reached through nginx."""
    info = grpcio_client.stub(channel, multiplexer_grpc.TeiMultiplexer.Info)
    reply = info(multiplexer_pb2.InfoRequest(), metadata=(header,), timeout=10)
    return str(reply.model_id)


def test_one_nginx_address_routes_by_header_and_fails_over_within_a_pool(
    front: dict[str, Any],
) -> None:
    nodes: dict[str, Node] = front["nodes"]
    address = f"127.0.0.1:{front['port']}"
    http = httpx.Client(verify=ssl.create_default_context(cafile=front["ca"]), timeout=10)
    client = openai.OpenAI(
        base_url=f"https://{address}/v1", api_key="unused", http_client=http, max_retries=0
    )
    credentials = grpc.ssl_channel_credentials(front["ca"].read_bytes())
    channel = grpc.secure_channel(address, credentials)
    try:
        # Each model reaches a node that serves it: the other node has no such
        # model and would answer 404 / NOT_FOUND.
        for model in (SMALL, BASE, MINILM):
            assert _embed(client, model, ("x-tei-model", model), "four") == [4.0] + [1.0] * 7
        assert _info(channel, ("x-tei-model", SMALL)) == SMALL
        assert _info(channel, ("x-tei-model", BASE)) == BASE
        assert _info(channel, ("x-tei-instance", "bge-base")) == BASE
        listed = client.models.list(extra_headers={"x-tei-model": BASE})
        assert {"bge-base", BASE, "minilm"} <= {m.id for m in listed.data}
        assert SMALL not in {m.id for m in listed.data}  # pool-b-1's own list
        # The header routes; a body naming another model is refused by the manager.
        with pytest.raises(openai.BadRequestError) as refused:
            _embed(client, BASE, ("x-tei-model", SMALL), "x")
        assert "x-tei-model" in str(refused.value) and "model" in str(refused.value)
        with pytest.raises(openai.NotFoundError):  # no header: nginx has no pool
            client.embeddings.create(model=SMALL, input="x")
        with pytest.raises(grpc.RpcError) as no_pool:
            _info(channel, ("x-tei-model", "unknown/model"))
        assert no_pool.value.code() == grpc.StatusCode.NOT_FOUND

        # The shared model is balanced over both pools' nodes.
        for i in range(8):
            _embed(client, MINILM, ("x-tei-model", MINILM), "x" * (i + 1))
            assert _info(channel, ("x-tei-instance", "minilm")) == MINILM
        assert all(node.requests_for(MINILM) > 0 for node in nodes.values())

        # pool-a-1 dies: minilm moves to pool-b-1; bge-small has no node left.
        nodes["pool-a-1"].manager.process.kill()
        nodes["pool-a-1"].manager.process.wait()
        before = nodes["pool-b-1"].requests_for(MINILM)
        for i in range(8):
            assert _embed(client, MINILM, ("x-tei-model", MINILM), "y" * (i + 1))[0] == i + 1
            assert _info(channel, ("x-tei-model", MINILM)) == MINILM
        assert nodes["pool-b-1"].requests_for(MINILM) == before + 8
        with pytest.raises(openai.APIStatusError) as gone:
            _embed(client, SMALL, ("x-tei-model", SMALL), "x")
        assert gone.value.status_code == 502
        with pytest.raises(grpc.RpcError) as unavailable:
            _info(channel, ("x-tei-model", SMALL))
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _embed(client, BASE, ("x-tei-model", BASE), "ok") == [2.0] + [1.0] * 7
    finally:
        channel.close()
        client.close()
