"""The router's choice of replica (pure): balance, passing over a failed replica, and
an inference request's ``model`` as instance name, alias or model id."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tei_manager.config import InstanceConfig
from tei_manager.core.instances import InstanceRecord, InstanceStatus, InstanceTable
from tei_manager.core.ondemand import StartPolicy
from tei_manager.core.ports import PortAllocator
from tei_manager.core.routing import SUSPECT_SECS, Router
from tei_manager.errors import ErrorCode, TeiError

MODEL = "m/x"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _table(*names: str) -> InstanceTable:
    table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    for pid, name in enumerate(names, start=1):
        record = table.add(InstanceConfig(name=name, model_id=MODEL), created_at=datetime.now(UTC))
        record.status = InstanceStatus.RUNNING
        record.pid = pid
    return table


def _picks(router: Router, count: int) -> list[str]:
    return [router.choose(("model_id", MODEL)).name for _ in range(count)]


def test_idle_replicas_alternate() -> None:
    assert _picks(Router(_table("a", "b", "c")), 6) == ["a", "b", "c", "a", "b", "c"]


def test_a_suspect_replica_is_passed_over_until_its_time_is_up() -> None:
    clock = Clock()
    router = Router(_table("a", "b", "c"), clock=clock)
    router.suspect("b", 2)
    assert router.suspected("b")
    assert "b" not in _picks(router, 6)
    clock.now += SUSPECT_SECS
    assert not router.suspected("b")
    assert "b" in _picks(router, 3)


def test_a_new_process_or_a_working_connection_clears_the_suspicion() -> None:
    table = _table("a", "b")
    router = Router(table, clock=Clock())
    router.suspect("a", 1)
    table.get("a").pid = 7  # restarted
    assert "a" in _picks(router, 2)
    router.suspect("b", 2)
    router.cleared("b")
    assert "b" in _picks(router, 2)


def test_when_every_replica_is_suspect_one_is_still_tried() -> None:
    router = Router(_table("a", "b"), clock=Clock())
    router.suspect("a", 1)
    router.suspect("b", 2)
    assert set(_picks(router, 4)) == {"a", "b"}


def test_suspicion_does_not_affect_routing_by_name() -> None:
    router = Router(_table("a", "b"), clock=Clock())
    router.suspect("a", 1)
    assert router.choose(("instance_name", "a")).name == "a"


def test_alternative_is_another_running_replica_preferring_trusted_ones() -> None:
    table = _table("a", "b", "c")
    router = Router(table, clock=Clock())
    router.suspect("b", 2)
    for _ in range(3):
        found = router.alternative(MODEL, "a")
        assert found is not None and found.name == "c"
    table.get("c").status = InstanceStatus.STOPPED
    found = router.alternative(MODEL, "a")
    assert found is not None and found.name == "b"  # suspect, but the only one left
    table.get("b").status = InstanceStatus.STOPPED
    assert router.alternative(MODEL, "a") is None


def test_alternative_goes_to_the_least_busy() -> None:
    router = Router(_table("a", "b", "c"), clock=Clock())
    router.begin("b")
    found = router.alternative(MODEL, "a")
    assert found is not None and found.name == "c"


def test_no_running_replica_says_what_each_is_doing() -> None:
    table = _table("a")
    table.get("a").status = InstanceStatus.STOPPED
    with pytest.raises(TeiError, match='"a" is stopped'):
        Router(table).choose(("model_id", MODEL))


def _on_demand(table: InstanceTable, name: str) -> None:
    table.add(
        InstanceConfig(name=name, model_id=MODEL, start=StartPolicy.ON_DEMAND),
        created_at=datetime.now(UTC),
    )


async def test_on_demand_instances_are_routable_while_idle_only_with_a_starter() -> None:
    table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    _on_demand(table, "x")
    _on_demand(table, "y")
    started: list[str] = []

    async def starter(record: InstanceRecord, deadline: float) -> None:
        started.append(record.name)

    with pytest.raises(TeiError, match='"x" is idle, not running'):
        Router(table).choose(("instance_name", "x"))
    router = Router(table, starter=starter)
    assert router.choose(("instance_name", "y")).name == "y"
    assert router.choose(("instance_index", 0)).name == "x"
    # By model: the first idle replica; one starting is preferred (its start is shared);
    # a running one before both.
    assert router.choose(("model_id", MODEL)).name == "x"
    table.get("y").mark_start_requested()
    assert router.choose(("model_id", MODEL)).name == "y"
    table.get("x").mark_starting(9, datetime.now(UTC))
    table.get("x").mark_running()
    assert router.choose(("model_id", MODEL)).name == "x"
    await router.ensure_running(table.get("x"))  # running: the starter is not asked
    await router.ensure_running(table.get("y"))
    assert started == ["y"]


async def test_an_always_instance_that_is_not_running_fails_at_once() -> None:
    table = _table("a")
    asked: list[str] = []

    async def starter(record: InstanceRecord, deadline: float) -> None:
        asked.append(record.name)

    router = Router(table, starter=starter)
    table.get("a").mark_exited("process exited with code 1")  # restarting
    with pytest.raises(TeiError, match='"a" is starting, not running'):
        await router.ensure_running(table.get("a"))
    table.get("a").mark_stopped()
    with pytest.raises(TeiError, match="stopped by an operator"):
        router.choose(("instance_name", "a"))
    assert asked == []


# -- choose_model: an inference request's ``model`` as instance name, alias or model id


@pytest.fixture
def table() -> InstanceTable:
    table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    now = datetime.now(UTC)
    for name, model, alias, status in (
        ("a1", "org/a", "fast", InstanceStatus.RUNNING),
        ("a2", "org/a", "fast", InstanceStatus.RUNNING),
        ("b", "org/b", None, InstanceStatus.RUNNING),
        ("c", "org/c", "sleepy", InstanceStatus.STOPPED),
    ):
        record = table.add(
            InstanceConfig(name=name, model_id=model, served_model_name=alias), created_at=now
        )
        record.status = status
    return table


def test_instance_name_wins(table: InstanceTable) -> None:
    assert Router(table).choose_model("b").name == "b"


def test_alias_and_model_id_balance_over_running_replicas(table: InstanceTable) -> None:
    router = Router(table)
    assert {router.choose_model("fast").name for _ in range(4)} == {"a1", "a2"}
    assert {router.choose_model("org/a").name for _ in range(4)} == {"a1", "a2"}
    router.begin("a1")
    assert [router.choose_model("fast").name for _ in range(3)] == ["a2"] * 3


def test_exclude_skips_a_replica(table: InstanceTable) -> None:
    router = Router(table)
    assert {router.choose_model("org/a", exclude=frozenset({"a1"})).name for _ in range(3)} == {
        "a2"
    }
    with pytest.raises(TeiError) as none_left:
        router.choose_model("fast", exclude=frozenset({"a1", "a2"}))
    assert none_left.value.code is ErrorCode.BACKEND_UNAVAILABLE


def test_unknown_empty_and_not_running(table: InstanceTable) -> None:
    router = Router(table)
    with pytest.raises(TeiError) as unknown:
        router.choose_model("nope")
    assert unknown.value.code is ErrorCode.MODEL_NOT_FOUND
    with pytest.raises(TeiError) as empty:
        router.choose_model("")
    assert empty.value.code is ErrorCode.VALIDATION_ERROR
    for name in ("c", "sleepy", "org/c"):
        with pytest.raises(TeiError) as stopped:
            router.choose_model(name)
        assert stopped.value.code is ErrorCode.BACKEND_UNAVAILABLE
        assert "stopped" in stopped.value.message
