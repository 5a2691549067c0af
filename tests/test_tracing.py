"""OpenTelemetry tracing: ``[otel]``, W3C trace context in and on to the instance, OTLP out.

The REST app and the multiplexer run in-process over an in-process tei.v1 backend
that records the metadata it gets; spans go to the SDK's in-memory exporter. The
backend is served by our gRPC server in the same process, so it is traced too: its
SERVER span stands for TEI's, which joins the trace from the ``traceparent`` it gets.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import msgspec
import pytest
import trio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

from tei_manager import tracing
from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tei_manager.api import serve_api
from tei_manager.api.app import create_app, route_of
from tei_manager.config import ConfigError, InstanceConfig, ManagerConfig, OtelConfig, parse_config
from tei_manager.core.instances import InstanceTable
from tei_manager.core.ports import PortAllocator
from tei_manager.gateway.relay import create_gateway
from tei_manager.grpc.calls import CallContext
from tei_manager.grpc.channel import open_channel
from tei_manager.grpc.rpc import Servicer, StatusCode
from tei_manager.grpc.server import GrpcServer
from tei_manager.multiplexer.metrics import MultiplexerMetrics
from tei_manager.multiplexer.server import MultiplexerServer, shared_routing
from tei_manager.otlp import EXPORT, OtlpExporter
from tests.conftest import Workers
from tests.fake_manager import FakeManager
from tests.httpclient import http_request

M = multiplexer_grpc.TeiMultiplexer
mux = multiplexer_pb2

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
MUX_SERVICE = "tei_multiplexer.v1.TeiMultiplexer"


# -- fixtures --------------------------------------------------------------------------
@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on (sampling everything) for the test, finished spans kept in memory."""
    exporter = _install(1.0)
    try:
        yield exporter
    finally:
        tracing.uninstall()


def _install(ratio: float) -> InMemorySpanExporter:
    """Tracing on with ``ratio``; its finished spans (an exporter ends with its tracing)."""
    exporter = InMemorySpanExporter()
    config = OtelConfig(endpoint="http://unused:4317", sample_ratio=ratio)
    tracing.install(config, processor=SimpleSpanProcessor(exporter))
    return exporter


class Backend(tei_grpc.EmbedServicer):
    """An embedding instance that records the metadata of every call as it arrived
    (from the server's authorizer hook: its own tracing then puts its span in)."""

    def __init__(self) -> None:
        self.metadata: list[tuple[tuple[str, str], ...]] = []

    def record(self, context: CallContext) -> None:
        self.metadata.append(context.metadata)

    def server(self, *more: Servicer) -> GrpcServer:
        return GrpcServer([self, *more], authorize=self.record)

    async def Embed(
        self, request: tei_pb2.EmbedRequest, context: CallContext
    ) -> tei_pb2.EmbedResponse:
        return tei_pb2.EmbedResponse(embeddings=[float(len(request.inputs))])

    async def EmbedStream(
        self, requests: AsyncIterator[tei_pb2.EmbedRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.EmbedResponse]:
        async for request in requests:
            yield tei_pb2.EmbedResponse(embeddings=[float(len(request.inputs))])

    def traceparent(self) -> str:
        values = [value for key, value in self.metadata[-1] if key == "traceparent"]
        assert len(values) == 1, self.metadata[-1]
        return values[0]


class InfoBackend(tei_grpc.InfoServicer):
    async def Info(
        self, request: tei_pb2.InfoRequest, context: CallContext
    ) -> tei_pb2.InfoResponse:
        return tei_pb2.InfoResponse(
            model_id="m/b", model_type=tei_pb2.MODEL_TYPE_EMBEDDING, max_client_batch_size=32
        )


def _table(port: int) -> InstanceTable:
    table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    now = datetime.now(UTC)
    record = table.add(InstanceConfig(name="b", model_id="m/b"), created_at=now)
    record.config = msgspec.structs.replace(record.config, port=port)
    record.mark_starting(pid=1, now=now)
    record.mark_running()
    return table


def _config(tmp_path: Path) -> ManagerConfig:
    return ManagerConfig(
        api_host="127.0.0.1", api_port=0, grpc_port=0,
        state_file=str(tmp_path / "state.toml"), log_dir=str(tmp_path / "logs"),
    )  # fmt: skip


async def _serve_rest(nursery: trio.Nursery, tmp_path: Path, backend: Backend) -> int:
    config = _config(tmp_path)
    backend_port = await nursery.start(backend.server(InfoBackend()).run)
    table = _table(backend_port)
    manager = FakeManager(config)
    shared = shared_routing(config, table)
    await nursery.start(shared.pool.run)
    gateway = create_gateway(
        config,
        table,
        manager.metrics.prometheus,
        shared,
    )
    port: int = await nursery.start(partial(serve_api, manager, "127.0.0.1", 0, gateway=gateway))
    return port


async def _serve_mux(nursery: trio.Nursery, tmp_path: Path, backend: Backend) -> int:
    backend_port = await nursery.start(backend.server().run)
    server = MultiplexerServer(
        _config(tmp_path), _table(backend_port), MultiplexerMetrics(CollectorRegistry())
    )
    port: int = await nursery.start(server.run)
    return port


def _embed(text: str = "abc") -> multiplexer_pb2.EmbedRequest:
    return mux.EmbedRequest(
        target=mux.Target(instance_name="b"), request=tei_pb2.EmbedRequest(inputs=text)
    )


async def _wait_for(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError("condition not met within 5 s")


def _sampled(flags: str) -> bool:
    """The W3C sampled bit (a new root also sets bit 1, "random trace id")."""
    return bool(int(flags, 16) & 1)


def _named(spans: InMemorySpanExporter, name: str) -> bool:
    return any(s.name == name for s in spans.get_finished_spans())


def _hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def _hex_span(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}"


def _parent(span: ReadableSpan) -> str | None:
    return None if span.parent is None else f"{span.parent.span_id:016x}"


def _one(found: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    matching = [s for s in found if s.name == name and s.kind is kind]
    assert len(matching) == 1, [(s.name, s.kind) for s in found]
    return matching[0]


def _check_chain(
    found: list[ReadableSpan], server: ReadableSpan, backend: Backend, relayed: str
) -> None:
    """``server`` -> a CLIENT span for ``relayed`` -> the instance, one trace."""
    client = _one(found, relayed, SpanKind.CLIENT)
    assert _hex_trace(client) == _hex_trace(server)
    assert _parent(client) == _hex_span(server)
    assert client.attributes is not None and client.attributes["rpc.grpc.status_code"] == 0
    # What the instance got: the same trace, under the relayed call's span, sampled.
    version, trace_id, parent_id, flags = backend.traceparent().split("-")
    assert (version, trace_id, parent_id) == ("00", _hex_trace(server), _hex_span(client))
    assert _sampled(flags)
    instance = _one(found, relayed, SpanKind.SERVER)
    assert _parent(instance) == _hex_span(client)


# -- REST ------------------------------------------------------------------------------
async def test_rest_request_with_traceparent_is_a_child_span_passed_to_the_instance(
    nursery: trio.Nursery, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    backend = Backend()
    port = await _serve_rest(nursery, tmp_path, backend)
    body = json.dumps({"model": "b", "input": "hello"}).encode()
    reply = await http_request(
        port,
        "POST",
        "/v1/embeddings",
        body=body,
        headers=[("traceparent", TRACEPARENT), ("tracestate", "vendor=1")],
    )
    assert reply.status == 200, reply.body

    def server() -> list[ReadableSpan]:
        return [s for s in spans.get_finished_spans() if s.name == "POST /v1/embeddings"]

    await _wait_for(lambda: bool(server()))
    found = list(spans.get_finished_spans())
    (request,) = server()
    assert request.kind is SpanKind.SERVER
    assert _hex_trace(request) == TRACE_ID
    assert _parent(request) == PARENT_ID
    assert request.parent is not None and request.parent.is_remote
    assert request.attributes is not None
    assert request.attributes["http.route"] == "/v1/embeddings"
    assert request.attributes["http.response.status_code"] == 200
    _check_chain(found, request, backend, "tei.v1.Embed/Embed")
    assert "tracestate" in dict(backend.metadata[-1])  # the caller's, carried on


async def test_rest_request_without_traceparent_starts_a_trace(
    nursery: trio.Nursery, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    backend = Backend()
    port = await _serve_rest(nursery, tmp_path, backend)
    reply = await http_request(port, "POST", "/tei/b/embed", body=b'{"inputs": "x"}')
    assert reply.status == 200, reply.body

    def server() -> list[ReadableSpan]:
        return [s for s in spans.get_finished_spans() if s.name.startswith("POST /tei/")]

    await _wait_for(lambda: bool(server()))
    (request,) = server()
    assert request.name.endswith("/embed") and request.kind is SpanKind.SERVER
    assert request.parent is None
    _check_chain(list(spans.get_finished_spans()), request, backend, "tei.v1.Embed/Embed")


def test_rest_app_is_not_wrapped_when_tracing_is_off(tmp_path: Path) -> None:
    assert tracing.tracer is None
    app = create_app(FakeManager(_config(tmp_path)))
    assert tracing.wrap_asgi(app, route_of) is app


# -- gRPC multiplexer ------------------------------------------------------------------
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_multiplexer_unary_call_is_a_child_span_passed_to_the_instance(
    nursery: trio.Nursery, tmp_path: Path, spans: InMemorySpanExporter, warm: bool
) -> None:
    backend = Backend()
    port = await _serve_mux(nursery, tmp_path, backend)
    async with open_channel("127.0.0.1", port) as channel:
        if warm:  # the next call takes the task-free path
            await channel.unary_unary(M.Embed, _embed("warm"))
        spans.clear()
        await channel.unary_unary(M.Embed, _embed(), metadata=(("traceparent", TRACEPARENT),))
    found = list(spans.get_finished_spans())
    call = _one(found, f"{MUX_SERVICE}/Embed", SpanKind.SERVER)
    assert _hex_trace(call) == TRACE_ID and _parent(call) == PARENT_ID
    assert call.attributes is not None and call.attributes["rpc.grpc.status_code"] == 0
    _check_chain(found, call, backend, "tei.v1.Embed/Embed")


async def test_multiplexer_stream_call_is_traced(
    nursery: trio.Nursery, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    backend = Backend()
    port = await _serve_mux(nursery, tmp_path, backend)
    async with (
        open_channel("127.0.0.1", port) as channel,
        channel.open_call(M.EmbedStream, metadata=(("traceparent", TRACEPARENT),)) as call,
    ):
        await call.send(_embed("a"))
        await call.send(_embed("bb"))
        await call.done_writing()
        assert len([reply async for reply in call]) == 2
    await _wait_for(
        lambda: any(s.name == f"{MUX_SERVICE}/EmbedStream" for s in spans.get_finished_spans())
    )
    found = list(spans.get_finished_spans())
    server = _one(found, f"{MUX_SERVICE}/EmbedStream", SpanKind.SERVER)
    assert _hex_trace(server) == TRACE_ID
    _check_chain(found, server, backend, "tei.v1.Embed/EmbedStream")


@pytest.mark.parametrize(
    "bad",
    [
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # all-zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # all-zero span id
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version ff
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  # upper case
        "garbage",
        "00-" + "a" * 5000,
    ],
)
async def test_invalid_traceparent_is_ignored_for_a_new_root(
    nursery: trio.Nursery, tmp_path: Path, spans: InMemorySpanExporter, bad: str
) -> None:
    backend = Backend()
    port = await _serve_mux(nursery, tmp_path, backend)
    async with open_channel("127.0.0.1", port) as channel:
        reply = await channel.unary_unary(M.Embed, _embed(), metadata=(("traceparent", bad),))
    assert list(reply.embeddings) == [3.0]
    found = list(spans.get_finished_spans())
    call = _one(found, f"{MUX_SERVICE}/Embed", SpanKind.SERVER)
    assert call.parent is None
    assert _hex_trace(call) != "0" * 32
    # The instance gets our trace, never the caller's bad header.
    _check_chain(found, call, backend, "tei.v1.Embed/Embed")


async def test_sample_ratio_is_honoured(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = Backend()
    port = await _serve_mux(nursery, tmp_path, backend)
    try:
        async with open_channel("127.0.0.1", port) as channel:
            # Ratio 0: a new trace is not sampled, yet the instance learns that it is not.
            exporter = _install(0.0)
            await channel.unary_unary(M.Embed, _embed())
            assert exporter.get_finished_spans() == ()
            assert not _sampled(backend.traceparent().split("-")[3])
            # A caller's sampled flag is followed, whatever the ratio.
            await channel.unary_unary(M.Embed, _embed(), metadata=(("traceparent", TRACEPARENT),))
            assert {_hex_trace(s) for s in exporter.get_finished_spans()} == {TRACE_ID}
            unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"
            exporter = _install(1.0)
            await channel.unary_unary(M.Embed, _embed(), metadata=(("traceparent", unsampled),))
            assert exporter.get_finished_spans() == ()
            _, trace_id, _, flags = backend.traceparent().split("-")
            assert trace_id == TRACE_ID and not _sampled(flags)
            # Ratio 0.5 keeps about half of new traces (trace ids are random: ±7 sd).
            exporter = _install(0.5)
            for _ in range(200):
                await channel.unary_unary(M.Embed, _embed())
            kept = [s for s in exporter.get_finished_spans() if s.name == f"{MUX_SERVICE}/Embed"]
            assert 50 < len(kept) < 150, len(kept)
    finally:
        tracing.uninstall()


async def test_traceparent_is_relayed_untouched_when_tracing_is_off(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    assert tracing.tracer is None
    backend = Backend()
    port = await _serve_mux(nursery, tmp_path, backend)
    async with open_channel("127.0.0.1", port) as channel:
        await channel.unary_unary(M.Embed, _embed(), metadata=(("traceparent", TRACEPARENT),))
    assert backend.traceparent() == TRACEPARENT


async def test_calls_outside_a_request_get_no_span(
    nursery: trio.Nursery, spans: InMemorySpanExporter
) -> None:
    # Health checks, Info probes: no request, no span, metadata as given.
    backend = Backend()
    port = await nursery.start(backend.server().run)
    async with open_channel("127.0.0.1", port) as channel:
        await channel.unary_unary(tei_grpc.Embed.Embed, tei_pb2.EmbedRequest(inputs="x"))
    assert "traceparent" not in dict(backend.metadata[-1])
    assert [s.kind for s in spans.get_finished_spans()] == [SpanKind.SERVER]  # the backend's


async def test_a_task_outliving_its_request_makes_untraced_calls(
    nursery: trio.Nursery, spans: InMemorySpanExporter
) -> None:
    # An instance's runner started by a create request, or a pooled connection opened
    # by a relayed call, inherits the request; its later calls are not the request's.
    backend = Backend()
    port = await nursery.start(backend.server().run)
    embed = tei_grpc.Embed.Embed
    later, done = trio.Event(), trio.Event()

    async def runner() -> None:
        await later.wait()
        async with open_channel("127.0.0.1", port) as channel:
            await channel.unary_unary(embed, tei_pb2.EmbedRequest(inputs="later"))
        done.set()

    request = tracing.start_server(CallContext(M.Embed, (), None, None, None))
    assert request is not None
    nursery.start_soon(runner)
    async with open_channel("127.0.0.1", port) as channel:
        await channel.unary_unary(embed, tei_pb2.EmbedRequest(inputs="now"))
    assert "traceparent" in dict(backend.metadata[-1])
    tracing.end_server(request, StatusCode.OK)
    later.set()
    await done.wait()
    assert "traceparent" not in dict(backend.metadata[-1])
    clients = [s for s in spans.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert len(clients) == 1
    assert _parent(clients[0]) == f"{request.span.get_span_context().span_id:016x}"


# -- OTLP export -----------------------------------------------------------------------
class Collector(Servicer):
    """An OTLP/gRPC collector that keeps what it is sent."""

    SERVICE = EXPORT.service
    METHODS = (EXPORT,)

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: CallContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_spans_are_exported_over_otlp_grpc(nursery: trio.Nursery, tmp_path: Path) -> None:
    collector = Collector()
    collector_port = await nursery.start(GrpcServer([collector]).run)
    config = OtelConfig(
        endpoint=f"http://127.0.0.1:{collector_port}",
        service_name="mux-a",
        deployment_environment="test",
    )
    exporter = tracing.install(config)
    assert isinstance(exporter, OtlpExporter)
    registry = CollectorRegistry()
    exporter.watch(registry)
    try:
        backend = Backend()
        port = await _serve_mux(nursery, tmp_path, backend)
        async with trio.open_nursery() as inner:
            await inner.start(exporter.run)
            async with open_channel("127.0.0.1", port) as channel:
                await channel.unary_unary(
                    M.Embed, _embed(), metadata=(("traceparent", TRACEPARENT),)
                )
            inner.cancel_scope.cancel()  # the last batch goes on cancellation
    finally:
        tracing.uninstall()
    assert exporter.statistics() == (0, 3, 0)
    assert registry.get_sample_value("tei_manager_otel_spans_exported_total") == 3
    assert registry.get_sample_value("tei_manager_otel_spans_dropped_total") == 0
    assert registry.get_sample_value("tei_manager_otel_spans_queued") == 0
    (request,) = collector.requests
    (resource_spans,) = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource == {"service.name": "mux-a", "deployment.environment": "test"}
    sent = [span for scope in resource_spans.scope_spans for span in scope.spans]
    assert {span.trace_id.hex() for span in sent} == {TRACE_ID}
    assert sorted(span.name for span in sent) == [
        "tei.v1.Embed/Embed",  # ours (CLIENT) and the instance's (SERVER)
        "tei.v1.Embed/Embed",
        f"{MUX_SERVICE}/Embed",
    ]


async def test_export_to_an_absent_collector_drops_and_logs(
    caplog: pytest.LogCaptureFixture, spans: InMemorySpanExporter
) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nobody listens there now
    exporter = OtlpExporter(f"http://127.0.0.1:{port}")
    assert tracing.tracer is not None
    with tracing.tracer.start_as_current_span("work") as span:
        pass
    exporter.on_end(span)  # type: ignore[arg-type]
    assert exporter.statistics() == (1, 0, 0)
    await exporter.flush()
    assert exporter.statistics() == (0, 0, 1)
    assert "1 spans not exported" in caplog.text


class StuckCollector(Collector):
    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: CallContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_shutdown_sends_the_last_batch_for_a_bounded_time(
    nursery: trio.Nursery, spans: InMemorySpanExporter
) -> None:
    collector = StuckCollector()
    port = await nursery.start(GrpcServer([collector]).run)
    exporter = OtlpExporter(f"http://127.0.0.1:{port}", interval=60, final_timeout=0.2)
    assert tracing.tracer is not None
    for _ in range(3):
        with tracing.tracer.start_as_current_span("work") as span:
            pass
        exporter.on_end(span)  # type: ignore[arg-type]
    async with trio.open_nursery() as inner:
        await inner.start(exporter.run)
        assert collector.requests == []  # not before the interval, or a full batch
        started = trio.current_time()
        inner.cancel_scope.cancel()
    # The last send began as the task was cancelled, and was given up in time.
    assert len(collector.requests) == 1
    assert 0.2 <= trio.current_time() - started < 5
    assert exporter.statistics() == (0, 0, 3)


# -- configuration ---------------------------------------------------------------------
def test_the_originals_otel_section_is_read_unchanged() -> None:
    config = parse_config(
        """
        [otel]
        endpoint = "http://otel-collector:4317"   # OTLP/gRPC
        service_name = "tei-manager"
        sample_ratio = 1.0
        deployment_environment = "dev"
        """,
        env={},
    )
    assert config.otel == OtelConfig(
        endpoint="http://otel-collector:4317",
        service_name="tei-manager",
        sample_ratio=1.0,
        deployment_environment="dev",
    )
    assert config.otel.enabled
    assert not parse_config("", env={}).otel.enabled
    assert not parse_config('[otel]\nendpoint = "  "', env={}).otel.enabled


def test_otel_env_overrides() -> None:
    config = parse_config(
        '[otel]\nendpoint = "http://a:4317"',
        env={
            "TEI_MANAGER_OTEL_ENDPOINT": "https://collector:4317",
            "TEI_MANAGER_OTEL_SERVICE_NAME": "embeddings",
            "TEI_MANAGER_OTEL_SAMPLE_RATIO": "0.1",
        },
    )
    assert config.otel == OtelConfig(
        endpoint="https://collector:4317", service_name="embeddings", sample_ratio=0.1
    )
    with pytest.raises(
        ConfigError, match=r"otel.sample_ratio \(from TEI_MANAGER_OTEL_SAMPLE_RATIO\)"
    ):
        parse_config("", env={"TEI_MANAGER_OTEL_SAMPLE_RATIO": "2"})


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ('endpoint = "otel-collector:4317"', "otel.endpoint"),
        ('endpoint = "grpc://otel-collector:4317"', "otel.endpoint"),
        ('endpoint = "http://:4317"', "otel.endpoint"),
        ('endpoint = "http://c:70000"', "otel.endpoint"),
        ("sample_ratio = -0.1", "otel.sample_ratio"),
        ("sample_ratio = nan", "otel.sample_ratio"),
        ('service_name = ""', "otel.service_name"),
        ('protocol = "grpc"', "otel"),  # unknown field
    ],
)
def test_bad_otel_settings_name_the_field(section: str, field: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(f"[otel]\n{section}", env={})
    assert str(error.value).startswith(f"{field}:"), error.value


def test_missing_packages_fail_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # import fails
    with pytest.raises(ConfigError, match=r"pip install 'tei-manager\[otel\]'"):
        tracing.install(OtelConfig(endpoint="http://c:4317"))
    assert tracing.tracer is None


def test_serve_refuses_to_start_without_the_packages(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tei_manager.manager.serve import main

    config = tmp_path / "config.toml"
    config.write_text(
        f'state_file = "{tmp_path / "state.toml"}"\nlog_dir = "{tmp_path}"\n'
        '[otel]\nendpoint = "http://otel-collector:4317"\n'
    )
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    assert main(str(config)) == 2
    assert "otel.endpoint is set but the OpenTelemetry packages are not installed" in (
        capsys.readouterr().err
    )


# -- the built-in worker ---------------------------------------------------------------
@pytest.mark.slow
async def test_the_worker_answers_calls_that_carry_trace_context(workers: Workers) -> None:
    # It makes no spans of its own: the context is metadata it has no use for.
    request = tei_pb2.EmbedRequest(inputs="trace me")
    async with open_channel("127.0.0.1", workers.dense.port) as channel:
        plain = await channel.unary_unary(tei_grpc.Embed.Embed, request)
        for metadata in (
            (("traceparent", TRACEPARENT), ("tracestate", "vendor=1")),
            (("traceparent", "garbage"),),
        ):
            traced = await channel.unary_unary(tei_grpc.Embed.Embed, request, metadata=metadata)
            assert list(traced.embeddings) == list(plain.embeddings)
