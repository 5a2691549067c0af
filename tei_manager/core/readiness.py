"""The readiness gate ``ready_requires_instances``: not ready until the seeds run.

Pool members behind a Kubernetes Service (DESIGN "Many nodes") must not take
traffic while the models they declare are still loading: a Service does not retry
elsewhere. With the gate on, readiness waits until every ``[[instances]]`` seed that
is *meant* to run is ``running`` at once, as TEI, vLLM and KServe report not-ready
until their model is loaded. The rules:

* a seed deleted through the API, or stopped (desired state ``stopped``, its
  ``auto_start = false`` included), is not waited for: the operator decided;
* an on-demand seed is not waited for: it is idle by design and loads on its first
  request;
* a seed that is ``starting`` (loading, or waiting out a restart backoff) or
  ``failed`` is waited for. A failed one keeps the member out of its Service, as a
  container that cannot start keeps its pod unready: a broken model or config then
  halts a rolling update at the first new pod while the old ones serve, instead of
  spreading. The message says how to release it (stop or delete that instance).
* once open, the gate stays open (a latch, like a startup probe that succeeded):
  a later crash is the restart policy's and the front doors' failover's business.
  Flipping readiness would pull every other model of the member out of the
  Service, and a request that crashes a model on every member at once would leave
  the Service with no endpoint at all.

Pure: the manager checks it after the state is restored, and polls it to tell the
gRPC health service (:mod:`tei_manager.manager.service`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from tei_manager.core.instances import DesiredState, InstanceStatus, InstanceTable

__all__ = ["MAX_NAMED", "ReadinessGate", "waiting_for"]

#: Instances a not-ready message names; the rest are counted. Names are at most 63
#: characters, so the message stays under about 600.
MAX_NAMED: Final = 5


def waiting_for(seeds: Iterable[str], instances: InstanceTable) -> list[tuple[str, InstanceStatus]]:
    """The seeds (by name) the gate waits for, with their status, in seed order."""
    waiting: list[tuple[str, InstanceStatus]] = []
    for name in seeds:
        record = instances.find(name)
        if record is None or record.desired is DesiredState.STOPPED or record.on_demand:
            continue
        if record.status is not InstanceStatus.RUNNING:
            waiting.append((name, record.status))
    return waiting


def _message(waiting: list[tuple[str, InstanceStatus]]) -> str:
    named = ", ".join(f"{name} ({status})" for name, status in waiting[:MAX_NAMED])
    more = len(waiting) - MAX_NAMED
    if more > 0:
        named += f" and {more} more"
    message = f"not ready: declared instances not running yet: {named}"
    if any(status is InstanceStatus.FAILED for _, status in waiting):
        message += "; a failed one holds readiness until it runs, is stopped or is deleted"
    return message


class ReadinessGate:
    """``ready_requires_instances`` over an instance table: see the module notes."""

    def __init__(self, seeds: Iterable[str], instances: InstanceTable, *, enabled: bool) -> None:
        self._seeds = tuple(seeds)
        self._instances = instances
        self._open = not enabled

    @property
    def is_open(self) -> bool:
        """The gate opened (or is off): it never closes again."""
        return self._open

    def check(self) -> str | None:
        """None once open (opening it now if every seed it waits for runs), else
        why not: the waited-for instances, named. Only meaningful once the state is
        restored: before, the table is empty and nothing would be waited for."""
        if self._open:
            return None
        waiting = waiting_for(self._seeds, self._instances)
        if waiting:
            return _message(waiting)
        self._open = True
        return None
