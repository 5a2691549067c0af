"""Multiplexer CPU per relayed call: the manager process's own cost of a small unary call.

This process holds the multiplexer as ``tei-manager serve`` builds it (the shared
router with an on-demand starter, pool and admission; metrics; the authorizer its
config asks for, none by default) over an instance table of one running instance.
The instance is a fake tei.v1 server in a child process that answers Tokenize at
once; the client is grpcio (asyncio, as ``benches/multiplexer_overhead.py`` uses)
in another child process, ``--concurrency`` calls at a time. Only this process's
CPU time (``time.process_time``) is counted, from the client's first measured call
to its last: one server side and one client side of each call, plus the
multiplexer's bookkeeping. CPU time barely moves with other load on the machine,
unlike wall time, so two versions of the code compare on a busy box too.

Each round makes ``--calls`` calls; the median round is the result. ``--target
model`` routes by ``model_id`` (balancing, failover armed) instead of by
``instance_name`` (what multiplexer_overhead does). ``--profile F`` writes a
cProfile of this process over the measured rounds (read it with ``python -m pstats F``).

``--fake-transport`` measures the multiplexer's own bookkeeping alone, in this
process, with no sockets: the task-free handler routes, admits and relays each
call to a fake channel, the fake instance stream's reply and status answer it, and
the call ends, ``--calls`` times per round; the best round, less what the fakes
cost by themselves, is the result. It is exact enough to see a microsecond.

    python benches/multiplexer_cpu.py [--calls 4000] [--concurrency 16] [--rounds 5]
                                      [--target name|model] [--profile F] [--json F]
                                      [--fake-transport]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import msgspec
import trio
from prometheus_client import CollectorRegistry

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tei_manager.config import InstanceConfig, ManagerConfig
from tei_manager.core.instances import InstanceRecord, InstanceStatus, InstanceTable
from tei_manager.core.ondemand import Activity
from tei_manager.core.ports import PortAllocator
from tei_manager.core.routing import Router
from tei_manager.gateway.admission import Admission
from tei_manager.grpc._grpc_events import MessageReceived, ResponseEnded
from tei_manager.grpc.calls import CallContext
from tei_manager.grpc.rpc import StatusCode
from tei_manager.grpc.server import GrpcServer
from tei_manager.multiplexer.metrics import MultiplexerMetrics
from tei_manager.multiplexer.server import MultiplexerServer
from tei_manager.multiplexer.service import Multiplexer

INSTANCE = "bench"
MODEL = "bench/tokenizer"
TEXT = "the quick brown fox jumps over a lazy dog"


class FakeTokenize(tei_grpc.TokenizeServicer):
    """Answers every Tokenize at once with one token per word."""

    def __init__(self) -> None:
        tokens = [
            tei_pb2.SimpleToken(id=1000 + i, text=word, start=0, stop=len(word))
            for i, word in enumerate(TEXT.split())
        ]
        self._reply = tei_pb2.EncodeResponse(tokens=tokens)

    async def Tokenize(
        self, request: tei_pb2.EncodeRequest, context: CallContext
    ) -> tei_pb2.EncodeResponse:
        return self._reply


async def _backend_child() -> None:
    """Serve the fake instance; print its port; run until stdin closes."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(GrpcServer([FakeTokenize()]).run)
        print(port, flush=True)
        await trio.wrap_file(sys.stdin).read()
        nursery.cancel_scope.cancel()


def _client_child(port: int, calls: int, concurrency: int, target: str) -> None:
    """grpcio client: for each stdin line ``go``, make ``calls`` calls and print ``done``."""
    import grpc
    import grpc.aio

    spec = multiplexer_grpc.TeiMultiplexer.Tokenize
    where = (
        multiplexer_pb2.Target(model_id=MODEL)
        if target == "model"
        else multiplexer_pb2.Target(instance_name=INSTANCE)
    )
    request = multiplexer_pb2.EncodeRequest(
        target=where, request=tei_pb2.EncodeRequest(inputs=TEXT)
    )

    async def run() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            tokenize = channel.unary_unary(
                spec.path,
                request_serializer=spec.request_type.SerializeToString,
                response_deserializer=spec.response_type.FromString,
            )

            async def drive(count: int) -> None:
                async def worker(n: int) -> None:
                    for _ in range(n):
                        await tokenize(request, timeout=30)

                await asyncio.gather(
                    *(
                        worker(count // concurrency + (i < count % concurrency))
                        for i in range(concurrency)
                    )
                )

            await drive(min(calls, 1000))  # warm-up
            print("ready", flush=True)
            loop = asyncio.get_running_loop()
            while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "go":
                started = time.perf_counter()
                await drive(calls)
                print(f"done {time.perf_counter() - started}", flush=True)

    asyncio.run(run())


def _child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


async def _line(stream: IO[str]) -> str:
    return await trio.to_thread.run_sync(stream.readline)


async def _not_startable(record: InstanceRecord, deadline: float) -> None:
    raise AssertionError("the bench's instance runs: nothing to start")


async def measure(args: argparse.Namespace) -> list[dict[str, float]]:
    backend = _child("--backend-child")
    assert backend.stdin is not None and backend.stdout is not None
    try:
        backend_port = int(await _line(backend.stdout))
        instances = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
        record = instances.add(
            InstanceConfig(name=INSTANCE, model_id=MODEL), created_at=datetime.now(UTC)
        )
        record.config = msgspec.structs.replace(record.config, port=backend_port)
        record.status = InstanceStatus.RUNNING
        record.pid = backend.pid
        config = ManagerConfig(api_host="127.0.0.1", grpc_port=0)
        server = MultiplexerServer(
            config,
            instances,
            MultiplexerMetrics(CollectorRegistry()),
            activity=Activity(trio.current_time),
            starter=_not_startable,
        )
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            client = _child(
                "--client-child",
                str(port),
                str(args.calls),
                str(args.concurrency),
                args.target,
            )
            assert client.stdin is not None and client.stdout is not None
            try:
                assert await _line(client.stdout) == "ready\n"
                profile = cProfile.Profile() if args.profile is not None else None
                results = []
                for _ in range(args.rounds):
                    if profile is not None:
                        profile.enable()
                    cpu = time.process_time()
                    client.stdin.write("go\n")
                    client.stdin.flush()
                    done = await _line(client.stdout)
                    used = time.process_time() - cpu
                    if profile is not None:
                        profile.disable()
                    wall = float(done.split()[1])
                    per_call = used / args.calls * 1e6
                    results.append({"cpu_us_per_call": per_call, "calls_per_s": args.calls / wall})
                    print(
                        f"  {args.calls} calls at concurrency {args.concurrency}: "
                        f"{results[-1]['cpu_us_per_call']:6.1f} CPU µs/call, "
                        f"{results[-1]['calls_per_s']:7.0f} calls/s"
                    )
                if profile is not None:
                    profile.dump_stats(args.profile)
            finally:
                client.stdin.close()
                client.wait()
            nursery.cancel_scope.cancel()
        return results
    finally:
        backend.stdin.close()
        backend.wait()


class _FakeContext:
    metadata: tuple[tuple[str, str], ...] = ()


class _FakeCall:
    """What the task-free handler uses of a ``FastCall``; ending calls ``on_end``."""

    def __init__(self) -> None:
        self.started = trio.current_time()
        self.deadline = float("inf")
        self.deadline_message = "deadline exceeded"
        self.on_end: Any = None
        self.done = False
        self.context = _FakeContext()

    def limit(self, deadline: float, message: str) -> None:
        if deadline < self.deadline:
            self.deadline, self.deadline_message = deadline, message

    def spawn(self, *args: object) -> None:
        raise AssertionError("the call went on in a task: the fake channel is always ready")

    def reply(self, data: bytes | None, code: StatusCode = StatusCode.OK, message: str = "", *,
              retry_pushback_ms: int | None = None) -> None:  # fmt: skip
        if not self.done:
            self.done = True
            on_end, self.on_end = self.on_end, None
            on_end(code)


class _FakeStream:
    """An instance's answer: one reply message, then status OK."""

    def __init__(self) -> None:
        self._events: list[Any] = [ResponseEnded(1, 0, ""), MessageReceived(1, b"reply", 10)]
        self.watcher: Any = None
        self.response_ended: Any = None
        self.error = None
        self.reset = False

    def pop_event(self) -> Any:
        if not self._events:
            return None
        event = self._events.pop()
        if type(event) is ResponseEnded:
            self.response_ended = event
        return event

    def release(self) -> None:
        pass

    def cancel(self) -> None:
        pass


class _FakeChannel:
    def __init__(self) -> None:
        self.stream = _FakeStream()

    def relay(self, spec: Any, data: bytes, *, deadline: float, watcher: Any,
              metadata: Any = ()) -> _FakeStream:  # fmt: skip
        self.stream.watcher = watcher
        return self.stream


class _FakePool:
    def __init__(self) -> None:
        self.channel = _FakeChannel()

    def ready(self, record: InstanceRecord) -> _FakeChannel:
        return self.channel


async def measure_bookkeeping(args: argparse.Namespace) -> list[dict[str, float]]:
    instances = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    for pid, name in enumerate((INSTANCE, INSTANCE + "-2"), 1):
        record = instances.add(
            InstanceConfig(name=name, model_id=MODEL), created_at=datetime.now(UTC)
        )
        record.status = InstanceStatus.RUNNING
        record.pid = pid
    pool = _FakePool()
    activity = Activity(trio.current_time)
    router = Router(instances, clock=trio.current_time, activity=activity, starter=_not_startable)
    mux = Multiplexer(
        router,
        pool,  # type: ignore[arg-type]
        MultiplexerMetrics(CollectorRegistry()),
        admission=Admission(max_queued=16, queue_timeout=1.0),
        request_timeout=30.0,
        stream_idle_timeout=30.0,
    )
    handler = mux.fast_unary(multiplexer_grpc.TeiMultiplexer.Tokenize)
    assert handler is not None
    where = (
        multiplexer_pb2.Target(model_id=MODEL)
        if args.target == "model"
        else multiplexer_pb2.Target(instance_name=INSTANCE)
    )
    data = multiplexer_pb2.EncodeRequest(
        target=where, request=tei_pb2.EncodeRequest(inputs=TEXT)
    ).SerializeToString()
    channel = pool.channel

    def fakes_only() -> None:
        call = _FakeCall()
        call.on_end = _ignore
        channel.stream = _FakeStream()
        call.reply(None)

    def relayed() -> None:
        call = _FakeCall()
        stream = channel.stream = _FakeStream()
        handler(call, data)  # type: ignore[arg-type]
        stream.watcher(stream)
        assert call.done

    def best(one: Any) -> float:
        fastest = float("inf")
        for _ in range(args.rounds):
            cpu = time.process_time()
            for _ in range(args.calls):
                one()
            fastest = min(fastest, time.process_time() - cpu)
        return fastest / args.calls * 1e6

    relayed()  # the series and the gate are made on the first call
    per_call = best(relayed) - best(fakes_only)
    print(f"  the multiplexer's bookkeeping alone: {per_call:.2f} CPU µs/call")
    return [{"cpu_us_per_call": per_call, "calls_per_s": 0.0}]


def _ignore(code: StatusCode) -> None:
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--target", choices=["name", "model"], default="name")
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--fake-transport", action="store_true")
    parser.add_argument("--backend-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client-child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend_child:
        trio.run(_backend_child)
        return
    if args.client_child is not None:
        port, calls, concurrency, target = args.client_child
        _client_child(int(port), int(calls), int(concurrency), target)
        return
    if args.fake_transport:
        args.calls *= 5  # no sockets: many more calls in the same time
        results = trio.run(measure_bookkeeping, args)
    else:
        results = trio.run(measure, args)
    summary: dict[str, Any] = {
        "fake_transport": args.fake_transport,
        "calls": args.calls,
        "concurrency": args.concurrency,
        "target": args.target,
        "cpu_us_per_call": statistics.median(r["cpu_us_per_call"] for r in results),
        "calls_per_s": statistics.median(r["calls_per_s"] for r in results),
        "rounds": results,
    }
    if not args.fake_transport:
        print(
            f"median: {summary['cpu_us_per_call']:.1f} CPU µs/call in the multiplexer's "
            f"process ({summary['calls_per_s']:.0f} calls/s)"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
