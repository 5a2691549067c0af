"""Chaos suites: an operator's bad day against a real ``tei-manager serve``.

Scenarios (all by default, or name some):

- ``manager-kill``: 3 running instances; SIGKILL the manager ``--rounds`` times (10),
  restarting it each time. Goal: 0 orphans (instance processes of an earlier
  manager still alive), every round restored (all 3 running again).
- ``replica-kill``: two replicas of one model behind the multiplexer under load
  (``--concurrency`` clients calling Embed by ``model_id``); kill -9 one replica's
  process every ``--interval`` s (3), ``--kills`` times (20), each time when both
  run. Goal: every replica back without help, 0 hung calls, 0 failed calls while
  another replica was running.
- ``create-delete``: random creates and deletes, with ``--manager-kills`` (30)
  SIGKILLs of the manager at random moments, some in the middle of a request.
  Goal: 0 acknowledged writes lost, 0 deletes resurrected, the state file always
  loads, no ``.state.toml.*.tmp`` left after a restart.
- ``port-churn``: ``--cycles`` (300) create/delete cycles in a 30-port range.
  Goal: 0 ``PORT_ALLOCATION_FAILED``.

Instances run ``benches/fake_tei.py`` (through ``tei_binary_path``): it takes TEI's
flags and answers Info and Embed with no model, so the suites measure the manager,
not a model's load time. Each scenario prints its counts and whether it met its
goals; the exit status is 1 when any goal was missed. ``--quick`` runs short forms
(a few minutes in all, for CI); ``--json PATH`` writes every count.

    python benches/chaos.py [SCENARIO ...] [--quick] [--json PATH] [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import control_plane as cp  # a sibling script: its manager helpers

from tei_manager.testing import packaged_model_dir

# A real model folder, so the manager's create-time checks pass; the fake never reads it.
MODEL = str(packaged_model_dir())
FAKE_TEI = Path(__file__).resolve().with_name("fake_tei.py")
MARKER_FLAG = "--chaos-run"  # on every fake instance's command line: finds orphans
INSTANCE_TIMEOUT = 60.0  # a fake instance is up in well under a second
REPLICA_BACKOFF_MAX_SECS = 4.0
CALL_TIMEOUT = 10.0  # a call slower than this through the multiplexer counts as hung
POLL_SECS = 0.05
GRACE_SECS = 5.0  # graceful_shutdown_timeout_secs of the managers started here


# -- a manager we may kill ----------------------------------------------------------------------
def fake_binary(workdir: Path) -> Path:
    """An executable that runs the fake TEI with this interpreter, marked with ``workdir``."""
    path = workdir / "text-embeddings-router"
    path.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_TEI}" {MARKER_FLAG} "{workdir}" "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


class ChaosManager:
    """``tei-manager serve`` on fixed ports and one state folder, started again at will."""

    def __init__(
        self,
        workdir: Path,
        *,
        ports: int = 16,
        grpc: bool = False,
        restart_backoff_max_secs: float | None = None,
    ) -> None:
        self.workdir = workdir
        self.api_port = cp.free_port()
        self.grpc_port = cp.free_port() if grpc else 0
        port_start = cp.free_port_range(ports)
        settings: dict[str, object] = {
            "api_host": cp.HOST,
            "api_port": self.api_port,
            "grpc_enabled": grpc,
            "grpc_port": self.grpc_port,
            "instance_port_start": port_start,
            "instance_port_end": port_start + ports - 1,
            "startup_timeout_secs": INSTANCE_TIMEOUT,
            "graceful_shutdown_timeout_secs": GRACE_SECS,
            "tei_binary_path": str(fake_binary(workdir)),
        }
        if restart_backoff_max_secs is not None:
            settings["restart_backoff_max_secs"] = restart_backoff_max_secs
        self.config_file = workdir / "config.toml"
        self.config_file.write_text(cp.config_toml(settings, []))
        self.state_home = workdir / "state"
        self.state_dir = self.state_home / "tei-manager"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(cp._OVERRIDES)}
        self.env.update(XDG_STATE_HOME=str(self.state_home), HF_HUB_OFFLINE="1")
        self.log_path = workdir / "manager.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.api = cp.Api(self.api_port)
        self.starts = 0

    @property
    def handle(self) -> cp.Manager:
        assert self.process is not None
        return cp.Manager(self.process, self.api, self.state_home, self.log_path)

    def start(self) -> None:
        self.api.close()
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [*cp.serve_command(), "--config", str(self.config_file)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        self.starts += 1
        self.handle.wait_ready(cp.MANAGER_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL: no shutdown at all; its instances die with it (PDEATHSIG)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.api.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            cp.stop_manager(self.handle)
        self.api.close()

    def instances(self) -> dict[str, dict[str, Any]]:
        body = self.api.get("/instances")
        items = body["instances"] if isinstance(body, dict) else body
        return {item["name"]: item for item in items}

    def create(self, name: str, **fields: object) -> tuple[int, Any]:
        return self.api.request("POST", "/instances", {"name": name, "model_id": MODEL, **fields})

    def must_create(self, name: str) -> None:
        status, body = self.create(name)
        if status != 201:
            raise RuntimeError(f"creating {name}: HTTP {status}: {body}")

    def delete(self, name: str) -> tuple[int, Any]:
        return self.api.request("DELETE", f"/instances/{name}")

    def wait_running(self, names: list[str], within: float) -> bool:
        """True once every instance in ``names`` is running; False after ``within`` s."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                found = self.instances()
            except (OSError, http.client.HTTPException, RuntimeError):
                found = {}
            if all(found.get(n, {}).get("status") == "running" for n in names):
                return True
            time.sleep(POLL_SECS)
        return False

    def temp_files(self) -> list[str]:
        return sorted(p.name for p in self.state_dir.glob(".state.toml.*.tmp"))

    def metric(self, prefix: str) -> float:
        """The sum of the samples of ``/metrics`` whose line starts with ``prefix``."""
        _, text = self.api.exchange("GET", "/metrics")
        total = 0.0
        for line in text.decode().splitlines():
            if line.startswith(prefix):
                total += float(line.rsplit(" ", 1)[1])
        return total


def marked_processes(workdir: Path) -> set[int]:
    """Pids of live fake instances started for ``workdir`` (by any manager)."""
    found = set()
    marker = f"{MARKER_FLAG}\0{workdir}\0".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.add(int(entry.name))
    return found


@dataclass
class Result:
    scenario: str
    counts: dict[str, Any]
    goals: dict[str, bool]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(self.goals.values())

    def show(self) -> None:
        verdict = "PASS" if self.passed else "FAIL"
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        print(f"{verdict} {self.scenario}: {counts}")
        for goal, met in self.goals.items():
            print(f"    {'ok  ' if met else 'MISS'} {goal}")
        for note in self.notes[:5]:
            print(f"    note: {note}")
        sys.stdout.flush()


# -- manager SIGKILL ----------------------------------------------------------------------------
def manager_kill(workdir: Path, rounds: int, rng: random.Random) -> Result:
    names = ["mk-0", "mk-1", "mk-2"]
    manager = ChaosManager(workdir)
    restored = orphans = 0
    notes: list[str] = []
    try:
        manager.start()
        for name in names:
            manager.must_create(name)
        if not manager.wait_running(names, INSTANCE_TIMEOUT):
            raise RuntimeError(f"instances never ran:\n{manager.handle.log_tail()}")
        for round_ in range(rounds):
            time.sleep(rng.uniform(0.2, 1.0))
            manager.kill()
            manager.start()
            if manager.wait_running(names, INSTANCE_TIMEOUT):
                restored += 1
            else:
                notes.append(f"round {round_ + 1}: not all running: {manager.instances()}")
            current = {info["pid"] for info in manager.instances().values()}
            alive = marked_processes(workdir)
            if not current <= alive:  # the check itself must see the live instances
                raise RuntimeError(f"instance pids {current} not among the marked {alive}")
            stray = alive - current
            orphans += len(stray)
            for pid in stray:  # so one orphan is counted once
                os.kill(pid, signal.SIGKILL)
    finally:
        manager.stop()
    return Result(
        "manager-kill",
        {"kills": rounds, "restored": restored, "orphans": orphans},
        {f"{rounds}/{rounds} restored": restored == rounds, "0 orphans": orphans == 0},
        notes,
    )


# -- replica kills under load -------------------------------------------------------------------
class Load:
    """Clients calling Embed by model through the multiplexer, in a trio loop of their own."""

    def __init__(self, port: int, concurrency: int, snapshot: Callable[[], int]) -> None:
        self.port = port
        self.concurrency = concurrency
        self.snapshot = snapshot  # replicas running now, as last polled
        self.ok = self.failed = self.failed_while_another_ran = self.hung = 0
        self.errors: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(CALL_TIMEOUT + 10)

    def _run(self) -> None:
        import trio

        trio.run(self._main)

    async def _main(self) -> None:
        import trio

        from tei_manager._proto.tei.v1 import tei_pb2
        from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
        from tei_manager.grpc.channel import open_channel
        from tei_manager.grpc.rpc import GrpcError

        method = multiplexer_grpc.TeiMultiplexer.Embed
        target = multiplexer_pb2.Target(model_id=MODEL)

        async def client(channel: Any, index: int) -> None:
            count = 0
            while not self._stop.is_set():
                count += 1
                text = f"c{index}-{count}" + "x" * (count % 7)
                request = multiplexer_pb2.EmbedRequest(
                    target=target, request=tei_pb2.EmbedRequest(inputs=text)
                )
                problem = None
                with trio.move_on_after(CALL_TIMEOUT) as timer:
                    try:
                        reply = await channel.unary_unary(method, request)
                        if reply.embeddings[0] != len(text):
                            problem = "wrong answer"
                    except GrpcError as error:
                        problem = f"{error.code.name}: {error.message}"[:120]
                if timer.cancelled_caught:
                    self.hung += 1
                    continue
                if problem is None:
                    self.ok += 1
                    continue
                self.failed += 1
                if self.snapshot() >= 1:
                    self.failed_while_another_ran += 1
                self.errors[problem] = self.errors.get(problem, 0) + 1

        async with open_channel(cp.HOST, self.port) as channel, trio.open_nursery() as nursery:
            for index in range(self.concurrency):
                nursery.start_soon(client, channel, index)


def replica_kill(
    workdir: Path, kills: int, interval: float, concurrency: int, rng: random.Random
) -> Result:
    names = ["rk-0", "rk-1"]
    # A replica killed every few seconds is in a crash loop, whose backoff doubles to
    # restart_backoff_max_secs (300 s by default, like Kubernetes' CrashLoopBackOff):
    # capped at a few seconds here, so 20 kills fit in minutes. What this checks is
    # that supervision never gives up and no call fails while the other replica runs.
    manager = ChaosManager(workdir, grpc=True, restart_backoff_max_secs=REPLICA_BACKOFF_MAX_SECS)
    done = 0
    stuck: list[str] = []
    running_now = [2]
    try:
        manager.start()
        for name in names:
            manager.must_create(name)
        if not manager.wait_running(names, INSTANCE_TIMEOUT):
            raise RuntimeError(f"replicas never ran:\n{manager.handle.log_tail()}")
        load = Load(manager.grpc_port, concurrency, lambda: running_now[0])
        load.start()
        try:
            for kill in range(kills):
                # Kill only while both run: the other replica is then always up.
                if not manager.wait_running(names, INSTANCE_TIMEOUT):
                    stuck.append(f"before kill {kill + 1}: {_statuses(manager)}")
                    break
                victim = names[kill % 2] if rng.random() < 0.5 else names[(kill + 1) % 2]
                pid = manager.instances()[victim]["pid"]
                os.kill(pid, signal.SIGKILL)
                running_now[0] = 1  # the other one
                done += 1
                time.sleep(interval * rng.uniform(0.8, 1.2))
                running_now[0] = 2 if manager.wait_running(names, 0) else 1
        finally:
            load.stop()
        back = manager.wait_running(names, INSTANCE_TIMEOUT)
        if not back:
            stuck.append(f"at the end: {_statuses(manager)}")
        retries = manager.metric("tei_manager_grpc_retries_total")
    finally:
        manager.stop()
    errors = sorted(load.errors.items(), key=lambda item: -item[1])
    return Result(
        "replica-kill",
        {
            "kills": done,
            "calls_ok": load.ok,
            "failed": load.failed,
            "failed_while_another_ran": load.failed_while_another_ran,
            "hung": load.hung,
            "retries": int(retries),
            "replicas_back": back,
        },
        {
            f"{kills} kills made": done == kills,
            "every replica back without help": back,
            "0 hung calls": load.hung == 0,
            "0 failed calls while another replica ran": load.failed_while_another_ran == 0,
        },
        stuck + [f"{n} x {e}" for e, n in errors],
    )


def _statuses(manager: ChaosManager) -> str:
    return ", ".join(
        f"{name} {info['status']} ({info['last_error']})"
        for name, info in manager.instances().items()
    )


# -- create/delete with manager kills -----------------------------------------------------------
def create_delete(workdir: Path, kills: int, rng: random.Random) -> Result:
    names = [f"cd-{i}" for i in range(8)]
    manager = ChaosManager(workdir, ports=32)
    expected: dict[str, bool] = {}  # acknowledged: exists (True) or deleted (False)
    lost: list[str] = []
    resurrected: list[str] = []
    acknowledged = unsure = 0
    temp_seen = 0
    notes: list[str] = []

    def operate(name: str) -> tuple[str, int]:
        if expected.get(name, False):
            return "delete", manager.delete(name)[0]
        return "create", manager.create(name)[0]

    def settle(op: str, name: str, status: int) -> None:
        nonlocal acknowledged
        if status in (200, 201, 204):
            acknowledged += 1
            expected[name] = op == "create"

    try:
        manager.start()
        for kill in range(kills):
            for _ in range(rng.randint(2, 6)):
                name = rng.choice(names)
                op, status = operate(name)
                settle(op, name, status)
            # The kill: in the middle of a request (a save in flight) or between two.
            name = rng.choice(names)
            outcome: list[tuple[str, int]] = []
            worker = threading.Thread(target=_capture, args=(outcome, operate, name), daemon=True)
            worker.start()
            if rng.random() < 0.5:  # during the request
                time.sleep(rng.uniform(0.0, 0.03))
            else:  # just after its answer: the state file is being saved
                worker.join(10)
                time.sleep(rng.uniform(0.0, 0.005))
            manager.kill()
            worker.join(10)
            if outcome:
                settle(outcome[0][0], name, outcome[0][1])
            else:
                unsure += 1
                expected.pop(name, None)  # either outcome is right: not acknowledged
            temp_seen += len(manager.temp_files())
            try:
                manager.start()
            except (RuntimeError, TimeoutError) as error:
                notes.append(f"kill {kill + 1}: the manager did not come back: {error}")
                break
            present = set(manager.instances())
            for name_, exists in expected.items():
                if exists and name_ not in present:
                    lost.append(name_)
                if not exists and name_ in present:
                    resurrected.append(name_)
            # Start again from what is there (a loss counted once).
            expected = {n: n in present for n in names}
        temp_left = manager.temp_files()
    finally:
        manager.stop()
    return Result(
        "create-delete",
        {
            "manager_kills": kills,
            "acknowledged_writes": acknowledged,
            "unacknowledged": unsure,
            "lost": len(lost),
            "resurrected": len(resurrected),
            "temp_files_after_kills": temp_seen,
            "temp_files_left": len(temp_left),
        },
        {
            "0 lost": not lost,
            "0 resurrected": not resurrected,
            "the manager always came back": not notes,
            "no .state.toml.*.tmp left": not temp_left,
        },
        notes + [f"lost {n}" for n in lost] + [f"resurrected {n}" for n in resurrected],
    )


def _capture(into: list[Any], action: Callable[[str], Any], name: str) -> None:
    # The manager may die first: then no answer, and nothing acknowledged.
    with contextlib.suppress(OSError, http.client.HTTPException):
        into.append(action(name))


# -- port churn ---------------------------------------------------------------------------------
def port_churn(workdir: Path, cycles: int) -> Result:
    manager = ChaosManager(workdir, ports=30)
    refused = 0
    other: dict[str, int] = {}
    try:
        manager.start()
        for cycle in range(cycles):
            name = f"pc-{cycle}"
            status, body = manager.create(name)
            if status == 201:
                manager.delete(name)
                continue
            code = body.get("code", "") if isinstance(body, dict) else ""
            if code == "PORT_ALLOCATION_FAILED":
                refused += 1
            else:
                key = f"HTTP {status} {code}"
                other[key] = other.get(key, 0) + 1
    finally:
        manager.stop()
    return Result(
        "port-churn",
        {
            "cycles": cycles,
            "port_allocation_failed": refused,
            "other_failures": sum(other.values()),
        },
        {"0 PORT_ALLOCATION_FAILED": refused == 0, "no other failure": not other},
        [f"{n} x {e}" for e, n in other.items()],
    )


# -- main ---------------------------------------------------------------------------------------
SCENARIOS = ("manager-kill", "replica-kill", "create-delete", "port-churn")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=", ".join(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="short forms, for CI")
    parser.add_argument("--rounds", type=int, help="manager-kill: SIGKILLs (10; quick 3)")
    parser.add_argument("--kills", type=int, help="replica-kill: kill -9s (20; quick 4)")
    parser.add_argument(
        "--interval", type=float, help="replica-kill: seconds between kills (3; quick 1.5)"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="replica-kill: clients (8)")
    parser.add_argument("--manager-kills", type=int, help="create-delete: SIGKILLs (30; quick 5)")
    parser.add_argument("--cycles", type=int, help="port-churn: cycles (300; quick 40)")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--json", type=Path, help="write every count to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work folders (logs)")
    args = parser.parse_args(argv)
    quick = args.quick
    chosen = args.scenarios or list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r} (choose from {', '.join(SCENARIOS)})")
    rng = random.Random(args.seed)
    results: list[Result] = []
    root = Path(tempfile.mkdtemp(prefix="tei-chaos-"))
    try:
        for scenario in chosen:
            workdir = root / scenario
            workdir.mkdir()
            started = time.monotonic()
            if scenario == "manager-kill":
                result = manager_kill(workdir, args.rounds or (3 if quick else 10), rng)
            elif scenario == "replica-kill":
                result = replica_kill(
                    workdir,
                    args.kills or (4 if quick else 20),
                    args.interval or (1.5 if quick else 3.0),
                    args.concurrency,
                    rng,
                )
            elif scenario == "create-delete":
                result = create_delete(workdir, args.manager_kills or (5 if quick else 30), rng)
            else:
                result = port_churn(workdir, args.cycles or (40 if quick else 300))
            result.counts["secs"] = round(time.monotonic() - started, 1)
            result.show()
            results.append(result)
    finally:
        if args.keep:
            print(f"work folders kept in {root}")
        else:
            subprocess.run(["rm", "-rf", str(root)], check=False)
    if args.json is not None:
        report = {
            r.scenario: {"counts": r.counts, "goals": r.goals, "passed": r.passed, "notes": r.notes}
            for r in results
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
