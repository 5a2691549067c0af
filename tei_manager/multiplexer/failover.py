"""Failover: a unary call routed by ``model_id`` that never got an answer goes to another replica.

Only a call whose request cannot have been answered is sent again, once, to
another running replica of its model, within its own deadline:

- ``connect``: no connection to the instance could be made;
- ``closed``: the connection was already closed or going away when the call
  started, or had no stream left for it;
- ``refused``: the instance refused the stream (REFUSED_STREAM);
- ``lost``: the connection died, or a GOAWAY left the call out, before any reply
  or status came back.

Every tei.v1 unary call is idempotent (an embedding or a tokenization computed
twice is the same), so ``lost`` is safe to retry, as grpc-go's transparent retry
does for streams that never reached the server. A call that got a status back,
whatever it is, a stream, and a call routed by instance name or index are never
retried: the client named what it wanted. Each retry is counted in
``tei_manager_grpc_retries_total{method,reason}``.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from tei_manager.core.instances import InstanceRecord
from tei_manager.core.routing import Router
from tei_manager.grpc.rpc import GrpcError, StatusCode
from tei_manager.grpc.transport import Stream
from tei_manager.multiplexer.metrics import MultiplexerMetrics
from tei_manager.multiplexer.wire import Target

__all__ = ["CLOSED", "CONNECT", "LOST", "REFUSED", "Failover", "Outcome", "retry_model"]

CONNECT: Final = "connect"
CLOSED: Final = "closed"
REFUSED: Final = "refused"
LOST: Final = "lost"


class Outcome(NamedTuple):
    """How one attempt at a unary call ended; ``retry``: why it may go elsewhere, or None."""

    reply: bytes | None
    code: StatusCode
    message: str
    retry: str | None = None


def retry_model(target: Target | None) -> str | None:
    """The model a call may fail over within: its ``model_id`` target, else None."""
    if target is not None and target[0] == "model_id" and isinstance(target[1], str):
        return target[1]
    return None


def stream_failure(stream: Stream) -> str | None:
    """Why a relayed stream that failed before any reply may be retried; None: it may not.

    Only UNAVAILABLE is a transport failure the instance did not answer; a reset
    with another code (the instance cancelled, ran out of something) is its answer.
    """
    error = stream.error
    if error is None or error.code is not StatusCode.UNAVAILABLE:
        return None
    # RST_STREAM(REFUSED_STREAM): never processed. Anything else unanswered (the
    # connection closed, or a GOAWAY left the stream out) counts as lost.
    return REFUSED if stream.reset else LOST


def call_failure(error: GrpcError, *, replied: bool, connection_usable: bool) -> str | None:
    """Like :func:`stream_failure`, for a call driven by a task (``Channel.start_call``)."""
    if replied or error.code is not StatusCode.UNAVAILABLE:
        return None
    return REFUSED if connection_usable else LOST


class Failover:
    """Picks the replica a failed call goes to next, and counts it."""

    def __init__(self, router: Router, metrics: MultiplexerMetrics) -> None:
        self._router = router
        self._metrics = metrics

    def reroute(
        self, model_id: str, failed: InstanceRecord, method: str, reason: str
    ) -> InstanceRecord | None:
        """Another running replica of ``model_id`` for a call that failed on ``failed``.

        None when no other replica runs (the call then fails with the first
        attempt's error). Later routing passes ``failed`` over when its connection
        failed (the pool tells the router), not when it merely refused a stream.
        """
        record = self._router.alternative(model_id, failed.name)
        if record is not None:
            self._metrics.retried(method, reason)
        return record
