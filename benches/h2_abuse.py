"""Hostile HTTP/2 peers against a real worker and a real multiplexer (issue 13).

A real ``tei-manager serve`` (gRPC multiplexer on) runs one instance of the packaged
all-MiniLM-L6-v2 on the built-in worker. Each attack of ``tests/hostile.py`` runs
over loopback, first against the worker's port, then against the multiplexer's,
while a well-behaved client in a process of its own makes back-to-back Tokenize calls
(through the multiplexer: routed to the instance) on its own connection. Per attack
and target it prints:

- bytes the attacker sent;
- the longest stall the well-behaved calls saw (a call's time beyond its 5 ms pause;
  target <= 100 ms);
- the RSS growth of the attacked process (/proc VmRSS, highest sample during the
  attack minus the value before it), per attacking connection (target <= 16 MB);
- how the attacker's connection ended: GOAWAY and its code, reset, closed, the
  server stopped reading from it, or still open.

A well-behaved call that fails, or an attacked process that dies, is a MISS too.

The attacks are built before they start, so this process spends little CPU while
measuring; the attacker and the well-behaved client still share it. ``--quick``
runs every attack at a tenth of its size and idle connections for 2 s (a smoke run);
``--json PATH`` writes the figures. Exits 1 on a MISS, or if an attacked process died.

    python benches/h2_abuse.py [--quick] [--json F] [--attacks rapid_reset,ping_flood]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benches"), str(ROOT)]

from control_plane import (  # noqa: E402
    free_port,
    print_table,
    run_manager,
    verdict,
    vm_rss_mib,
    wait_status,
)

from tei_manager.testing import packaged_model_dir  # noqa: E402
from tests import hostile  # noqa: E402

INSTANCE = "abuse"
STALL_TARGET_MS = 100.0
RSS_TARGET_MB = 16.0
RSS_SAMPLE_SECS = 0.02


class Target:
    """One attacked server: its port, its process, the service it serves."""

    def __init__(self, name: str, port: int, pid: int, service: hostile.Service) -> None:
        self.name = name
        self.port = port
        self.pid = pid
        self.service = service

    def alive(self) -> bool:
        return Path(f"/proc/{self.pid}/status").exists()


async def highest_rss(pid: int, done: trio.Event, into: list[float]) -> None:
    while not done.is_set():
        try:
            into.append(vm_rss_mib(pid))
        except (OSError, RuntimeError):
            return
        with trio.move_on_after(RSS_SAMPLE_SECS):
            await done.wait()


async def measure(
    target: Target, name: str, run: Callable[[], Awaitable[hostile.Outcome]], connections: int
) -> dict[str, Any]:
    """One attack against ``target``, with the well-behaved client alongside."""
    before = vm_rss_mib(target.pid)
    samples: list[float] = []
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(highest_rss, target.pid, done, samples)
        async with probing_elsewhere(target) as prober:
            try:
                outcome = await run()
            except ConnectionRefusedError:  # the server no longer listens
                outcome = hostile.Outcome(name, ended="refused: not listening")
        done.set()
    growth = max([before, *samples]) - before
    per_connection = growth * 2**20 / 1e6 / connections  # MiB -> MB
    stall_ms = prober.max_stall * 1000
    return {
        "target": target.name,
        "attack": name,
        "bytes_sent": outcome.bytes_sent,
        "max_stall_ms": round(stall_ms, 1),
        "rss_growth_mb_per_connection": round(per_connection, 2),
        "ended": outcome.ended,
        "well_behaved_calls": prober.calls,
        "well_behaved_failures": prober.failures,
        "outcome": asdict(outcome),
        "stall_ok": stall_ms <= STALL_TARGET_MS,
        "rss_ok": per_connection <= RSS_TARGET_MB,
        "alive": target.alive() and not outcome.ended.startswith("refused"),
    }


class ProbeReport:
    """What the well-behaved client saw: calls, failed calls, its longest stall."""

    def __init__(self) -> None:
        self.calls = 0
        self.failures = 0
        self.max_stall = 0.0


@asynccontextmanager
async def probing_elsewhere(target: Target) -> AsyncIterator[ProbeReport]:
    """The well-behaved client in a process of its own (``--probe``), so the work an
    attack does in this process (hundreds of connects, building frames) never shows
    as a stall of the server under attack."""
    report = ProbeReport()
    service = "worker" if target.service is hostile.WORKER else "multiplexer"
    command = [sys.executable, __file__, "--probe", f"{service}:{target.port}"]
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_env()
    )
    assert process.stdin is not None and process.stdout is not None
    received = b""
    try:
        while not received.endswith(b"\n"):  # "ready": connected, one call answered
            chunk = await process.stdout.receive_some()
            if not chunk:
                raise RuntimeError("the probing process ended before it was ready")
            received += chunk
        yield report
    finally:
        with trio.CancelScope(shield=True):
            await process.stdin.send_all(b"stop\n")  # one more call, then the report
            await process.stdin.aclose()
            received = b""
            while chunk := await process.stdout.receive_some():
                received += chunk
            await process.wait()
    figures = json.loads(received.decode())
    report.calls, report.failures = figures["calls"], figures["failures"]
    report.max_stall = figures["max_stall"]


def _child_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{root}:{path}" if path else root}


async def probe(spec: str) -> None:
    """``--probe worker:PORT`` or ``multiplexer:PORT``: back-to-back Tokenize calls until
    a line arrives on stdin, then one more answered call and the figures as JSON."""
    kind, port = spec.split(":")
    service = hostile.WORKER if kind == "worker" else hostile.multiplexer_service(INSTANCE)
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with hostile.probing(int(port), service) as prober:
        print("ready", flush=True)
        await stdin.receive_some()
    print(
        json.dumps(
            {"calls": prober.calls, "failures": prober.failures, "max_stall": prober.max_stall}
        ),
        flush=True,
    )


#: Attacks left to tests/test_grpc_hostile.py. unread_answers: a worker's large answer
#: (Tokenize of a long text) costs far more CPU to compute, on the event loop, than
#: the transport spends queueing it, so here it would measure Tokenize, not HTTP/2.
NOT_HERE = ("unread_answers",)


def attacks(target: Target, quick: bool) -> list[tuple[str, Callable[[], Any], int]]:
    """Each attack bound to ``target``, with the number of connections it opens."""
    scale = 0.1 if quick else 1.0
    service = target.service
    port = target.port
    chosen: list[tuple[str, Callable[[], Any], int]] = []
    for attack in hostile.ATTACKS:
        if attack.name in NOT_HERE:
            continue

        def bound(fn: Any = attack.run) -> Awaitable[hostile.Outcome]:
            return fn(port, scale, service=service)  # type: ignore[no-any-return]

        chosen.append((attack.name, bound, 1))
    idle_count = 20 if quick else 100
    idle_wait = 2.0 if quick else 15.0
    chosen.append(
        (
            "idle_connections",
            lambda: hostile.idle_connections(port, idle_count, idle_wait),
            3 * idle_count,
        )
    )
    many = 64 if quick else 600
    chosen.append(
        ("many_connections", lambda: hostile.many_connections(port, many, hold=1.0), many)
    )
    return chosen


#: Attacks that may take a server down run last, against the multiplexer first (its
#: well-behaved calls need the worker).
LAST = ("empty_header_name",)


async def run_all(targets: list[Target], quick: bool, only: set[str]) -> list[dict[str, Any]]:
    plans = [
        [attack for attack in attacks(target, quick) if not only or attack[0] in only]
        for target in targets
    ]
    order = [
        (target, attack)
        for index in range(len(plans[0]))
        for target, plan in zip(targets, plans, strict=True)
        for attack in [plan[index]]
        if attack[0] not in LAST
    ]
    order += [
        (target, attack)
        for target, plan in reversed(list(zip(targets, plans, strict=True)))
        for attack in plan
        if attack[0] in LAST
    ]
    results = []
    for target, (name, run, connections) in order:
        if not target.alive():
            results.append({"target": target.name, "attack": name, "alive": False})
            print(f"{target.name:11} {name:22} (the process is gone)", flush=True)
            continue
        result = await measure(target, name, run, connections)
        results.append(result)
        print(
            f"{target.name:11} {name:22} sent {result['bytes_sent']:>10,} B  "
            f"stall {result['max_stall_ms']:7.1f} ms  "
            f"rss +{result['rss_growth_mb_per_connection']:6.2f} MB/conn  "
            f"failed calls {result['well_behaved_failures']}  {result['ended']}",
            flush=True,
        )
        await trio.sleep(0.2)  # let the server settle between attacks
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a tenth of each attack (smoke run)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--attacks", help="comma-separated attack names to run (default: all)", default=""
    )
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # the probing child process
    args = parser.parse_args()
    if args.probe:
        trio.run(probe, args.probe)
        return
    only = {name for name in args.attacks.split(",") if name}
    model = packaged_model_dir()
    with tempfile.TemporaryDirectory() as workdir:
        mux_port = free_port()
        with run_manager(Path(workdir), grpc_port=mux_port) as (manager, _):
            status, body = manager.api.request(
                "POST", "/instances", {"name": INSTANCE, "model_id": str(model)}
            )
            if status != 201:
                raise RuntimeError(f"create failed: {status} {body}")
            info = wait_status(
                manager, INSTANCE, lambda i: bool(i["status"] == "running"), "running"
            )
            targets = [
                Target("worker", int(info["port"]), int(info["pid"]), hostile.WORKER),
                Target(
                    "multiplexer",
                    mux_port,
                    manager.process.pid,
                    hostile.multiplexer_service(INSTANCE),
                ),
            ]
            results = trio.run(run_all, targets, args.quick, only)
    rows = []
    missed = False
    for result in results:
        if not result.get("alive", True) or "max_stall_ms" not in result:
            rows.append((f"{result['target']} {result['attack']}", "server died", "", "MISS"))
            missed = True
            continue
        ok = result["stall_ok"] and result["rss_ok"] and result["alive"]
        ok = ok and result["well_behaved_failures"] == 0
        missed |= not ok
        stall, rss = result["max_stall_ms"], result["rss_growth_mb_per_connection"]
        rows.append(
            (
                f"{result['target']} {result['attack']}",
                f"{stall:.1f} ms, +{rss:.2f} MB",
                f"<= {STALL_TARGET_MS:.0f} ms, <= {RSS_TARGET_MB:.0f} MB; {result['ended']}",
                verdict(ok),
            )
        )
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        figures = {
            "quick": args.quick,
            "targets": {"stall_ms": STALL_TARGET_MS, "rss_mb_per_connection": RSS_TARGET_MB},
            "results": results,
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if missed:
        sys.exit(1)


if __name__ == "__main__":
    main()
