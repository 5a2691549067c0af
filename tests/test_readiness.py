"""The readiness gate's rules (``ready_requires_instances``), on a real instance table."""

from __future__ import annotations

from datetime import UTC, datetime

from tei_manager.config import InstanceConfig
from tei_manager.core.instances import DesiredState, InstanceRecord, InstanceTable
from tei_manager.core.instances import InstanceStatus as S
from tei_manager.core.ondemand import StartPolicy
from tei_manager.core.ports import PortAllocator
from tei_manager.core.readiness import MAX_NAMED, ReadinessGate, waiting_for

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _table() -> InstanceTable:
    return InstanceTable(PortAllocator(20000, 20099, probe=lambda port: True))


def _add(table: InstanceTable, name: str, **fields: object) -> InstanceRecord:
    desired = fields.pop("desired", DesiredState.RUNNING)
    config = InstanceConfig(name=name, model_id="org/model", **fields)  # type: ignore[arg-type]
    return table.add(config, created_at=NOW, desired=desired)  # type: ignore[arg-type]


def test_off_it_is_open_whatever_the_instances() -> None:
    table = _table()
    _add(table, "a")  # starting
    gate = ReadinessGate(["a", "b"], table, enabled=False)
    assert gate.is_open and gate.check() is None


def test_it_waits_for_every_seed_meant_to_run_then_opens() -> None:
    table = _table()
    a, b = _add(table, "a"), _add(table, "b")
    _add(table, "not-a-seed")  # created through the API: never waited for
    gate = ReadinessGate(["a", "b"], table, enabled=True)
    assert (
        gate.check() == "not ready: declared instances not running yet: a (starting), b (starting)"
    )
    a.mark_running()
    assert gate.check() == "not ready: declared instances not running yet: b (starting)"
    assert not gate.is_open
    b.mark_running()
    assert gate.check() is None and gate.is_open


def test_what_the_operator_decided_is_not_waited_for() -> None:
    table = _table()
    _add(table, "stopped", desired=DesiredState.STOPPED)  # auto_start = false, or stopped
    lazy = _add(table, "lazy", start=StartPolicy.ON_DEMAND)  # idle by design
    assert lazy.status is S.IDLE
    stopped_later = _add(table, "b")
    table.request_stop("b")
    assert stopped_later.desired is DesiredState.STOPPED
    # "gone" was a seed deleted through the API: it is not in the table.
    gate = ReadinessGate(["stopped", "lazy", "b", "gone"], table, enabled=True)
    assert waiting_for(["stopped", "lazy", "b", "gone"], table) == []
    assert gate.check() is None


def test_an_on_demand_seed_loading_or_failed_is_still_not_waited_for() -> None:
    table = _table()
    lazy = _add(table, "lazy", start=StartPolicy.ON_DEMAND)
    lazy.mark_start_requested()
    assert waiting_for(["lazy"], table) == []
    lazy.mark_failed("startup timed out")
    assert ReadinessGate(["lazy"], table, enabled=True).check() is None


def test_a_failed_seed_holds_readiness_and_says_how_to_release_it() -> None:
    table = _table()
    _add(table, "a").mark_failed("crash loop: 5 restarts in 300 s")
    gate = ReadinessGate(["a"], table, enabled=True)
    reason = gate.check()
    assert reason is not None
    assert reason.startswith("not ready: declared instances not running yet: a (failed)")
    assert "is stopped or is deleted" in reason
    assert "crash loop" not in reason  # the error is in GET /instances/a, not here
    table.request_stop("a")
    assert gate.check() is None


def test_once_open_it_stays_open_when_an_instance_crashes() -> None:
    table = _table()
    a = _add(table, "a")
    a.mark_running()
    gate = ReadinessGate(["a"], table, enabled=True)
    assert gate.check() is None
    a.mark_exited("exit code 3")
    assert a.status is S.STARTING
    assert gate.check() is None and gate.is_open


def test_the_message_names_a_few_and_counts_the_rest() -> None:
    table = _table()
    names = [f"instance-{i:02d}-{'x' * 50}" for i in range(40)]
    for name in names:
        _add(table, name)
    reason = ReadinessGate(names, table, enabled=True).check()
    assert reason is not None
    assert all(name in reason for name in names[:MAX_NAMED])
    assert names[MAX_NAMED] not in reason
    assert reason.endswith(f" and {40 - MAX_NAMED} more")
    assert len(reason) < 600
