"""The on-demand policies as pure code: idle timers, placement, admission, eviction order."""

from __future__ import annotations

import trio

from tei_manager.core.ondemand import (
    Activity,
    Admission,
    DeviceMemory,
    Refusal,
    Resident,
    admit,
    idle_expired,
    next_idle_check,
)

GIB = 1 << 30


def _gpu(index: int, cap_gib: float) -> DeviceMemory:
    cap = int(cap_gib * GIB)
    return DeviceMemory(device=f"gpu:{index}", total_bytes=cap, free_bytes=cap, cap_bytes=cap)


def _resident(
    name: str, device: str, gib: float, *, used: float, evictable: bool = True, in_flight: int = 0
) -> Resident:
    return Resident(
        name=name,
        device=device,
        reserved_bytes=int(gib * GIB),
        evictable=evictable,
        in_flight=in_flight,
        last_used=used,
    )


async def test_idle_timer_counts_from_the_last_request_and_streams_hold_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    activity = Activity(trio.current_time)
    start = trio.current_time()
    activity.touch("a")
    activity.touch("b")
    activity.begin("b")  # a stream that stays open
    await trio.sleep(30)
    assert idle_expired([("a", 60), ("b", 60)], activity, trio.current_time()) == []
    assert next_idle_check([("a", 60), ("b", 60)], activity, trio.current_time()) == start + 60
    await trio.sleep(30)
    assert idle_expired([("a", 60), ("b", 60)], activity, trio.current_time()) == ["a"]
    await trio.sleep(100)
    # Still held by its stream, however long it lasts.
    assert idle_expired([("b", 60)], activity, trio.current_time()) == []
    activity.end("b")
    ended = trio.current_time()
    await trio.sleep(59)
    assert idle_expired([("b", 60)], activity, trio.current_time()) == []
    assert next_idle_check([("b", 60)], activity, trio.current_time()) == ended + 60
    await trio.sleep(1)
    assert idle_expired([("b", 60)], activity, trio.current_time()) == ["b"]


async def test_a_zero_timeout_never_expires(autojump_clock: trio.abc.Clock) -> None:
    activity = Activity(trio.current_time)
    activity.touch("a")
    await trio.sleep(10**6)
    assert idle_expired([("a", 0)], activity, trio.current_time()) == []
    assert next_idle_check([("a", 0)], activity, trio.current_time()) is None


def test_placement_takes_the_device_with_the_most_memory_left_that_fits() -> None:
    devices = [_gpu(0, 8), _gpu(1, 16), _gpu(2, 12)]
    residents = [_resident("x", "gpu:1", 10, used=0)]  # gpu:1 has 6 left, gpu:2 12
    assert admit(4 * GIB, devices, residents, may_evict=False) == Admission(device="gpu:2")
    assert admit(9 * GIB, devices, residents, may_evict=False) == Admission(device="gpu:2")
    # Ties go to the first listed.
    assert admit(GIB, [_gpu(0, 8), _gpu(1, 8)], [], may_evict=False) == Admission(device="gpu:0")


def test_a_start_that_fits_nowhere_is_refused_naming_the_need_and_what_is_left() -> None:
    refused = admit(20 * GIB, [_gpu(0, 8), _gpu(1, 16)], [], may_evict=True)
    assert isinstance(refused, Refusal)
    assert refused.available == (("gpu:0", 8 * GIB), ("gpu:1", 16 * GIB))
    assert refused.describe() == (
        "needs 20.0 GiB but gpu:0 has 8.0 GiB left, gpu:1 has 16.0 GiB left"
    )


def test_eviction_stops_the_least_recently_used_first_and_only_as_many_as_needed() -> None:
    cpu = DeviceMemory(device="cpu", total_bytes=10 * GIB, free_bytes=10 * GIB, cap_bytes=3 * GIB)
    residents = [
        _resident("b", "cpu", 1, used=20),
        _resident("a", "cpu", 1, used=10),
        _resident("c", "cpu", 1, used=30),
    ]
    assert admit(GIB, [cpu], residents, may_evict=True) == Admission(device="cpu", evict=("a",))
    assert admit(2 * GIB, [cpu], residents, may_evict=True) == Admission(
        device="cpu", evict=("a", "b")
    )
    # An operator's or an always-on start may not evict.
    assert isinstance(admit(GIB, [cpu], residents, may_evict=False), Refusal)


def test_always_pinned_and_busy_instances_are_never_evicted() -> None:
    cpu = DeviceMemory(device="cpu", total_bytes=4 * GIB, free_bytes=4 * GIB, cap_bytes=3 * GIB)
    residents = [
        _resident("always", "cpu", 1, used=0, evictable=False),
        _resident("busy", "cpu", 1, used=1, in_flight=1),
        _resident("old", "cpu", 1, used=2),
    ]
    assert admit(GIB, [cpu], residents, may_evict=True) == Admission(device="cpu", evict=("old",))
    refused = admit(2 * GIB, [cpu], residents, may_evict=True)
    assert isinstance(refused, Refusal)
    assert refused.busy == ("busy",)
    assert "calls in flight are not evicted: busy" in refused.describe()


def test_eviction_picks_the_device_needing_the_fewest_stops() -> None:
    devices = [_gpu(0, 4), _gpu(1, 4)]
    residents = [
        _resident("a", "gpu:0", 1, used=0),
        _resident("b", "gpu:0", 2, used=1),
        _resident("c", "gpu:1", 3, used=5),
    ]
    # gpu:0 frees 3 GiB after two stops, gpu:1 after one.
    assert admit(4 * GIB, devices, residents, may_evict=True) == Admission(
        device="gpu:1", evict=("c",)
    )
