"""REST inference CPU per request, with no model: where a single-input /v1/embeddings goes.

Three servers run side by side as subprocesses, each answering the same keep-alive
``POST /v1/embeddings`` (one input, a 384-float answer):

- ``gateway``: ``serve_api`` with the gateway (Hypercorn, the inference path, a
  session, a tei.v1 call over the pooled HTTP/2 connection) to an in-process fake
  instance that answers every Embed with the same reply;
- ``hypercorn``: Hypercorn with a trivial ASGI app that sends the same JSON: what the
  server costs before any of our code runs;
- ``front``: the REST port's lean HTTP/1.1 front (``tei_manager.api.front``, its
  heads read by ``tei_manager.api.http1``) with a trivial inference view that answers
  the same JSON: what the front costs before the handler runs (the ``gateway`` row's
  plaintext connections go through it);
- ``h11``: a bare trio + h11 loop that sends the same JSON: the scale of HTTP/1.1 in
  Python here (the front used h11 until it cost as much as the rest of the front).

The client (this process, blocking sockets) sends batches of ``--batch`` requests to
each in turn for ``--rounds`` rounds and reads each server's user + system CPU from
/proc around every batch, so a busy host weighs on all three alike; a figure is the
median over rounds. A direct gRPC Embed batch to the gateway's fake instance gives
the fake's own share, which the "manager" figure leaves out.

``--baseline DIR`` adds a fourth server: the ``gateway`` one with ``tei_manager``
imported from the source tree DIR (another checkout), measured in the same rounds.
The servers import ``tei_manager`` and the tests' fakes from this source tree:

    python benches/http_cpu.py [--rounds 10] [--batch 400] [--baseline DIR] [--json F]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Final

import grpc
import msgspec
import trio
from control_plane import cpu_seconds

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2

HOST: Final = "127.0.0.1"
TEXT: Final = "the quick brown fox jumps over the lazy dog"
VECTOR: Final = [((i * 7919) % 1000) / 1000.0 - 0.5 for i in range(384)]
REPLY: Final = tei_pb2.EmbedResponse(embeddings=VECTOR, metadata=tei_pb2.Metadata(compute_tokens=9))
ANSWER: Final = msgspec.json.encode(
    {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": VECTOR}],
        "model": "b",
        "usage": {"prompt_tokens": 9, "total_tokens": 9},
    }
)
VARIANTS: Final = ("gateway", "hypercorn", "front", "h11")


# --- the servers (child processes) -----------------------------------------------------------


class _Info(tei_grpc.InfoServicer):
    async def Info(self, request: tei_pb2.InfoRequest, context: Any) -> tei_pb2.InfoResponse:
        return tei_pb2.InfoResponse(model_id="m/b", model_type=tei_pb2.MODEL_TYPE_EMBEDDING)


class _Embed(tei_grpc.EmbedServicer):
    async def Embed(self, request: tei_pb2.EmbedRequest, context: Any) -> tei_pb2.EmbedResponse:
        return REPLY


async def _gateway(nursery: trio.Nursery, workdir: Path) -> tuple[int, int]:
    from tei_manager.api import serve_api
    from tei_manager.config import InstanceConfig, ManagerConfig
    from tei_manager.core.instances import InstanceTable
    from tei_manager.core.ports import PortAllocator
    from tei_manager.gateway.relay import create_gateway
    from tei_manager.grpc.server import GrpcServer
    from tei_manager.multiplexer.server import shared_routing
    from tests.fake_manager import FakeManager

    config = ManagerConfig(
        api_port=0, grpc_port=0, state_file=str(workdir / "s.toml"), log_dir=str(workdir)
    )
    backend_port: int = await nursery.start(GrpcServer([_Embed(), _Info()]).run)
    table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    record = table.add(
        InstanceConfig(name="b", model_id="m/b", max_concurrent_requests=64),
        created_at=datetime.now(UTC),
    )
    record.config = msgspec.structs.replace(record.config, port=backend_port)
    record.mark_starting(pid=1, now=datetime.now(UTC))
    record.mark_running()
    manager = FakeManager(config)
    shared = shared_routing(config, table)
    await nursery.start(shared.pool.run)
    gateway = create_gateway(
        config,
        table,
        manager.metrics.prometheus,
        shared,
    )
    port: int = await nursery.start(partial(serve_api, manager, HOST, 0, gateway=gateway))
    return port, backend_port


async def _asgi(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER})


async def _hypercorn(nursery: trio.Nursery) -> int:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    probe = trio.socket.socket()
    await probe.bind((HOST, 0))
    port: int = probe.getsockname()[1]
    probe.close()
    config = Config()
    config.bind = [f"{HOST}:{port}"]
    config.accesslog = None
    config.errorlog = None
    await nursery.start(partial(serve, _asgi, config))  # type: ignore[arg-type]
    return port


async def _front(nursery: trio.Nursery, workdir: Path) -> int:
    from hypercorn.config import Config
    from prometheus_client import CollectorRegistry
    from werkzeug.routing import Map, Rule

    from tei_manager.api.auth import RequestGuard
    from tei_manager.api.front import LeanFront, ReplayStream
    from tei_manager.api.inference import Answer, InferenceRequest
    from tei_manager.api.inference_asgi import InferenceDispatch
    from tei_manager.api.openai_routes import OpenAIDoor
    from tei_manager.auth.security import build_security
    from tei_manager.config import ManagerConfig

    async def view(request: InferenceRequest) -> Answer:
        return Answer(ANSWER)

    async def hand_off(stream: ReplayStream) -> None:
        await stream.aclose()  # every request here is an inference one

    config = ManagerConfig(state_file=str(workdir / "s.toml"), log_dir=str(workdir))
    guard = RequestGuard(build_security(config, CollectorRegistry()))
    url_map = Map([Rule("/v1/embeddings", endpoint="embed", methods=["POST"])])
    dispatch = InferenceDispatch(url_map, {"embed": (OpenAIDoor(), view)}, guard)
    front = LeanFront(dispatch, Config(), hand_off, lambda *observed: None)
    await nursery.start(front.run)
    listeners = await nursery.start(trio.serve_tcp, front.serve, 0)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def _h11_connection(stream: trio.SocketStream) -> None:
    import h11

    conn = h11.Connection(h11.SERVER)
    head = [("content-type", "application/json"), ("content-length", str(len(ANSWER)))]
    async with stream:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.EndOfMessage):
                out = conn.send(h11.Response(status_code=200, headers=head)) or b""
                out += (conn.send(h11.Data(data=ANSWER)) or b"") + (
                    conn.send(h11.EndOfMessage()) or b""
                )
                await stream.send_all(out)
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return


async def serve(variant: str) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        async with trio.open_nursery() as nursery:
            backend_port = 0
            if variant == "gateway":
                port, backend_port = await _gateway(nursery, Path(workdir))
            elif variant == "hypercorn":
                port = await _hypercorn(nursery)
            elif variant == "front":
                port = await _front(nursery, Path(workdir))
            else:
                listeners = await nursery.start(trio.serve_tcp, _h11_connection, 0)
                port = listeners[0].socket.getsockname()[1]
            print(port, backend_port, flush=True)
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()


# --- the client -----------------------------------------------------------------------------


class Server:
    def __init__(self, variant: str, source: Path | None = None) -> None:
        env = dict(os.environ)
        # The servers import tei_manager and the tests' fakes from this tree (or ``source``).
        env["PYTHONPATH"] = str(source or Path(__file__).resolve().parent.parent)
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", variant],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.process.stdout is not None
        self.port, self.backend_port = map(int, self.process.stdout.readline().split())
        self.http = http.client.HTTPConnection(HOST, self.port)
        self.body = json.dumps({"model": "b", "input": TEXT}).encode()

    def post(self, count: int) -> None:
        for _ in range(count):
            try:
                self.http.request("POST", "/v1/embeddings", self.body)
                reply = self.http.getresponse()
            except (ConnectionError, http.client.RemoteDisconnected):  # keep-alive ran out
                self.http.close()
                self.http = http.client.HTTPConnection(HOST, self.port)
                self.http.request("POST", "/v1/embeddings", self.body)
                reply = self.http.getresponse()
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}: {reply.read()[:200]!r}")
            reply.read()

    def cpu_us_per_request(self, work: Any, count: int) -> float:
        before = cpu_seconds(self.process.pid)
        work(count)
        return (cpu_seconds(self.process.pid) - before) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=400)
    parser.add_argument("--baseline", type=Path, help="another source tree's gateway too")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(serve, args.serve)
        return
    servers = {variant: Server(variant) for variant in VARIANTS}
    if args.baseline is not None:
        servers["gateway (baseline)"] = Server("gateway", args.baseline.resolve())
    try:
        gateway = servers["gateway"]
        channel = grpc.insecure_channel(f"{HOST}:{gateway.backend_port}")
        embed = channel.unary_unary(
            tei_grpc.Embed.Embed.path,
            request_serializer=tei_pb2.EmbedRequest.SerializeToString,
            response_deserializer=tei_pb2.EmbedResponse.FromString,
        )
        message = tei_pb2.EmbedRequest(inputs=TEXT, normalize=True)

        def direct(count: int) -> None:
            for _ in range(count):
                embed(message)

        for server in servers.values():
            server.post(100)  # warm up: imports, connections, the instance's Info
        direct(100)
        samples: dict[str, list[float]] = {name: [] for name in (*servers, "fake instance")}
        for _ in range(args.rounds):
            for name, server in servers.items():
                samples[name].append(server.cpu_us_per_request(server.post, args.batch))
            samples["fake instance"].append(gateway.cpu_us_per_request(direct, args.batch))
        figures = {name: statistics.median(values) for name, values in samples.items()}
    finally:
        for server in servers.values():
            server.process.terminate()
            server.process.wait()
    manager = figures["gateway"] - figures["fake instance"]
    print(f"{'server process CPU per request':40s} {'us':>6s}")
    for name, value in figures.items():
        print(f"{name:40s} {value:6.0f}")
    print(f"{'manager (gateway - fake instance)':40s} {manager:6.0f}")
    over = figures["hypercorn"] - figures["h11"]
    print(f"{'Hypercorn over a bare h11 loop':40s} {over:6.0f}")
    over = figures["front"] - figures["h11"]
    print(f"{'the lean front over a bare h11 loop':40s} {over:6.0f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {"cpu_us_per_request": figures, "manager_us": manager, "rounds": samples}
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
