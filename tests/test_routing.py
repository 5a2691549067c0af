"""Router.choose_model: an inference request's ``model`` as instance name, alias or model id."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tei_manager.config import InstanceConfig
from tei_manager.core.instances import InstanceStatus, InstanceTable
from tei_manager.core.ports import PortAllocator
from tei_manager.core.routing import Router
from tei_manager.errors import ErrorCode, TeiError


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
