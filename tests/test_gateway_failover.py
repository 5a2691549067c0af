"""Failover in the HTTP gateway: a unary call routed by model that never got an answer
goes once to another replica, through ``Session._exchange``; nothing else is retried.

The replicas are the multiplexer failover tests' killable in-process backends.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.config import InstanceConfig, ManagerConfig
from tei_manager.core.instances import InstanceTable
from tei_manager.core.ports import PortAllocator
from tei_manager.gateway.errors import InferenceError, Kind
from tei_manager.gateway.relay import Gateway, create_gateway
from tei_manager.multiplexer.server import shared_routing
from tests.test_multiplexer_failover import Replica
from tests.test_multiplexer_relay import _wait_for

MODEL = "m/replicated"
ROUTE = "/v1/embeddings"


class Replicas:
    """Replicas "a" and "b" of MODEL (alias "fast"), and a gateway over them."""

    def __init__(self, nursery: trio.Nursery, tmp_path: Path) -> None:
        self.nursery = nursery
        self.replicas = {"a": Replica(), "b": Replica()}
        self.registry = CollectorRegistry(auto_describe=True)
        self.config = ManagerConfig(
            state_file=str(tmp_path / "state.toml"), log_dir=str(tmp_path / "logs")
        )
        self.table = InstanceTable(PortAllocator(20000, 20100, probe=lambda port: True))
        self.gateway: Gateway | None = None

    async def start(self) -> Gateway:
        now = datetime.now(UTC)
        for pid, (name, replica) in enumerate(self.replicas.items(), start=1):
            port = await self.nursery.start(replica.run)
            record = self.table.add(
                InstanceConfig(name=name, model_id=MODEL, served_model_name="fast"),
                created_at=now,
            )
            record.config = msgspec.structs.replace(record.config, port=port)
            record.mark_starting(pid=pid, now=now)
            record.mark_running()
        shared = shared_routing(self.config, self.table)
        await self.nursery.start(shared.pool.run)
        self.gateway = create_gateway(
            self.config,
            self.table,
            self.registry,
            shared,
        )
        return self.gateway

    def retries(self, reason: str | None = None) -> float:
        text = generate_latest(self.registry).decode()
        found = re.findall(
            r'tei_manager_inference_retries_total\{reason="(\w+)",route="[^"]+"\} (\S+)', text
        )
        return sum(float(count) for why, count in found if reason in (None, why))


def embed(text: str) -> bytes:
    return tei_pb2.EmbedRequest(inputs=text).SerializeToString()


def embedding(reply: bytes) -> list[float]:
    return list(tei_pb2.EmbedResponse.FromString(reply).embeddings)


@pytest.mark.parametrize("model", [MODEL, "fast"])
async def test_a_dead_replica_is_skipped_after_one_connect_retry(
    nursery: trio.Nursery, tmp_path: Path, model: str
) -> None:
    setup = Replicas(nursery, tmp_path)
    gateway = await setup.start()
    setup.replicas["a"].kill()  # nothing listens on its port any more
    async with gateway.session(ROUTE, model) as session:
        assert session.instance.name == "a"  # the first choice
        assert embedding(await session.unary(tei_grpc.Embed.Embed, embed("xy"))) == [2.0]
        # The slot and the in-flight count moved with the call.
        assert session.instance.name == "b"
        assert gateway.router.in_flight("a") == 0 and gateway.router.in_flight("b") == 1
        assert gateway.admission.statistics()["a"].in_flight == 0
    assert gateway.router.in_flight("b") == 0
    assert setup.retries("connect") == 1
    # The router now passes the dead replica over: no more retries.
    for _ in range(3):
        async with gateway.session(ROUTE, model) as session:
            await session.unary(tei_grpc.Embed.Embed, embed("z"))
    assert setup.retries() == 1
    assert setup.replicas["b"].seen == ["xy", "z", "z", "z"]


async def test_a_call_lost_with_its_connection_goes_to_the_other_replica(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    setup = Replicas(nursery, tmp_path)
    gateway = await setup.start()
    a = setup.replicas["a"]
    a.stalling = True
    answer: list[list[float]] = []

    async def call() -> None:
        async with gateway.session(ROUTE, MODEL) as session:
            answer.append(embedding(await session.unary(tei_grpc.Embed.Embed, embed("stall"))))

    async with trio.open_nursery() as calls:
        calls.start_soon(call)
        await _wait_for(lambda: "stall" in a.seen)
        a.kill()
    assert answer == [[5.0]]
    assert setup.replicas["b"].seen == ["stall"]
    assert setup.retries("lost") == 1


async def test_calls_by_instance_name_are_not_retried(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    setup = Replicas(nursery, tmp_path)
    gateway = await setup.start()
    setup.replicas["a"].kill()
    with pytest.raises(InferenceError) as failed:
        async with gateway.session(ROUTE, "a") as session:
            await session.unary(tei_grpc.Embed.Embed, embed("xy"))
    assert failed.value.kind is Kind.UNAVAILABLE
    assert setup.retries() == 0 and setup.replicas["b"].seen == []


async def test_an_instance_that_answered_is_not_retried(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    setup = Replicas(nursery, tmp_path)
    gateway = await setup.start()
    with pytest.raises(InferenceError) as failed:
        async with gateway.session(ROUTE, MODEL) as session:
            await session.unary(tei_grpc.Embed.Embed, embed("fail"))  # UNAVAILABLE "busy"
    assert "busy" in failed.value.message
    assert setup.replicas["a"].seen == ["fail"] and setup.replicas["b"].seen == []
    assert setup.retries() == 0


async def test_streams_are_not_retried(nursery: trio.Nursery, tmp_path: Path) -> None:
    setup = Replicas(nursery, tmp_path)
    gateway = await setup.start()
    setup.replicas["a"].kill()
    with pytest.raises(InferenceError) as failed:
        async with gateway.session(ROUTE, MODEL) as session:
            assert session.instance.name == "a"
            await session.stream(tei_grpc.Embed.EmbedStream, [embed("x"), embed("y")])
    assert failed.value.kind is Kind.UNAVAILABLE
    assert setup.retries() == 0
    assert gateway.router.in_flight("a") == 0
