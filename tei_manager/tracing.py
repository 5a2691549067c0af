"""OpenTelemetry tracing (``[otel]``): W3C trace context in, spans, context on to instances.

Tracing is on once :func:`install` ran, which ``serve`` does when ``[otel] endpoint`` is
set. Then:

- a REST request gets a SERVER span (:func:`wrap_asgi`), a multiplexer call too
  (:func:`start_server`, from the gRPC server), each the child of the caller's
  ``traceparent`` / ``tracestate`` when those are valid, else the root of a new trace;
- every call to an instance made inside one gets a CLIENT span (:func:`start_client`,
  from the gRPC channel), whose context replaces any ``traceparent`` / ``tracestate``
  in the call's metadata, so TEI (``--otlp-endpoint``) joins the trace under it;
- finished spans go in batches over OTLP/gRPC to the endpoint
  (:class:`~tei_manager.otlp.OtlpExporter`), sent by a trio task on our own gRPC
  channel: no grpcio, no thread.

Sampling is OTel's ``parentbased_traceidratio``: a caller's sampled flag is followed,
and ``sample_ratio`` of new traces are kept. An unsampled trace still gets span ids,
so the context passed on says "not sampled" and TEI does not sample it either.

Off, nothing is imported from ``opentelemetry`` and no hook does more than test
``tracing.tracer is None``; the REST app is not even wrapped. The multiplexer then
relays a client's ``traceparent`` to the instance untouched, as any other metadata.

Health checks and other calls made outside a request get no span: the gRPC
infrastructure services (``grpc.health.v1``, reflection) are not traced, and a call
to an instance is traced only while the request it is made for is being served (see
:class:`ServerSpan`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

from tei_manager.errors import ConfigError
from tei_manager.grpc.rpc import MethodSpec, StatusCode, status_code

if TYPE_CHECKING:
    from contextvars import Token

    from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.trace import Span, Tracer

    from tei_manager.config import OtelConfig
    from tei_manager.grpc.calls import CallContext
    from tei_manager.grpc.transport import Stream
    from tei_manager.otlp import OtlpExporter

__all__ = [
    "TRACE_KEYS",
    "ServerSpan",
    "end_server",
    "forget_request",
    "install",
    "start_client",
    "start_server",
    "tracer",
    "uninstall",
    "wrap_asgi",
]

#: The W3C trace-context keys, as HTTP headers and gRPC metadata.
TRACE_KEYS: Final = ("traceparent", "tracestate")

Metadata = tuple[tuple[str, str], ...]

#: The tracer every span comes from; None: tracing is off (the hooks' one test).
tracer: Tracer | None = None
_provider: Any = None  # the SDK's TracerProvider, shut down by uninstall()

#: gRPC server statuses that mark a SERVER span as an error (OTel's RPC conventions);
#: a CLIENT span is an error for any status but OK.
_SERVER_ERRORS: Final = frozenset(
    {
        StatusCode.UNKNOWN,
        StatusCode.DEADLINE_EXCEEDED,
        StatusCode.UNIMPLEMENTED,
        StatusCode.INTERNAL,
        StatusCode.UNAVAILABLE,
        StatusCode.DATA_LOSS,
    }
)

#: Services whose calls get no span: gRPC's own (health, reflection), and OTLP's
#: (a span for each export would be exported in turn).
_UNTRACED: Final = ("grpc.", "opentelemetry.")

_MISSING_PACKAGES: Final = (
    "otel.endpoint is set but the OpenTelemetry packages are not installed: "
    "install tei-manager's 'otel' extra (pip install 'tei-manager[otel]'), "
    "or leave otel.endpoint empty"
)


# -- set-up ----------------------------------------------------------------------------
class _Api:
    """The OpenTelemetry names the hooks use, imported once by :func:`install`."""

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.root = context.Context()  # the parent of a span that starts a trace
        self.set_span_in_context = trace.set_span_in_context
        self.server = trace.SpanKind.SERVER
        self.client = trace.SpanKind.CLIENT
        self.status = trace.Status
        self.error = trace.StatusCode.ERROR
        self.propagator = TraceContextTextMapPropagator()


_api: _Api | None = None


def install(config: OtelConfig, *, processor: SpanProcessor | None = None) -> OtlpExporter | None:
    """Turn tracing on for this process with ``config``'s resource and sampling.

    Finished spans go to ``processor`` (tests: the SDK's in-memory exporter), else
    to an :class:`OtlpExporter` for ``config.endpoint``, returned: its ``run`` task
    sends them. Raises :class:`ConfigError` when the OpenTelemetry packages are missing.
    """
    global tracer, _provider, _api
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        api = _Api()
    except ImportError:
        raise ConfigError(_MISSING_PACKAGES) from None
    exporter = None
    if processor is None:
        from tei_manager.otlp import OtlpExporter

        exporter = processor = OtlpExporter(config.endpoint)
    attributes = {"service.name": config.service_name}
    if config.deployment_environment:
        attributes["deployment.environment"] = config.deployment_environment
    # The resource is the config's alone: OTEL_* variables do not rename the service.
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        resource=Resource(attributes),
    )
    provider.add_span_processor(processor)
    uninstall()
    _provider, _api = provider, api
    tracer = provider.get_tracer("tei_manager")
    return exporter


def uninstall() -> None:
    """Turn tracing off (spans still in flight are ended but go nowhere)."""
    global tracer, _provider
    provider, _provider, tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def _on() -> tuple[Tracer, _Api]:
    assert tracer is not None and _api is not None, "tracing is off"
    return tracer, _api


# -- trace context -------------------------------------------------------------------
def _parent(api: _Api, traceparent: str | None, tracestate: str | None) -> Context:
    """The caller's context; the root (a new trace) when ``traceparent`` is absent or
    invalid (the W3C rules: version, lengths, lower-case hex, no all-zero ids)."""
    if traceparent is None:
        return api.root
    carrier = {"traceparent": traceparent}
    if tracestate is not None:
        carrier["tracestate"] = tracestate
    return api.propagator.extract(carrier, api.root)


def _carried(span: Span) -> Metadata:
    """``span``'s context as W3C ``traceparent`` (and ``tracestate``) values."""
    context = span.get_span_context()
    parent = (
        "traceparent",
        f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}",
    )
    if not context.trace_state:
        return (parent,)
    return parent, ("tracestate", context.trace_state.to_header())


def _carrying(span: Span, metadata: Metadata) -> Metadata:
    """``metadata`` with ``span``'s trace context in place of any other."""
    kept = tuple(item for item in metadata if item[0] not in TRACE_KEYS)
    return kept + _carried(span)


def _first(pairs: Iterable[tuple[str, str]]) -> tuple[str | None, str | None]:
    """The first ``traceparent`` and ``tracestate`` among ``pairs``."""
    parent = state = None
    for key, value in pairs:
        if key == "traceparent":
            parent = parent if parent is not None else value
        elif key == "tracestate":
            state = state if state is not None else value
    return parent, state


# -- REST ------------------------------------------------------------------------------
def wrap_asgi(app: ASGIFramework, route_of: Callable[[Scope], str]) -> ASGIFramework:
    """``app`` with a SERVER span around each HTTP request; ``app`` itself when off.

    The span is named ``METHOD route`` once answered (``route_of`` gives the matched
    route's template), and is the current span while the app runs, so the calls the
    request makes to an instance are its children.
    """
    if tracer is None:
        return app
    return _TracedApp(app, route_of)


class _TracedApp:
    def __init__(self, app: ASGIFramework, route_of: Callable[[Scope], str]) -> None:
        self._app = app
        self._route_of = route_of

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http" or tracer is None:
            await self._app(scope, receive, send)
            return
        traced, api = _on()
        method = scope["method"]
        parent = _parent(
            api,
            *_first(
                (key.decode("latin-1"), value.decode("latin-1"))
                for key, value in scope["headers"]
                if key in (b"traceparent", b"tracestate")
            ),
        )
        span = traced.start_span(
            method,
            context=parent,
            kind=api.server,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        )
        status = 0

        async def send_noting_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        request = ServerSpan(span)
        try:
            await self._app(scope, receive, send_noting_status)
        finally:
            request.close()
            route = self._route_of(scope)
            span.update_name(f"{method} {route}")
            span.set_attribute("http.route", route)
            if status:
                span.set_attribute("http.response.status_code", status)
            if status == 0 or status >= 500:
                span.set_status(api.status(api.error))
            span.end()


# -- the request being served ---------------------------------------------------------
class ServerSpan:
    """A request's SERVER span, current (:data:`_request`) in the task or callback that
    serves it and in the tasks those start, until it is closed.

    A task started during a request and outliving it (an instance's runner, a pooled
    connection) inherits it too: once closed it parents nothing more.
    """

    __slots__ = ("closed", "span", "token")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.closed = False
        self.token: Token[ServerSpan | None] | None = _request.set(self)

    def detach(self) -> None:
        """Stop being current here (tasks already started keep it until it closes)."""
        token, self.token = self.token, None
        if token is not None:
            _request.reset(token)

    def close(self) -> None:
        self.detach()
        self.closed = True


#: The request whose work this task does, if any: the parent of calls to instances.
_request: ContextVar[ServerSpan | None] = ContextVar("tei_manager_request", default=None)


def forget_request() -> None:
    """This task works for no request (a connection's reader: its callbacks serve many)."""
    if _request.get() is not None:
        _request.set(None)


def start_server(context: CallContext) -> ServerSpan | None:
    """A SERVER span for the call ``context`` describes, made current; None for the
    services in :data:`_UNTRACED`. The call's metadata then carries the span's context
    in place of the caller's, so whatever relays it passes the span on. Call only with
    tracing on.
    """
    traced, api = _on()
    method = context.method
    if method.service.startswith(_UNTRACED):
        return None
    span = traced.start_span(
        f"{method.service}/{method.name}",
        context=_parent(api, *_first(context.metadata)),
        kind=api.server,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": method.service,
            "rpc.method": method.name,
        },
    )
    context.metadata = _carrying(span, context.metadata)
    return ServerSpan(span)


def end_server(server: ServerSpan, code: StatusCode) -> None:
    """End a SERVER span with the call's final status."""
    server.close()
    span = server.span
    span.set_attribute("rpc.grpc.status_code", code.value)
    if code in _SERVER_ERRORS and _api is not None:
        span.set_status(_api.status(_api.error, code.name))
    span.end()


# -- gRPC client -----------------------------------------------------------------------
def start_client(
    method: MethodSpec[Any, Any], host: str, port: int, metadata: Metadata
) -> tuple[Callable[[Stream], None] | None, Metadata]:
    """A CLIENT span for a call to ``host:port`` made for the current request, if any.

    Returns the callback that ends it (with the stream's status, when the stream is
    released) and ``metadata`` carrying its trace context instead of any other;
    ``(None, metadata)`` outside a request. Call only with tracing on.
    """
    traced, api = _on()
    request = _request.get()
    if request is None or request.closed:
        return None, metadata
    span = traced.start_span(
        f"{method.service}/{method.name}",
        context=api.set_span_in_context(request.span, api.root),
        kind=api.client,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": method.service,
            "rpc.method": method.name,
            "server.address": host,
            "server.port": port,
        },
    )

    def end(stream: Stream) -> None:
        ended = stream.response_ended
        if ended is not None:
            code = status_code(ended.status)
        elif stream.error is not None:
            code = stream.error.code
        else:  # let go before its status came: the caller cancelled it
            code = StatusCode.CANCELLED
        span.set_attribute("rpc.grpc.status_code", code.value)
        if code is not StatusCode.OK:
            span.set_status(api.status(api.error, code.name))
        span.end()

    return end, _carrying(span, metadata)
