"""Our gRPC server's guarantees (see its module docstring): one test per trap.

Each test drives the real server over real sockets, mostly with the official
grpcio client (run in a thread) so the behaviour is what grpcio users see.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
import trio
from hyperframe.frame import WindowUpdateFrame

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.grpc.calls import CallContext
from tei_manager.grpc.channel import Channel, client_ssl_context, open_channel
from tei_manager.grpc.rpc import GrpcError, StatusCode
from tei_manager.grpc.server import GrpcServer, server_ssl_context
from tests.tls import make_pki

SLEEP_FOREVER = 777
CRASH = 666
SLOW = 555
PUSH_BACK = 444


class Probe(tei_grpc.TokenizeServicer):
    """A servicer whose behaviour the tests steer through the request's ids."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.cancelled = trio.Event()
        self.deadlines: list[float | None] = []

    async def Decode(
        self, request: tei_pb2.DecodeRequest, context: CallContext
    ) -> tei_pb2.DecodeResponse:
        self.deadlines.append(context.time_remaining())
        if list(request.ids) == [CRASH]:
            raise RuntimeError("secret internal detail")
        if list(request.ids) == [PUSH_BACK]:
            raise GrpcError(StatusCode.RESOURCE_EXHAUSTED, "full", retry_pushback_ms=1500)
        if list(request.ids) == [SLOW]:
            self.started.set()
            await trio.sleep(0.3)
        if list(request.ids) == [SLEEP_FOREVER]:
            self.started.set()
            try:
                await trio.sleep_forever()
            finally:
                self.cancelled.set()
        return tei_pb2.DecodeResponse(text=" ".join(map(str, request.ids)))

    async def DecodeStream(
        self, requests: AsyncIterator[tei_pb2.DecodeRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.DecodeResponse]:
        async for request in requests:
            yield await self.Decode(request, context)

    async def Tokenize(
        self, request: tei_pb2.EncodeRequest, context: CallContext
    ) -> tei_pb2.EncodeResponse:
        cert = context.peer_certificate or b""
        return tei_pb2.EncodeResponse(
            tokens=[tei_pb2.SimpleToken(text=hashlib.sha256(cert).hexdigest())]
        )


async def _serve(nursery: trio.Nursery, **kwargs: Any) -> tuple[GrpcServer, Probe]:
    probe = Probe()
    server = GrpcServer([probe], **kwargs)
    await nursery.start(server.run)
    return server, probe


def _decode_stub(channel: grpc.Channel) -> Callable[..., Any]:
    return channel.unary_unary(
        "/tei.v1.Tokenize/Decode",
        request_serializer=tei_pb2.DecodeRequest.SerializeToString,
        response_deserializer=tei_pb2.DecodeResponse.FromString,
    )


async def _grpcio(port: int, fn: Callable[[grpc.Channel], Any], **channel_kwargs: Any) -> Any:
    def work() -> Any:
        creds = channel_kwargs.pop("credentials", None)
        target = f"127.0.0.1:{port}"
        ch = (
            grpc.secure_channel(target, creds, **channel_kwargs)
            if creds
            else grpc.insecure_channel(target, **channel_kwargs)
        )
        with ch:
            return fn(ch)

    return await trio.to_thread.run_sync(work)


async def test_grpcio_unary_and_stream(nursery: trio.Nursery) -> None:
    server, _ = await _serve(nursery)

    def calls(ch: grpc.Channel) -> tuple[str, list[str]]:
        one = _decode_stub(ch)(tei_pb2.DecodeRequest(ids=[1, 2]), timeout=10).text
        stream = ch.stream_stream(
            "/tei.v1.Tokenize/DecodeStream",
            request_serializer=tei_pb2.DecodeRequest.SerializeToString,
            response_deserializer=tei_pb2.DecodeResponse.FromString,
        )
        many = [r.text for r in stream(iter([tei_pb2.DecodeRequest(ids=[i]) for i in range(5)]))]
        return one, many

    one, many = await _grpcio(server.port, calls)
    assert one == "1 2"
    assert many == ["0", "1", "2", "3", "4"]


async def test_a_handler_can_ask_the_client_to_retry_later(nursery: trio.Nursery) -> None:
    server, _ = await _serve(nursery)

    def call(ch: grpc.Channel) -> tuple[grpc.StatusCode, dict[str, str]]:
        try:
            _decode_stub(ch)(tei_pb2.DecodeRequest(ids=[PUSH_BACK]), timeout=10)
        except grpc.RpcError as error:
            trailers = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
            return error.code(), trailers  # type: ignore[attr-defined]
        return grpc.StatusCode.OK, {}

    code, trailers = await _grpcio(server.port, call)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert trailers["grpc-retry-pushback-ms"] == "1500"


async def test_unknown_method_is_unimplemented(nursery: trio.Nursery) -> None:
    server, _ = await _serve(nursery)
    async with open_channel("127.0.0.1", server.port) as channel:
        with pytest.raises(GrpcError) as info:
            await channel.unary_unary(tei_grpc.Info.Info, tei_pb2.InfoRequest())
    assert info.value.code == StatusCode.UNIMPLEMENTED


async def test_tls_advertises_alpn_h2_for_grpcio(nursery: trio.Nursery, tmp_path: Path) -> None:
    """grpcio refuses a TLS server that does not negotiate ALPN h2."""
    pki = make_pki(tmp_path)
    context = server_ssl_context(str(pki.server_cert), str(pki.server_key))
    server, _ = await _serve(nursery, ssl_context=context)
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    text = await _grpcio(
        server.port,
        lambda ch: _decode_stub(ch)(tei_pb2.DecodeRequest(ids=[7]), timeout=10).text,
        credentials=creds,
    )
    assert text == "7"


async def test_peer_certificate_reaches_the_handler(nursery: trio.Nursery, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    context = server_ssl_context(str(pki.server_cert), str(pki.server_key), client_ca=str(pki.ca))
    server, _ = await _serve(nursery, ssl_context=context)
    client = client_ssl_context(
        str(pki.ca), certfile=str(pki.client_cert), keyfile=str(pki.client_key)
    )
    channel = Channel("127.0.0.1", server.port, ssl_context=client)
    async with trio.open_nursery() as inner:
        await inner.start(channel.run)
        reply = await channel.unary_unary(tei_grpc.Tokenize.Tokenize, tei_pb2.EncodeRequest())
        channel.close()
    der = ssl.PEM_cert_to_DER_cert(pki.client_cert.read_text())
    assert reply.tokens[0].text == hashlib.sha256(der).hexdigest()


async def test_oversized_message_fails_only_that_call(nursery: trio.Nursery) -> None:
    server, _ = await _serve(nursery, max_message_bytes=1024)

    def calls(ch: grpc.Channel) -> tuple[grpc.StatusCode, str, str]:
        stub = _decode_stub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub(tei_pb2.DecodeRequest(ids=list(range(2000))), timeout=10)
        # The same connection still serves the next call.
        after = stub(tei_pb2.DecodeRequest(ids=[3]), timeout=10).text
        return info.value.code(), info.value.details(), after

    code, details, after = await _grpcio(server.port, calls)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1024" in details
    assert after == "3"


async def test_client_cancellation_cancels_the_handler(nursery: trio.Nursery) -> None:
    server, probe = await _serve(nursery)
    async with open_channel("127.0.0.1", server.port) as channel:
        async with trio.open_nursery() as calls:
            calls.start_soon(
                channel.unary_unary,
                tei_grpc.Tokenize.Decode,
                tei_pb2.DecodeRequest(ids=[SLEEP_FOREVER]),
            )
            await probe.started.wait()
            calls.cancel_scope.cancel()
        with trio.fail_after(5):
            await probe.cancelled.wait()


async def test_grpc_timeout_cancels_the_handler(nursery: trio.Nursery) -> None:
    server, probe = await _serve(nursery)

    def call(ch: grpc.Channel) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as info:
            _decode_stub(ch)(tei_pb2.DecodeRequest(ids=[SLEEP_FOREVER]), timeout=0.3)
        return info.value.code()

    assert await _grpcio(server.port, call) == grpc.StatusCode.DEADLINE_EXCEEDED
    with trio.fail_after(5):
        await probe.cancelled.wait()
    # grpcio rounds the timeout it sends up to its wire resolution, so the server may
    # see a hair over the 0.3 s the client asked for.
    assert probe.deadlines[0] is not None and 0 < probe.deadlines[0] <= 0.31


async def test_trio_deadline_propagates_as_grpc_timeout(nursery: trio.Nursery) -> None:
    server, probe = await _serve(nursery)
    async with open_channel("127.0.0.1", server.port) as channel:
        with trio.move_on_after(5):
            await channel.unary_unary(tei_grpc.Tokenize.Decode, tei_pb2.DecodeRequest(ids=[1]))
    assert probe.deadlines[0] is not None and 4 < probe.deadlines[0] <= 5


async def test_window_update_on_closed_stream_keeps_connection(nursery: trio.Nursery) -> None:
    """RFC 9113 §5.1: WINDOW_UPDATE after END_STREAM is ignored, not a connection error."""
    server, _ = await _serve(nursery)
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    client.initiate_connection()
    request = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", tei_grpc.Tokenize.Decode.path),
        (":authority", "test"),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
    ]
    body = tei_pb2.DecodeRequest(ids=[1]).SerializeToString()
    message = struct.pack(">BL", 0, len(body)) + body
    seen: list[Any] = []
    sock = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with sock:
        for stream_id in (1, 3):
            client.send_headers(stream_id, request)
            client.send_data(stream_id, message, end_stream=True)
            await sock.send_all(client.data_to_send())
            ended = False
            with trio.fail_after(5):
                while not ended:
                    events = client.receive_data(await sock.receive_some())
                    seen += events
                    ended = any(isinstance(e, h2.events.StreamEnded) for e in events)
            await sock.send_all(client.data_to_send())
            if stream_id == 1:  # the stream is closed: a late WINDOW_UPDATE for it
                await sock.send_all(WindowUpdateFrame(1, window_increment=1000).serialize())
    # Stream 3 was answered on the same connection, and no GOAWAY came.
    assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in seen)


async def test_handler_exception_is_internal_with_clean_message(nursery: trio.Nursery) -> None:
    server, _ = await _serve(nursery)

    def call(ch: grpc.Channel) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as info:
            _decode_stub(ch)(tei_pb2.DecodeRequest(ids=[CRASH]), timeout=10)
        return info.value.code(), info.value.details()

    code, details = await _grpcio(server.port, call)
    assert code == grpc.StatusCode.INTERNAL
    assert details == "internal error while handling /tei.v1.Tokenize/Decode"
    assert "secret" not in details and "Traceback" not in details


async def test_shutdown_with_calls_in_flight_logs_no_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with trio.open_nursery() as nursery:
        server, probe = await _serve(nursery)
        async with open_channel("127.0.0.1", server.port) as channel:
            nursery.start_soon(
                channel.unary_unary,
                tei_grpc.Tokenize.Decode,
                tei_pb2.DecodeRequest(ids=[SLEEP_FOREVER]),
            )
            await probe.started.wait()
            nursery.cancel_scope.cancel()
    assert probe.cancelled.is_set()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_graceful_shutdown_finishes_running_calls(nursery: trio.Nursery) -> None:
    server, probe = await _serve(nursery)
    results: list[str] = []
    async with open_channel("127.0.0.1", server.port) as channel:

        async def slow_call() -> None:
            method = tei_grpc.Tokenize.Decode
            reply = await channel.unary_unary(method, tei_pb2.DecodeRequest(ids=[SLOW]))
            results.append(reply.text)

        async with trio.open_nursery() as calls:
            calls.start_soon(slow_call)
            await probe.started.wait()
            server.shutdown(grace=5)
            await trio.sleep(0.05)
            with pytest.raises(GrpcError) as info:
                await channel.unary_unary(tei_grpc.Tokenize.Decode, tei_pb2.DecodeRequest(ids=[6]))
    assert info.value.code == StatusCode.UNAVAILABLE
    assert results == [str(SLOW)]


async def test_port_is_not_shared_with_reuse_port(nursery: trio.Nursery) -> None:
    server, _ = await _serve(nursery)
    second = GrpcServer([Probe()], port=server.port)
    with pytest.raises(OSError):
        await nursery.start(second.run)
    # And what SO_REUSEPORT on our listener would allow: a second socket binding it.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    with pytest.raises(OSError):
        sock.bind(("127.0.0.1", server.port))
    sock.close()


async def test_a_call_is_counted_before_its_client_sees_the_answer(
    nursery: trio.Nursery,
) -> None:
    """Metrics scraped right after a reply include that call."""
    observed = threading.Event()

    def on_call(spec: Any, seconds: float, code: StatusCode) -> None:
        time.sleep(0.2)  # holds the server's loop: an answer already sent would arrive now
        observed.set()

    server, _ = await _serve(nursery, on_call=on_call)

    def call(ch: grpc.Channel) -> bool:
        _decode_stub(ch)(tei_pb2.DecodeRequest(ids=[1]), timeout=10)
        return observed.is_set()

    assert await _grpcio(server.port, call)


async def test_an_authorizer_that_raises_fails_only_that_call(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    def authorize(context: CallContext) -> None:
        if context.metadata_value("x-crash") is not None:
            raise ValueError("secret detail")

    server, _ = await _serve(nursery, authorize=authorize)
    async with open_channel("127.0.0.1", server.port) as channel:
        with pytest.raises(GrpcError) as info:
            await channel.unary_unary(
                tei_grpc.Tokenize.Decode,
                tei_pb2.DecodeRequest(ids=[1]),
                metadata=[("x-crash", "1")],
            )
        assert info.value.code == StatusCode.INTERNAL
        assert "secret" not in info.value.message
        # The connection and the server live on.
        reply = await channel.unary_unary(tei_grpc.Tokenize.Decode, tei_pb2.DecodeRequest(ids=[2]))
    assert reply.text == "2"
    assert "secret detail" in caplog.text
