"""The manager facade with fake processes: the contract's errors, state saving, restore,
shutdown. Real files (state, logs) in a temporary directory; no real processes."""

from __future__ import annotations

import os
import random
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from tei_manager.config import ConfigError, InstanceConfig, ManagerConfig, SeedInstance
from tei_manager.core.instances import DesiredState, InstanceStatus
from tei_manager.core.ondemand import StartPolicy
from tei_manager.core.ports import probe_bindable
from tei_manager.core.restart import RestartPolicy
from tei_manager.errors import ErrorCode, TeiError
from tei_manager.manager.metrics import ManagerMetrics
from tei_manager.manager.service import Manager
from tei_manager.supervisor.process import SpawnError
from tests.fake_devices import FakeDevices
from tests.fake_processes import FakeHost, FakeProcess, run_inline

S = InstanceStatus


@pytest.fixture
def clock(autojump_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    return autojump_clock


@pytest.fixture
def config(tmp_path: Path) -> ManagerConfig:
    return ManagerConfig(
        state_file=str(tmp_path / "state" / "state.toml"),
        log_dir=str(tmp_path / "logs"),
        api_port=0,
        grpc_port=0,
        instance_port_start=20000,
        instance_port_end=20009,
        health_check_interval_secs=10,
        startup_timeout_secs=60,
        graceful_shutdown_timeout_secs=5,
    )


def _manager(
    config: ManagerConfig,
    host: FakeHost,
    *,
    gpu_count: int = 0,
    host_port_free: Callable[[int], bool] = lambda port: True,
    devices: FakeDevices | None = None,
) -> Manager:
    devices = devices or FakeDevices()
    return Manager(
        config,
        spawner=host.spawn,
        prober=host.probe,
        gpu_count=gpu_count,
        port_probe=lambda port: True,
        explicit_port_probe=host_port_free,
        policy=RestartPolicy.from_config(config),
        run_blocking=run_inline,
        read_devices=devices.read_devices,
        estimate=devices.estimate,
        read_memory=devices.read_memory,
        gpu_memory=devices.gpu_memory,
    )


@asynccontextmanager
async def running(manager: Manager) -> AsyncIterator[Manager]:
    """``manager.run`` in a nursery; leaving the block shuts it down."""
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        yield manager
        nursery.cancel_scope.cancel()


def _cfg(name: str = "a", **fields: object) -> InstanceConfig:
    return InstanceConfig(name=name, model_id="org/model", **fields)  # type: ignore[arg-type]


def _persisted(config: ManagerConfig) -> dict[str, tuple[DesiredState, int | None]]:
    from tei_manager.manager.state import load_state

    state = load_state(config.state_file).state
    return {i.config.name: (i.desired_state, i.config.port) for i in state.instances}


async def _code(call: Callable[[], object]) -> ErrorCode:
    with pytest.raises(TeiError) as error:
        result = call()
        if hasattr(result, "__await__"):
            await result
    return error.value.code


# -- creating ------------------------------------------------------------------------------
async def test_create_spawns_and_returns_starting(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    host = FakeHost(nursery)
    async with running(_manager(config, host)) as manager:
        assert manager.startup_complete and not manager.ready  # no listener yet
        manager.mark_listening()
        assert manager.ready
        info = await manager.create_instance(_cfg("a"))
        assert (info.status, info.pid, info.port) == (S.STARTING, host.current("a").pid, 20000)
        await manager.create_instance(_cfg("b", port=20005, pooling="cls"))
        await trio.sleep(5)
        assert [(i.name, i.status, i.port) for i in manager.list_instances()] == [
            ("a", S.RUNNING, 20000),
            ("b", S.RUNNING, 20005),
        ]
        assert manager.get_instance("b").pooling == "cls"
        assert _persisted(config) == {
            "a": (DesiredState.RUNNING, 20000),
            "b": (DesiredState.RUNNING, 20005),
        }
        summary = manager.health_summary()
        assert summary["status"] == "healthy"
        assert summary["instances"] == {
            "total": 2,
            "running": 2,
            "starting": 0,
            "failed": 0,
            "stopped": 0,
            "idle": 0,
        }


async def test_create_refusals_carry_the_contract_codes(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    host = FakeHost(nursery)
    config = msgspec.structs.replace(config, max_instances=2)
    busy_on_host = {20007}
    manager = _manager(config, host, gpu_count=1, host_port_free=lambda p: p not in busy_on_host)
    assert await _code(lambda: manager.create_instance(_cfg())) is ErrorCode.NOT_READY
    async with running(manager):
        await manager.create_instance(_cfg("a", port=20001, gpu_id=0))
        E = ErrorCode
        assert await _code(lambda: manager.create_instance(_cfg("a"))) is E.INSTANCE_EXISTS
        assert await _code(lambda: manager.create_instance(_cfg("b", port=20001))) is (
            E.PORT_CONFLICT
        )
        assert await _code(lambda: manager.create_instance(_cfg("b", port=20007))) is (
            E.PORT_CONFLICT
        )
        assert await _code(lambda: manager.create_instance(_cfg("b", gpu_id=1))) is (
            E.INVALID_GPU_ID
        )
        assert await _code(lambda: manager.create_instance(_cfg("b", port=80))) is E.INVALID_PORT
        await manager.create_instance(_cfg("b"))
        assert await _code(lambda: manager.create_instance(_cfg("c"))) is (E.MAX_INSTANCES_REACHED)
        assert [i.name for i in manager.list_instances()] == ["a", "b"]
        assert len(host.processes) == 2


def _model_folders(root: Path) -> dict[str, Path]:
    folders = {name: root / name for name in ("empty", "readme", "bert", "st", "nested")}
    for folder in folders.values():
        folder.mkdir()
    (folders["readme"] / "README.md").write_text("# not a model")
    (folders["bert"] / "config.json").write_text("{}")
    (folders["st"] / "modules.json").write_text("[]")
    (folders["nested"] / "0_Transformer").mkdir()
    (folders["nested"] / "0_Transformer" / "config.json").write_text("{}")
    (root / "file").write_text("")
    return folders


async def test_a_local_model_id_must_be_a_model_folder(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig, tmp_path: Path
) -> None:
    folders = _model_folders(tmp_path)
    host = FakeHost(nursery)
    async with running(_manager(config, host)) as manager:
        for model_id, problem in [
            ("/tmp/nonexistent-model-folder", "does not exist"),
            (str(tmp_path / "file"), "is not a folder"),
            (str(folders["empty"]), "holds no config.json or modules.json: not a model folder"),
            (str(folders["readme"]), "holds no config.json or modules.json: not a model folder"),
        ]:
            with pytest.raises(TeiError) as error:
                await manager.create_instance(InstanceConfig(name="x", model_id=model_id))
            assert (error.value.code, error.value.http_status) == (ErrorCode.MODEL_NOT_FOUND, 404)
            assert error.value.message == f'model_id: "{model_id}" {problem}'
        assert manager.list_instances() == [] and not host.processes
        for name in ("bert", "st", "nested"):
            info = await manager.create_instance(
                InstanceConfig(name=name, model_id=str(folders[name]))
            )
            assert info.status is S.STARTING
        await manager.create_instance(_cfg("hub"))  # a Hub id: not looked for on disk


async def test_without_gpus_every_gpu_id_is_refused(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    async with running(_manager(config, FakeHost(nursery), gpu_count=0)) as manager:
        with pytest.raises(TeiError) as error:
            await manager.create_instance(_cfg("a", gpu_id=0))
        assert error.value.code is ErrorCode.INVALID_GPU_ID
        assert "this host has no GPU" in str(error.value)


async def test_auto_ports_fill_the_range_then_run_out(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    async with running(_manager(config, FakeHost(nursery))) as manager:
        ports = [(await manager.create_instance(_cfg(f"i{n}"))).port for n in range(10)]
        assert ports == list(range(20000, 20010))
        with pytest.raises(TeiError) as error:
            await manager.create_instance(_cfg("one-too-many"))
        assert error.value.code is ErrorCode.PORT_ALLOCATION_FAILED


# -- start, stop, restart, delete ------------------------------------------------------------------
async def test_lifecycle_and_state_saved_on_every_change(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    host = FakeHost(nursery, sigterm_exit_secs=0.5)
    async with running(_manager(config, host)) as manager:
        await manager.create_instance(_cfg("a"))
        await trio.sleep(5)
        assert await _code(lambda: manager.start_instance("a")) is ErrorCode.ALREADY_RUNNING

        info = await manager.stop_instance("a")
        assert info.status is S.STOPPING  # returns at once
        assert _persisted(config)["a"][0] is DesiredState.STOPPED
        assert await _code(lambda: manager.stop_instance("a")) is ErrorCode.NOT_RUNNING
        await trio.sleep(1)
        assert manager.get_instance("a").status is S.STOPPED
        await trio.sleep(100)
        assert len(host.processes["a"]) == 1  # a stopped instance is never restarted

        info = await manager.start_instance("a")
        assert info.status is S.STARTING
        assert _persisted(config)["a"][0] is DesiredState.RUNNING
        await trio.sleep(5)
        assert manager.get_instance("a").status is S.RUNNING

        before = host.current("a")
        info = await manager.restart_instance("a")
        assert (info.status, info.restarts) == (S.STOPPING, 1)
        await trio.sleep(5)
        after = manager.get_instance("a")
        assert (after.status, after.pid) == (S.RUNNING, host.current("a").pid)
        assert before.returncode == 0 and host.current("a") is not before

        as_it_was = await manager.delete_instance("a")
        assert (as_it_was.name, as_it_was.status) == ("a", S.RUNNING)
        assert host.alive("a") == []  # delete waits for the process to be gone
        assert _persisted(config) == {}
        assert await _code(lambda: manager.get_instance("a")) is ErrorCode.INSTANCE_NOT_FOUND
        for call in (manager.start_instance, manager.stop_instance, manager.restart_instance):
            assert await _code(lambda call=call: call("a")) is ErrorCode.INSTANCE_NOT_FOUND  # type: ignore[misc]
        assert host.overlaps == 0


async def test_start_twice_never_runs_two_processes(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    host = FakeHost(nursery, sigterm_exit_secs=None)  # SIGKILLed after the 5 s grace
    async with running(_manager(config, host)) as manager:
        await manager.create_instance(_cfg("a"))
        await trio.sleep(2)
        await manager.stop_instance("a")
        await trio.sleep(1)
        # Still stopping: the registry lets a start through; it waits for the old process.
        assert (await manager.start_instance("a")).status is S.STOPPING
        assert (await manager.start_instance("a")).status is S.STOPPING
        await trio.sleep(10)
        assert manager.get_instance("a").status is S.RUNNING
        assert await _code(lambda: manager.start_instance("a")) is ErrorCode.ALREADY_RUNNING
        assert host.spawn_times("a") == [0.0, 7.0]
        assert host.overlaps == 0


async def test_a_failed_instance_can_be_stopped_and_started(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    host = FakeHost(nursery)
    host.spawn_error = "cannot start x: No such file or directory"
    async with running(_manager(config, host)) as manager:
        info = await manager.create_instance(_cfg("a"))
        assert (info.status, info.last_error) == (S.FAILED, host.spawn_error)
        assert (await manager.stop_instance("a")).status is S.STOPPED
        host.spawn_error = None
        await manager.start_instance("a")
        await trio.sleep(5)
        assert manager.get_instance("a").status is S.RUNNING


async def test_a_name_is_free_again_only_once_its_process_is_gone(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    host = FakeHost(nursery, sigterm_exit_secs=3.0)
    async with running(_manager(config, host)) as manager:
        await manager.create_instance(_cfg("a"))
        async with trio.open_nursery() as inner:
            inner.start_soon(manager.delete_instance, "a")
            await trio.sleep(1)
            assert await _code(lambda: manager.create_instance(_cfg("a"))) is (
                ErrorCode.INSTANCE_EXISTS
            )
        await manager.create_instance(_cfg("a"))
        assert host.overlaps == 0


class ListeningHost(FakeHost):
    """Fake processes that really listen on their port with SO_REUSEADDR, as TEI and
    the worker do, and serve one connection, so a deleted one leaves its port with a
    connection in TIME_WAIT, as a real instance that served traffic would."""

    def spawn(self, config: InstanceConfig) -> FakeProcess:
        listener = socket.socket()
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", config.port or 0))
            listener.listen()
            with socket.create_connection(listener.getsockname()) as client:
                served, _ = listener.accept()
                served.close()  # the server closes first: its side ends in TIME_WAIT
                client.recv(1)
        except OSError as e:
            listener.close()
            raise SpawnError(f"cannot listen on {config.port}: {e}") from None
        process = super().spawn(config)
        self._nursery.start_soon(self._close_on_exit, process, listener)
        return process

    async def _close_on_exit(self, process: FakeProcess, listener: socket.socket) -> None:
        with listener:
            await process.wait()


def _free_port_range(size: int) -> int:
    rng = random.Random()
    for _ in range(100):
        start = rng.randrange(30000, 60000 - size)
        if all(probe_bindable(p) for p in range(start, start + size)):
            return start
    raise RuntimeError("no free port range")


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder in memory where there is one: 600 state saves, each fsynced, take
    seconds on a disk, and saving is not what the test is about."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        yield Path(folder)


async def test_port_churn_reuses_released_ports_and_never_fails(
    nursery: trio.Nursery, fast_dir: Path
) -> None:
    start = _free_port_range(30)
    config = ManagerConfig(
        state_file=str(fast_dir / "state.toml"),
        log_dir=str(fast_dir / "logs"),
        api_port=0,
        grpc_port=0,
        instance_port_start=start,
        instance_port_end=start + 29,
    )
    host = ListeningHost(nursery, ready_after=0)
    # The real bind probe decides (Manager's default).
    manager = Manager(
        config, spawner=host.spawn, prober=host.probe, gpu_count=0, run_blocking=run_inline
    )
    failures: list[str] = []
    ports: list[int] = []
    async with running(manager):
        for n in range(300):
            try:
                info = await manager.create_instance(_cfg(f"churn-{n % 7}"))
            except TeiError as e:
                failures.append(f"{e.code}: {e}")
                continue
            assert info.status is not S.FAILED, info.last_error  # it could listen
            ports.append(info.port)
            await manager.delete_instance(info.name)
    assert failures == []
    assert len(ports) == 300
    assert set(ports) <= set(range(start, start + 30))
    # Released ports go to the back of the line, so the churn rotates through the
    # range (a port another program grabs meanwhile is skipped, hence not "== 30").
    assert len(set(ports)) >= 20
    assert host.overlaps == 0


# -- logs and metrics ------------------------------------------------------------------------
async def test_logs_are_sliced_like_python(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    async with running(_manager(config, FakeHost(nursery))) as manager:
        await manager.create_instance(_cfg("a"))
        manager.log_path("a").write_text("".join(f"{i}\n" for i in range(10)))
        logs = await manager.instance_logs("a", -3, None)
        assert (logs.lines, logs.start, logs.end, logs.total_lines) == (["7", "8", "9"], 7, 10, 10)
        with pytest.raises(TeiError):
            await manager.instance_logs("nope", None, None)


async def test_a_deleted_instance_s_log_goes_with_it(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    async with running(_manager(config, FakeHost(nursery, sigterm_exit_secs=2))) as manager:
        await manager.create_instance(_cfg("a"))
        log = manager.log_path("a")
        _write(log, b"old instance line\n")
        await manager.delete_instance("a")
        assert not log.exists()
        await manager.create_instance(_cfg("a"))
        assert (await manager.instance_logs("a", None, None)).lines == []


async def test_a_new_instance_never_sees_a_leftover_log(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    # Left by an instance of that name whose delete a crash interrupted.
    _write(Path(config.log_dir) / "a.log", b"a line from before\n")
    async with running(_manager(config, FakeHost(nursery))) as manager:
        await manager.create_instance(_cfg("a"))
        assert (await manager.instance_logs("a", None, None)).total_lines == 0


class HeldBlocking:
    """``run_inline``, except that the call after :meth:`hold_next` waits for ``release``."""

    def __init__(self) -> None:
        self.release: trio.Event | None = None
        self.entered = trio.Event()

    def hold_next(self) -> trio.Event:
        self.release = trio.Event()
        return self.release

    async def __call__(self, fn: Callable[[], T]) -> T:
        if self.release is not None:
            release, self.release = self.release, None
            self.entered.set()
            await release.wait()
        return await run_inline(fn)


T = TypeVar("T")


@pytest.mark.parametrize("created_again", [False, True])
async def test_logs_are_never_served_for_a_deleted_instance(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig, created_again: bool
) -> None:
    host = FakeHost(nursery)
    blocking = HeldBlocking()
    manager = Manager(
        config, spawner=host.spawn, prober=host.probe, gpu_count=0, run_blocking=blocking
    )
    async with running(manager):
        await manager.create_instance(_cfg("a"))
        _write(manager.log_path("a"), b"secret of the old instance\n")
        release = blocking.hold_next()
        outcome: list[object] = []

        async def read_logs() -> None:
            try:
                outcome.append(await manager.instance_logs("a", None, None))
            except TeiError as e:
                outcome.append(e.code)

        nursery.start_soon(read_logs)
        await blocking.entered.wait()  # the read is under way...
        await manager.delete_instance("a")  # ...when the instance is deleted
        if created_again:
            await manager.create_instance(_cfg("a"))
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == [ErrorCode.INSTANCE_NOT_FOUND]


async def test_every_contract_metric_is_recorded(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    host = FakeHost(nursery)
    async with running(_manager(config, host)) as manager:
        await manager.create_instance(_cfg("a"))
        await manager.create_instance(_cfg("b"))
        await trio.sleep(5)
        host.current("a").exit(1)  # crash: spawned again at once
        await manager.restart_instance("b")  # manual
        await trio.sleep(5)
        host.unhealthy.add("a")  # running since 6: failed checks at 16, 26, 36, then restarted
        await trio.sleep(28)
        host.unhealthy.discard("a")
        await trio.sleep(5)
        await manager.delete_instance("b")
        manager.metrics.observe_http("/instances", "GET", 200, 0.003)
        text = (await trio.to_thread.run_sync(manager.metrics.render)).decode()
    for line in (
        "tei_manager_instances_count 1.0",
        'tei_manager_instances_created_total{instance="a",model="org/model"} 1.0',
        'tei_manager_instances_deleted_total{instance="b"} 1.0',
        'tei_manager_health_check_failures_total{instance="a"} 3.0',
        'tei_manager_instance_restarts_total{instance="a",reason="crash"} 1.0',
        'tei_manager_instance_restarts_total{instance="a",reason="health"} 1.0',
        'tei_manager_instance_restarts_total{instance="b",reason="manual"} 1.0',
        "tei_manager_instance_startup_seconds_count 5.0",
        'tei_manager_http_request_duration_seconds_count{method="GET",route="/instances",'
        'status="200"} 1.0',
    ):
        assert line in text
    assert "tei_manager_health_check_seconds_count" in text
    # No `_created` timestamp series beside the counters and histograms.
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    assert samples
    assert [s.name for s in samples if s.name.endswith("_created")] == []


def test_http_durations_stay_counted_when_the_kept_children_are_dropped() -> None:
    metrics = ManagerMetrics()
    metrics.observe_http("/v1/embeddings", "POST", 200, 0.002)
    for i in range(1100):  # made-up methods: more series than are kept at hand
        metrics.observe_http("unmatched", f"M{i}", 405, 0.001)
    metrics.observe_http("/v1/embeddings", "POST", 200, 0.003)
    families = text_string_to_metric_families(metrics.render().decode())
    counts = {
        (s.labels["route"], s.labels["method"], s.labels["status"]): s.value
        for family in families
        for s in family.samples
        if s.name == "tei_manager_http_request_duration_seconds_count"
    }
    assert counts[("/v1/embeddings", "POST", "200")] == 2.0
    assert counts[("unmatched", "M0", "405")] == counts[("unmatched", "M1099", "405")] == 1.0


# -- restore and shutdown --------------------------------------------------------------------
async def test_shutdown_stops_every_instance_concurrently_and_keeps_them_wanted(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    host = FakeHost(nursery, sigterm_exit_secs=None)  # each needs the full 5 s grace
    manager = _manager(config, host)
    async with running(manager):
        for name in ("a", "b", "c"):
            await manager.create_instance(_cfg(name))
        await trio.sleep(5)
        shutdown_at = trio.current_time()
    assert trio.current_time() - shutdown_at == 5.0  # not 15: all at once
    assert all(p.signals == ["SIGTERM", "SIGKILL"] for ps in host.processes.values() for p in ps)
    assert {i.status for i in manager.list_instances()} == {S.STOPPED}
    assert {desired for desired, _ in _persisted(config).values()} == {DesiredState.RUNNING}
    assert not Path(config.state_file).with_suffix(".runtime.json").exists()


async def test_a_new_manager_restores_the_state_and_merges_seeds(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    host = FakeHost(nursery)
    async with running(_manager(config, host)) as first:
        await first.create_instance(_cfg("a", pooling="mean"))
        await first.create_instance(_cfg("b", port=20008))
        await first.stop_instance("b")

    seeds = (
        SeedInstance(name="a", model_id="org/other"),  # known: the state file wins
        SeedInstance(name="c", model_id="org/model", auto_start=False),
        SeedInstance(name="d", model_id="org/model", port=20009),
    )
    config = msgspec.structs.replace(config, instances=seeds)
    host = FakeHost(nursery)
    async with running(_manager(config, host)) as second:
        await trio.sleep(5)
        restored = {i.name: i for i in second.list_instances()}
        assert list(restored) == ["a", "b", "c", "d"]
        assert (restored["a"].status, restored["a"].pooling, restored["a"].port) == (
            S.RUNNING,
            "mean",
            20000,
        )
        assert second.get_instance("a").model_id == "org/model"
        assert (restored["b"].status, restored["b"].port) == (S.STOPPED, 20008)
        assert restored["c"].status is S.STOPPED
        assert (restored["d"].status, restored["d"].port) == (S.RUNNING, 20009)
        assert set(host.processes) == {"a", "d"}
        assert _persisted(config)["c"] == (DesiredState.STOPPED, 20001)


# -- readiness ---------------------------------------------------------------------------------
_GATED_SEEDS = (
    SeedInstance(name="a", model_id="org/model"),
    SeedInstance(name="off", model_id="org/model", auto_start=False),
    SeedInstance(name="lazy", model_id="org/model", start=StartPolicy.ON_DEMAND),
)


async def test_ready_requires_instances_waits_for_the_seeds_then_latches(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    config = msgspec.structs.replace(config, instances=_GATED_SEEDS, ready_requires_instances=True)
    host = FakeHost(nursery, ready_after=30)  # a model that takes 30 s to load
    async with running(_manager(config, host)) as manager:
        manager.mark_listening()
        assert manager.not_ready_reason() == (
            "not ready: declared instances not running yet: a (starting)"
        )
        assert not manager.ready and not manager.instances_ready.is_set()
        await manager.instances_ready.wait()
        # The supervisor saw it running, and the gate (polled each second) opened.
        assert 30 <= trio.current_time() <= 32
        assert manager.get_instance("a").status is S.RUNNING
        assert manager.get_instance("lazy").status is S.IDLE
        assert manager.ready and manager.not_ready_reason() is None
        # Latched: a crash later does not take the member out of its Service.
        host.current("a").exit(3)
        await trio.testing.wait_all_tasks_blocked()
        assert manager.get_instance("a").status is S.STARTING
        assert manager.ready
        manager.begin_shutdown()
        assert manager.not_ready_reason() == "not ready: the manager is shutting down"


async def test_a_failed_seed_holds_readiness_until_stopped(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    config = msgspec.structs.replace(config, instances=_GATED_SEEDS, ready_requires_instances=True)
    host = FakeHost(nursery)
    host.spawn_error = "cannot start x: No such file or directory"
    async with running(_manager(config, host)) as manager:
        manager.mark_listening()
        await trio.sleep(60)
        assert manager.get_instance("a").status is S.FAILED
        reason = manager.not_ready_reason()
        assert reason is not None and "a (failed)" in reason
        assert not manager.instances_ready.is_set()
        await manager.stop_instance("a")  # the operator gives up on it
        assert manager.ready
        await trio.sleep(1)
        assert manager.instances_ready.is_set()


async def test_without_the_gate_ready_does_not_wait_for_instances(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    config = msgspec.structs.replace(config, instances=_GATED_SEEDS)
    host = FakeHost(nursery, ready_after=30)
    async with running(_manager(config, host)) as manager:
        # Set by the time run() started: the gRPC health serves as soon as it listens.
        assert manager.instances_ready.is_set()
        assert manager.not_ready_reason() == (
            "not ready: state is being restored or the listeners are not up yet"
        )
        manager.mark_listening()
        assert manager.get_instance("a").status is S.STARTING
        assert manager.ready


def _write(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _read(path: Path) -> bytes:
    return path.read_bytes()


async def test_a_corrupt_state_file_is_moved_aside_and_reported_on_health(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    state = _write(config.state_file, b"[[instances]\nbroken")
    # Saves that crashes interrupted, one of them from an older run.
    for tmp in (".state.toml.0a1b2c3d.tmp", ".state.toml.deadbeef.tmp"):
        _write(state.parent / tmp, b"half")
    config = msgspec.structs.replace(config, instances=(SeedInstance(name="s", model_id="o/m"),))
    async with running(_manager(config, FakeHost(nursery))) as manager:
        report = manager.health_summary()["state"]
        assert report["status"] == "moved_aside"
        aside = Path(report["moved_aside_to"])
        assert aside.parent == state.parent and aside.name.startswith("state.toml.corrupt-")
        assert _read(aside) == b"[[instances]\nbroken"  # kept, not replaced
        assert report["error"]
        assert [i.name for i in manager.list_instances()] == ["s"]  # from the seeds
    assert sorted(p.name for p in state.parent.iterdir()) == sorted([aside.name, "state.toml"])


async def test_a_good_state_file_is_reported_ok(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    async with running(_manager(config, FakeHost(nursery))) as manager:
        assert manager.health_summary()["state"] == {
            "status": "ok",
            "moved_aside_to": None,
            "error": None,
        }


async def test_a_state_file_that_cannot_be_moved_aside_stops_the_start(
    nursery: trio.Nursery, config: ManagerConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _write(config.state_file, b"version = 99")

    def refuse(*args: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(ConfigError, match=r"state_file: .* is unusable .* cannot be moved aside"):
        await _manager(config, FakeHost(nursery)).run()
    assert _read(state) == b"version = 99"


async def test_restore_is_off_when_configured(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    async with running(_manager(config, FakeHost(nursery))) as first:
        await first.create_instance(_cfg("a"))
    config = msgspec.structs.replace(
        config,
        auto_restore_on_restart=False,
        instances=(SeedInstance(name="s", model_id="org/model"),),
    )
    async with running(_manager(config, FakeHost(nursery))) as second:
        assert [i.name for i in second.list_instances()] == ["s"]


async def test_a_restored_instance_on_a_missing_gpu_is_failed_not_dropped(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    async with running(_manager(config, FakeHost(nursery), gpu_count=2)) as first:
        await first.create_instance(_cfg("a", gpu_id=1))
    host = FakeHost(nursery)
    async with running(_manager(config, host, gpu_count=1)) as second:
        info = second.get_instance("a")
        assert info.status is S.FAILED
        assert info.last_error == "cannot start: gpu_id: 1 does not exist: this host has GPUs 0-0"
        assert host.processes == {}
        await second.delete_instance("a")


async def test_a_restored_port_now_used_by_the_manager_moves(
    clock: trio.testing.MockClock, nursery: trio.Nursery, config: ManagerConfig
) -> None:
    async with running(_manager(config, FakeHost(nursery))) as first:
        await first.create_instance(_cfg("a", port=20005))
    config = msgspec.structs.replace(config, api_port=20005)
    async with running(_manager(config, FakeHost(nursery))) as second:
        assert second.get_instance("a").port == 20000
