"""HTTP inference gateway: OpenAI's /v1/embeddings vs the same work over direct gRPC.

A real ``tei-manager serve`` runs one instance of the packaged all-MiniLM-L6-v2 on the
built-in worker. In one run, with the same texts, this process measures:

- ``/v1/embeddings`` with 1000 inputs (one request) vs the same 1000 texts over one
  direct gRPC ``EmbedStream`` call to the instance: throughput ratio (target >= 0.95);
- single-input ``/v1/embeddings`` at concurrency 16 vs direct gRPC ``Embed`` at 16:
  throughput ratio (target >= 0.85);
- the same at concurrency 1: the latency the gateway adds, p50 (target <= 1 ms).

For each HTTP workload it also reports the manager process's CPU time per input
(user + system, from /proc): far less sensitive to a busy host than wall time, and
what the gateway costs the other processes on a small machine. The gRPC side's
figure is the manager's idle background (health checks) over the same span.

The two sides of each workload run back to back, alternating which goes first per
round; a figure is the median of the per-round ratios (the JSON keeps every round's).
HTTP goes through httpx with keep-alive, gRPC through grpcio (both asyncio).

    python benches/http_gateway.py [--rounds 3] [--quick] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from control_plane import HOST, print_table, run_manager, verdict, wait_status

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.testing import packaged_model_dir

INSTANCE = "bench"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_texts(count: int) -> list[str]:
    words = "the quick brown fox jumps over a lazy dog while embeddings map text to vectors".split()
    return [" ".join(words[(i + k) % len(words)] for k in range(8 + i % 9)) for i in range(count)]


async def run_concurrent(
    count: int, concurrency: int, one: Callable[[int], Awaitable[None]]
) -> list[float]:
    """``count`` calls of ``one(i)`` by ``concurrency`` workers; each call's seconds."""
    latencies: list[float] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            started = time.perf_counter()
            await one(i)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


class Sides:
    """The two ways to embed: ``http`` (the gateway) and ``grpc`` (direct to the instance)."""

    def __init__(self, http: httpx.AsyncClient, channel: grpc.aio.Channel) -> None:
        self.http = http
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

    async def http_embed(self, inputs: str | list[str]) -> int:
        reply = await self.http.post("/v1/embeddings", json={"model": INSTANCE, "input": inputs})
        if reply.status_code != 200:
            raise RuntimeError(f"/v1/embeddings: HTTP {reply.status_code}: {reply.text[:200]}")
        return len(reply.json()["data"])

    async def grpc_stream(self, texts: list[str]) -> int:
        requests = [tei_pb2.EmbedRequest(inputs=t, normalize=True) for t in texts]
        return len([r async for r in self.embed_stream(iter(requests), timeout=600)])

    async def grpc_embed(self, text: str) -> None:
        await self.embed(tei_pb2.EmbedRequest(inputs=text, normalize=True), timeout=60)


async def batch(sides: Sides, side: str, texts: list[str]) -> dict[str, float]:
    started = time.perf_counter()
    got = await (sides.http_embed(texts) if side == "http" else sides.grpc_stream(texts))
    assert got == len(texts)
    return {"throughput": len(texts) / (time.perf_counter() - started)}


async def singles(sides: Sides, side: str, texts: list[str], concurrency: int) -> dict[str, float]:
    async def one(i: int) -> None:
        if side == "http":
            await sides.http_embed(texts[i])
        else:
            await sides.grpc_embed(texts[i])

    started = time.perf_counter()
    latencies = await run_concurrent(len(texts), concurrency, one)
    elapsed = time.perf_counter() - started
    return {"throughput": len(texts) / elapsed, "p50_ms": statistics.median(latencies) * 1e3}


async def measure(
    api_port: int, instance_port: int, manager_pid: int, rounds: int, quick: bool
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
        sides = Sides(http, channel)
        for side in ("http", "grpc"):  # warm up both paths, the model and the connections
            await singles(sides, side, texts[:64], 16)
        n_batch, n_c16, n_c1 = 1000 // scale, 800 // scale, 200 // scale
        workloads: list[tuple[str, int, Callable[[str], Awaitable[dict[str, float]]]]] = [
            ("batch1000", n_batch, lambda side: batch(sides, side, texts[:n_batch])),
            ("single_c16", n_c16, lambda side: singles(sides, side, texts[:n_c16], 16)),
            ("single_c1", n_c1, lambda side: singles(sides, side, texts[:n_c1], 1)),
        ]
        for round_ in range(rounds):
            order = ("grpc", "http") if round_ % 2 == 0 else ("http", "grpc")
            for name, inputs, workload in workloads:
                for side in order:
                    cpu_before = cpu_seconds(manager_pid)
                    figures = await workload(side)
                    used = cpu_seconds(manager_pid) - cpu_before
                    figures["manager_cpu_us_per_input"] = used / inputs * 1e6
                    results.setdefault(f"{name}/{side}", []).append(figures)
            print(f"round {round_ + 1}/{rounds} done", file=sys.stderr)
    return results


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    per_round: dict[str, list[float]] = {}

    def per(name: str, key: str, combine: Callable[[float, float], float]) -> float:
        pairs = zip(results[f"{name}/http"], results[f"{name}/grpc"], strict=True)
        values = per_round[f"{name}_{key}"] = [combine(h[key], g[key]) for h, g in pairs]
        return statistics.median(values)

    def median(name: str, key: str) -> float:
        return statistics.median(v[key] for v in results[name])

    return {
        "batch1000_throughput_ratio": per("batch1000", "throughput", lambda h, g: h / g),
        "single_c16_throughput_ratio": per("single_c16", "throughput", lambda h, g: h / g),
        "single_c1_added_p50_ms": per("single_c1", "p50_ms", lambda h, g: h - g),
        "single_c1_p50_ms": {
            "http": median("single_c1/http", "p50_ms"),
            "grpc": median("single_c1/grpc", "p50_ms"),
        },
        "throughput_per_sec": {
            name: median(name, "throughput") for name in results if "throughput" in results[name][0]
        },
        "manager_cpu_us_per_input": {
            name: median(name, "manager_cpu_us_per_input") for name in results
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
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as workdir, run_manager(Path(workdir)) as (manager, _):
        status, body = manager.api.request(
            "POST",
            "/instances",
            {"name": INSTANCE, "model_id": str(packaged_model_dir()),
             "max_concurrent_requests": 1024},
        )  # fmt: skip
        if status != 201:
            raise RuntimeError(f"create failed: {status} {body}")
        info = wait_status(manager, INSTANCE, lambda i: bool(i["status"] == "running"), "running")
        results = asyncio.run(
            measure(manager.api.port, int(info["port"]), manager.process.pid, rounds, args.quick)
        )
    figures = summarize(results)
    c1 = figures["single_c1_p50_ms"]
    rows = [
        (
            "/v1/embeddings x1000 vs EmbedStream (throughput)",
            f"{figures['batch1000_throughput_ratio']:.3f}",
            ">= 0.95",
            verdict(figures["batch1000_throughput_ratio"] >= 0.95),
        ),
        (
            "/v1/embeddings c16 vs Embed c16 (throughput)",
            f"{figures['single_c16_throughput_ratio']:.3f}",
            ">= 0.85",
            verdict(figures["single_c16_throughput_ratio"] >= 0.85),
        ),
        (
            "/v1/embeddings c1 added p50",
            f"{figures['single_c1_added_p50_ms']:.2f} ms ({c1['grpc']:.2f} -> {c1['http']:.2f})",
            "<= 1 ms",
            verdict(figures["single_c1_added_p50_ms"] <= 1.0),
        ),
    ]
    cpu = figures["manager_cpu_us_per_input"]
    rows += [
        (
            f"manager CPU per input, {name} (HTTP; gRPC side: idle)",
            f"{cpu[f'{name}/http']:.0f} us ({cpu[f'{name}/grpc']:.0f} us)",
            "-",
            "-",
        )
        for name in ("batch1000", "single_c16", "single_c1")
    ]
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
