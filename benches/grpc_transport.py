"""gRPC transport cost: CPU per small unary call on our Channel and GrpcServer.

Two measurements, each ``--rounds`` rounds of ``--calls`` unary ``Tokenize.Decode``
calls, ``--concurrency`` at a time, over loopback; the median round is the result:

- direct: one process holds the client Channel and a server whose handler answers at
  once; CPU per call (``time.process_time``) covers both ends of the call.
- relay: the calls go through a relay in a child process: a raw servicer that, like
  the multiplexer, receives the request's bytes, makes the same call on a Channel to
  the backend (under a deadline, so ``grpc-timeout`` is sent) and sends the reply's
  bytes back. The figure is the relay process's own CPU per relayed call: one server
  side and one client side of a call, plus the relaying.
- direct on h2 (``--stack h2``): the direct measurement with client and server written
  on h2 4.x (``benches/h2_baseline.py``), the stack purerpc used, so the trade-off
  behind our own layer can be re-checked.

    python benches/grpc_transport.py [--calls 20000] [--concurrency 16] [--rounds 3]
                                     [--mode direct|relay|both] [--stack ours|h2|both]
                                     [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio
from h2_baseline import H2Client, serve_h2

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.grpc.calls import CallContext, ServerCall
from tei_manager.grpc.channel import Channel, open_channel
from tei_manager.grpc.rpc import Servicer
from tei_manager.grpc.server import GrpcServer

METHOD = tei_grpc.Tokenize.Decode


class Echo(tei_grpc.TokenizeServicer):
    async def Decode(
        self, request: tei_pb2.DecodeRequest, context: CallContext
    ) -> tei_pb2.DecodeResponse:
        return tei_pb2.DecodeResponse(text="ok")


class Relay(Servicer):
    """Relays Tokenize.Decode as bytes, the way the multiplexer relays a unary call."""

    SERVICE = METHOD.service
    METHODS = (METHOD,)
    RAW = True

    def __init__(self, backend: Channel) -> None:
        self.backend = backend

    async def Decode(self, call: ServerCall, context: CallContext) -> None:
        data = await call.receive()
        assert data is not None
        with trio.move_on_after(30):
            async with self.backend.open_call(METHOD, metadata=context.metadata) as relayed:
                await relayed.send_raw(data)
                await relayed.done_writing()
                reply = await relayed.receive_raw()
                assert reply is not None
                await call.send(reply)
                await relayed.receive_raw()


async def _drive(channel: Channel, calls: int, concurrency: int) -> None:
    request = tei_pb2.DecodeRequest(ids=[101, 7592, 2088, 102])

    async def worker(count: int) -> None:
        for _ in range(count):
            await channel.unary_unary(METHOD, request)

    async with trio.open_nursery() as nursery:
        for i in range(concurrency):
            nursery.start_soon(worker, calls // concurrency + (i < calls % concurrency))


async def _drive_h2(client: H2Client, calls: int, concurrency: int) -> None:
    request = tei_pb2.DecodeRequest(ids=[101, 7592, 2088, 102]).SerializeToString()
    path = f"/{METHOD.service}/{METHOD.name}"

    async def worker(count: int) -> None:
        for _ in range(count):
            tei_pb2.DecodeResponse.FromString(await client.unary(path, request))

    async with trio.open_nursery() as nursery:
        for i in range(concurrency):
            nursery.start_soon(worker, calls // concurrency + (i < calls % concurrency))


async def _rounds(
    drive: Callable[[int, int], Awaitable[None]],
    calls: int,
    concurrency: int,
    rounds: int,
    cpu: Callable[[], float],
) -> list[dict[str, float]]:
    await drive(min(calls, 2000), concurrency)  # warm-up
    results = []
    for _ in range(rounds):
        start_cpu, start = cpu(), time.perf_counter()
        await drive(calls, concurrency)
        used, wall = cpu() - start_cpu, time.perf_counter() - start
        results.append({"calls_per_s": calls / wall, "cpu_us_per_call": used / calls * 1e6})
        print(
            f"  {calls} calls at concurrency {concurrency}: "
            f"{results[-1]['calls_per_s']:8.0f} calls/s, "
            f"{results[-1]['cpu_us_per_call']:6.1f} CPU µs/call"
        )
    return results


async def measure_direct(calls: int, concurrency: int, rounds: int) -> list[dict[str, float]]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(GrpcServer([Echo()]).run)
        async with open_channel("127.0.0.1", port) as channel:
            results = await _rounds(
                partial(_drive, channel), calls, concurrency, rounds, time.process_time
            )
        nursery.cancel_scope.cancel()
    return results


def _decode_ok(request: bytes) -> bytes:
    tei_pb2.DecodeRequest.FromString(request)
    return tei_pb2.DecodeResponse(text="ok").SerializeToString()


async def measure_direct_h2(calls: int, concurrency: int, rounds: int) -> list[dict[str, float]]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_h2, f"/{METHOD.service}/{METHOD.name}", _decode_ok)
        async with H2Client(port) as client:
            results = await _rounds(
                partial(_drive_h2, client), calls, concurrency, rounds, time.process_time
            )
        nursery.cancel_scope.cancel()
    return results


async def measure_relay(
    child: subprocess.Popen[str], calls: int, concurrency: int, rounds: int
) -> list[dict[str, float]]:
    assert child.stdin is not None and child.stdout is not None
    stdin, stdout = child.stdin, child.stdout
    async with trio.open_nursery() as nursery:
        backend_port = await nursery.start(GrpcServer([Echo()]).run)
        stdin.write(f"{backend_port}\n")
        stdin.flush()
        relay_port = int(await trio.to_thread.run_sync(stdout.readline))

        def relay_cpu() -> float:
            stdin.write("cpu\n")
            stdin.flush()
            return float(stdout.readline())

        async with open_channel("127.0.0.1", relay_port) as channel:
            results = await _rounds(partial(_drive, channel), calls, concurrency, rounds, relay_cpu)
        nursery.cancel_scope.cancel()
    return results


async def _relay_child() -> None:
    """Read the backend's port, serve the relay, print its port, then answer each
    further stdin line with this process's CPU time."""
    stdin = trio.wrap_file(sys.stdin)
    backend_port = int(await stdin.readline())
    async with trio.open_nursery() as nursery, open_channel("127.0.0.1", backend_port) as backend:
        port = await nursery.start(GrpcServer([Relay(backend)]).run)
        print(port, flush=True)
        async for _ in stdin:
            print(time.process_time(), flush=True)
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=["direct", "relay", "both"], default="both")
    parser.add_argument(
        "--stack",
        choices=["ours", "h2", "both"],
        default="both",
        help="direct mode: our Channel/GrpcServer, the h2 4.x baseline, or both",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--relay-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay_child:
        trio.run(_relay_child)
        return
    summary: dict[str, Any] = {"calls": args.calls, "concurrency": args.concurrency}
    modes = ["direct", "relay"] if args.mode == "both" else [args.mode]
    if "direct" in modes and args.stack != "ours":
        modes.insert(modes.index("direct") + 1, "direct_h2")
        if args.stack == "h2":
            modes.remove("direct")
    for mode in modes:
        counts = (args.calls, args.concurrency, args.rounds)
        if mode == "direct":
            print("direct: client and server together, one process")
            results = trio.run(measure_direct, *counts)
        elif mode == "direct_h2":
            print("direct_h2: the same on h2 4.x (the baseline), one process")
            results = trio.run(measure_direct_h2, *counts)
        else:
            print("relay: the relay process alone, per relayed call")
            child = subprocess.Popen(
                [sys.executable, __file__, "--relay-child"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                results = trio.run(measure_relay, child, *counts)
            finally:
                child.kill()
                child.wait()
        summary[mode] = {
            "calls_per_s": statistics.median(r["calls_per_s"] for r in results),
            "cpu_us_per_call": statistics.median(r["cpu_us_per_call"] for r in results),
        }
        print(
            f"  median: {summary[mode]['calls_per_s']:.0f} calls/s, "
            f"{summary[mode]['cpu_us_per_call']:.1f} CPU µs/call"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
