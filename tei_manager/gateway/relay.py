"""The gateway: a client's ``model`` to an instance, admission, and tei.v1 calls to it.

One :class:`Session` per front-door request::

    async with gateway.session("/v1/embeddings", model) as session:
        info = await session.info()
        replies = await session.stream(tei_grpc.Embed.EmbedStream, messages)

Opening a session resolves ``model`` (an instance name, a ``served_model_name``
alias, or a model id balanced over running replicas, see
:meth:`Router.choose_model`), waits for an admission slot on that instance
(:mod:`~tei_manager.gateway.admission`) and counts the request in flight for the
router's least-loaded choice. Calls go over the pooled HTTP/2 connection to the
instance, the multiplexer's :class:`ConnectionPool`: a list of inputs is one
stream call with every message in flight, so the instance batches them itself.

Every call to an instance goes through :meth:`Session._exchange`: the one place a
call is retried on another replica. As in the multiplexer
(:mod:`~tei_manager.multiplexer.failover`), only a unary call whose ``model`` was a
model id or an alias (never an instance name), and whose request never got an
answer (no connection, a closed connection, a refused stream, a connection lost
before any reply), goes once to another running replica, within the same
deadline; the session's admission slot and in-flight count move with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import trio
from prometheus_client import CollectorRegistry

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.config import ManagerConfig
from tei_manager.core.instances import InstanceRecord, InstanceStatus, InstanceTable
from tei_manager.core.routing import Router
from tei_manager.errors import TeiError, quote
from tei_manager.gateway.admission import Admission
from tei_manager.gateway.errors import InferenceError, Kind, from_instance, from_routing
from tei_manager.gateway.metrics import GatewayMetrics
from tei_manager.grpc.channel import Call, Channel
from tei_manager.grpc.rpc import GrpcError, MethodSpec
from tei_manager.multiplexer.failover import CLOSED, CONNECT, call_failure
from tei_manager.multiplexer.pool import ConnectionPool

if TYPE_CHECKING:  # (multiplexer.server builds on the gateway's modules)
    from tei_manager.multiplexer.server import SharedRouting

__all__ = ["MODEL_TYPES", "Gateway", "Session", "create_gateway", "status_hint"]

Spec = MethodSpec[Any, Any]

#: The longest ``model`` looked up: a model id may be an absolute path of up to this.
MAX_MODEL_CHARS: Final = 4096

#: Model types by tei.v1 enum value, in the words errors use.
MODEL_TYPES: Final = {
    tei_pb2.MODEL_TYPE_EMBEDDING: "embedding",
    tei_pb2.MODEL_TYPE_CLASSIFIER: "classifier",
    tei_pb2.MODEL_TYPE_RERANKER: "reranker",
}


def status_hint(error: InferenceError) -> int:
    """The HTTP status a door is likely to give ``error``, for metrics when it said none."""
    return _HINTS.get(error.kind, 500)


_HINTS: Final = {
    Kind.VALIDATION: 400,
    Kind.EMPTY: 400,
    Kind.TOO_LARGE: 413,
    Kind.NOT_FOUND: 404,
    Kind.UNSUPPORTED: 400,
    Kind.OVERLOADED: 429,
    Kind.UNAVAILABLE: 503,
    Kind.TIMEOUT: 504,
    Kind.BACKEND: 500,
}


class Gateway:
    """Routing, admission and relaying shared by the inference front doors."""

    def __init__(
        self,
        instances: InstanceTable,
        router: Router,
        pool: ConnectionPool,
        admission: Admission,
        metrics: GatewayMetrics,
        *,
        request_timeout: float,
    ) -> None:
        self.instances = instances
        self.router = router
        self.pool = pool
        self.admission = admission
        self.metrics = metrics
        self.request_timeout = request_timeout
        # tei.v1 Info per instance, for the process it was asked of (name -> the
        # instance's creation time, pid, info). Kept when the process ends, so an
        # instance resting on demand still has its model's facts.
        self._infos: dict[str, tuple[datetime, int | None, tei_pb2.InfoResponse]] = {}
        metrics.watch_admission(admission.statistics)

    def resolve(self, model: str) -> InstanceRecord:
        """The running instance for ``model``; InferenceError if none."""
        if len(model) > MAX_MODEL_CHARS:  # refused before any message quotes it
            raise InferenceError(
                Kind.VALIDATION,
                f"model: is {len(model)} characters: use at most {MAX_MODEL_CHARS}",
                param="model",
            )
        try:
            return self.router.choose_model(model)
        except TeiError as error:
            raise from_routing(error) from None

    def session(
        self,
        route: str,
        model: str,
        status_of: Callable[[InferenceError], int] = status_hint,
    ) -> Session:
        """A session for one request, to be entered (``async with``): entering
        resolves ``model``, waits for a slot on its instance and counts the request.

        Metrics are recorded when the block ends, under the status the front door
        answers: 200, ``status_of(error)`` for an InferenceError, 499 when cancelled,
        500 for anything else.
        """
        return Session(self, route, model, status_of)

    async def instance_info(
        self, record: InstanceRecord, *, fresh: bool = False
    ) -> tei_pb2.InfoResponse:
        """The instance's tei.v1 Info, asked once per process (``fresh``: asked now).

        Outside admission: it is cheap, and a health check must not queue.
        """
        if not fresh:
            known = self.known_info(record)
            if known is not None:
                return known
        channel = await self._channel(record)
        try:
            with trio.fail_after(self.request_timeout):
                info = await channel.unary_unary(tei_grpc.Info.Info, tei_pb2.InfoRequest())
        except trio.TooSlowError:
            raise InferenceError(
                Kind.TIMEOUT, f"instance {quote(record.name)} did not answer Info in time"
            ) from None
        except GrpcError as error:
            raise from_instance(error) from None
        self._infos[record.name] = (record.created_at, record.pid, info)
        return info

    def known_info(self, record: InstanceRecord) -> tei_pb2.InfoResponse | None:
        """The Info the process ``record`` describes gave, if it was asked; else None."""
        cached = self._infos.get(record.name)
        if cached is None or cached[0] != record.created_at or cached[1] != record.pid:
            return None
        return cached[2]

    @staticmethod
    def resting(record: InstanceRecord) -> bool:
        """True when ``record`` (as :meth:`resolve` returned it) runs no process: an
        on-demand instance idle, loading or being unloaded, which any call would
        start or wait for. Probes and metadata must not: a health check or an
        ``/info`` never loads a model."""
        return record.status is not InstanceStatus.RUNNING

    def resting_info(self, record: InstanceRecord) -> tei_pb2.InfoResponse:
        """The Info the last process of ``record`` gave, for an instance resting on
        demand; UNAVAILABLE, saying why, if it has not loaded since the manager
        started. Never asks the instance (that would load its model).

        Only the instance's own answer is used: most of TEI's Info (the model's
        type, dtype, input and batch limits) is known exactly only once the model
        is loaded, and a guess would mislead a client sizing its batches.
        """
        cached = self._infos.get(record.name)
        if cached is not None and cached[0] == record.created_at:
            return cached[2]
        raise InferenceError(
            Kind.UNAVAILABLE,
            f"instance {quote(record.name)} is {record.status.value} (started on demand) and "
            "has not loaded its model yet: its info is known once it has; "
            "an inference request loads it",
        )

    async def _channel(self, record: InstanceRecord) -> Channel:
        try:
            return await self.pool.channel(record)
        except GrpcError as error:
            raise from_instance(error) from None


class Session:
    """One front-door request on the instance it was routed to; an async context
    manager (see :meth:`Gateway.session`), written out rather than generated by
    ``asynccontextmanager``: it is entered once per inference request."""

    __slots__ = (
        "_gateway",
        "_held",
        "_model",
        "_route",
        "_started",
        "_status_of",
        "failover",
        "queued",
        "record",
        "status",
        "tokens",
    )

    def __init__(
        self,
        gateway: Gateway,
        route: str,
        model: str,
        status_of: Callable[[InferenceError], int] = status_hint,
    ) -> None:
        self._gateway = gateway
        self._route = route
        self._model = model
        self._status_of = status_of
        self._started = 0.0
        self.record: InstanceRecord | None = None
        #: The ``model`` a failed call may fail over within; None: not (again).
        self.failover: str | None = None
        self.queued: float | None = None
        self.status = 200
        self.tokens = 0
        self._held: str | None = None  # the instance whose slot this session holds

    async def __aenter__(self) -> Session:
        self._started = trio.current_time()
        model = self._model
        try:
            self.record = record = self._gateway.resolve(model)
            if record.name != model:  # an alias or a model id: it may fail over
                self.failover = model
            await self.admit(record)
        except BaseException as error:
            self._end(error)
            raise
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.release()
        finally:
            self._end(error)

    def _end(self, error: BaseException | None) -> None:
        """Settle the status ``error`` (None: the block ended well) makes, and record it."""
        if error is None:
            pass
        elif isinstance(error, InferenceError):
            self.status = self._status_of(error)
        elif self.status == 200:
            # Cancelled: the client left, or shutdown; anything else is a bug.
            self.status = 499 if isinstance(error, trio.Cancelled) else 500
        self.observe(trio.current_time() - self._started)

    async def admit(self, record: InstanceRecord) -> None:
        """Wait for a slot on ``record``, count the request in flight to it, and have
        it running: the one place before any connection to it (the session's
        instance, or the replica a failover moves to). An idle on-demand instance
        is started here (:meth:`Router.ensure_running`, one start shared by every
        request waiting), within its startup timeout and the request's deadline
        (``request_timeout`` times the call once it runs, as on the gRPC door);
        counted in flight meanwhile, it is not unloaded or evicted under the request."""
        gateway = self._gateway
        waited = await gateway.admission.enter(record.name, record.config.max_concurrent_requests)
        self.queued = waited + (self.queued or 0.0)
        self.record = record
        self._held = record.name
        gateway.router.begin(record.name)
        if record.status is InstanceStatus.RUNNING:
            return
        try:
            await gateway.router.ensure_running(record, trio.current_effective_deadline())
        except TeiError as error:
            self.release()
            raise from_routing(error) from None
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give back the slot and the in-flight count, if held."""
        name, self._held = self._held, None
        if name is not None:
            self._gateway.router.end(name)
            self._gateway.admission.leave(name)

    @property
    def instance(self) -> InstanceRecord:
        assert self.record is not None  # set before the session is handed out
        return self.record

    def observe(self, seconds: float) -> None:
        model = "" if self.record is None else self.record.config.model_id
        self._gateway.metrics.route(self._route, model).finished(
            self.status, seconds, self.tokens, self.queued
        )

    async def info(self) -> tei_pb2.InfoResponse:
        return await self._gateway.instance_info(self.instance)

    async def require(self, model_type: int, what: str) -> tei_pb2.InfoResponse:
        """The instance's Info; UNSUPPORTED unless its model is of ``model_type``."""
        info = self._gateway.known_info(self.instance)  # asked once per process
        if info is None:
            info = await self.info()
        if info.model_type != model_type:
            have = MODEL_TYPES.get(info.model_type, "unknown")
            raise InferenceError(
                Kind.UNSUPPORTED,
                f"model {quote(self.instance.config.model_id)} is a {have} model: it cannot {what}",
                param="model",
            )
        return info

    async def unary(self, spec: Spec, request: bytes) -> bytes:
        """One unary call with a serialized request; the serialized reply."""
        replies = await self._exchange(spec, (request,), unary=True)
        return replies[0]

    async def stream(self, spec: Spec, requests: Sequence[bytes]) -> list[bytes]:
        """One stream call with every request in flight; the replies, in order."""
        if not requests:
            return []
        return await self._exchange(spec, requests, unary=False)

    async def _exchange(self, spec: Spec, requests: Sequence[bytes], *, unary: bool) -> list[bytes]:
        """Every call to an instance comes here: the place for a retry elsewhere."""
        timeout = self._gateway.request_timeout
        with trio.move_on_after(timeout) as timer:
            while True:
                try:
                    replies = await self._attempt(spec, requests, timer)
                    break
                except _Unanswered as failed:
                    if not unary or not await self._fail_over(failed.reason):
                        raise failed.error from None
        name = self.instance.name
        if timer.cancelled_caught:
            raise InferenceError(
                Kind.TIMEOUT,
                f"instance {quote(name)} did not answer within {timeout:g} s "
                "(grpc_request_timeout_secs)",
            )
        if len(replies) != (1 if unary else len(requests)):
            raise InferenceError(
                Kind.BACKEND,
                f"instance {quote(name)} answered {len(replies)} of {len(requests)} requests",
            )
        return replies

    async def _attempt(
        self, spec: Spec, requests: Sequence[bytes], timer: trio.CancelScope
    ) -> list[bytes]:
        """One try on the session's instance; :class:`_Unanswered` if it never answered."""
        record = self.instance
        pool = self._gateway.pool
        try:
            # The pooled connection as it is (the common case, no await), else made now.
            channel = pool.ready(record) or await pool.channel(record)
            await channel.wait_for_stream_slot()
        except GrpcError as error:
            raise _Unanswered(CONNECT, from_instance(error)) from None
        try:
            # grpc-timeout: the timer is the call's deadline (no scope around it sets one).
            call = channel.start_call(spec, deadline=timer.deadline)
        except GrpcError as error:  # closed or going away since it was pooled
            raise _Unanswered(CLOSED, _failure(error, None, record.name)) from None
        try:
            if len(requests) > 1:
                return await _feed(call, requests, timer, self._gateway.request_timeout)
            await call.send_raw(requests[0])
            await call.done_writing()
            replies = []
            while (reply := await call.receive_raw()) is not None:
                replies.append(reply)
            return replies
        except GrpcError as error:
            failure = _failure(error, call, record.name)
            reason = call_failure(error, replied=call.answered, connection_usable=channel.usable)
            if reason is None:
                raise failure from None
            raise _Unanswered(reason, failure) from None
        finally:
            call.close()

    async def _fail_over(self, reason: str) -> bool:
        """Move the session to another running replica of its ``model``, once."""
        model, self.failover = self.failover, None
        if model is None:
            return False
        gateway = self._gateway
        failed = self.instance
        try:
            moved = gateway.router.choose_model(model, exclude=frozenset({failed.name}))
        except TeiError:
            return False  # no other replica runs: the first failure stands
        self.release()
        gateway.metrics.retries.labels(self._route, reason).inc()
        await self.admit(moved)
        return True


class _Unanswered(Exception):
    """A call whose request got no answer from its instance (see failover.py's reasons)."""

    def __init__(self, reason: str, error: InferenceError) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


async def _feed(
    call: Call[Any, Any], requests: Sequence[bytes], timer: trio.CancelScope, idle: float
) -> list[bytes]:
    """Send ``requests`` (more than one, all in flight) while reading the replies;
    each reply pushes the deadline on, so a long stream fails only when it stalls."""
    replies: list[bytes] = []
    failures: list[GrpcError] = []
    async with trio.open_nursery() as nursery:

        async def send_all() -> None:
            try:
                for request in requests:
                    await call.send_raw(request)
                await call.done_writing()
            except GrpcError as error:  # the reader sees the call's end too
                failures.append(error)

        nursery.start_soon(send_all)
        try:
            while (reply := await call.receive_raw()) is not None:
                timer.deadline = trio.current_time() + idle
                replies.append(reply)
        except GrpcError as error:
            failures.insert(0, error)  # the status the instance sent beats a send failure
        nursery.cancel_scope.cancel()
    if failures:
        raise failures[0]
    return replies


def _failure(error: GrpcError, call: Call[Any, Any] | None, name: str) -> InferenceError:
    """The instance's status as it said it; a relay failure naming the instance."""
    if (call is not None and call.answered) or error.message.startswith("instance "):
        return from_instance(error)
    return from_instance(GrpcError(error.code, f"instance {quote(name)}: {error.message}"))


def create_gateway(
    config: ManagerConfig,
    instances: InstanceTable,
    registry: CollectorRegistry,
    shared: SharedRouting,
) -> Gateway:
    """The gateway for ``instances``, its metrics on ``registry``, over the router,
    pool and admission every front door shares (``shared_routing``)."""
    return Gateway(
        instances,
        shared.router,
        shared.pool,
        shared.admission,
        GatewayMetrics(registry),
        request_timeout=config.grpc_request_timeout_secs,
    )
