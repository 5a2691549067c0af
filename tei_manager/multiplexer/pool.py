"""One HTTP/2 connection per instance, shared by every call the multiplexer relays to it.

A connection is made on first use and reused by all later calls (HTTP/2 multiplexes
them). It is forgotten as soon as it closes (the instance stopped, was restarted or
died: its process took the socket with it), when the instance it was made for is
gone or is another process now, and after ``idle_timeout`` without calls. The
next call then connects afresh. Concurrent first calls share one connection attempt.

A connection that fails (cannot be made, or closes without our asking) is reported
at once through ``on_lost`` (the router then passes the replica over), and a new
one through ``on_connected``.

Each instance process also has a pacer (:meth:`ConnectionPool.pacer`): at most its
``max_concurrent_requests`` messages in flight from the calls that pace themselves
(Arrow), so a large batch waits its turn instead of overloading the instance.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from tei_manager.core.instances import InstanceRecord, InstanceStatus
from tei_manager.errors import quote
from tei_manager.grpc.channel import Channel
from tei_manager.grpc.limits import DEFAULT_LIMITS, Limits
from tei_manager.grpc.rpc import GrpcError, StatusCode

__all__ = ["ConnectionPool"]

log = logging.getLogger(__name__)

Lookup = Callable[[str], InstanceRecord | None]
OnLost = Callable[[str, int | None], None]
"""Called with the instance's name and pid when a connection to it fails."""
OnConnected = Callable[[str], None]
BeforeConnect = Callable[[InstanceRecord], Awaitable[None]]
"""Awaited before connecting to an instance that is not running (an on-demand start);
raises ``GrpcError``."""


class Pacer:
    """At most ``limit`` messages in flight to one instance process, shared by its callers.

    Calls take turns (``turn``, a FIFO lock held while a call sends): first come,
    first served, so with four large calls the first is answered after a quarter
    of the work rather than all four at the end, and every place freed by a reply
    goes to the call whose turn it is, keeping the instance busy across calls.
    """

    __slots__ = ("_places", "limit", "pid", "port", "turn")

    def __init__(self, limit: int, port: int, pid: int | None) -> None:
        self.limit = limit
        self.port = port
        self.pid = pid
        self._places = trio.Semaphore(limit)
        self.turn = trio.Lock()

    async def acquire(self) -> None:
        """Wait for a place (one message in flight)."""
        await self._places.acquire()

    def release(self, count: int = 1) -> None:
        """Give back ``count`` places."""
        for _ in range(count):
            self._places.release()

    @property
    def in_flight(self) -> int:
        return self.limit - self._places.value


class _Entry:
    __slots__ = ("channel", "last_used", "pid", "port")

    def __init__(self, channel: Channel, port: int, pid: int | None) -> None:
        self.channel = channel
        self.port = port
        self.pid = pid
        self.last_used = trio.current_time()


class ConnectionPool:
    """Connections to instances; ``run`` is a trio service holding them (``nursery.start``)."""

    def __init__(
        self,
        host: str,
        lookup: Lookup,
        *,
        max_message_bytes: int,
        limits: Limits = DEFAULT_LIMITS,
        idle_timeout: float = 300.0,
        connect_timeout: float = 5.0,
        sweep_interval: float = 5.0,
        on_lost: OnLost | None = None,
        on_connected: OnConnected | None = None,
        before_connect: BeforeConnect | None = None,
    ) -> None:
        self._host = host
        self._lookup = lookup
        self._max_message_bytes = max_message_bytes
        self._limits = limits
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._sweep_interval = sweep_interval
        self._on_lost = on_lost
        self._on_connected = on_connected
        self._before_connect = before_connect
        self._entries: dict[str, _Entry] = {}
        self._pacers: dict[str, Pacer] = {}
        self._connecting: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def connected(self, name: str) -> bool:
        """True while a usable connection to ``name`` is pooled."""
        entry = self._entries.get(name)
        return entry is not None and entry.channel.usable

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the connections until cancelled; sweep stale ones meanwhile."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    await trio.sleep(self._sweep_interval)
                    self.sweep()
        finally:
            self._nursery = None
            for entry in self._entries.values():
                entry.channel.close()
            self._entries.clear()

    def pacer(self, record: InstanceRecord) -> Pacer:
        """The pacer of the instance process ``record`` describes (made on first use)."""
        limit = record.config.max_concurrent_requests
        found = self._pacers.get(record.name)
        if (
            found is None
            or found.pid != record.pid
            or found.port != record.port
            or found.limit != limit
        ):
            found = self._pacers[record.name] = Pacer(limit, record.port, record.pid)
        return found

    def ready(self, record: InstanceRecord) -> Channel | None:
        """The pooled connection to the instance ``record`` describes, if one is usable now."""
        entry = self._entries.get(record.name)
        # Not running: stopping (an on-demand unload), or not started yet.
        if entry is None or record.status is not InstanceStatus.RUNNING:
            return None
        if not _serves(entry, record):
            return None
        entry.last_used = trio.current_time()
        return entry.channel

    async def channel(self, record: InstanceRecord) -> Channel:
        """A connection to the instance ``record`` describes, made now if needed.

        Raises ``GrpcError(UNAVAILABLE)`` when the instance cannot be reached. An
        instance that is not running goes through ``before_connect`` first (the
        one place every relayed call passes before it needs the instance up).
        """
        if record.status is not InstanceStatus.RUNNING and self._before_connect is not None:
            await self._before_connect(record)
        name = record.name
        while True:
            entry = self._entries.get(name)
            if entry is not None:
                if _serves(entry, record):
                    entry.last_used = trio.current_time()
                    return entry.channel
                self._drop(name)
            pending = self._connecting.get(name)
            if pending is None:
                break
            await pending.wait()  # someone else is connecting: use theirs
        done = self._connecting[name] = trio.Event()
        try:
            return await self._connect(record)
        finally:
            del self._connecting[name]
            done.set()

    async def _connect(self, record: InstanceRecord) -> Channel:
        nursery = self._nursery
        if nursery is None:
            raise GrpcError(StatusCode.UNAVAILABLE, "the multiplexer is shutting down")
        channel = Channel(
            self._host,
            record.port,
            max_message_bytes=self._max_message_bytes,
            connect_timeout=self._connect_timeout,
            limits=self._limits,
        )
        entry = _Entry(channel, record.port, record.pid)
        try:
            await nursery.start(self._hold, record.name, entry)
        except GrpcError as error:
            if self._on_lost is not None:
                self._on_lost(record.name, record.pid)
            raise GrpcError(
                StatusCode.UNAVAILABLE, f"instance {quote(record.name)}: {error.message}"
            ) from None
        # A connection lost in between is noticed by the next caller (not usable).
        self._entries[record.name] = entry
        if self._on_connected is not None:
            self._on_connected(record.name)
        return channel

    async def _hold(self, name: str, entry: _Entry, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            await entry.channel.run(task_status=task_status)
        finally:
            # Still pooled: the connection closed without our asking (the process
            # stopped or died), which the router hears at once.
            if self._entries.get(name) is entry:
                del self._entries[name]
                if self._on_lost is not None:
                    self._on_lost(name, entry.pid)
            log.debug("connection to instance %s closed", name)

    def _drop(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            entry.channel.close()

    def sweep(self) -> None:
        """Close connections to instances gone, not running, replaced, or idle too long."""
        now = trio.current_time()
        for name, entry in list(self._entries.items()):
            record = self._lookup(name)
            stale = (
                record is None
                or record.status is not InstanceStatus.RUNNING
                or record.pid != entry.pid
                or record.port != entry.port
            )
            idle = entry.channel.active_calls == 0 and now - entry.last_used > self._idle_timeout
            if stale or idle:
                self._drop(name)
        for name, pacer in list(self._pacers.items()):
            record = self._lookup(name)
            if pacer.in_flight == 0 and (
                record is None or record.pid != pacer.pid or record.port != pacer.port
            ):
                del self._pacers[name]


def _serves(entry: _Entry, record: InstanceRecord) -> bool:
    """True when ``entry`` is a usable connection to the process ``record`` describes."""
    return entry.channel.usable and entry.port == record.port and entry.pid == record.pid
