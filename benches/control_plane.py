"""Control plane: a real ``tei-manager serve`` process, timed over its REST API.

(a) A manager with 100 ``[[instances]]`` seeds that do not start (``auto_start =
    false``) runs the built-in worker on the packaged all-MiniLM-L6-v2:
    1. create -> running: ``POST /instances``, then ``GET /instances/{name}`` every
       15 ms until ``running``. The model's load time is what a cold process needs
       from spawn to ready: the manager's ``tei_manager_instance_startup_seconds`` for
       the instance's first process (spawn -> first answered Info call; the only
       process started in this manager). The ``load_secs`` of the worker's ``Ready``
       line is reported too, but it leaves out the worker's imports.
    2. failover: SIGKILL the instance's pid, time until it is ``running`` again with
       a new pid (target: the model's load time + 1 s).
    3. ``GET /instances`` with 101 instances registered: p50 / p99 of sequential
       requests on one keep-alive connection.
(b) A fresh manager with no instances, started ``--starts`` times: spawn -> first 200
    from ``/health/ready`` (target <= 1.0 s) and the idle VmRSS of the serve process
    ``--settle`` seconds later (target <= 60 MiB); the medians are reported. These
    run first, while no worker process is about.

Every manager gets its own temporary XDG_STATE_HOME and config (API on a free
loopback port, gRPC off, instance ports from a free high range) and is stopped with
SIGTERM, which stops its instances. Prints a table; ``--json PATH`` writes the figures.
Instances run the built-in worker, so ``text-embeddings-router`` must not be on PATH.

    python benches/control_plane.py [--seeds 100] [--gets 300] [--starts 3] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from tei_manager.core.ports import probe_bindable
from tei_manager.testing import packaged_model_dir

T = TypeVar("T")

HOST = "127.0.0.1"
POLL_SECS = 0.015  # status polling while an instance starts
READY_POLL_SECS = 0.01  # /health/ready polling while the manager starts
INSTANCE_TIMEOUT = 180.0  # a cold torch import on a slow machine takes a while
MANAGER_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 30.0  # the config's graceful_shutdown_timeout_secs
FAILOVER_SLACK_SECS = 1.0
STARTUP_COUNT = "tei_manager_instance_startup_seconds_count"
LOAD_DEFINITION = (
    "spawn -> ready of the instance's first (cold) process: the manager's "
    "tei_manager_instance_startup_seconds, from spawning the process to its first answered Info"
)
START_TO_READY_TARGET_SECS = 1.0
IDLE_RSS_TARGET_MIB = 60.0
# Variables that would override the bench's config file.
_OVERRIDES = ("TEI_MANAGER_", "TEI_BINARY_PATH")


# -- ports and config ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def free_port_range(size: int) -> int:
    """The first of ``size`` consecutive ports that are free now, high in the range."""
    rng = random.Random()
    for _ in range(200):
        start = rng.randrange(30000, 60000 - size)
        if all(probe_bindable(p) for p in range(start, start + size)):
            return start
    raise RuntimeError(f"no {size} consecutive free ports found")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's string escapes are valid in TOML basic strings
    raise TypeError(f"no TOML form for {value!r}")


def config_toml(settings: dict[str, object], seeds: list[dict[str, object]]) -> str:
    lines = [f"{key} = {_toml_value(value)}" for key, value in settings.items()]
    for seed in seeds:
        lines += ["", "[[instances]]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in seed.items()]
    return "\n".join(lines) + "\n"


# -- a tiny HTTP client -------------------------------------------------------------------------
class Api:
    """JSON over one keep-alive HTTP/1.1 connection to the manager, reopened when needed."""

    def __init__(
        self,
        port: int,
        timeout: float = 10.0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        token: str | None = None,
    ) -> None:
        self.port = port
        self.timeout = timeout
        self.ssl_context = ssl_context  # HTTPS when set
        self.token = token  # sent as a bearer token when set
        self._conn: http.client.HTTPConnection | None = None

    def fresh(self, timeout: float) -> Api:
        """Another client for the same server, with its own connection."""
        return Api(self.port, timeout, ssl_context=self.ssl_context, token=self.token)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        status, payload = self.exchange(method, path, data)
        return status, json.loads(payload) if payload else None

    def exchange(self, method: str, path: str, data: bytes | None = None) -> tuple[int, bytes]:
        """One request; the status and the raw body."""
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in (1, 2):
            if self._conn is None:
                if self.ssl_context is not None:
                    self._conn = http.client.HTTPSConnection(
                        HOST, self.port, timeout=self.timeout, context=self.ssl_context
                    )
                else:
                    self._conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=data, headers=headers)
                response = self._conn.getresponse()
                payload = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()  # the server closed an idle keep-alive connection
                if attempt == 2 or method not in ("GET", "HEAD"):
                    raise
                continue
            except (OSError, http.client.HTTPException):
                self.close()
                raise
            if response.getheader("Connection", "").lower() == "close":
                self.close()
            return response.status, payload
        raise AssertionError("unreachable")

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}: {body}")
        return body


def wait_until(probe: Callable[[], T | None], *, within: float, every: float, what: str) -> T:
    """Call ``probe`` every ``every`` s until it returns something, for at most ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {within:g} s")
        time.sleep(every)


# -- one manager process ------------------------------------------------------------------------
@dataclass
class Manager:
    process: subprocess.Popen[bytes]
    api: Api
    state_home: Path
    log_path: Path

    @property
    def instance_log_dir(self) -> Path:
        return self.state_home / "tei-manager" / "logs"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout: float) -> float:
        """Poll ``/health/ready`` on fresh connections; ``perf_counter()`` at its first 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the manager exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            probe = self.api.fresh(timeout=2.0)
            try:
                if probe.request("GET", "/health/ready")[0] == 200:
                    return time.perf_counter()
            except (OSError, http.client.HTTPException):
                pass  # not listening yet
            finally:
                probe.close()
            time.sleep(READY_POLL_SECS)
        raise TimeoutError(f"the manager was not ready within {timeout:g} s:\n{self.log_tail()}")


def serve_command() -> list[str]:
    """``tei-manager serve`` from this interpreter's environment."""
    script = Path(sys.executable).with_name("tei-manager")
    if script.is_file():
        return [str(script), "serve"]
    return [sys.executable, "-m", "tei_manager", "serve"]


@contextmanager
def run_manager(
    workdir: Path,
    *,
    seeds: Sequence[dict[str, object]] = (),
    instance_ports: int = 16,
    grpc_port: int | None = None,
    extra_toml: str = "",
    api_ssl: ssl.SSLContext | None = None,
    api_token: str | None = None,
) -> Iterator[tuple[Manager, float]]:
    """Start ``tei-manager serve`` in ``workdir``; yield it and its spawn -> ready seconds.

    The gRPC multiplexer is off unless ``grpc_port`` is given. ``extra_toml`` is
    appended to the config (e.g. ``[auth]`` tables); ``api_ssl`` / ``api_token`` are
    what the REST client then needs.

    On exit: SIGTERM and a wait for it to stop its instances (SIGKILL as a last resort).
    """
    port_start = free_port_range(instance_ports)
    api_port = free_port()
    settings: dict[str, object] = {
        "api_host": HOST,
        "api_port": api_port,
        "grpc_enabled": grpc_port is not None,
        "grpc_port": grpc_port or 0,
        "instance_port_start": port_start,
        "instance_port_end": port_start + instance_ports - 1,
        "startup_timeout_secs": INSTANCE_TIMEOUT,
        "graceful_shutdown_timeout_secs": SHUTDOWN_TIMEOUT,
    }
    config_file = workdir / "config.toml"
    config_file.write_text(config_toml(settings, list(seeds)) + extra_toml)
    state_home = workdir / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OVERRIDES)}
    env.update(XDG_STATE_HOME=str(state_home), HF_HUB_OFFLINE="1")
    log_path = workdir / "manager.log"
    command = [*serve_command(), "--config", str(config_file)]
    with log_path.open("wb") as log_file:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    manager = Manager(
        process, Api(api_port, ssl_context=api_ssl, token=api_token), state_home, log_path
    )
    try:
        ready_at = manager.wait_ready(MANAGER_TIMEOUT)
        yield manager, ready_at - started
    finally:
        manager.api.close()
        stop_manager(manager)


def stop_manager(manager: Manager) -> None:
    """SIGTERM (the manager stops its instances); SIGKILL if it is still there much later."""
    process = manager.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(SHUTDOWN_TIMEOUT + 15)
        except subprocess.TimeoutExpired:
            process.kill()  # its instances die with it (PDEATHSIG)
            process.wait()
            print("warning: the manager ignored SIGTERM and was killed", file=sys.stderr)
            return
    if process.returncode != 0:
        print(
            f"warning: the manager exited with {process.returncode}:\n{manager.log_tail()}",
            file=sys.stderr,
        )


def vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # the kernel reports kB (KiB)
    raise RuntimeError(f"no VmRSS for pid {pid}")


def parent_pid(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    return None


# -- (a) one instance's life --------------------------------------------------------------------
@dataclass
class ReadyLine:
    at: float  # wall clock, seconds since the epoch
    load_secs: float


def ready_lines(log_path: Path) -> list[ReadyLine]:
    """The ``Ready`` lines of an instance log (one per process it ran), in order."""
    found = []
    for line in log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("message") == "Ready":
            at = datetime.fromisoformat(entry["timestamp"]).timestamp()
            found.append(ReadyLine(at, float(entry["load_secs"])))
    return found


def nth_ready(log_path: Path, index: int) -> ReadyLine | None:
    found = ready_lines(log_path)
    return found[index] if len(found) > index else None


def wait_status(
    manager: Manager, name: str, check: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        info: dict[str, Any] = manager.api.get(f"/instances/{name}")
        if info["status"] == "failed":
            raise RuntimeError(f"{name} failed: {info['last_error']}\n{manager.log_tail()}")
        return info if check(info) else None

    return wait_until(probe, within=INSTANCE_TIMEOUT, every=POLL_SECS, what=f"{name} {what}")


def startup_seconds(manager: Manager) -> tuple[float, int]:
    """Sum and count of ``tei_manager_instance_startup_seconds``: spawn -> ready, per process."""
    status, payload = manager.api.exchange("GET", "/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics: HTTP {status}")
    found: dict[str, float] = {}
    for line in payload.decode().splitlines():
        name, _, value = line.partition(" ")
        if name in ("tei_manager_instance_startup_seconds_sum", STARTUP_COUNT):
            found[name] = float(value)
    return found["tei_manager_instance_startup_seconds_sum"], int(found[STARTUP_COUNT])


def instance_life(manager: Manager, model_dir: Path) -> dict[str, Any]:
    name = "bench"
    log_path = manager.instance_log_dir / f"{name}.log"
    if startup_seconds(manager)[1] != 0:
        raise RuntimeError("an instance process started before the bench's")

    started = time.perf_counter()
    status, created = manager.api.request(
        "POST", "/instances", {"name": name, "model_id": str(model_dir)}
    )
    if status != 201:
        raise RuntimeError(f"POST /instances: HTTP {status}: {created}")
    info = wait_status(manager, name, lambda i: i["status"] == "running", "running")
    create_to_running = time.perf_counter() - started
    first_ready = wait_until(
        lambda: nth_ready(log_path, 0), within=5, every=0.05, what="first Ready line"
    )
    # The cold process's spawn -> ready, as the manager timed it: the model's load time.
    load_secs, started = startup_seconds(manager)
    if started != 1:
        raise RuntimeError(f"expected one process started, the manager counts {started}")

    old_pid = int(info["pid"])
    if parent_pid(old_pid) != manager.process.pid:
        raise RuntimeError(f"pid {old_pid} is not a child of the manager: not killing it")
    killed_wall = time.time()
    killed = time.perf_counter()
    os.kill(old_pid, signal.SIGKILL)
    respawned = wait_status(
        manager, name, lambda i: i["pid"] not in (None, old_pid), "spawned again"
    )
    respawn_secs = time.perf_counter() - killed
    info = wait_status(
        manager, name, lambda i: i["status"] == "running" and i["pid"] != old_pid, "running again"
    )
    failover = time.perf_counter() - killed
    second_ready = wait_until(
        lambda: nth_ready(log_path, 1), within=5, every=0.05, what="second Ready line"
    )
    both_secs, started = startup_seconds(manager)
    if started != 2:
        raise RuntimeError(f"expected two processes started, the manager counts {started}")
    target = load_secs + FAILOVER_SLACK_SECS
    return {
        "create_to_running_secs": round(create_to_running, 3),
        "load_secs": round(load_secs, 3),
        "load_definition": LOAD_DEFINITION,
        "ready_line_load_secs": first_ready.load_secs,
        "failover_secs": round(failover, 3),
        "failover_target_secs": round(target, 3),
        "failover_met": failover <= target,
        "failover_breakdown": {
            "kill_to_new_pid_secs": round(respawn_secs, 3),
            "kill_to_ready_line_secs": round(second_ready.at - killed_wall, 3),
            "new_process_spawn_to_ready_secs": round(both_secs - load_secs, 3),
            "new_process_ready_line_load_secs": second_ready.load_secs,
            "restarts": info["restarts"],
            "new_pid_status": respawned["status"],
        },
    }


def list_latencies(manager: Manager, count: int, expected: int) -> dict[str, Any]:
    api = manager.api
    for _ in range(10):  # warm-up: connection, caches
        api.get("/instances")
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        instances = api.get("/instances")
        samples.append((time.perf_counter() - started) * 1000)
        if len(instances) != expected:
            raise RuntimeError(f"GET /instances listed {len(instances)}, expected {expected}")
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        "instances": expected,
        "requests": count,
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(cuts[98], 3),
        "max_ms": round(max(samples), 3),
    }


def bench_instances(model_dir: Path, seed_count: int, gets: int) -> dict[str, Any]:
    seeds: list[dict[str, object]] = [
        {"name": f"idle-{i:03d}", "model_id": str(model_dir), "auto_start": False}
        for i in range(seed_count)
    ]
    with (
        tempfile.TemporaryDirectory(prefix="tei-bench-") as tmp,
        run_manager(Path(tmp), seeds=seeds, instance_ports=seed_count + 16) as (manager, _),
    ):
        listed = manager.api.get("/instances")
        if len(listed) != seed_count or any(i["status"] != "stopped" for i in listed):
            raise RuntimeError(f"expected {seed_count} stopped seeds, got {listed[:3]}...")
        life = instance_life(manager, model_dir)
        life["list"] = list_latencies(manager, gets, seed_count + 1)
        return life


# -- (b) a fresh, empty manager -----------------------------------------------------------------
def bench_idle_manager(starts: int, settle: float) -> dict[str, Any]:
    ready: list[float] = []
    rss: list[float] = []
    for _ in range(starts):
        with (
            tempfile.TemporaryDirectory(prefix="tei-bench-") as tmp,
            run_manager(Path(tmp)) as (manager, start_to_ready),
        ):
            ready.append(start_to_ready)
            time.sleep(settle)
            if manager.api.get("/instances") != []:
                raise RuntimeError("the fresh manager has instances")
            manager.api.close()
            rss.append(vm_rss_mib(manager.process.pid))
    return {
        "start_to_ready_secs": round(statistics.median(ready), 3),
        "start_to_ready_rounds": [round(x, 3) for x in ready],
        "idle_rss_mib": round(statistics.median(rss), 1),
        "idle_rss_rounds": [round(x, 1) for x in rss],
        "settle_secs": settle,
    }


# -- report -------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_concurrent(
    count: int, concurrency: int, one: Callable[[int], Awaitable[None]]
) -> list[float]:
    """``count`` calls of ``one(i)`` by ``concurrency`` asyncio workers; each call's seconds."""
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


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    header = ("figure", "value", "target", "result")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100, help="stopped instances registered")
    parser.add_argument("--gets", type=int, default=300, help="timed GET /instances requests")
    parser.add_argument("--starts", type=int, default=3, help="fresh manager starts")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before reading RSS")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model_dir = packaged_model_dir()

    idle = bench_idle_manager(args.starts, args.settle)
    life = bench_instances(model_dir, args.seeds, args.gets)
    listing = life.pop("list")

    rss_ok = idle["idle_rss_mib"] <= IDLE_RSS_TARGET_MIB
    ready_ok = idle["start_to_ready_secs"] <= START_TO_READY_TARGET_SECS
    breakdown = life["failover_breakdown"]
    n = listing["instances"]
    rows = [
        ("create -> running (s)", f"{life['create_to_running_secs']:.3f}", "", ""),
        ("model load time (s): cold spawn -> ready", f"{life['load_secs']:.3f}", "", ""),
        ("  of which in-worker load (Ready line)", f"{life['ready_line_load_secs']:.3f}", "", ""),
        (
            "failover after kill -9 (s)",
            f"{life['failover_secs']:.3f}",
            f"<= {life['failover_target_secs']:.3f}",
            verdict(life["failover_met"]),
        ),
        (f"GET /instances p50 (ms, {n} inst.)", f"{listing['p50_ms']:.2f}", "", ""),
        (f"GET /instances p99 (ms, {n} inst.)", f"{listing['p99_ms']:.2f}", "", ""),
        (
            "manager idle RSS (MiB)",
            f"{idle['idle_rss_mib']:.1f}",
            f"<= {IDLE_RSS_TARGET_MIB:g}",
            verdict(rss_ok),
        ),
        (
            "start -> ready (s)",
            f"{idle['start_to_ready_secs']:.3f}",
            f"<= {START_TO_READY_TARGET_SECS:g}",
            verdict(ready_ok),
        ),
    ]
    print_table(rows)
    print(f"model load time: {LOAD_DEFINITION}")
    print(
        f"failover: new pid seen after {breakdown['kill_to_new_pid_secs']:.3f} s, "
        f"Ready logged after {breakdown['kill_to_ready_line_secs']:.3f} s; the new process "
        f"took {breakdown['new_process_spawn_to_ready_secs']:.3f} s spawn -> ready "
        f"(Ready line load_secs {breakdown['new_process_ready_line_load_secs']:.3f})"
    )
    print(
        f"fresh manager rounds: start -> ready {idle['start_to_ready_rounds']} s, "
        f"RSS {idle['idle_rss_rounds']} MiB (read {args.settle:g} s after ready)"
    )
    result = {
        "bench": "control_plane",
        **life,
        "list_instances": listing,
        **idle,
        "idle_rss_target_mib": IDLE_RSS_TARGET_MIB,
        "idle_rss_met": rss_ok,
        "start_to_ready_target_secs": START_TO_READY_TARGET_SECS,
        "start_to_ready_met": ready_ok,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
