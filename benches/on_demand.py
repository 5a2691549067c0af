"""Models on demand: what a cold start costs a request, and what the admission path costs
a warm one.

A real ``tei-manager serve`` (gRPC multiplexer on) with three instances of the
packaged all-MiniLM-L6-v2 on the built-in worker:

- ``cold``: on demand, ``idle_timeout_secs = 1``; each round waits until it is idle
  again, then times one Embed through the multiplexer, from the request to its
  answer (the start happens inside the call);
- ``always`` and ``warm``: started with the manager, the second on demand (started
  once by a request and never unloaded), for the steady state.

Figures (medians over ``--rounds``):

- cold start: first request to an idle instance -> answer, against the model's plain
  load time, the manager's ``tei_manager_instance_startup_seconds`` of the same
  instance's process (spawn -> first answered Info) in the same round
  (target: cold start <= load + 0.5 s);
- admission overhead: unary Embed p50 at concurrency 1, on demand / always, both
  warm, measured back to back in alternating order (target <= 1.02).

Prints a table; ``--json PATH`` writes the figures; ``--quick`` is a smoke run.

    python benches/on_demand.py [--rounds 5] [--calls 2000] [--quick] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from control_plane import (
    Manager,
    free_port,
    print_table,
    run_manager,
    wait_status,
)

from tei_manager._proto.tei.v1 import tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tei_manager.testing import packaged_model_dir

M = multiplexer_grpc.TeiMultiplexer
COLD_TARGET_SLACK_SECS = 0.5
OVERHEAD_TARGET = 1.02
CALL_TIMEOUT_SECS = 180.0


def _embed_stub(channel: grpc.Channel) -> Any:
    return channel.unary_unary(
        M.Embed.path,
        request_serializer=M.Embed.request_type.SerializeToString,
        response_deserializer=M.Embed.response_type.FromString,
    )


def _request(name: str, text: str = "a sentence to embed") -> multiplexer_pb2.EmbedRequest:
    return multiplexer_pb2.EmbedRequest(
        target=multiplexer_pb2.Target(instance_name=name),
        request=tei_pb2.EmbedRequest(inputs=text),
    )


def _startup_sum_count(manager: Manager) -> tuple[float, int]:
    status, payload = manager.api.exchange("GET", "/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics: HTTP {status}")
    found: dict[str, float] = {}
    for line in payload.decode().splitlines():
        name, _, value = line.partition(" ")
        found[name] = float(value) if name.startswith("tei_manager_instance_startup") else 0.0
    return (
        found["tei_manager_instance_startup_seconds_sum"],
        int(found["tei_manager_instance_startup_seconds_count"]),
    )


def cold_round(manager: Manager, embed: Any) -> dict[str, float]:
    """Wait for ``cold`` to be idle, then time its first request; and its process's load."""
    wait_status(manager, "cold", lambda i: i["status"] == "idle", "idle")
    before_sum, before_count = _startup_sum_count(manager)
    started = time.perf_counter()
    reply = embed(_request("cold"), timeout=CALL_TIMEOUT_SECS)
    cold = time.perf_counter() - started
    assert len(reply.embeddings) == 384
    after_sum, after_count = _startup_sum_count(manager)
    if after_count != before_count + 1:
        raise RuntimeError(f"expected one start, the manager counted {after_count - before_count}")
    return {"cold_start_secs": cold, "load_secs": after_sum - before_sum}


def p50_latency(embed: Any, name: str, calls: int) -> float:
    request = _request(name)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        embed(request, timeout=30)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000, help="per side and round")
    parser.add_argument("--quick", action="store_true", help="one round of 100 calls (smoke run)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    rounds, calls = (1, 100) if args.quick else (args.rounds, args.calls)
    model = str(packaged_model_dir())
    seeds = [
        {"name": "always", "model_id": model},
        {"name": "warm", "model_id": model, "start": "on_demand", "idle_timeout_secs": 0},
        {"name": "cold", "model_id": model, "start": "on_demand", "idle_timeout_secs": 1},
    ]
    grpc_port = free_port()
    results: list[dict[str, float]] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        run_manager(Path(tmp), seeds=seeds, grpc_port=grpc_port) as (manager, _),
    ):
        wait_status(manager, "always", lambda i: i["status"] == "running", "running")
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            embed = _embed_stub(channel)
            embed(_request("warm"), timeout=CALL_TIMEOUT_SECS)  # started once, kept
            for warm_up in ("always", "warm"):
                p50_latency(embed, warm_up, 20)
            for index in range(rounds):
                figures = cold_round(manager, embed)
                # Its unload (a second later) must not run beside the warm figures.
                wait_status(manager, "cold", lambda i: i["status"] == "idle", "idle")
                order = ("warm", "always") if index % 2 else ("always", "warm")
                p50 = {name: p50_latency(embed, name, calls) for name in order}
                figures["on_demand_p50_secs"] = p50["warm"]
                figures["always_p50_secs"] = p50["always"]
                figures["overhead_ratio"] = p50["warm"] / p50["always"]
                results.append(figures)
                print(f"round {index + 1}: {json.dumps(figures)}", file=sys.stderr)

    def median(key: str) -> float:
        return statistics.median(r[key] for r in results)

    cold, load, ratio = median("cold_start_secs"), median("load_secs"), median("overhead_ratio")
    summary = {
        "cold_start_secs": cold,
        "load_secs": load,
        "cold_minus_load_secs": cold - load,
        "overhead_ratio": ratio,
        "on_demand_p50_ms": median("on_demand_p50_secs") * 1000,
        "always_p50_ms": median("always_p50_secs") * 1000,
        "rounds": results,
        "quick": args.quick,
    }
    cold_ok = cold <= load + COLD_TARGET_SLACK_SECS
    print_table(
        [
            (
                "cold start (request -> answer)",
                f"{cold:.2f} s",
                f"<= load {load:.2f} s + {COLD_TARGET_SLACK_SECS:g}",
                "ok" if cold_ok else "MISSED",
            ),
            (
                "admission overhead, warm p50",
                f"{ratio:.3f}x",
                f"<= {OVERHEAD_TARGET:g}x",
                "ok" if ratio <= OVERHEAD_TARGET else "MISSED",
            ),
        ]
    )
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
