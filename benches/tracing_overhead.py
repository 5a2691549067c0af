"""Tracing's cost: CPU time per call with ``[otel]`` off, on, and before tracing existed.

The front doors run in this process, on one trio loop: the gRPC multiplexer and the
REST app with its gateway, in front of a fake tei.v1 instance (``fake_tei.py``'s Info
and Embed) in a subprocess. Two clients in this process call them, one call at a
time, and the process's CPU time per call is the figure: the manager's work plus a
client's, which is the same in every configuration, so differences are the manager's.

- ``grpc``: unary ``Embed`` through the multiplexer (the task-free relay), on our channel;
- ``rest``: ``POST /tei/b/embed`` through the gateway, HTTP/1.1 keep-alive.

Every call carries a sampled ``traceparent``. With ``--otel`` tracing is on, and each
call's two spans (the front door's and the relayed call's) are sent by the real
OTLP/gRPC exporter to a collector in the subprocess that drops them, so encoding and
sending are counted too. ``--sample-ratio`` applies to new traces only: the
``traceparent`` the clients send is sampled; ``--unsampled`` sends it unsampled.

One configuration per run; ``--compare TREE`` runs this script's configurations in
subprocesses, alternating, ``--rounds`` times: ``before`` (``PYTHONPATH=TREE``, a
checkout without tracing), ``off``, ``on`` and ``on-unsampled`` (this checkout), and
prints the median CPU µs per call of each with its difference to ``before``.

    python benches/tracing_overhead.py [--otel] [--calls 5000] [--json F]
    python benches/tracing_overhead.py --compare /path/to/checkout-before [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))  # tests.fake_manager; tei_manager from PYTHONPATH first

import msgspec  # noqa: E402
import trio  # noqa: E402
from fake_tei import FakeEmbed, FakeInfo  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

import tei_manager  # noqa: E402
from tei_manager._proto.tei.v1 import tei_pb2  # noqa: E402
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2  # noqa: E402
from tei_manager.api import serve_api  # noqa: E402
from tei_manager.config import InstanceConfig, ManagerConfig  # noqa: E402
from tei_manager.core.instances import InstanceTable  # noqa: E402
from tei_manager.core.ports import PortAllocator  # noqa: E402
from tei_manager.gateway.relay import create_gateway  # noqa: E402
from tei_manager.grpc.channel import open_channel  # noqa: E402
from tei_manager.grpc.rpc import Servicer  # noqa: E402
from tei_manager.grpc.server import GrpcServer  # noqa: E402
from tei_manager.multiplexer.metrics import MultiplexerMetrics  # noqa: E402
from tei_manager.multiplexer.server import MultiplexerServer, shared_routing  # noqa: E402
from tests.fake_manager import FakeManager  # noqa: E402

#: Calls whose function calls are counted (after the timed ones: counting slows them).
COUNTED = 50
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _serve_peers() -> None:
    """The subprocess: a fake instance and a collector that drops what it is sent; prints
    their ports, serves until stdin closes."""
    from tei_manager.grpc.rpc import MethodSpec

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            instance = GrpcServer([FakeEmbed(), FakeInfo("m/b", 512, 16384)])
            ports = [await nursery.start(instance.run)]
            try:
                from tei_manager.otlp import EXPORT
            except ImportError:  # a checkout without tracing: no collector needed
                ports.append(0)
            else:
                spec: MethodSpec[Any, Any] = EXPORT

                class Sink(Servicer):
                    SERVICE = spec.service
                    METHODS = (spec,)

                    async def Export(self, request: Any, context: Any) -> Any:
                        return spec.response_type()

                ports.append(await nursery.start(GrpcServer([Sink()]).run))
            print(*ports, flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)
            nursery.cancel_scope.cancel()

    trio.run(main)


def _table(port: int) -> InstanceTable:
    table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    now = datetime.now(UTC)
    record = table.add(InstanceConfig(name="b", model_id="m/b"), created_at=now)
    record.config = msgspec.structs.replace(record.config, port=port)
    record.mark_starting(pid=1, now=now)
    record.mark_running()
    return table


class _Http:
    """A minimal HTTP/1.1 keep-alive client: one request at a time, Content-Length bodies."""

    def __init__(self, stream: trio.SocketStream, traceparent: str) -> None:
        self._stream = stream
        self._traceparent = traceparent
        self._buffer = bytearray()

    async def post(self, path: str, body: bytes) -> bytes:
        head = (
            f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
            f"traceparent: {self._traceparent}\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        await self._stream.send_all(head.encode() + body)
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            await self._receive()
        headers = bytes(self._buffer[:end]).decode("latin-1").lower()
        if not headers.startswith("http/1.1 200"):
            raise RuntimeError(headers.splitlines()[0])
        length = int(headers.split("content-length:")[1].split("\r\n")[0])
        while len(self._buffer) < end + 4 + length:
            await self._receive()
        reply = bytes(self._buffer[end + 4 : end + 4 + length])
        del self._buffer[: end + 4 + length]
        return reply

    async def _receive(self) -> None:
        data = await self._stream.receive_some(65536)
        if not data:
            raise RuntimeError("connection closed")
        self._buffer += data


class _CallCounter:
    """Counts Python and C function calls in this thread (``sys.setprofile``): a
    figure the machine's load does not move, unlike CPU time."""

    def __init__(self) -> None:
        self.calls = 0

    def __enter__(self) -> _CallCounter:
        sys.setprofile(self._count)
        return self

    def __exit__(self, *_: object) -> None:
        sys.setprofile(None)

    def _count(self, frame: Any, event: str, arg: Any) -> None:
        if event in ("call", "c_call"):
            self.calls += 1


def _per_call(calls: int, started: tuple[float, float]) -> dict[str, float]:
    cpu, wall = time.process_time() - started[0], time.perf_counter() - started[1]
    return {"cpu_us": cpu / calls * 1e6, "wall_us": wall / calls * 1e6}


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    exporter = None
    peers = await trio.lowlevel.open_process(
        [sys.executable, __file__, "--serve-peers"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert peers.stdout is not None and peers.stdin is not None
    line = b""
    while not line.endswith(b"\n"):
        line += await peers.stdout.receive_some(100)
    instance_port, sink_port = map(int, line.split())
    with tempfile.TemporaryDirectory() as tmp:
        config = ManagerConfig(
            api_host="127.0.0.1", api_port=0, grpc_port=0,
            state_file=f"{tmp}/state.toml", log_dir=f"{tmp}/logs",
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            if args.otel:
                from tei_manager import tracing
                from tei_manager.config import OtelConfig

                otel = OtelConfig(
                    endpoint=f"http://127.0.0.1:{sink_port}", sample_ratio=args.sample_ratio
                )
                exporter = tracing.install(otel)
                assert exporter is not None
                await nursery.start(exporter.run)
            table = _table(instance_port)
            mux = MultiplexerServer(config, table, MultiplexerMetrics(CollectorRegistry()))
            mux_port = await nursery.start(mux.run)
            manager = FakeManager(config)
            shared = shared_routing(config, table)
            await nursery.start(shared.pool.run)
            gateway = create_gateway(
                config,
                table,
                manager.metrics.prometheus,
                shared,
            )
            api_port = await nursery.start(
                partial(serve_api, manager, "127.0.0.1", 0, gateway=gateway)
            )
            request = multiplexer_pb2.EmbedRequest(
                target=multiplexer_pb2.Target(instance_name="b"),
                request=tei_pb2.EmbedRequest(inputs="a short text to embed"),
            )
            traceparent = TRACEPARENT[:-2] + ("00" if args.unsampled else "01")
            metadata = (("traceparent", traceparent),)
            embed = multiplexer_grpc.TeiMultiplexer.Embed
            async with open_channel("127.0.0.1", mux_port) as channel:
                for _ in range(args.calls // 10):  # warm: connections up, caches filled
                    await channel.unary_unary(embed, request, metadata=metadata)
                started = time.process_time(), time.perf_counter()
                for _ in range(args.calls):
                    await channel.unary_unary(embed, request, metadata=metadata)
                figures["grpc"] = _per_call(args.calls, started)
                with _CallCounter() as counter:
                    for _ in range(COUNTED):
                        await channel.unary_unary(embed, request, metadata=metadata)
                figures["grpc"]["functions"] = counter.calls / COUNTED
            body = b'{"inputs": "a short text to embed"}'
            rest_calls = max(1, args.calls // 5)  # each costs several times a gRPC call
            async with await trio.open_tcp_stream("127.0.0.1", api_port) as stream:
                http = _Http(stream, traceparent)
                for _ in range(rest_calls // 10):
                    await http.post("/tei/b/embed", body)
                started = time.process_time(), time.perf_counter()
                for _ in range(rest_calls):
                    await http.post("/tei/b/embed", body)
                figures["rest"] = _per_call(rest_calls, started)
                with _CallCounter() as counter:
                    for _ in range(COUNTED):
                        await http.post("/tei/b/embed", body)
                figures["rest"]["functions"] = counter.calls / COUNTED
            if exporter is not None:
                await exporter.flush()
                figures["spans_exported"] = exporter.sent
                figures["spans_dropped"] = exporter.dropped
            nursery.cancel_scope.cancel()
    await peers.stdin.aclose()
    await peers.wait()
    figures["tei_manager"] = str(Path(tei_manager.__file__).parent)
    figures["otel"] = bool(args.otel)
    return figures


def _compare(args: argparse.Namespace) -> None:
    here = str(HERE.parent)
    runs = {
        "before": (args.compare, []),
        "off": (here, []),
        "on": (here, ["--otel"]),
        "on-unsampled": (here, ["--otel", "--unsampled"]),
    }
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for round_ in range(args.rounds):
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        for name in order:
            tree, extra = runs[name]
            env = {**os.environ, "PYTHONPATH": tree}
            command = [sys.executable, __file__, "--calls", str(args.calls), "--print-json", *extra]
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
            results[name].append(json.loads(out.stdout.splitlines()[-1]))
    summary: dict[str, dict[str, float]] = {}
    for name, rounds in results.items():
        summary[name] = {
            f"{door}_{key}": statistics.median(r[door][key] for r in rounds)
            for door in ("grpc", "rest")
            for key in ("cpu_us", "wall_us", "functions")
        }
    print(
        f"Per call, median of {args.rounds} rounds of {args.calls} gRPC calls "
        "(CPU µs; function calls, Python and C, in this process)"
    )
    columns = [(door, key) for door in ("grpc", "rest") for key in ("cpu_us", "functions")]
    print(f"{'':12}" + "".join(f"{door + ' ' + key:>16}{'Δ before':>10}" for door, key in columns))
    base = summary["before"]
    for name, figures in summary.items():
        cells = []
        for door, key in columns:
            value = figures[f"{door}_{key}"]
            cells.append(f"{value:16.1f}{value - base[f'{door}_{key}']:+10.1f}")
        print(f"{name:12}" + "".join(cells))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rounds": results}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--otel", action="store_true", help="tracing on, spans exported")
    parser.add_argument("--sample-ratio", type=float, default=1.0)
    parser.add_argument("--unsampled", action="store_true", help="the clients' traces are not")
    parser.add_argument("--calls", type=int, default=5000, help="gRPC calls (REST: a fifth)")
    parser.add_argument("--compare", metavar="TREE", help="before / off / on, alternating")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--print-json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-peers", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_peers:
        _serve_peers()
        return
    if args.compare:
        _compare(args)
        return
    figures = trio.run(_measure, args)
    if args.print_json:
        print(json.dumps(figures))
        return
    for door in ("grpc", "rest"):
        f = figures[door]
        print(
            f"{door:5} {f['cpu_us']:8.1f} CPU µs/call {f['wall_us']:8.1f} wall µs/call "
            f"{f['functions']:8.1f} function calls/call"
        )
    if args.otel:
        print(f"spans exported {figures['spans_exported']}, dropped {figures['spans_dropped']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
