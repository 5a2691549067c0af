"""Which instance serves a multiplexed request (pure: no I/O).

Three ways to name it, per the wire contract's ``Target``:

- ``instance_name``: that instance;
- ``model_id``: one of the *running* instances serving the model, the one with the
  fewest requests in flight through the multiplexer; ties go round-robin, so an
  idle pool of replicas still shares the load;
- ``instance_index``: the N-th instance in creation order (0-based).

A target that names nothing is NOT_FOUND; one that names an instance that is not
running is UNAVAILABLE with a message saying what it is doing instead.

Models on demand: with a ``starter`` (the manager's
:meth:`~tei_manager.manager.ondemand.OnDemand.ensure_running`), an on-demand
instance that is idle, starting or being unloaded is routable too: ``choose``
returns it, and the front door awaits :meth:`Router.ensure_running` before it
connects (the multiplexer's connection pool does). By ``model_id``, a running
replica is preferred, then one already starting, then the first idle one. Requests
in flight and last use are kept in an :class:`~tei_manager.core.ondemand.Activity`
shared with the manager, which is what holds an instance against idle unloads
and eviction.

A replica whose connection just failed (:meth:`Router.suspect`) is skipped by
``model_id`` routing while another replica runs, until its process changes, a
connection to it succeeds again (:meth:`Router.cleared`) or ``SUSPECT_SECS``
pass: its process may have died, which the supervisor learns a moment later.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Final

from tei_manager.core.instances import DesiredState, InstanceRecord, InstanceStatus, InstanceTable
from tei_manager.core.ondemand import Activity
from tei_manager.errors import ErrorCode, NotFoundError, TeiError, ValidationError, quote

__all__ = ["Router", "Starter", "describe_target"]

Starter = Callable[[InstanceRecord, float], Awaitable[None]]
"""Returns once the instance runs (starting it on demand), within a trio deadline;
raises the TeiError the client should see."""

TargetChoice = tuple[str, str | int]
"""``("instance_name" | "model_id" | "instance_index", value)``."""

#: How long a replica whose connection failed is passed over. Long enough for the
#: supervisor to see a dead process and restart it (a new pid ends it sooner),
#: short enough that a live replica whose connection merely dropped is soon back.
SUSPECT_SECS: Final = 5.0


def describe_target(target: TargetChoice) -> str:
    kind, value = target
    shown = quote(value) if isinstance(value, str) else str(value)
    return f"{kind} {shown}"


class Router:
    """Chooses instances from the instance table and counts requests in flight per instance."""

    def __init__(
        self,
        instances: InstanceTable,
        *,
        clock: Callable[[], float] = time.monotonic,
        activity: Activity | None = None,
        starter: Starter | None = None,
    ) -> None:
        self._instances = instances
        self._clock = clock
        self._activity = activity or Activity(clock)
        self._starter = starter
        self._turn: dict[str, int] = {}
        # name -> (pid of the process whose connection failed, until when)
        self._suspects: dict[str, tuple[int | None, float]] = {}

    def choose(self, target: TargetChoice | None) -> InstanceRecord:
        """The instance for ``target``; raises the TeiError a client should see."""
        if target is None:
            raise ValidationError(
                "target", "required: set instance_name, model_id or instance_index"
            )
        kind, value = target
        if kind == "instance_index":
            assert isinstance(value, int)
            return self._routable(self._instances.at_index(value))
        assert isinstance(value, str)
        if not value:
            raise ValidationError(f"target.{kind}", "must not be empty")
        if kind == "instance_name":
            return self._routable(self._instances.get(value))
        return self._balance(value)

    async def ensure_running(self, record: InstanceRecord, deadline: float = math.inf) -> None:
        """Return once ``record`` runs: at once if it does, else through the starter
        (an on-demand start, shared with every other request waiting for it)."""
        if record.status is InstanceStatus.RUNNING:
            return
        if not self._startable(record):
            # Not ours to start (an always instance restarting, say): fail now, so a
            # call by model_id fails over rather than waiting.
            _running(record)
        assert self._starter is not None
        await self._starter(record, deadline)

    def _startable(self, record: InstanceRecord) -> bool:
        """True for an on-demand instance traffic may start (or is starting)."""
        if self._starter is None or not record.on_demand:
            return False
        status = record.status
        return status in (InstanceStatus.IDLE, InstanceStatus.STARTING) or (
            status is InstanceStatus.STOPPING and record.desired is DesiredState.RUNNING
        )

    def _routable(self, record: InstanceRecord) -> InstanceRecord:
        # Running first: the common case, and the cheapest test.
        if record.status is InstanceStatus.RUNNING or self._startable(record):
            return record
        return _running(record)

    def choose_model(self, model: str, *, exclude: frozenset[str] = frozenset()) -> InstanceRecord:
        """The instance for an inference front door's ``model`` string.

        In this order: an instance name; a ``served_model_name`` (balanced over its
        running replicas); a model id (likewise). ``exclude`` names replicas not to
        pick (one that just failed, for a retry elsewhere).
        """
        if not model:
            raise ValidationError("model", "must not be empty")
        record = self._instances.find(model)
        if record is not None and record.name not in exclude:
            return self._routable(record)
        aliased = self._instances.by_served_name(model)
        if aliased:
            return self._pick(model, aliased, exclude)
        return self._balance(model, exclude)

    def _balance(self, model_id: str, exclude: frozenset[str] = frozenset()) -> InstanceRecord:
        replicas = self._instances.by_model(model_id)
        if not replicas:
            raise NotFoundError(
                ErrorCode.MODEL_NOT_FOUND, f"no instance serves model {quote(model_id)}"
            )
        return self._pick(model_id, replicas, exclude)

    def _pick(
        self, key: str, replicas: list[InstanceRecord], exclude: frozenset[str]
    ) -> InstanceRecord:
        running = [
            r for r in replicas if r.status is InstanceStatus.RUNNING and r.name not in exclude
        ]
        if not running:
            if self._starter is not None:
                startable = [r for r in replicas if self._startable(r) and r.name not in exclude]
                if startable:  # one already on its way up first, else the first idle one
                    idle = InstanceStatus.IDLE
                    return next((r for r in startable if r.status is not idle), startable[0])
            states = ", ".join(f"{quote(r.name)} is {r.status.value}" for r in replicas)
            raise TeiError(
                ErrorCode.BACKEND_UNAVAILABLE,
                f"no running instance of model {quote(key)}: {states}",
            )
        return self._from_running(key, running)

    def alternative(self, model_id: str, failed: str) -> InstanceRecord | None:
        """Another running replica of ``model_id`` than ``failed``, for a retry; None if none."""
        running = [
            r
            for r in self._instances.by_model(model_id)
            if r.status is InstanceStatus.RUNNING and r.name != failed
        ]
        return self._from_running(model_id, running) if running else None

    def _from_running(self, key: str, running: list[InstanceRecord]) -> InstanceRecord:
        """The replica to use among ``running`` (not empty): suspects passed over while
        another runs (all suspect: better try one than refuse), then the least busy."""
        if len(running) > 1 and self._suspects:
            running = [r for r in running if not self._suspected(r)] or running
        return running[0] if len(running) == 1 else self._least_busy(key, running)

    def suspect(self, name: str, pid: int | None) -> None:
        """The connection to ``name``'s process ``pid`` failed: pass it over for a while."""
        now = self._clock()
        # Forget old ones here, so names of deleted instances do not pile up.
        for old in [n for n, (_, until) in self._suspects.items() if until <= now]:
            del self._suspects[old]
        self._suspects[name] = (pid, now + SUSPECT_SECS)

    def cleared(self, name: str) -> None:
        """A connection to ``name`` works again."""
        self._suspects.pop(name, None)

    def suspected(self, name: str) -> bool:
        """True while ``name`` is passed over (see :meth:`suspect`)."""
        record = self._instances.find(name)
        return record is not None and self._suspected(record)

    def _suspected(self, record: InstanceRecord) -> bool:
        found = self._suspects.get(record.name)
        if found is None:
            return False
        pid, until = found
        if pid != record.pid or self._clock() >= until:
            del self._suspects[record.name]  # another process now, or long enough
            return False
        return True

    def _least_busy(self, model_id: str, running: list[InstanceRecord]) -> InstanceRecord:
        turn = self._turn.get(model_id, 0)
        self._turn[model_id] = turn + 1
        count = len(running)
        best = running[turn % count]
        least = self._activity.in_flight(best.name)
        for step in range(1, count):
            candidate = running[(turn + step) % count]
            load = self._activity.in_flight(candidate.name)
            if load < least:
                best, least = candidate, load
        return best

    def begin(self, name: str) -> None:
        """One more request in flight to ``name``; pair it with :meth:`end`."""
        self._activity.begin(name)

    def end(self, name: str) -> None:
        self._activity.end(name)

    @contextmanager
    def track(self, name: str) -> Iterator[None]:
        """Count one request in flight to ``name`` for the duration of the block."""
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    def in_flight(self, name: str) -> int:
        """Requests to ``name`` in flight through the multiplexer now."""
        return self._activity.in_flight(name)


def _running(record: InstanceRecord) -> InstanceRecord:
    if record.status is InstanceStatus.STOPPED:
        raise TeiError(
            ErrorCode.BACKEND_UNAVAILABLE,
            f"instance {quote(record.name)} is stopped by an operator, not running",
        )
    if record.status is not InstanceStatus.RUNNING:
        raise TeiError(
            ErrorCode.BACKEND_UNAVAILABLE,
            f"instance {quote(record.name)} is {record.status.value}, not running",
        )
    return record
