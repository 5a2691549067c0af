"""Unary calls answered from callbacks (``Servicer.fast_unary``, ``FastCall``).

A probe servicer takes, declines, holds or crashes on calls as the request's ids
say; the tests check what the client gets and that ``on_end`` sees every call
end exactly once, whatever ended it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
import trio

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.grpc.calls import CallContext, FastCall, ServerCall
from tei_manager.grpc.channel import Channel, open_channel
from tei_manager.grpc.rpc import GrpcError, MethodSpec, StatusCode
from tei_manager.grpc.server import GrpcServer
from tests.test_grpc_server import _grpcio

DECLINE = 1
HOLD = 2
LIMIT = 3
CRASH = 4
BIG = 5

Decode = tei_grpc.Tokenize.Decode


class FastProbe(tei_grpc.TokenizeServicer):
    """Decode answered from the reader; the task handler answers what it declines."""

    RAW = True

    def __init__(self) -> None:
        self.ended: list[StatusCode] = []
        self.ended_event = trio.Event()
        self.held: list[FastCall] = []
        self.held_event = trio.Event()
        self.by_task = 0

    def fast_unary(self, spec: MethodSpec[Any, Any]) -> Callable[[Any, bytes], bool] | None:
        return self._fast if spec.name == "Decode" else None

    def _fast(self, call: FastCall, data: bytes) -> bool:
        ids = list(tei_pb2.DecodeRequest.FromString(data).ids)
        if ids[:1] == [DECLINE]:
            return False
        call.on_end = self._ended
        if ids[:1] == [CRASH]:
            raise RuntimeError("secret internal detail")
        if ids[:1] == [LIMIT]:
            call.limit(trio.current_time() + 0.2, "the probe's own limit")
        if ids[:1] in ([HOLD], [LIMIT]):
            self.held.append(call)
            self.held_event.set()
            return True
        size = ids[1] if ids[:1] == [BIG] else 0
        text = "x" * size if size else "fast " + " ".join(map(str, ids))
        call.reply(tei_pb2.DecodeResponse(text=text).SerializeToString())
        return True

    def _ended(self, code: StatusCode) -> None:
        self.ended.append(code)
        self.ended_event.set()

    async def Decode(self, call: ServerCall, context: CallContext) -> None:  # type: ignore[override]
        self.by_task += 1
        data = await call.receive()
        assert data is not None
        ids = tei_pb2.DecodeRequest.FromString(data).ids
        await call.send(
            tei_pb2.DecodeResponse(text="task " + " ".join(map(str, ids))).SerializeToString()
        )


async def _serve(nursery: trio.Nursery, **kwargs: Any) -> tuple[GrpcServer, FastProbe]:
    probe = FastProbe()
    server = GrpcServer([probe], **kwargs)
    await nursery.start(server.run)
    return server, probe


def _request(*ids: int) -> tei_pb2.DecodeRequest:
    return tei_pb2.DecodeRequest(ids=list(ids))


async def test_taken_and_declined_calls(nursery: trio.Nursery) -> None:
    server, probe = await _serve(nursery)
    async with open_channel("127.0.0.1", server.port) as channel:
        reply = await channel.unary_unary(Decode, _request(7, 8))
        assert reply.text == "fast 7 8"
        declined = await channel.unary_unary(Decode, _request(DECLINE, 9))
        assert declined.text == f"task {DECLINE} 9"
    assert probe.ended == [StatusCode.OK]
    assert probe.by_task == 1
    assert server.statistics()["active_calls"] == 0


async def test_a_held_call_is_answered_later_from_outside(nursery: trio.Nursery) -> None:
    server, probe = await _serve(nursery)
    async with open_channel("127.0.0.1", server.port) as channel, trio.open_nursery() as inner:
        replies: list[str] = []

        async def ask() -> None:
            replies.append((await channel.unary_unary(Decode, _request(HOLD))).text)

        inner.start_soon(ask)
        await probe.held_event.wait()
        assert server.statistics()["active_calls"] == 1
        call = probe.held[0]
        call.reply(tei_pb2.DecodeResponse(text="later").SerializeToString())
        call.reply(None, StatusCode.INTERNAL, "a second answer is moot")
    assert replies == ["later"]
    assert probe.ended == [StatusCode.OK]


async def test_an_instance_status_passes_with_the_reply(nursery: trio.Nursery) -> None:
    server, probe = await _serve(nursery)
    async with open_channel("127.0.0.1", server.port) as channel, trio.open_nursery() as inner:

        async def ask() -> None:
            with pytest.raises(GrpcError) as error:
                await channel.unary_unary(Decode, _request(HOLD))
            assert error.value.code == StatusCode.FAILED_PRECONDITION
            assert error.value.message == "not now"

        inner.start_soon(ask)
        await probe.held_event.wait()
        probe.held[0].reply(None, StatusCode.FAILED_PRECONDITION, "not now")
    assert probe.ended == [StatusCode.FAILED_PRECONDITION]


async def test_a_limit_set_by_the_handler_ends_the_call(nursery: trio.Nursery) -> None:
    server, probe = await _serve(nursery)
    async with open_channel("127.0.0.1", server.port) as channel:
        with pytest.raises(GrpcError) as error, trio.fail_after(5):
            await channel.unary_unary(Decode, _request(LIMIT))
        assert error.value.code == StatusCode.DEADLINE_EXCEEDED
        assert error.value.message == "the probe's own limit"
    assert probe.ended == [StatusCode.DEADLINE_EXCEEDED]
    assert server.statistics()["active_calls"] == 0


async def test_client_deadline_ends_the_call(nursery: trio.Nursery) -> None:
    server, probe = await _serve(nursery)

    def call(channel: grpc.Channel) -> grpc.StatusCode:
        stub = channel.unary_unary(
            Decode.path,
            request_serializer=tei_pb2.DecodeRequest.SerializeToString,
            response_deserializer=tei_pb2.DecodeResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as error:
            stub(_request(HOLD), timeout=0.3)
        code: grpc.StatusCode = error.value.code()
        return code

    assert await _grpcio(server.port, call) == grpc.StatusCode.DEADLINE_EXCEEDED
    with trio.fail_after(5):
        await probe.ended_event.wait()
    # The server's own deadline, or the client's reset: whichever came first.
    assert probe.ended[0] in (StatusCode.DEADLINE_EXCEEDED, StatusCode.CANCELLED)
    assert server.statistics()["active_calls"] == 0


async def test_client_cancellation_ends_the_call(nursery: trio.Nursery) -> None:
    server, probe = await _serve(nursery)
    async with open_channel("127.0.0.1", server.port) as channel:
        async with trio.open_nursery() as inner:
            inner.start_soon(channel.unary_unary, Decode, _request(HOLD))
            await probe.held_event.wait()
            inner.cancel_scope.cancel()
        with trio.fail_after(5):
            await probe.ended_event.wait()
        assert probe.ended == [StatusCode.CANCELLED]
        # The call is gone: answering it now does nothing, and the connection is fine.
        probe.held[0].reply(tei_pb2.DecodeResponse(text="too late").SerializeToString())
        assert (await channel.unary_unary(Decode, _request(6))).text == "fast 6"
    assert probe.ended == [StatusCode.CANCELLED, StatusCode.OK]
    assert server.statistics()["active_calls"] == 0


async def test_lost_connection_ends_the_call(nursery: trio.Nursery) -> None:
    server, probe = await _serve(nursery)

    async def ask(channel: Channel) -> None:
        with pytest.raises(GrpcError):
            await channel.unary_unary(Decode, _request(HOLD))

    async with open_channel("127.0.0.1", server.port) as channel, trio.open_nursery() as inner:
        inner.start_soon(ask, channel)
        await probe.held_event.wait()
        channel.close()
    with trio.fail_after(5):
        await probe.ended_event.wait()
    assert probe.ended == [StatusCode.CANCELLED]
    assert server.statistics()["active_calls"] == 0


async def test_handler_crash_is_internal_with_a_clean_message(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    server, probe = await _serve(nursery)
    async with open_channel("127.0.0.1", server.port) as channel:
        with pytest.raises(GrpcError) as error:
            await channel.unary_unary(Decode, _request(CRASH))
    assert error.value.code == StatusCode.INTERNAL
    assert "secret" not in error.value.message
    assert "secret internal detail" in caplog.text
    assert probe.ended == [StatusCode.INTERNAL]


async def test_reply_larger_than_the_clients_window(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # grpcio starts streams with a 64 KiB window: the rest waits for its updates.
    server, probe = await _serve(nursery)
    slow = FastCall._reply_slowly
    waited: list[int] = []

    async def counted(self: FastCall, data: bytes, code: StatusCode, message: str) -> None:
        waited.append(len(data))
        await slow(self, data, code, message)

    monkeypatch.setattr(FastCall, "_reply_slowly", counted)
    size = 3 * 1024 * 1024

    def call(channel: grpc.Channel) -> int:
        stub = channel.unary_unary(
            Decode.path,
            request_serializer=tei_pb2.DecodeRequest.SerializeToString,
            response_deserializer=tei_pb2.DecodeResponse.FromString,
        )
        return len(stub(_request(BIG, size), timeout=10).text)

    options = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 8 << 20)]
    assert await _grpcio(server.port, call, options=options) == size
    assert waited and waited[0] > size
    assert probe.ended == [StatusCode.OK]


async def test_reply_over_the_size_limit_is_resource_exhausted(nursery: trio.Nursery) -> None:
    server, probe = await _serve(nursery, max_message_bytes=1024)
    async with open_channel("127.0.0.1", server.port) as channel:
        with pytest.raises(GrpcError) as error:
            await channel.unary_unary(Decode, _request(BIG, 4096))
        assert error.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert (await channel.unary_unary(Decode, _request(6))).text == "fast 6"
    assert probe.ended == [StatusCode.RESOURCE_EXHAUSTED, StatusCode.OK]


async def test_graceful_shutdown_waits_for_a_held_call(nursery: trio.Nursery) -> None:
    server, probe = await _serve(nursery)
    replies: list[str] = []
    async with open_channel("127.0.0.1", server.port) as channel:

        async def ask() -> None:
            replies.append((await channel.unary_unary(Decode, _request(HOLD))).text)

        async with trio.open_nursery() as inner:
            inner.start_soon(ask)
            await probe.held_event.wait()
            server.shutdown(grace=5)
            await trio.sleep(0.1)
            probe.held[0].reply(tei_pb2.DecodeResponse(text="drained").SerializeToString())
    assert replies == ["drained"]
