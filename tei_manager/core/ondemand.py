"""Models on demand, the decisions: activity, idle unloads, placement, admission, eviction.

Pure and synchronous (no trio, no I/O), so every rule is tested exhaustively on
plain numbers; :mod:`tei_manager.manager.ondemand` acts on what these return.

- :class:`Activity` counts requests in flight per instance and when each was last
  used; a request in flight (a unary call, a whole stream) holds its instance: it
  is neither idle nor evictable.
- :func:`idle_expired`: running on-demand instances unused for their idle timeout.
- :func:`admit`: where an instance of ``need`` bytes goes (the device with the most
  memory left that fits it) and, when nothing fits, which running on-demand
  instances to stop first, least recently used first, never one that is
  ``always``, pinned or busy. A refusal names the need and what is free.

Memory "left" on a device is our cap on it (``[devices]``) minus what our own
instances reserve there: on a host shared with other programs the cap is the
operator's statement of what we may use.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence

import msgspec

__all__ = [
    "CPU_DEVICE",
    "Activity",
    "Admission",
    "DeviceMemory",
    "Refusal",
    "Resident",
    "StartPolicy",
    "admit",
    "format_bytes",
    "gpu_device",
    "idle_expired",
    "next_idle_check",
]

CPU_DEVICE = "cpu"


def gpu_device(index: int) -> str:
    """The device name of GPU ``index`` (``gpu:0``), as metrics and ``/devices`` show it."""
    return f"gpu:{index}"


class StartPolicy(enum.StrEnum):
    """When an instance's process runs."""

    ALWAYS = "always"  # started with the manager (or on create), kept running
    ON_DEMAND = "on_demand"  # started by its first request, unloaded when idle


class Activity:
    """Requests in flight and last use per instance; ``clock`` is monotonic seconds."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._in_flight: dict[str, int] = {}
        self._last_used: dict[str, float] = {}

    def begin(self, name: str) -> None:
        """One more request in flight to ``name``; pair it with :meth:`end`."""
        self._in_flight[name] = self._in_flight.get(name, 0) + 1
        self._last_used[name] = self._clock()

    def end(self, name: str) -> None:
        left = self._in_flight[name] - 1
        if left:
            self._in_flight[name] = left
        else:
            del self._in_flight[name]
        # Idle time counts from the end of the last request, not its start.
        self._last_used[name] = self._clock()

    def touch(self, name: str) -> None:
        """``name`` counts as used now (it was just started)."""
        self._last_used[name] = self._clock()

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)

    def last_used(self, name: str) -> float | None:
        return self._last_used.get(name)

    def forget(self, name: str) -> None:
        """``name`` was deleted (its in-flight count, if any, stays until its calls end)."""
        self._last_used.pop(name, None)


class DeviceMemory(msgspec.Struct, frozen=True, kw_only=True):
    """One device as admission sees it: what it has and what we may use of it."""

    device: str  # "cpu" or "gpu:N"
    total_bytes: int
    free_bytes: int  # as the device reports it (other programs included)
    cap_bytes: int  # what we may use of it ([devices] config)


class Resident(msgspec.Struct, frozen=True, kw_only=True):
    """An instance that holds memory on a device now (starting, running or stopping)."""

    name: str
    device: str
    reserved_bytes: int
    evictable: bool  # on demand, not pinned, running
    in_flight: int
    last_used: float


class Admission(msgspec.Struct, frozen=True, kw_only=True):
    """Start on ``device``, once the instances in ``evict`` (in that order) stopped."""

    device: str
    evict: tuple[str, ...] = ()


class Refusal(msgspec.Struct, frozen=True, kw_only=True):
    """No device can take the instance, even by eviction."""

    need_bytes: int
    available: tuple[tuple[str, int], ...]  # (device, bytes left to us)
    busy: tuple[str, ...] = ()  # evictable by policy but with calls in flight

    def describe(self) -> str:
        left = ", ".join(f"{d} has {format_bytes(b)} left" for d, b in self.available)
        text = f"needs {format_bytes(self.need_bytes)} but {left or 'no device is usable'}"
        if self.busy:
            text += f"; instances with calls in flight are not evicted: {', '.join(self.busy)}"
        return text


def format_bytes(count: int) -> str:
    """``count`` in MiB or GiB with one decimal: short enough for an error message."""
    if abs(count) >= 1 << 30:
        return f"{count / (1 << 30):.1f} GiB"
    return f"{count / (1 << 20):.1f} MiB"


def _left(device: DeviceMemory, residents: Iterable[Resident]) -> int:
    used = sum(r.reserved_bytes for r in residents if r.device == device.device)
    return device.cap_bytes - used


def admit(
    need_bytes: int,
    devices: Sequence[DeviceMemory],
    residents: Sequence[Resident],
    *,
    may_evict: bool,
) -> Admission | Refusal:
    """Where an instance needing ``need_bytes`` goes, among ``devices`` (its candidates).

    Without eviction: the device with the most memory left that fits (ties: the
    first listed). Otherwise, with ``may_evict``: the device that fits after the
    fewest evictions, evicting idle evictable residents least recently used first.
    """
    fits = [(d, _left(d, residents)) for d in devices]
    best: tuple[DeviceMemory, int] | None = None
    for device, left in fits:
        if left >= need_bytes and (best is None or left > best[1]):
            best = (device, left)
    if best is not None:
        return Admission(device=best[0].device)
    busy: set[str] = set()
    plan: tuple[int, int, Admission] | None = None  # (evictions, -left after, admission)
    if may_evict:
        for device, left in fits:
            candidates = sorted(
                (r for r in residents if r.device == device.device and r.evictable),
                key=lambda r: (r.last_used, r.name),
            )
            chosen: list[str] = []
            for resident in candidates:
                if left >= need_bytes:
                    break
                if resident.in_flight:
                    busy.add(resident.name)
                    continue
                chosen.append(resident.name)
                left += resident.reserved_bytes
            if left >= need_bytes:
                key = (len(chosen), -left)
                if plan is None or key < plan[:2]:
                    plan = (*key, Admission(device=device.device, evict=tuple(chosen)))
    if plan is not None:
        return plan[2]
    return Refusal(
        need_bytes=need_bytes,
        available=tuple((d.device, max(0, left)) for d, left in fits),
        busy=tuple(sorted(busy)),
    )


def idle_expired(
    candidates: Iterable[tuple[str, float]], activity: Activity, now: float
) -> list[str]:
    """Of ``(name, idle_timeout_secs)`` (running on-demand instances; 0: never), those
    with nothing in flight and unused for at least their timeout."""
    expired = []
    for name, timeout in candidates:
        if timeout <= 0 or activity.in_flight(name):
            continue
        last = activity.last_used(name)
        if last is not None and now - last >= timeout:
            expired.append(name)
    return expired


def next_idle_check(
    candidates: Iterable[tuple[str, float]], activity: Activity, now: float
) -> float | None:
    """When the next of ``candidates`` could expire (None: none can), for a timer."""
    soonest: float | None = None
    for name, timeout in candidates:
        if timeout <= 0:
            continue
        last = activity.last_used(name)
        at = now + timeout if last is None or activity.in_flight(name) else last + timeout
        if soonest is None or at < soonest:
            soonest = at
    return soonest
