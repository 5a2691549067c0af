"""The on-demand hook on both doors: a request to an idle instance starts it and is answered.

gRPC through the multiplexer, HTTP through the gateway's /v1 and /tei routes; both
share one router, so one start serves the requests of either.

The starter here brings up an in-process tei.v1 backend after a delay, as a
process would load its model; the manager's own starter is tested in
``test_manager_ondemand.py``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tei_manager.api import serve_api
from tei_manager.config import InstanceConfig, ManagerConfig
from tei_manager.core.instances import InstanceRecord, InstanceStatus, InstanceTable
from tei_manager.core.ondemand import Activity, StartPolicy
from tei_manager.core.ports import PortAllocator
from tei_manager.errors import ErrorCode, TeiError
from tei_manager.gateway.relay import create_gateway
from tei_manager.grpc.calls import CallContext
from tei_manager.grpc.channel import open_channel
from tei_manager.grpc.rpc import GrpcError, StatusCode
from tei_manager.grpc.server import GrpcServer
from tei_manager.multiplexer.metrics import MultiplexerMetrics
from tei_manager.multiplexer.server import MultiplexerServer, SharedRouting, shared_routing
from tests.fake_manager import FakeManager
from tests.httpclient import http_request

M = multiplexer_grpc.TeiMultiplexer
mux = multiplexer_pb2
LOAD_SECS = 0.3


class Backend(tei_grpc.EmbedServicer):
    def __init__(self, activity: Activity) -> None:
        self.activity = activity
        self.held: list[int] = []
        self.answer_secs = 0.0  # how long Embed takes to answer

    async def Embed(
        self, request: tei_pb2.EmbedRequest, context: CallContext
    ) -> tei_pb2.EmbedResponse:
        await trio.sleep(self.answer_secs)
        return tei_pb2.EmbedResponse(embeddings=[float(len(request.inputs))])

    async def EmbedStream(
        self, requests: AsyncIterator[tei_pb2.EmbedRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.EmbedResponse]:
        async for request in requests:
            self.held.append(self.activity.in_flight("od"))
            yield tei_pb2.EmbedResponse(embeddings=[float(len(request.inputs))])


class InfoBackend(tei_grpc.InfoServicer):
    async def Info(
        self, request: tei_pb2.InfoRequest, context: CallContext
    ) -> tei_pb2.InfoResponse:
        return tei_pb2.InfoResponse(
            model_id="m/od", model_type=tei_pb2.MODEL_TYPE_EMBEDDING, max_client_batch_size=32
        )


class Starter:
    """Starts the backend once, however many requests wait; refuses when ``refuse`` is set."""

    def __init__(self, nursery: trio.Nursery, backend: Backend) -> None:
        self.nursery = nursery
        self.backend = backend
        self.load_secs = LOAD_SECS
        self.starts = 0
        self.refuse: str | None = None
        self._started: trio.Event | None = None

    async def __call__(self, record: InstanceRecord, deadline: float) -> None:
        if self.refuse is not None:
            raise TeiError(ErrorCode.CAPACITY_EXHAUSTED, self.refuse)
        if self._started is None:
            # As OnDemand does: the start runs on its own, each caller waits for it
            # within its deadline.
            self._started = trio.Event()
            self.starts += 1
            record.mark_start_requested()
            self.nursery.start_soon(self._load, record, self._started)
        with trio.move_on_at(deadline):
            await self._started.wait()
            return
        raise TeiError(ErrorCode.TIMEOUT, f"instance {record.name} was not ready in time")

    async def _load(self, record: InstanceRecord, started: trio.Event) -> None:
        await trio.sleep(self.load_secs)
        port = await self.nursery.start(GrpcServer([self.backend, InfoBackend()]).run)
        record.config = msgspec.structs.replace(record.config, port=port)
        record.mark_starting(4242, datetime.now(UTC))
        record.mark_running()
        started.set()


@pytest.fixture
async def setup(
    nursery: trio.Nursery,
) -> tuple[MultiplexerServer, Starter, InstanceTable, int]:
    return await serve(nursery, ManagerConfig(api_host="127.0.0.1", grpc_port=0))


async def serve(
    nursery: trio.Nursery, config: ManagerConfig
) -> tuple[MultiplexerServer, Starter, InstanceTable, int]:
    table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    for name, start in (("od", StartPolicy.ON_DEMAND), ("off", StartPolicy.ON_DEMAND)):
        table.add(
            InstanceConfig(name=name, model_id=f"m/{name}", start=start),
            created_at=datetime.now(UTC),
        )
    table.request_stop("off")
    activity = Activity(trio.current_time)
    starter = Starter(nursery, Backend(activity))
    server = MultiplexerServer(
        config,
        table,
        MultiplexerMetrics(CollectorRegistry()),
        activity=activity,
        starter=starter,
    )
    port = await nursery.start(server.run)
    return server, starter, table, port


def _embed(target: multiplexer_pb2.Target, text: str = "abc") -> multiplexer_pb2.EmbedRequest:
    return mux.EmbedRequest(target=target, request=tei_pb2.EmbedRequest(inputs=text))


async def test_concurrent_first_requests_share_one_start_and_all_get_answers(
    setup: tuple[MultiplexerServer, Starter, InstanceTable, int],
) -> None:
    _server, starter, table, port = setup
    assert table.get("od").status is InstanceStatus.IDLE
    answers: list[float] = []
    began = trio.current_time()
    async with open_channel("127.0.0.1", port) as channel:

        async def call(target: multiplexer_pb2.Target) -> None:
            reply = await channel.unary_unary(M.Embed, _embed(target))
            answers.append(reply.embeddings[0])

        async with trio.open_nursery() as calls:
            for _ in range(4):
                calls.start_soon(call, mux.Target(instance_name="od"))
            calls.start_soon(call, mux.Target(model_id="m/od"))
            calls.start_soon(call, mux.Target(instance_index=0))
        assert answers == [3.0] * 6
        assert starter.starts == 1
        assert trio.current_time() - began >= LOAD_SECS
        # Warm now: the task-free path, no start.
        reply = await channel.unary_unary(M.Embed, _embed(mux.Target(instance_name="od")))
        assert reply.embeddings == [3.0] and starter.starts == 1


async def test_a_stream_starts_the_instance_and_holds_it_while_open(
    setup: tuple[MultiplexerServer, Starter, InstanceTable, int],
) -> None:
    server, starter, _table, port = setup
    async with open_channel("127.0.0.1", port) as channel:
        replies = []
        async with channel.open_call(M.EmbedStream) as call:
            for n in (1, 2, 3):
                await call.send(_embed(mux.Target(instance_name="od"), "x" * n))
                reply = await call.receive()
                assert reply is not None
                replies.append(reply.embeddings[0])
            await call.done_writing()
            assert await call.receive() is None
    assert replies == [1.0, 2.0, 3.0]
    assert starter.starts == 1
    assert starter.backend.held == [1, 1, 1]  # counted in flight throughout
    assert server.router.in_flight("od") == 0


async def test_stopped_instances_and_refused_starts_fail_fast_with_their_reason(
    setup: tuple[MultiplexerServer, Starter, InstanceTable, int],
) -> None:
    _server, starter, _table, port = setup
    async with open_channel("127.0.0.1", port) as channel:
        with pytest.raises(GrpcError) as stopped:
            await channel.unary_unary(M.Embed, _embed(mux.Target(instance_name="off")))
        assert stopped.value.code is StatusCode.UNAVAILABLE
        assert "is stopped by an operator" in stopped.value.message
        starter.refuse = 'instance "od" needs 1.0 GiB but cpu has 0.5 GiB left'
        with pytest.raises(GrpcError) as refused:
            await channel.unary_unary(M.Embed, _embed(mux.Target(instance_name="od")))
        assert refused.value.code is StatusCode.RESOURCE_EXHAUSTED
        assert "needs 1.0 GiB but cpu has 0.5 GiB left" in refused.value.message
    assert starter.starts == 0


async def test_a_cold_start_is_not_timed_by_the_request_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A load longer than grpc_request_timeout_secs is waited for (its own bound is
    startup_timeout_secs, and the client's deadline); the request timeout times the
    call from when the instance runs."""
    config = ManagerConfig(api_host="127.0.0.1", grpc_port=0, grpc_request_timeout_secs=2.0)
    _server, starter, _table, port = await serve(nursery, config)
    starter.load_secs = 60.0
    began = trio.current_time()
    async with open_channel("127.0.0.1", port) as channel:
        reply = await channel.unary_unary(M.Embed, _embed(mux.Target(instance_name="od")))
        assert reply.embeddings == [3.0]
        assert trio.current_time() - began == pytest.approx(60.0, abs=0.5)
        # Running now: a call that takes longer than the request timeout still fails.
        starter.backend.answer_secs = 10.0
        began = trio.current_time()
        with pytest.raises(GrpcError) as slow:
            await channel.unary_unary(M.Embed, _embed(mux.Target(instance_name="od")))
    assert slow.value.code is StatusCode.DEADLINE_EXCEEDED
    assert "grpc_request_timeout_secs" in slow.value.message
    assert trio.current_time() - began == pytest.approx(2.0, abs=0.5)


async def test_a_call_that_starts_an_instance_gets_the_request_timeout_after_the_start(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    config = ManagerConfig(api_host="127.0.0.1", grpc_port=0, grpc_request_timeout_secs=2.0)
    _server, starter, _table, port = await serve(nursery, config)
    starter.load_secs = 60.0
    starter.backend.answer_secs = 10.0
    began = trio.current_time()
    async with open_channel("127.0.0.1", port) as channel:
        with pytest.raises(GrpcError) as slow:
            await channel.unary_unary(M.Embed, _embed(mux.Target(instance_name="od")))
    assert slow.value.code is StatusCode.DEADLINE_EXCEEDED
    assert trio.current_time() - began == pytest.approx(62.0, abs=0.5)


async def gateway_port(
    nursery: trio.Nursery, tmp_path: Path, table: InstanceTable, starter: Starter, **settings: Any
) -> tuple[int, SharedRouting]:
    """The REST port with the HTTP gateway, on a router that starts through ``starter``."""
    config = ManagerConfig(
        api_host="127.0.0.1", api_port=0, grpc_port=0,
        state_file=str(tmp_path / "state.toml"), log_dir=str(tmp_path / "logs"), **settings,
    )  # fmt: skip
    shared = shared_routing(config, table, activity=starter.backend.activity, starter=starter)
    await nursery.start(shared.pool.run)
    manager = FakeManager(config)
    gateway = create_gateway(
        config,
        table,
        manager.metrics.prometheus,
        shared,
    )
    port = await nursery.start(partial(serve_api, manager, "127.0.0.1", 0, gateway=gateway))
    return port, shared


async def test_the_http_gateway_waits_for_a_cold_start_as_the_multiplexer_does(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    table.add(
        InstanceConfig(name="od", model_id="m/od", start=StartPolicy.ON_DEMAND),
        created_at=datetime.now(UTC),
    )
    starter = Starter(nursery, Backend(Activity(trio.current_time)))
    starter.load_secs = 60.0
    port, _ = await gateway_port(nursery, tmp_path, table, starter, grpc_request_timeout_secs=2.0)
    began = trio.current_time()
    body = json.dumps({"inputs": "abcd"}).encode()
    reply = await http_request(port, "POST", "/tei/od/embed", body=body)
    assert (reply.status, reply.json()) == (200, [[4.0]])
    assert trio.current_time() - began == pytest.approx(60.0, abs=0.5)
    # Running now: the request timeout times the call.
    starter.backend.answer_secs = 10.0
    reply = await http_request(port, "POST", "/tei/od/embed", body=body)
    assert "did not answer within 2 s (grpc_request_timeout_secs)" in reply.json()["error"]


async def test_the_http_gateway_starts_an_idle_instance_through_the_same_hook(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    for name in ("od", "refused"):
        table.add(
            InstanceConfig(name=name, model_id=f"m/{name}", start=StartPolicy.ON_DEMAND),
            created_at=datetime.now(UTC),
        )
    starter = Starter(nursery, Backend(Activity(trio.current_time)))
    port, shared = await gateway_port(nursery, tmp_path, table, starter)

    async def post(path: str, body: object) -> tuple[int, object]:
        reply = await http_request(port, "POST", path, body=json.dumps(body).encode())
        return reply.status, reply.json()

    answers: list[tuple[int, object]] = []

    async def ask(path: str, body: object) -> None:
        answers.append(await post(path, body))

    began = trio.current_time()
    async with trio.open_nursery() as calls:
        for _ in range(3):
            calls.start_soon(ask, "/v1/embeddings", {"model": "od", "input": "abc"})
            calls.start_soon(ask, "/tei/od/embed", {"inputs": "abcd"})
        calls.start_soon(ask, "/v1/embeddings", {"model": "m/od", "input": "ab"})
    assert trio.current_time() - began >= LOAD_SECS
    assert starter.starts == 1  # one start shared by every request of either route
    assert table.get("od").status is InstanceStatus.RUNNING
    assert sorted(status for status, _ in answers) == [200] * 7
    bodies = [body for _, body in answers]
    assert bodies.count([[4.0]]) == 3  # TEI's answer to one input of 4 characters
    openai = [b["data"][0]["embedding"] for b in bodies if isinstance(b, dict)]
    assert sorted(openai) == [[2.0], [3.0], [3.0], [3.0]]
    assert shared.router.in_flight("od") == 0
    # A start that finds no memory: 503 on the OpenAI route, with the reason.
    starter.refuse = 'instance "refused" needs 1.0 GiB but cpu has 0.5 GiB left'
    status, body = await post("/v1/embeddings", {"model": "refused", "input": "x"})
    assert status == 503
    assert isinstance(body, dict)
    assert "needs 1.0 GiB but cpu has 0.5 GiB left" in body["error"]["message"]
    assert shared.router.in_flight("refused") == 0
    # The refused request gave its admission slot back.
    assert shared.admission.statistics()["refused"].in_flight == 0


async def test_probes_listing_and_info_never_load_a_model(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = ManagerConfig(
        api_host="127.0.0.1", api_port=0, grpc_port=0,
        state_file=str(tmp_path / "state.toml"), log_dir=str(tmp_path / "logs"),
    )  # fmt: skip
    table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
    table.add(
        InstanceConfig(name="od", model_id="m/od", start=StartPolicy.ON_DEMAND),
        created_at=datetime.now(UTC),
    )
    activity = Activity(trio.current_time)
    starter = Starter(nursery, Backend(activity))
    shared = shared_routing(config, table, activity=activity, starter=starter)
    await nursery.start(shared.pool.run)
    manager = FakeManager(config)
    gateway = create_gateway(
        config,
        table,
        manager.metrics.prometheus,
        shared,
    )
    port = await nursery.start(partial(serve_api, manager, "127.0.0.1", 0, gateway=gateway))
    record = table.get("od")

    async def get(path: str) -> tuple[int, object]:
        reply = await http_request(port, "GET", path)
        return reply.status, reply.json() if reply.body else None

    # Idle: healthy (its first request loads it), listed, but its facts unknown yet.
    assert await get("/tei/od/health") == (200, None)
    assert await get("/tei/m/od/health") == (200, None)  # by model id too
    status, listed = await get("/v1/models")
    assert status == 200 and isinstance(listed, dict)
    assert {card["id"] for card in listed["data"]} == {"od", "m/od"}
    assert (await get("/v1/models/od"))[0] == 200
    status, info = await get("/tei/od/info")
    assert status == 503 and isinstance(info, dict)
    assert info["error_type"] == "Unhealthy"
    assert "has not loaded its model yet" in info["error"]
    assert starter.starts == 0 and record.status is InstanceStatus.IDLE

    # Loaded by a request: Info from the instance itself.
    reply = await http_request(port, "POST", "/tei/od/embed", body=b'{"inputs": "ab"}')
    assert reply.status == 200 and starter.starts == 1
    assert await get("/tei/od/health") == (200, None)
    status, loaded = await get("/tei/od/info")
    assert status == 200 and isinstance(loaded, dict)
    assert (loaded["model_id"], loaded["max_client_batch_size"]) == ("m/od", 32)

    # Unloaded again: the last process's Info, still without a start.
    record.mark_idle()
    assert await get("/tei/od/info") == (200, loaded)
    assert await get("/tei/od/health") == (200, None)
    # A cold start under way: not ready yet, answered at once rather than awaited.
    record.mark_start_requested()
    status, starting = await get("/tei/od/health")
    assert status == 503 and isinstance(starting, dict)
    assert starting == {"error": 'instance "od" is starting', "error_type": "Unhealthy"}
    assert starter.starts == 1 and record.status is InstanceStatus.STARTING
