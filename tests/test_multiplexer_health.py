"""The multiplexer's grpc.health.v1 status follows the manager's readiness gate."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest

from tei_manager._proto.grpc.health.v1 import health_grpc
from tei_manager._proto.grpc.health.v1 import health_pb2 as health_v1
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc
from tei_manager.config import GrpcConfig, ManagerConfig
from tei_manager.core.instances import InstanceTable
from tei_manager.core.ports import PortAllocator
from tei_manager.grpc.channel import Channel, open_channel
from tei_manager.grpc.health import NOT_SERVING, SERVING
from tei_manager.multiplexer.metrics import MultiplexerMetrics
from tei_manager.multiplexer.server import MultiplexerServer

M = multiplexer_grpc.TeiMultiplexer


def _bare_server(tmp_path: Path) -> MultiplexerServer:
    """A multiplexer with no instance, on a free port."""
    config = ManagerConfig(
        api_host="127.0.0.1",
        grpc_port=0,
        state_file=str(tmp_path / "state.toml"),
        log_dir=str(tmp_path / "logs"),
    )
    table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    return MultiplexerServer(config, table, MultiplexerMetrics(CollectorRegistry()))


async def test_health_waits_for_the_readiness_gate(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = _bare_server(tmp_path)
    ready = trio.Event()  # the manager's instances_ready (ready_requires_instances)
    port = await nursery.start(partial(server.run, ready=ready))

    async def statuses(channel: Channel) -> list[int]:
        answers = []
        for service in ("", M.NAME):
            request = health_v1.HealthCheckRequest(service=service)
            answers.append((await channel.unary_unary(health_grpc.Health.Check, request)).status)
        return answers

    async with open_channel("127.0.0.1", port) as channel:
        assert await statuses(channel) == [NOT_SERVING, NOT_SERVING]
        ready.set()
        await trio.testing.wait_all_tasks_blocked()
        assert await statuses(channel) == [SERVING, SERVING]


async def test_a_shutdown_before_the_gate_opens_ends_the_server(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = _bare_server(tmp_path)
    shutdown, done = trio.Event(), trio.Event()

    async def serve(task_status: trio.TaskStatus[int]) -> None:
        await server.run(ready=trio.Event(), shutdown=shutdown, task_status=task_status)
        done.set()

    await nursery.start(serve)
    shutdown.set()
    with trio.fail_after(5):
        await done.wait()
    assert server.health.status("") == NOT_SERVING


async def test_without_a_gate_it_serves_once_listening(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = _bare_server(tmp_path)
    await nursery.start(server.run)
    assert server.health.status("") == SERVING
    assert server.health.status(M.NAME) == SERVING


async def test_the_port_exports_its_connections_and_those_it_refused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = ManagerConfig(
        api_host="127.0.0.1",
        grpc_port=0,
        grpc=GrpcConfig(max_connections=1),
        state_file=str(tmp_path / "state.toml"),
        log_dir=str(tmp_path / "logs"),
    )
    registry = CollectorRegistry()
    table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    server = MultiplexerServer(config, table, MultiplexerMetrics(registry))
    port = await nursery.start(server.run)
    async with open_channel("127.0.0.1", port) as channel:
        request = health_v1.HealthCheckRequest(service="")
        await channel.unary_unary(health_grpc.Health.Check, request)
        for _ in range(3):  # over the limit: closed at once
            extra = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.fail_after(5):
                while await extra.receive_some(1024):
                    pass
            await extra.aclose()
        text = generate_latest(registry).decode()
    assert "tei_manager_grpc_connections 1.0" in text
    assert "tei_manager_grpc_connections_refused_total 3.0" in text
    assert "tei_manager_grpc_accept_errors_total 0.0" in text
    assert "tei_manager_grpc_queued_output_bytes 0.0" in text
