"""``tei-manager bench`` against a small in-process TeiMultiplexer over real sockets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from tei_manager import cli
from tei_manager._proto.tei.v1 import tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tei_manager.bench import BenchConfig, make_text, parse_endpoint, percentile, run_bench
from tei_manager.grpc.calls import CallContext, CallRefusal
from tei_manager.grpc.rpc import GrpcError, StatusCode
from tei_manager.grpc.server import GrpcServer, server_ssl_context
from tei_manager.multiplexer import arrow
from tests.tls import make_pki

DIM = 4


def text_index(text: str) -> int:
    found = re.match(r"text (\d+):", text)
    assert found, text
    return int(found.group(1))


def embedding(text: str) -> list[float]:
    return [float(text_index(text)), float(len(text)), 1.0, 0.5][:DIM]


class FakeMultiplexer(multiplexer_grpc.TeiMultiplexerServicer):
    """A multiplexer in front of one deterministic 4-wide model.

    The instance name steers it: "ok" answers, "down" fails every call, "flaky" fails
    texts whose index is a multiple of 4, "short" answers one embedding too few,
    "slow" never answers.
    """

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.calls: dict[str, int] = {}
        self.stream_targets: list[bool] = []

    def _admit(self, method: str, target: multiplexer_pb2.Target, texts: list[str]) -> str:
        self.calls[method] = self.calls.get(method, 0) + 1
        name = target.instance_name
        if name == "down":
            raise GrpcError(StatusCode.UNAVAILABLE, "instance 'down' is not running")
        if name == "flaky" and any(text_index(t) % 4 == 0 for t in texts):
            raise GrpcError(StatusCode.RESOURCE_EXHAUSTED, "overloaded")
        if name not in {"ok", "flaky", "short", "slow"}:
            raise GrpcError(StatusCode.NOT_FOUND, f"instance {name!r} not found")
        self.texts += texts
        return name

    async def Embed(
        self, request: multiplexer_pb2.EmbedRequest, context: CallContext
    ) -> tei_pb2.EmbedResponse:
        name = self._admit("Embed", request.target, [request.request.inputs])
        if name == "slow":
            await trio.sleep_forever()
        if name == "short":
            return tei_pb2.EmbedResponse()
        return tei_pb2.EmbedResponse(embeddings=embedding(request.request.inputs))

    async def EmbedSparse(
        self, request: multiplexer_pb2.EmbedSparseRequest, context: CallContext
    ) -> tei_pb2.EmbedSparseResponse:
        self._admit("EmbedSparse", request.target, [request.request.inputs])
        value = tei_pb2.SparseValue(index=text_index(request.request.inputs), value=1.0)
        return tei_pb2.EmbedSparseResponse(sparse_embeddings=[value])

    async def EmbedStream(
        self, requests: AsyncIterator[multiplexer_pb2.EmbedRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.EmbedResponse]:
        target: multiplexer_pb2.Target | None = None
        count = 0
        async for request in requests:
            if target is None:
                target = request.target
            self.stream_targets.append(request.HasField("target"))
            name = self._admit("EmbedStream", target, [request.request.inputs])
            count += 1
            if name == "short" and count == 1:
                continue
            yield tei_pb2.EmbedResponse(embeddings=embedding(request.request.inputs))

    async def EmbedSparseStream(
        self, requests: AsyncIterator[multiplexer_pb2.EmbedSparseRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.EmbedSparseResponse]:
        target: multiplexer_pb2.Target | None = None
        async for request in requests:
            target = target or request.target
            self._admit("EmbedSparseStream", target, [request.request.inputs])
            yield tei_pb2.EmbedSparseResponse()

    async def EmbedArrow(
        self, request: multiplexer_pb2.EmbedArrowRequest, context: CallContext
    ) -> multiplexer_pb2.EmbedArrowResponse:
        column = _read(request.arrow_ipc)
        if request.noop:
            self.calls["noop"] = self.calls.get("noop", 0) + 1
            return multiplexer_pb2.EmbedArrowResponse(arrow_ipc=arrow.noop_dense(column))
        name = self._admit("EmbedArrow", request.target, column.texts)
        texts = column.texts[1:] if name == "short" else column.texts
        if name == "short":
            column = _read(arrow.write_texts(texts))
        rows = [array("f", embedding(t)).tobytes() for t in texts]
        return multiplexer_pb2.EmbedArrowResponse(arrow_ipc=arrow.write_dense(column, rows))

    async def EmbedSparseArrow(
        self, request: multiplexer_pb2.EmbedSparseArrowRequest, context: CallContext
    ) -> multiplexer_pb2.EmbedSparseArrowResponse:
        column = _read(request.arrow_ipc)
        self._admit("EmbedSparseArrow", request.target, column.texts)
        rows: list[arrow.SparseRow] = [([text_index(t)], [1.0]) for t in column.texts]
        return multiplexer_pb2.EmbedSparseArrowResponse(arrow_ipc=arrow.write_sparse(column, rows))


def _read(ipc: bytes) -> arrow.TextColumn:
    try:
        return arrow.read_texts(ipc)
    except arrow.ArrowInputError as error:
        raise GrpcError(StatusCode.INVALID_ARGUMENT, error.message) from None


async def serve(nursery: trio.Nursery, **kwargs: Any) -> tuple[FakeMultiplexer, int]:
    fake = FakeMultiplexer()
    port: int = await nursery.start(GrpcServer([fake], **kwargs).run)
    return fake, port


def config(port: int, **fields: Any) -> BenchConfig:
    fields.setdefault("target_kind", "instance_name")
    fields.setdefault("target_value", "ok")
    return BenchConfig(host="127.0.0.1", port=port, timeout_secs=10.0, **fields)


def replace(cfg: BenchConfig, **changes: Any) -> BenchConfig:
    return msgspec.structs.replace(cfg, **changes)


def all_texts(count: int, length: int = 64) -> list[str]:
    return [make_text(i, length) for i in range(count)]


# -- modes -----------------------------------------------------------------------
async def test_standard_mode_sends_each_text_once(nursery: trio.Nursery) -> None:
    fake, port = await serve(nursery)
    report = await run_bench(config(port, mode="standard", num_texts=25, concurrency=4))
    assert sorted(fake.texts) == sorted(all_texts(25))
    assert fake.calls == {"Embed": 25}
    assert report.mode == "standard"
    assert report.target == {"instance_name": "ok"}
    assert (report.num_texts, report.batch_size, report.num_requests) == (25, 1, 25)
    assert (report.successful, report.failed, report.successful_texts) == (25, 0, 25)
    assert report.errors == []
    assert report.total_duration_secs > 0
    assert report.throughput_per_sec == pytest.approx(25 / report.total_duration_secs, rel=1e-3)
    latency = report.latency_ms
    assert latency is not None
    assert 0 < latency.p50 <= latency.p95 <= latency.p99 <= latency.max


async def test_stream_mode_batches_per_stream(nursery: trio.Nursery) -> None:
    fake, port = await serve(nursery)
    report = await run_bench(config(port, mode="stream", num_texts=23, batch_size=5))
    assert sorted(fake.texts) == sorted(all_texts(23))
    assert fake.calls == {"EmbedStream": 23}
    # 5 streams: 5+5+5+5+3 messages; only each stream's first message carries the target.
    assert (report.num_requests, report.successful, report.failed) == (5, 5, 0)
    assert report.batch_size == 5
    assert report.successful_texts == 23
    assert fake.stream_targets.count(True) == 5


async def test_arrow_mode(nursery: trio.Nursery) -> None:
    fake, port = await serve(nursery)
    report = await run_bench(
        config(port, mode="arrow", num_texts=100, batch_size=32, concurrency=2, text_length=20)
    )
    assert sorted(fake.texts) == sorted(all_texts(100, 20))
    assert fake.calls == {"EmbedArrow": 4}
    assert (report.num_requests, report.successful, report.failed) == (4, 4, 0)
    assert report.successful_texts == 100


async def test_arrow_noop_touches_no_instance(nursery: trio.Nursery) -> None:
    fake, port = await serve(nursery)
    report = await run_bench(config(port, mode="arrow", num_texts=10, batch_size=4, noop=True))
    assert fake.calls == {"noop": 3}
    assert fake.texts == []
    assert (report.successful, report.failed) == (3, 0)


@pytest.mark.parametrize(
    ("mode", "method", "requests"),
    [
        ("standard", "EmbedSparse", 7),
        ("stream", "EmbedSparseStream", 3),
        ("arrow", "EmbedSparseArrow", 3),
    ],
)
async def test_sparse_twins(nursery: trio.Nursery, mode: str, method: str, requests: int) -> None:
    fake, port = await serve(nursery)
    report = await run_bench(config(port, mode=mode, num_texts=7, batch_size=3, sparse=True))
    assert set(fake.calls) == {method}
    assert (report.num_requests, report.successful, report.failed) == (requests, requests, 0)
    assert report.sparse


async def test_other_targets_are_sent(nursery: trio.Nursery) -> None:
    _, port = await serve(nursery)
    report = await run_bench(
        config(port, target_kind="instance_index", target_value=3, num_texts=5)
    )
    assert report.target == {"instance_index": 3}
    assert report.failed == report.num_requests == 5
    assert report.errors == ["NOT_FOUND: instance '' not found"]


# -- failures --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "requests", "failed"),
    [("standard", 20, 5), ("stream", 5, 5), ("arrow", 3, 3)],
)
async def test_server_errors_are_counted(
    nursery: trio.Nursery, mode: str, requests: int, failed: int
) -> None:
    _, port = await serve(nursery)
    report = await run_bench(
        config(
            port,
            target_value="flaky",
            mode=mode,
            num_texts=20,
            batch_size=4 if mode == "stream" else 8,
        )
    )
    assert report.num_requests == requests
    assert (report.successful, report.failed) == (requests - failed, failed)
    assert report.successful_texts == 20 - (5 if mode == "standard" else 20)
    assert report.errors == ["RESOURCE_EXHAUSTED: overloaded"]


async def test_every_request_failing(nursery: trio.Nursery) -> None:
    _, port = await serve(nursery)
    report = await run_bench(config(port, target_value="down", mode="arrow", num_texts=9))
    assert (report.num_requests, report.successful, report.failed) == (1, 0, 1)
    assert report.latency_ms is None
    assert report.throughput_per_sec == 0
    assert report.errors == ["UNAVAILABLE: instance 'down' is not running"]


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("standard", "bad answer: an empty embedding"),
        ("stream", "bad answer: 2 replies to a stream of 3 texts"),
        ("arrow", "bad answer: 2 rows for 3 texts"),
    ],
)
async def test_answers_that_do_not_fit_count_as_failures(
    nursery: trio.Nursery, mode: str, error: str
) -> None:
    _, port = await serve(nursery)
    report = await run_bench(
        config(port, target_value="short", mode=mode, num_texts=3, batch_size=3)
    )
    assert report.successful == 0
    assert report.failed == report.num_requests
    assert report.errors == [error]


async def test_timeouts_count_as_failures(nursery: trio.Nursery) -> None:
    _, port = await serve(nursery)
    slow = config(port, target_value="slow", num_texts=3, concurrency=3)
    report = await run_bench(replace(slow, timeout_secs=0.2))
    assert (report.successful, report.failed) == (0, 3)
    assert report.errors[0].startswith("DEADLINE_EXCEEDED")


async def test_no_server_fails_every_request() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        report = await run_bench(config(port, mode="stream", num_texts=10, batch_size=5))
    assert (report.num_requests, report.successful, report.failed) == (2, 0, 2)
    assert report.errors[0].startswith("UNAVAILABLE: cannot connect to 127.0.0.1:")


# -- TLS -------------------------------------------------------------------------
async def test_mutual_tls(nursery: trio.Nursery, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    context = server_ssl_context(str(pki.server_cert), str(pki.server_key), client_ca=str(pki.ca))
    _, port = await serve(nursery, ssl_context=context)
    mtls = config(
        port,
        num_texts=5,
        tls_ca=str(pki.ca),
        tls_cert=str(pki.client_cert),
        tls_key=str(pki.client_key),
    )
    assert (await run_bench(mtls)).successful == 5
    # Without the client certificate the server ends the connection (with TLS 1.3
    # the client's side of the handshake completes first).
    no_cert = replace(mtls, tls_cert=None, tls_key=None)
    report = await run_bench(no_cert)
    assert (report.successful, report.failed) == (0, 5)
    assert report.errors[0].startswith("UNAVAILABLE: ")


async def test_tls_server_name(nursery: trio.Nursery, tmp_path: Path) -> None:
    # The server certificate is for "localhost" (its common name) and 127.0.0.1.
    pki = make_pki(tmp_path)
    context = server_ssl_context(str(pki.server_cert), str(pki.server_key))
    _, port = await serve(nursery, ssl_context=context)
    by_ip = config(port, num_texts=3, tls_ca=str(pki.ca))
    assert (await run_bench(by_ip)).successful == 3
    wrong = await run_bench(replace(by_ip, tls_server_name="elsewhere.example"))
    assert (wrong.successful, wrong.failed) == (0, 3)
    assert "certificate verify failed" in wrong.errors[0]
    named = await run_bench(replace(by_ip, tls_server_name="localhost"))
    assert (named.successful, named.failed) == (3, 0)


def require_key(key: str) -> Any:
    """A server-side authorizer wanting ``authorization: Bearer <key>``."""

    def authorize(context: CallContext) -> CallRefusal | None:
        if context.metadata_value("authorization") == f"Bearer {key}":
            return None
        return CallRefusal(StatusCode.UNAUTHENTICATED, "the API key is not valid")

    return authorize


@pytest.mark.parametrize("mode", ["standard", "stream", "arrow"])
async def test_api_key(nursery: trio.Nursery, mode: str) -> None:
    _, port = await serve(nursery, authorize=require_key("s3cret"))
    keyed = config(port, mode=mode, num_texts=4, batch_size=2, api_key="s3cret")
    assert (await run_bench(keyed)).successful == keyed.num_texts // (
        1 if mode == "standard" else 2
    )
    refused = await run_bench(replace(keyed, api_key=None))
    assert refused.successful == 0
    assert refused.errors == ["UNAUTHENTICATED: the API key is not valid"]


# -- command line ----------------------------------------------------------------
async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "tei_manager.cli", "bench", *args]
    return await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)


async def test_cli_prints_one_json_report(nursery: trio.Nursery, tmp_path: Path) -> None:
    _, port = await serve(nursery)
    out = tmp_path / "report.json"
    ok = await run_cli(
        "--endpoint", f"127.0.0.1:{port}", "--instance", "ok", "--mode", "arrow",
        "--num-texts", "50", "--batch-size", "20", "--json-output", str(out),
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert json.loads(out.read_text()) == report
    assert report["mode"] == "arrow"
    assert report["target"] == {"instance_name": "ok"}
    assert (report["num_texts"], report["batch_size"], report["num_requests"]) == (50, 20, 3)
    assert (report["successful"], report["failed"]) == (3, 0)
    assert set(report["latency_ms"]) == {"p50", "p95", "p99", "mean", "max"}
    assert report["throughput_per_sec"] > 0

    failing = await run_cli(
        "--endpoint", f"127.0.0.1:{port}", "--model", "m", "--num-texts", "3"
    )  # fmt: skip
    assert failing.returncode == 1
    report = json.loads(failing.stdout)
    assert report["target"] == {"model_id": "m"}
    assert report["failed"] == 3
    assert report["errors"] == ["NOT_FOUND: instance '' not found"]


async def test_cli_api_key_from_flag_or_environment(nursery: trio.Nursery) -> None:
    _, port = await serve(nursery, authorize=require_key("s3cret"))
    common = ("--endpoint", f"127.0.0.1:{port}", "--instance", "ok", "--num-texts", "2")
    flag = await run_cli(*common, "--api-key", "s3cret")
    assert flag.returncode == 0, flag.stderr
    assert b"s3cret" not in flag.stdout
    command = [sys.executable, "-m", "tei_manager.cli", "bench", *common]
    env = {**os.environ, "TEI_MANAGER_API_KEY": "s3cret"}
    from_env = await trio.run_process(command, capture_stdout=True, env=env, check=False)
    assert from_env.returncode == 0
    assert (await run_cli(*common)).returncode == 1


def test_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--endpoint", "--instance", "--model", "--index", "--mode", "--num-texts",
                   "--batch-size", "--concurrency", "--timeout", "--tls-ca", "--tls-cert",
                   "--tls-key", "--tls-server-name", "--api-key", "--json-output"):  # fmt: skip
        assert option in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "stream"], "one of the arguments --instance --model --index is required"),
        (["--instance", "a", "--model", "b"], "not allowed with argument"),
        (["--instance", "a", "--concurrency", "0"], "must be a positive integer"),
        (["--instance", "a", "--mode", "bulk"], "invalid choice"),
        (["--index", "-1"], "must be an instance index"),
        (["--instance", "a", "--timeout", "inf"], "positive number of seconds"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--endpoint", "nohost"], "--endpoint must be HOST:PORT"),
        (["--endpoint", "h:99999"], "--endpoint must be HOST:PORT"),
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--noop"], "--noop applies to --mode arrow only"),
        (["--tls-ca", "/nonexistent/ca.pem"], "No such file"),
    ],
)
def test_bad_combinations_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert cli.main(["bench", "--instance", "a", *args]) == 2
    assert message in capsys.readouterr().err


# -- pure helpers ----------------------------------------------------------------
def test_parse_endpoint() -> None:
    assert parse_endpoint("localhost:9001") == ("localhost", 9001, False)
    assert parse_endpoint("[::1]:9001") == ("::1", 9001, False)
    assert parse_endpoint("https://mux.example:443/") == ("mux.example", 443, True)
    assert parse_endpoint("http://10.0.0.1:80") == ("10.0.0.1", 80, False)


def test_texts_are_deterministic_distinct_and_sized() -> None:
    texts = all_texts(500, 40)
    assert texts == all_texts(500, 40)
    assert len(set(texts)) == 500
    assert {len(t) for t in texts} == {40}
    assert make_text(7, 3) == "tex"


def test_percentile_interpolates() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == pytest.approx(50.5)
    assert percentile(values, 0.99) == pytest.approx(99.01)
    assert percentile([4.0], 0.95) == 4.0
    with pytest.raises(ValueError):
        percentile([], 0.5)
