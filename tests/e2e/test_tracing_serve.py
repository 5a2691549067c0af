"""``tei-manager serve`` with an ``[otel]`` section written for the original: a REST
request and a multiplexer call carrying a ``traceparent`` reach an OTLP/gRPC collector
as spans of the caller's trace, the last batch sent as the manager shuts down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from tei_manager._proto.tei.v1 import tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tei_manager.grpc.calls import CallContext
from tei_manager.grpc.channel import open_channel
from tei_manager.grpc.rpc import GrpcError, Servicer, StatusCode
from tei_manager.grpc.server import GrpcServer
from tei_manager.otlp import EXPORT
from tests.e2e.test_manager_processes import READY_TIMEOUT, _free_port, _free_port_range
from tests.httpclient import http_request

pytestmark = pytest.mark.slow

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class Collector(Servicer):
    SERVICE = EXPORT.service
    METHODS = (EXPORT,)

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: CallContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_serve_exports_spans_of_the_callers_trace(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    collector = Collector()
    collector_port = await nursery.start(GrpcServer([collector]).run)
    api, grpc_port, start = _free_port(), _free_port(), _free_port_range(2)
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
api_host = "127.0.0.1"
api_port = {api}
grpc_port = {grpc_port}
state_file = "{tmp_path / "state.toml"}"
log_dir = "{tmp_path / "logs"}"
instance_port_start = {start}
instance_port_end = {start + 1}
gpu_preflight = "off"

[otel]
endpoint = "http://127.0.0.1:{collector_port}"   # OTLP/gRPC
service_name = "tei-manager"
sample_ratio = 1.0
deployment_environment = "ci"
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEI_")}
    env["HF_HUB_OFFLINE"] = "1"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tei_manager", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        with trio.fail_after(READY_TIMEOUT):
            while True:
                assert process.poll() is None, log.read_text()[-3000:]
                try:
                    if (await http_request(api, "GET", "/health/ready")).status == 200:
                        break
                except OSError:
                    pass
                await trio.sleep(0.1)
        reply = await http_request(api, "GET", "/instances", headers=[("traceparent", TRACEPARENT)])
        assert reply.status == 200
        request = multiplexer_pb2.EmbedRequest(
            target=multiplexer_pb2.Target(instance_name="none"),
            request=tei_pb2.EmbedRequest(inputs="x"),
        )
        async with open_channel("127.0.0.1", grpc_port) as channel:
            with pytest.raises(GrpcError) as error:
                await channel.unary_unary(
                    multiplexer_grpc.TeiMultiplexer.Embed,
                    request,
                    metadata=(("traceparent", TRACEPARENT),),
                )
        assert error.value.code == StatusCode.NOT_FOUND
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            assert await process.wait() == 0, log.read_text()[-3000:]
    spans = {
        span.name: span
        for request in collector.requests
        for resource_spans in request.resource_spans
        for scope in resource_spans.scope_spans
        for span in scope.spans
    }
    instances = spans["GET /instances"]
    assert instances.trace_id.hex() == TRACE_ID
    call = spans["tei_multiplexer.v1.TeiMultiplexer/Embed"]
    assert call.trace_id.hex() == TRACE_ID
    codes = {a.key: a.value.int_value for a in call.attributes}
    assert codes["rpc.grpc.status_code"] == StatusCode.NOT_FOUND.value
    resource = collector.requests[0].resource_spans[0].resource
    attributes = {a.key: a.value.string_value for a in resource.attributes}
    assert attributes == {"service.name": "tei-manager", "deployment.environment": "ci"}
