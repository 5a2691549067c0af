"""HTTP inference gateway: OpenAI's /v1/embeddings vs the same work over direct gRPC.

A real ``tei-manager serve`` runs one instance of the packaged all-MiniLM-L6-v2 on the
built-in worker. In one run, with the same texts, this process measures:

- ``/v1/embeddings`` with 1000 inputs (one request) vs the same 1000 texts over one
  direct gRPC ``EmbedStream`` call to the instance: throughput ratio (target >= 0.95);
- single-input ``/v1/embeddings`` at concurrency 16 vs direct gRPC ``Embed`` at 16:
  throughput ratio (target >= 0.85);
- the same at concurrency 1: the latency the gateway adds, p50 (target <= 1 ms),
  measured paired: each HTTP side and direct gRPC take turns request by request
  (no other side in between), and the figure is the median of (HTTP latency -
  direct gRPC latency) for the same text.

For each HTTP workload it also reports the manager process's CPU time per input
(user + system, from /proc): far less sensitive to a busy host than wall time, and
what the gateway costs the other processes on a small machine. The gRPC side's
figure is the manager's idle background (health checks) over the same span.

The sides of the throughput workloads run back to back, the order rotating per
round; a figure is the median of the per-round figures (the JSON keeps every
round's). gRPC goes through grpcio (asyncio). HTTP goes two ways: through a raw
keep-alive HTTP/1.1 client (``raw``: one write per request, the answer decoded with
msgspec) whose own CPU per request is below grpcio's, so the figures show the
gateway's cost and the targets are read from it; and through httpx with keep-alive
(a client people use, whose own CPU, several times grpcio's on the same two cores,
counts against the HTTP side). Each client's CPU per input is printed.

With ``--infinity BINARY`` (or ``$INFINITY_EMB``), Infinity (``infinity_emb v2``,
torch engine) serves the same model folder and takes the same workloads on its
``/embeddings`` through the raw client (``peer``), reported beside ours against the
same direct-gRPC baseline.

    python benches/http_gateway.py [--rounds 3] [--quick] [--json F] [--infinity BIN]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import grpc
import grpc.aio
import httpx
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from control_plane import (
    HOST,
    cpu_seconds,
    print_table,
    run_concurrent,
    run_manager,
    verdict,
    wait_status,
)
from worker_engines import start_infinity

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.testing import packaged_model_dir

INSTANCE = "bench"


def make_texts(count: int) -> list[str]:
    words = "the quick brown fox jumps over a lazy dog while embeddings map text to vectors".split()
    return [" ".join(words[(i + k) % len(words)] for k in range(8 + i % 9)) for i in range(count)]


class _Exchange(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: a request written whole, its answer gathered
    until its Content-Length is in (the least a Python client can do per request)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._waiter: asyncio.Future[tuple[bytes, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 or self._waiter is None:
            return
        head = self._buffer[:end]
        at = head.lower().find(b"content-length:")
        if at < 0:
            self._fail(ConnectionError(f"no Content-Length in {head[:80]!r}"))
            return
        length = int(head[at + 15 :].split(b"\r\n", 1)[0])
        if len(self._buffer) < end + 4 + length:
            return
        body = self._buffer[end + 4 : end + 4 + length]
        self._buffer = self._buffer[end + 4 + length :]
        waiter, self._waiter = self._waiter, None
        waiter.set_result((head.split(b"\r\n", 1)[0], body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(ConnectionError("closed"))

    def _fail(self, error: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
        self._waiter = None

    async def exchange(self, request: bytes) -> tuple[bytes, bytes]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self._waiter


class RawHttp:
    """POST JSON over raw keep-alive HTTP/1.1, one connection per concurrent caller.

    Costs the client about what grpcio does (the bench prints both), so a ratio
    against direct gRPC shows the server's cost rather than the client's.
    """

    def __init__(self, port: int, path: str, model: str) -> None:
        self._port = port
        self._path = path
        self._model = model
        self._idle: list[_Exchange] = []

    async def embed(self, inputs: str | list[str]) -> int:
        body = msgspec.json.encode({"model": self._model, "input": inputs})
        request = (
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (self._path.encode(), HOST.encode(), len(body), body)
        )
        while self._idle:  # a kept-alive connection the server may have closed since
            conn = self._idle.pop()
            if conn.transport is not None:
                with contextlib.suppress(ConnectionError):
                    return await self._exchange(conn, request)
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Exchange, HOST, self._port)
        return await self._exchange(conn, request)

    async def _exchange(self, conn: _Exchange, request: bytes) -> int:
        status, answer = await conn.exchange(request)
        if not status.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{self._path}: {status.decode()}: {answer[:200]!r}")
        self._idle.append(conn)
        data: list[Any] = msgspec.json.decode(answer)["data"]  # every float, as grpcio's
        return len(data)

    async def aclose(self) -> None:
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()


class HttpSide(Protocol):
    async def embed(self, inputs: str | list[str]) -> int: ...


class Httpx:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    async def embed(self, inputs: str | list[str]) -> int:
        reply = await self._http.post("/v1/embeddings", json={"model": INSTANCE, "input": inputs})
        if reply.status_code != 200:
            raise RuntimeError(f"/v1/embeddings: HTTP {reply.status_code}: {reply.text[:200]}")
        return len(reply.json()["data"])


class Sides:
    """The ways to embed: HTTP sides by name (the gateway, a peer) and ``grpc`` (direct
    to the instance)."""

    def __init__(
        self, http: dict[str, HttpSide], channel: grpc.aio.Channel, manager_pid: int
    ) -> None:
        self.http = http
        self.manager_pid = manager_pid
        spec = tei_grpc.Embed.Embed
        self.embed = channel.unary_unary(
            spec.path,
            request_serializer=spec.request_type.SerializeToString,
            response_deserializer=spec.response_type.FromString,
        )
        spec = tei_grpc.Embed.EmbedStream
        self.embed_stream = channel.stream_stream(
            spec.path,
            request_serializer=spec.request_type.SerializeToString,
            response_deserializer=spec.response_type.FromString,
        )

    async def grpc_stream(self, texts: list[str]) -> int:
        requests = [tei_pb2.EmbedRequest(inputs=t, normalize=True) for t in texts]
        return len([r async for r in self.embed_stream(iter(requests), timeout=600)])

    async def grpc_embed(self, text: str) -> None:
        await self.embed(tei_pb2.EmbedRequest(inputs=text, normalize=True), timeout=60)


async def batch(sides: Sides, side: str, texts: list[str]) -> dict[str, float]:
    started = time.perf_counter()
    got = await (sides.grpc_stream(texts) if side == "grpc" else sides.http[side].embed(texts))
    assert got == len(texts)
    return {"throughput": len(texts) / (time.perf_counter() - started)}


async def singles(sides: Sides, side: str, texts: list[str], concurrency: int) -> dict[str, float]:
    async def one(i: int) -> None:
        if side == "grpc":
            await sides.grpc_embed(texts[i])
        else:
            await sides.http[side].embed(texts[i])

    started = time.perf_counter()
    latencies = await run_concurrent(len(texts), concurrency, one)
    elapsed = time.perf_counter() - started
    return {"throughput": len(texts) / elapsed, "p50_ms": statistics.median(latencies) * 1e3}


async def paired_c1(
    sides: Sides, names: list[str], texts: list[str]
) -> dict[str, dict[str, float]]:
    """Concurrency 1, each HTTP side paired with direct gRPC: the two take turns
    request by request (the same text to each, which goes first alternating), so
    what the host does meanwhile weighs on both alike, and no other HTTP side runs
    in between (a request through the manager just before would find it warm).
    Each side's p50, and the median of its latency minus direct gRPC's for the same
    text (``added_p50_ms``); CPU per input summed per side around each request."""
    figures: dict[str, dict[str, float]] = {}
    direct_all: list[float] = []
    direct_manager = direct_client = 0.0
    for side in names:
        if side == "grpc":
            continue
        latencies: dict[str, list[float]] = {"grpc": [], side: []}
        manager = dict.fromkeys(latencies, 0.0)
        client = dict.fromkeys(latencies, 0.0)
        for i, text in enumerate(texts):
            for one in ("grpc", side) if i % 2 == 0 else (side, "grpc"):
                cpu_before, client_before = cpu_seconds(sides.manager_pid), time.process_time()
                started = time.perf_counter()
                if one == "grpc":
                    await sides.grpc_embed(text)
                else:
                    await sides.http[one].embed(text)
                latencies[one].append(time.perf_counter() - started)
                client[one] += time.process_time() - client_before
                manager[one] += cpu_seconds(sides.manager_pid) - cpu_before
        values, direct = latencies[side], latencies["grpc"]
        direct_all += direct
        added = statistics.median(v - d for v, d in zip(values, direct, strict=True))
        figures[side] = {
            "p50_ms": statistics.median(values) * 1e3,
            "added_p50_ms": added * 1e3,
            "manager_cpu_us_per_input": manager[side] / len(texts) * 1e6,
            "client_cpu_us_per_input": client[side] / len(texts) * 1e6,
        }
        direct_manager += manager["grpc"]
        direct_client += client["grpc"]
    figures["grpc"] = {
        "p50_ms": statistics.median(direct_all) * 1e3,
        "manager_cpu_us_per_input": direct_manager / len(direct_all) * 1e6,
        "client_cpu_us_per_input": direct_client / len(direct_all) * 1e6,
    }
    return figures


async def measure(
    api_port: int,
    instance_port: int,
    manager_pid: int,
    rounds: int,
    quick: bool,
    peer: tuple[int, str] | None,
) -> dict[str, list[dict[str, float]]]:
    """Each workload's figures, one entry per round and side (``name/side``)."""
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    scale = 4 if quick else 1
    texts = make_texts(1000)
    results: dict[str, list[dict[str, float]]] = {}
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with (
        httpx.AsyncClient(base_url=f"http://{HOST}:{api_port}", timeout=600, limits=limits) as http,
        grpc.aio.insecure_channel(f"{HOST}:{instance_port}", options=options) as channel,
    ):
        raw = RawHttp(api_port, "/v1/embeddings", INSTANCE)
        http_sides: dict[str, HttpSide] = {"http": Httpx(http), "raw": raw}
        if peer is not None:
            http_sides["peer"] = RawHttp(peer[0], "/embeddings", peer[1])
        sides = Sides(http_sides, channel, manager_pid)
        names = ["grpc", *http_sides]
        for side in names:  # warm up every path, the models and the connections
            await singles(sides, side, texts[:64], 16)
        n_batch, n_c16, n_c1 = 1000 // scale, 800 // scale, 300 // scale
        workloads: list[tuple[str, int, Callable[[str], Awaitable[dict[str, float]]]]] = [
            ("batch1000", n_batch, lambda side: batch(sides, side, texts[:n_batch])),
            ("single_c16", n_c16, lambda side: singles(sides, side, texts[:n_c16], 16)),
        ]
        for round_ in range(rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name, inputs, workload in workloads:
                for side in order:
                    cpu_before = cpu_seconds(manager_pid)
                    client_before = time.process_time()
                    figures = await workload(side)
                    used = cpu_seconds(manager_pid) - cpu_before
                    figures["manager_cpu_us_per_input"] = used / inputs * 1e6
                    client = time.process_time() - client_before
                    figures["client_cpu_us_per_input"] = client / inputs * 1e6
                    results.setdefault(f"{name}/{side}", []).append(figures)
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for side, figures in (await paired_c1(sides, order, texts[:n_c1])).items():
                results.setdefault(f"single_c1/{side}", []).append(figures)
            print(f"round {round_ + 1}/{rounds} done", file=sys.stderr)
        for side in http_sides.values():
            if isinstance(side, RawHttp):
                await side.aclose()
    return results


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    per_round: dict[str, list[float]] = {}

    def per(name: str, key: str, combine: Callable[[float, float], float], side: str) -> float:
        pairs = zip(results[f"{name}/{side}"], results[f"{name}/grpc"], strict=True)
        label = f"{side}_{name}_{key}"
        values = per_round[label] = [combine(h[key], g[key]) for h, g in pairs]
        return statistics.median(values)

    def paired(side: str) -> float:
        values = per_round[f"{side}_single_c1_added_p50_ms"] = [
            r["added_p50_ms"] for r in results[f"single_c1/{side}"]
        ]
        return statistics.median(values)

    def ratio(h: float, g: float) -> float:
        return h / g

    def median(name: str, key: str) -> float:
        return statistics.median(v[key] for v in results[name])

    sides = {
        side: {
            "batch1000_throughput_ratio": per("batch1000", "throughput", ratio, side),
            "single_c16_throughput_ratio": per("single_c16", "throughput", ratio, side),
            "single_c1_added_p50_ms": paired(side),
            "single_c1_p50_ms": median(f"single_c1/{side}", "p50_ms"),
        }
        for side in ("raw", "http", "peer")
        if f"batch1000/{side}" in results
    }
    return {
        "by_side": sides,
        "single_c1_grpc_p50_ms": median("single_c1/grpc", "p50_ms"),
        "throughput_per_sec": {
            name: median(name, "throughput") for name in results if "throughput" in results[name][0]
        },
        "manager_cpu_us_per_input": {
            name: median(name, "manager_cpu_us_per_input") for name in results
        },
        "client_cpu_us_per_input": {
            name: median(name, "client_cpu_us_per_input") for name in results
        },
        "per_round": per_round,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a quarter of the work, one round")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--infinity",
        default=os.environ.get("INFINITY_EMB"),
        help="Infinity's infinity_emb binary: serve the same model as a peer",
    )
    args = parser.parse_args()
    infinity = args.infinity if args.infinity and shutil.which(args.infinity) else None
    if args.infinity and infinity is None:
        print(f"infinity: {args.infinity} not found; no peer")
    rounds = 1 if args.quick else args.rounds
    model_dir = packaged_model_dir()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        peer = None
        if infinity is not None:
            _, client = stack.enter_context(
                start_infinity(infinity, "torch", model_dir, workdir / "infinity.log")
            )
            peer = (client.port, client.model)
        manager, _ = stack.enter_context(run_manager(workdir))
        status, body = manager.api.request(
            "POST",
            "/instances",
            {"name": INSTANCE, "model_id": str(model_dir),
             "max_concurrent_requests": 1024},
        )  # fmt: skip
        if status != 201:
            raise RuntimeError(f"create failed: {status} {body}")
        info = wait_status(manager, INSTANCE, lambda i: bool(i["status"] == "running"), "running")
        results = asyncio.run(
            measure(
                manager.api.port, int(info["port"]), manager.process.pid, rounds, args.quick, peer
            )
        )
    figures = summarize(results)
    judged = figures["by_side"]["raw"]
    c1 = judged["single_c1_p50_ms"]
    rows = [
        (
            "/v1/embeddings x1000 vs EmbedStream (throughput)",
            f"{judged['batch1000_throughput_ratio']:.3f}",
            ">= 0.95",
            verdict(judged["batch1000_throughput_ratio"] >= 0.95),
        ),
        (
            "/v1/embeddings c16 vs Embed c16 (throughput)",
            f"{judged['single_c16_throughput_ratio']:.3f}",
            ">= 0.85",
            verdict(judged["single_c16_throughput_ratio"] >= 0.85),
        ),
        (
            "/v1/embeddings c1 added p50",
            f"{judged['single_c1_added_p50_ms']:.2f} ms "
            f"({figures['single_c1_grpc_p50_ms']:.2f} -> {c1:.2f})",
            "<= 1 ms",
            verdict(judged["single_c1_added_p50_ms"] <= 1.0),
        ),
    ]
    cpu, client = figures["manager_cpu_us_per_input"], figures["client_cpu_us_per_input"]
    rows += [
        (
            f"manager CPU per input, {name}: raw, httpx (gRPC side: idle)",
            f"{cpu[f'{name}/raw']:.0f}, {cpu[f'{name}/http']:.0f} us ({cpu[f'{name}/grpc']:.0f})",
            "-",
            "-",
        )
        for name in ("batch1000", "single_c16", "single_c1")
    ]
    rows += [
        (
            f"client CPU per input, {name}: grpcio, raw, httpx",
            f"{client[f'{name}/grpc']:.0f}, {client[f'{name}/raw']:.0f}, "
            f"{client[f'{name}/http']:.0f} us",
            "-",
            "-",
        )
        for name in ("single_c16", "single_c1")
    ]
    for side, what in (("http", "ours, through httpx"), ("peer", "Infinity, raw client")):
        if side not in figures["by_side"]:
            continue
        f = figures["by_side"][side]
        rows += [
            (f"{what}: x1000 vs EmbedStream", f"{f['batch1000_throughput_ratio']:.3f}", "-", "-"),
            (f"{what}: c16 vs Embed c16", f"{f['single_c16_throughput_ratio']:.3f}", "-", "-"),
            (
                f"{what}: c1 added p50",
                f"{f['single_c1_added_p50_ms']:.2f} ms (p50 {f['single_c1_p50_ms']:.2f})",
                "-",
                "-",
            ),
        ]
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
