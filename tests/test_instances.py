from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from tei_manager.config import InstanceConfig, SeedInstance
from tei_manager.core.instances import (
    DesiredState,
    InstanceInfo,
    InstanceRecord,
    InstanceStatus,
    InstanceTable,
    InstanceTableStatistics,
)
from tei_manager.core.ports import PortAllocator
from tei_manager.errors import ConflictError, ErrorCode, LimitError, NotFoundError

T0 = datetime(2025, 1, 15, 10, 30, tzinfo=UTC)


class FakeHost:
    def __init__(self) -> None:
        self.busy: set[int] = set()
        self.now = 0.0

    def probe(self, port: int) -> bool:
        return port not in self.busy

    def clock(self) -> float:
        return self.now


@pytest.fixture
def host() -> FakeHost:
    return FakeHost()


def make_registry(
    host: FakeHost, *, max_instances: int | None = None, end: int = 8089
) -> InstanceTable:
    ports = PortAllocator(8080, end, probe=host.probe)
    return InstanceTable(ports, max_instances=max_instances, reserved_ports={9000, 9001})


@pytest.fixture
def registry(host: FakeHost) -> InstanceTable:
    return make_registry(host)


def cfg(name: str, **fields: object) -> InstanceConfig:
    return InstanceConfig(name=name, model_id=f"org/{name}", **fields)  # type: ignore[arg-type]


def test_add_allocates_ports_and_keeps_creation_order(registry: InstanceTable) -> None:
    for name in ("c", "a", "b"):
        registry.add(cfg(name), created_at=T0)
    assert [r.name for r in registry] == ["c", "a", "b"]
    assert [r.port for r in registry] == [8080, 8081, 8082]
    assert [i.name for i in registry.infos(T0)] == ["c", "a", "b"]
    assert len(registry) == 3 and "a" in registry and "z" not in registry


def test_add_stores_the_resolved_config(registry: InstanceTable) -> None:
    record = registry.add(cfg("a", port=0, prometheus_port=0), created_at=T0)
    assert (record.config.port, record.config.prometheus_port) == (8080, 8081)
    assert record.ports() == (8080, 8081)
    assert registry.add(cfg("b"), created_at=T0).config.prometheus_port is None


def test_explicit_ports_are_kept(registry: InstanceTable) -> None:
    record = registry.add(cfg("a", port=8500, prometheus_port=8501), created_at=T0)
    assert record.ports() == (8500, 8501)
    # Auto allocation still starts from the bottom of the range.
    assert registry.add(cfg("b"), created_at=T0).port == 8080


def test_auto_ports_skip_ports_taken_explicitly_inside_the_range(registry: InstanceTable) -> None:
    registry.add(cfg("a", port=8080, prometheus_port=8081), created_at=T0)
    assert registry.add(cfg("b", prometheus_port=0), created_at=T0).ports() == (8082, 8083)


def test_auto_ports_skip_ports_busy_on_the_host(host: FakeHost, registry: InstanceTable) -> None:
    host.busy = {8080}
    assert registry.add(cfg("a"), created_at=T0).port == 8081


def test_seed_is_stored_as_plain_instance_config(registry: InstanceTable) -> None:
    record = registry.add(SeedInstance(name="s", model_id="m", auto_start=False), created_at=T0)
    assert type(record.config) is InstanceConfig


def test_duplicate_name(registry: InstanceTable) -> None:
    registry.add(cfg("a"), created_at=T0)
    with pytest.raises(ConflictError) as info:
        registry.add(cfg("a"), created_at=T0)
    assert info.value.code is ErrorCode.INSTANCE_EXISTS
    assert str(info.value) == 'instance "a" already exists'


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"port": 8500}, 'port: 8500 is already used by instance "a"'),
        ({"port": 8501}, 'port: 8501 is already used by instance "a"'),
        ({"prometheus_port": 8500}, 'prometheus_port: 8500 is already used by instance "a"'),
        ({"prometheus_port": 8501}, 'prometheus_port: 8501 is already used by instance "a"'),
        ({"port": 9000}, "port: 9000 is used by the manager itself"),
        ({"prometheus_port": 9001}, "prometheus_port: 9001 is used by the manager itself"),
    ],
)
def test_port_conflicts(registry: InstanceTable, fields: dict[str, int], message: str) -> None:
    registry.add(cfg("a", port=8500, prometheus_port=8501), created_at=T0)
    with pytest.raises(ConflictError) as info:
        registry.add(cfg("b", **fields), created_at=T0)
    assert info.value.code is ErrorCode.PORT_CONFLICT
    assert str(info.value) == message
    assert [r.name for r in registry] == ["a"]


def test_auto_ports_never_take_the_managers_ports(host: FakeHost) -> None:
    ports = PortAllocator(9000, 9002, probe=host.probe)
    registry = InstanceTable(ports, reserved_ports={9000, 9001})
    assert registry.add(cfg("a"), created_at=T0).port == 9002


def test_max_instances(host: FakeHost) -> None:
    registry = make_registry(host, max_instances=2)
    registry.add(cfg("a"), created_at=T0)
    registry.add(cfg("b"), created_at=T0)
    with pytest.raises(LimitError) as info:
        registry.add(cfg("c"), created_at=T0)
    assert info.value.code is ErrorCode.MAX_INSTANCES_REACHED
    registry.remove("a")
    registry.add(cfg("c"), created_at=T0)


def test_name_conflict_is_reported_before_the_limit(host: FakeHost) -> None:
    registry = make_registry(host, max_instances=1)
    registry.add(cfg("a"), created_at=T0)
    with pytest.raises(ConflictError):
        registry.add(cfg("a"), created_at=T0)


def test_failed_allocation_changes_nothing(host: FakeHost) -> None:
    registry = make_registry(host, end=8081)
    registry.add(cfg("a"), created_at=T0)
    # The instance port fits, the metrics port does not: neither is taken.
    with pytest.raises(LimitError) as info:
        registry.add(cfg("b", prometheus_port=0), created_at=T0)
    assert info.value.code is ErrorCode.PORT_ALLOCATION_FAILED
    assert [r.name for r in registry] == ["a"]
    assert registry.add(cfg("c"), created_at=T0).port == 8081


def test_removed_ports_are_reused_last(host: FakeHost) -> None:
    registry = make_registry(host, end=8083)
    registry.add(cfg("a", prometheus_port=0), created_at=T0)
    removed = registry.remove("a")
    assert removed.name == "a" and len(registry) == 0
    assert registry.add(cfg("b"), created_at=T0).port == 8082
    # Only 8080 and 8081 are left in the range (8080-8083): reused, not refused.
    registry.add(cfg("c"), created_at=T0)
    assert registry.add(cfg("d", prometheus_port=0), created_at=T0).ports() == (8080, 8081)


def test_remove_unknown(registry: InstanceTable) -> None:
    with pytest.raises(NotFoundError) as info:
        registry.remove("ghost")
    assert info.value.code is ErrorCode.INSTANCE_NOT_FOUND


def test_lookups(registry: InstanceTable) -> None:
    a = registry.add(InstanceConfig(name="a", model_id="org/x"), created_at=T0)
    b = registry.add(InstanceConfig(name="b", model_id="org/y"), created_at=T0)
    c = registry.add(InstanceConfig(name="c", model_id="org/x"), created_at=T0)
    assert registry.get("b") is b
    assert registry.find("b") is b and registry.find("z") is None
    assert [registry.at_index(i) for i in range(3)] == [a, b, c]
    assert registry.by_model("org/x") == [a, c]
    assert registry.by_model("org/none") == []
    with pytest.raises(NotFoundError, match='instance "z" not found'):
        registry.get("z")
    with pytest.raises(NotFoundError, match="no instance at index 3: there are 3") as info:
        registry.at_index(3)
    assert info.value.code is ErrorCode.INSTANCE_NOT_FOUND
    with pytest.raises(NotFoundError):
        registry.at_index(-1)


def test_used_ports(registry: InstanceTable) -> None:
    registry.add(cfg("a", prometheus_port=0), created_at=T0)
    registry.add(cfg("b"), created_at=T0)
    assert registry.used_ports() == {9000, 9001, 8080, 8081, 8082}


def test_iteration_is_a_snapshot(registry: InstanceTable) -> None:
    registry.add(cfg("a"), created_at=T0)
    registry.add(cfg("b"), created_at=T0)
    for record in registry:
        registry.remove(record.name)
    assert len(registry) == 0


def test_initial_status_follows_desired_state(registry: InstanceTable) -> None:
    running = registry.add(cfg("a"), created_at=T0)
    stopped = registry.add(cfg("b"), created_at=T0, desired=DesiredState.STOPPED)
    assert (running.status, running.desired) == (InstanceStatus.STARTING, DesiredState.RUNNING)
    assert (stopped.status, stopped.desired) == (InstanceStatus.STOPPED, DesiredState.STOPPED)


def test_info_snapshot(registry: InstanceTable) -> None:
    record = registry.add(
        cfg("a", gpu_id=1, pooling="mean", prometheus_port=0, max_batch_tokens=512),
        created_at=T0,
    )
    record.mark_starting(pid=4242, now=T0 + timedelta(seconds=5))
    record.mark_running()
    record.record_health_check(False, T0 + timedelta(seconds=20))
    info = record.info(T0 + timedelta(seconds=95.9))
    assert info == InstanceInfo(
        name="a",
        model_id="org/a",
        port=8080,
        status=InstanceStatus.RUNNING,
        pid=4242,
        gpu_id=1,
        created_at=T0,
        uptime_secs=90,
        restarts=0,
        health_check_failures=1,
        last_health_check=T0 + timedelta(seconds=20),
        prometheus_port=8081,
        pooling="mean",
        max_batch_tokens=512,
        max_concurrent_requests=512,
        last_error=None,
    )
    encoded = msgspec.json.decode(msgspec.json.encode(info))
    assert list(encoded) == [
        "name", "model_id", "port", "status", "pid", "gpu_id", "created_at", "uptime_secs",
        "restarts", "health_check_failures", "last_health_check", "prometheus_port", "pooling",
        "max_batch_tokens", "max_concurrent_requests", "last_error", "next_restart_at",
        "start", "idle_timeout_secs", "pinned", "device", "memory_bytes",
        "served_model_name",
    ]  # fmt: skip
    assert encoded["status"] == "running"
    assert encoded["created_at"] == "2025-01-15T10:30:00Z"


def test_uptime_is_zero_without_a_process_and_never_negative(registry: InstanceTable) -> None:
    record = registry.add(cfg("a"), created_at=T0)
    assert record.info(T0).uptime_secs == 0
    record.mark_starting(pid=1, now=T0)
    assert record.info(T0 - timedelta(seconds=5)).uptime_secs == 0  # wall clock stepped back
    record.mark_stopped()
    assert record.info(T0 + timedelta(hours=1)).uptime_secs == 0


def test_record_transitions(registry: InstanceTable) -> None:
    record = registry.add(cfg("a"), created_at=T0)
    record.mark_starting(pid=7, now=T0)
    record.record_health_check(False, T0)
    record.record_health_check(False, T0)
    assert record.health_check_failures == 2
    record.record_health_check(True, T0)
    assert record.health_check_failures == 0
    record.mark_failed("crash loop: 5 restarts within 300 s")
    assert (record.status, record.pid, record.last_error) == (
        InstanceStatus.FAILED,
        None,
        "crash loop: 5 restarts within 300 s",
    )
    record.mark_starting(pid=8, now=T0)
    assert record.last_error is not None  # kept until the instance is running again
    record.mark_running()
    assert record.last_error is None
    record.mark_stopping()
    assert record.status is InstanceStatus.STOPPING
    record.mark_stopped()
    assert (record.status, record.pid) == (InstanceStatus.STOPPED, None)


def put(record: InstanceRecord, status: InstanceStatus) -> None:
    """Bring ``record`` to ``status`` the way the supervisor would."""
    S = InstanceStatus
    if status is S.FAILED:
        record.mark_failed(record.last_error or "failed")
    elif status is S.STOPPED:
        record.mark_stopped()
    else:
        record.mark_starting(pid=4242, now=T0)
        if status is S.RUNNING:
            record.mark_running()
        elif status is S.STOPPING:
            record.mark_stopping()
    assert record.status is status


def test_exit_and_restart_transitions(registry: InstanceTable) -> None:
    S = InstanceStatus
    record = registry.add(cfg("a"), created_at=T0)
    put(record, S.RUNNING)
    record.mark_exited("process killed by SIGKILL")
    # Gone: never "running" with a dead pid, whatever comes next.
    assert (record.status, record.pid, record.started_at) == (S.STARTING, None, None)
    assert record.last_error == "process killed by SIGKILL"
    at = T0 + timedelta(seconds=4)
    record.mark_restarting("crash loop", next_restart_at=at)
    assert (record.status, record.pid, record.restarts, record.next_restart_at) == (
        S.STARTING,
        None,
        1,
        at,
    )
    assert record.info(T0).next_restart_at == at
    record.mark_starting(pid=9, now=T0)
    assert (record.pid, record.next_restart_at, record.last_error) == (9, None, "crash loop")
    record.mark_stopping()
    record.mark_exited("process exited with code 0")
    assert (record.status, record.pid) == (S.STOPPING, None)  # the stop goes on
    put(record, S.RUNNING)
    record.mark_restart_requested()
    assert (record.status, record.restarts) == (S.STOPPING, 2)
    record.mark_failed("x")
    record.mark_start_requested()
    assert (record.status, record.last_error) == (S.STARTING, None)


def test_statistics(registry: InstanceTable) -> None:
    for name, status in [
        ("a", InstanceStatus.RUNNING),
        ("b", InstanceStatus.RUNNING),
        ("c", InstanceStatus.FAILED),
        ("d", InstanceStatus.STOPPED),
        ("e", InstanceStatus.STARTING),
        ("f", InstanceStatus.STOPPING),
    ]:
        put(registry.add(cfg(name), created_at=T0), status)
    assert registry.statistics() == InstanceTableStatistics(
        total=6, idle=0, starting=1, running=2, stopping=1, stopped=1, failed=1
    )


# --- start / stop requests ---------------------------------------------------


@pytest.mark.parametrize("status", [InstanceStatus.STARTING, InstanceStatus.RUNNING])
def test_start_when_already_running(registry: InstanceTable, status: InstanceStatus) -> None:
    put(registry.add(cfg("a"), created_at=T0), status)
    with pytest.raises(ConflictError) as info:
        registry.request_start("a")
    assert info.value.code is ErrorCode.ALREADY_RUNNING


@pytest.mark.parametrize("status", [InstanceStatus.STOPPED, InstanceStatus.FAILED])
def test_start_stopped_or_failed(registry: InstanceTable, status: InstanceStatus) -> None:
    record = registry.add(cfg("a"), created_at=T0, desired=DesiredState.STOPPED)
    record.mark_failed("old")
    put(record, status)
    assert registry.request_start("a") is record
    assert (record.status, record.desired) == (InstanceStatus.STARTING, DesiredState.RUNNING)
    assert record.last_error is None


def test_start_while_stopping_waits_for_the_stop(registry: InstanceTable) -> None:
    record = registry.add(cfg("a"), created_at=T0)
    record.desired = DesiredState.STOPPED
    put(record, InstanceStatus.STOPPING)
    registry.request_start("a")
    assert (record.status, record.desired) == (InstanceStatus.STOPPING, DesiredState.RUNNING)


@pytest.mark.parametrize("status", [InstanceStatus.STOPPED, InstanceStatus.STOPPING])
def test_stop_when_not_running(registry: InstanceTable, status: InstanceStatus) -> None:
    put(registry.add(cfg("a"), created_at=T0), status)
    with pytest.raises(ConflictError) as info:
        registry.request_stop("a")
    assert info.value.code is ErrorCode.NOT_RUNNING


@pytest.mark.parametrize("status", [InstanceStatus.STARTING, InstanceStatus.RUNNING])
def test_stop_running(registry: InstanceTable, status: InstanceStatus) -> None:
    record = registry.add(cfg("a"), created_at=T0)
    put(record, status)
    registry.request_stop("a")
    # The supervisor stops the process and marks it stopped.
    assert (record.status, record.desired) == (status, DesiredState.STOPPED)


def test_stop_failed_is_immediate(registry: InstanceTable) -> None:
    record = registry.add(cfg("a"), created_at=T0)
    record.mark_failed("boom")
    registry.request_stop("a")
    assert (record.status, record.desired) == (InstanceStatus.STOPPED, DesiredState.STOPPED)


def test_start_stop_unknown(registry: InstanceTable) -> None:
    for request in (registry.request_start, registry.request_stop):
        with pytest.raises(NotFoundError):
            request("ghost")
