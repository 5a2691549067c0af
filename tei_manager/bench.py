"""``tei-manager bench``: load a TeiMultiplexer endpoint and report what it sustained.

Three ways to send ``num_texts`` generated texts, ``concurrency`` requests at a time:

- ``standard``: one text per unary ``Embed`` call;
- ``stream``: ``EmbedStream`` calls of ``batch_size`` messages each;
- ``arrow``: ``EmbedArrow`` calls carrying ``batch_size`` texts each.

The report is one JSON object: counts, wall time, texts per second and per-request
latency percentiles. A request counts as failed when the call fails or times out, or
when its answer does not have one embedding per text.
"""

from __future__ import annotations

import argparse
import math
import os
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal

import msgspec
import trio

from tei_manager._proto.tei.v1 import tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tei_manager.grpc.channel import Channel, client_ssl_context
from tei_manager.grpc.rpc import GrpcError, MethodSpec

Mode = Literal["standard", "stream", "arrow"]
TargetKind = Literal["instance_name", "model_id", "instance_index"]

_MUX = multiplexer_grpc.TeiMultiplexer
#: How many distinct error messages a report keeps.
MAX_ERRORS = 5
#: Where ``--api-key`` is read from when the flag is absent.
API_KEY_ENV = "TEI_MANAGER_API_KEY"

_WORDS = (
    "the quick brown fox jumps over a lazy dog while every sentence lands in a vector "
    "space where similar meanings sit close together and distant ideas drift apart"
).split()


class BenchConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One benchmark run."""

    host: str = "localhost"
    port: int = 9001
    target_kind: TargetKind
    target_value: str | int
    mode: Mode = "standard"
    num_texts: int = 1000
    batch_size: int = 32
    concurrency: int = 8
    timeout_secs: float = 30.0
    text_length: int = 64
    sparse: bool = False
    noop: bool = False
    truncate: bool = False
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    # Sent as "authorization: Bearer <key>" on every call; never in the report.
    api_key: str | None = msgspec.field(default=None)

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call carries."""
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()


class Latency(msgspec.Struct, frozen=True):
    p50: float
    p95: float
    p99: float
    mean: float
    max: float


class BenchReport(msgspec.Struct, frozen=True):
    """What ``tei-manager bench`` prints."""

    mode: Mode
    endpoint: str
    target: dict[str, str | int]
    sparse: bool
    num_texts: int
    batch_size: int
    concurrency: int
    num_requests: int
    total_duration_secs: float
    throughput_per_sec: float
    successful: int
    failed: int
    successful_texts: int
    latency_ms: Latency | None
    errors: list[str]


class _BadAnswer(Exception):
    """The call succeeded but its answer does not fit the request."""


def make_text(index: int, length: int) -> str:
    """The ``index``-th benchmark text: deterministic, distinct, ``length`` characters."""
    start = index % len(_WORDS)
    words = _WORDS[start:] + _WORDS[:start]
    text = f"text {index}:"
    while len(text) < length:
        text = " ".join([text, *words])
    return text[:length]


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        raise ValueError("no values")
    position = (len(sorted_values) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _latency(seconds: list[float]) -> Latency | None:
    if not seconds:
        return None
    ms = sorted(s * 1000 for s in seconds)
    return Latency(
        p50=round(percentile(ms, 0.50), 3),
        p95=round(percentile(ms, 0.95), 3),
        p99=round(percentile(ms, 0.99), 3),
        mean=round(sum(ms) / len(ms), 3),
        max=round(ms[-1], 3),
    )


def _target(config: BenchConfig) -> multiplexer_pb2.Target:
    value = config.target_value
    if config.target_kind == "instance_index":
        return multiplexer_pb2.Target(instance_index=int(value))
    if config.target_kind == "model_id":
        return multiplexer_pb2.Target(model_id=str(value))
    return multiplexer_pb2.Target(instance_name=str(value))


def _describe(error: BaseException) -> str | None:
    """The message a failed request is reported with; None for what is not a request failure."""
    if isinstance(error, BaseExceptionGroup):
        messages = [_describe(e) for e in error.exceptions]
        if any(m is None for m in messages):
            return None
        return messages[0]
    if isinstance(error, GrpcError | _BadAnswer):
        return str(error)
    return None


class _Run:
    """The state of one run: workers take batches from one shared iterator."""

    def __init__(self, config: BenchConfig, channel: Channel) -> None:
        self.config = config
        self.metadata = config.call_metadata()
        self.channel = channel
        self.latencies: list[float] = []
        self.successful_texts = 0
        self.failed = 0
        self.errors: list[str] = []
        target = _target(config)
        size = 1 if config.mode == "standard" else config.batch_size
        texts = [make_text(i, config.text_length) for i in range(config.num_texts)]
        batches = [texts[i : i + size] for i in range(0, len(texts), size)]
        self.num_requests = len(batches)
        send = {"standard": self._unary, "stream": self._stream, "arrow": self._arrow}
        self._send: Callable[[Any, int], Awaitable[bytes | None]] = send[config.mode]
        # Requests are built before the clock starts: the client's encoding is not
        # what is being measured.
        build = {"standard": _unary_request, "stream": _stream_requests, "arrow": _arrow_request}
        self._work = iter(
            [(build[config.mode](config, target, batch), len(batch)) for batch in batches]
        )

    async def worker(self) -> None:
        for request, count in self._work:
            started = time.perf_counter()
            try:
                with trio.fail_after(self.config.timeout_secs):
                    arrow_answer = await self._send(request, count)
                elapsed = time.perf_counter() - started
                # Decoding the answer is the client's work: checked after the clock stops.
                if arrow_answer is not None:
                    rows = _answer_rows(arrow_answer, sparse=self.config.sparse)
                    if rows != count:
                        raise _BadAnswer(f"bad answer: {rows} rows for {count} texts")
            except trio.TooSlowError:
                self._fail(f"DEADLINE_EXCEEDED: no answer within {self.config.timeout_secs}s")
            except BaseException as error:
                message = _describe(error)
                if message is None:
                    raise
                self._fail(message)
            else:
                self.latencies.append(elapsed)
                self.successful_texts += count

    def _fail(self, message: str) -> None:
        self.failed += 1
        if len(self.errors) < MAX_ERRORS and message not in self.errors:
            self.errors.append(message)

    async def _unary(self, request: Any, count: int) -> None:
        spec: MethodSpec[Any, Any] = _MUX.EmbedSparse if self.config.sparse else _MUX.Embed
        reply = await self.channel.unary_unary(spec, request, metadata=self.metadata)
        if not self.config.sparse and not reply.embeddings:
            raise _BadAnswer("bad answer: an empty embedding")

    async def _stream(self, requests: list[Any], count: int) -> None:
        spec: MethodSpec[Any, Any] = (
            _MUX.EmbedSparseStream if self.config.sparse else _MUX.EmbedStream
        )
        answers = 0
        async with self.channel.open_call(spec, metadata=self.metadata) as call:

            async def send() -> None:
                for request in requests:
                    await call.send(request)
                await call.done_writing()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while await call.receive_raw() is not None:
                    answers += 1
        if answers != count:
            raise _BadAnswer(f"bad answer: {answers} replies to a stream of {count} texts")

    async def _arrow(self, request: Any, count: int) -> bytes:
        spec: MethodSpec[Any, Any] = (
            _MUX.EmbedSparseArrow if self.config.sparse else _MUX.EmbedArrow
        )
        reply = await self.channel.unary_unary(spec, request, metadata=self.metadata)
        answer: bytes = reply.arrow_ipc
        return answer


def _unary_request(config: BenchConfig, target: Any, texts: list[str]) -> Any:
    (text,) = texts
    if config.sparse:
        inner_sparse = tei_pb2.EmbedSparseRequest(inputs=text, truncate=config.truncate)
        return multiplexer_pb2.EmbedSparseRequest(target=target, request=inner_sparse)
    inner = tei_pb2.EmbedRequest(inputs=text, truncate=config.truncate)
    return multiplexer_pb2.EmbedRequest(target=target, request=inner)


def _stream_requests(config: BenchConfig, target: Any, texts: list[str]) -> list[Any]:
    # The first message's target picks the instance; the rest need none.
    requests = [_unary_request(config, target, [text]) for text in texts[:1]]
    requests += [_unary_request(config, None, [text]) for text in texts[1:]]
    return requests


def _arrow_request(config: BenchConfig, target: Any, texts: list[str]) -> Any:
    from tei_manager.multiplexer.arrow import write_texts

    ipc = write_texts(texts)
    if config.sparse:
        return multiplexer_pb2.EmbedSparseArrowRequest(
            target=target, arrow_ipc=ipc, truncate=config.truncate, noop=config.noop
        )
    return multiplexer_pb2.EmbedArrowRequest(
        target=target, arrow_ipc=ipc, truncate=config.truncate, normalize=True, noop=config.noop
    )


def _answer_rows(ipc: bytes, *, sparse: bool) -> int:
    import pyarrow as pa

    from tei_manager.multiplexer.arrow import DENSE_COLUMN, SPARSE_COLUMN

    column = SPARSE_COLUMN if sparse else DENSE_COLUMN
    try:
        table = pa.ipc.open_stream(ipc).read_all()
    except (pa.ArrowException, OSError) as error:
        raise _BadAnswer(f"bad answer: not an Arrow IPC stream: {error}") from None
    if column not in table.schema.names:
        raise _BadAnswer(f"bad answer: no column {column!r} in {table.schema.names}")
    rows: int = table.num_rows
    return rows


def _ssl_context(config: BenchConfig) -> ssl.SSLContext | None:
    if not (config.tls or config.tls_ca or config.tls_cert or config.tls_server_name):
        return None
    return client_ssl_context(config.tls_ca, certfile=config.tls_cert, keyfile=config.tls_key)


async def run_bench(config: BenchConfig, ssl_context: ssl.SSLContext | None = None) -> BenchReport:
    """Run the benchmark against the endpoint and report; failures are counted, not raised."""
    if ssl_context is None:
        ssl_context = _ssl_context(config)
    channel = Channel(
        config.host,
        config.port,
        ssl_context=ssl_context,
        server_hostname=config.tls_server_name,
        connect_timeout=config.timeout_secs,
    )
    run = _Run(config, channel)
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(channel.run)
        except GrpcError as error:
            # Nothing was sent: every planned request failed.
            run.failed = run.num_requests
            run.errors.append(str(error))
        else:
            started = time.perf_counter()
            async with trio.open_nursery() as workers:
                for _ in range(min(config.concurrency, run.num_requests)):
                    workers.start_soon(run.worker)
            channel.close()
    duration = time.perf_counter() - started
    return BenchReport(
        mode=config.mode,
        endpoint=f"{config.host}:{config.port}",
        target={config.target_kind: config.target_value},
        sparse=config.sparse,
        num_texts=config.num_texts,
        batch_size=1 if config.mode == "standard" else config.batch_size,
        concurrency=config.concurrency,
        num_requests=run.num_requests,
        total_duration_secs=round(duration, 6),
        throughput_per_sec=round(run.successful_texts / duration, 3) if duration > 0 else 0.0,
        successful=len(run.latencies),
        failed=run.failed,
        successful_texts=run.successful_texts,
        latency_ms=_latency(run.latencies),
        errors=run.errors,
    )


# -- command line ------------------------------------------------------------------
class UsageError(Exception):
    """A bad combination of options (exit status 2)."""


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return number


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not number > 0 or math.isinf(number):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value!r}")
    return number


def _index(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number < 2**32:
        raise argparse.ArgumentTypeError(f"must be an instance index 0-4294967295, got {value!r}")
    return number


def parse_endpoint(endpoint: str) -> tuple[str, int, bool]:
    """``HOST:PORT`` (``[v6]:PORT``, optional http:// or https://) → host, port, TLS."""
    tls = endpoint.startswith("https://")
    rest = endpoint.removeprefix("https://").removeprefix("http://").rstrip("/")
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"--endpoint must be HOST:PORT, got {endpoint!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text), tls


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``tei-manager bench``'s options to ``parser``."""
    parser.add_argument(
        "--endpoint",
        default="localhost:9001",
        help="the multiplexer, HOST:PORT (default: localhost:9001)",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--instance", metavar="NAME", help="route to this instance")
    target.add_argument("--model", metavar="MODEL_ID", help="route to any instance of this model")
    target.add_argument(
        "--index", metavar="N", type=_index, help="route to the N-th instance (creation order)"
    )
    parser.add_argument(
        "--mode",
        choices=["standard", "stream", "arrow"],
        default="standard",
        help="standard: one text per Embed call; stream: EmbedStream calls of --batch-size "
        "texts; arrow: EmbedArrow calls of --batch-size texts (default: standard)",
    )
    parser.add_argument(
        "--num-texts", type=_positive, default=1000, metavar="N", help="texts to send (1000)"
    )
    parser.add_argument(
        "--batch-size",
        type=_positive,
        default=32,
        metavar="B",
        help="texts per stream or arrow call (32)",
    )
    parser.add_argument(
        "--concurrency", type=_positive, default=8, metavar="C", help="requests in flight (8)"
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=30.0,
        metavar="SECS",
        help="deadline of each request, and of connecting (30)",
    )
    parser.add_argument(
        "--text-length",
        type=_positive,
        default=64,
        metavar="CHARS",
        help="characters per generated text (64)",
    )
    parser.add_argument(
        "--sparse",
        action="store_true",
        help="call the sparse twins (EmbedSparse, EmbedSparseStream, EmbedSparseArrow)",
    )
    parser.add_argument(
        "--noop",
        action="store_true",
        help="arrow mode: ask for dummy answers that touch no instance (transport cost only)",
    )
    parser.add_argument("--truncate", action="store_true", help="set truncate on every request")
    tls = parser.add_argument_group("TLS")
    tls.add_argument("--tls", action="store_true", help="use TLS with the system's CAs")
    tls.add_argument("--tls-ca", metavar="FILE", help="CA bundle to verify the server with")
    tls.add_argument("--tls-cert", metavar="FILE", help="client certificate (mutual TLS)")
    tls.add_argument("--tls-key", metavar="FILE", help="client certificate's key")
    tls.add_argument(
        "--tls-server-name", metavar="NAME", help="name to verify the server certificate against"
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="send 'authorization: Bearer KEY' on every call "
        f"(default: ${API_KEY_ENV}; the variable keeps the key out of the process list)",
    )
    parser.add_argument("--json-output", metavar="FILE", help="also write the JSON report to FILE")


def config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> BenchConfig:
    """The run ``args`` describe; UsageError for a bad combination."""
    host, port, https = parse_endpoint(args.endpoint)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if args.noop and args.mode != "arrow":
        raise UsageError("--noop applies to --mode arrow only")
    kind: TargetKind
    if args.instance is not None:
        kind, value = "instance_name", args.instance
    elif args.model is not None:
        kind, value = "model_id", args.model
    else:
        kind, value = "instance_index", args.index
    return BenchConfig(
        host=host,
        port=port,
        target_kind=kind,
        target_value=value,
        mode=args.mode,
        num_texts=args.num_texts,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        timeout_secs=args.timeout,
        text_length=args.text_length,
        sparse=args.sparse,
        noop=args.noop,
        truncate=args.truncate,
        tls=args.tls or https,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name,
        api_key=_api_key(args.api_key, os.environ if env is None else env),
    )


def _api_key(flag: str | None, env: Mapping[str, str]) -> str | None:
    key = flag if flag is not None else env.get(API_KEY_ENV) or None
    if key is not None and (not key.strip() or not key.isprintable() or not key.isascii()):
        raise UsageError("--api-key: use printable ASCII characters")
    return key.strip() if key is not None else None


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``tei-manager bench``: 0 when every request succeeded, 1 when any failed, 2 on usage."""
    try:
        config = config_from_args(args)
        context = _ssl_context(config)
    except (UsageError, OSError, ssl.SSLError) as error:
        print(f"tei-manager bench: error: {error}", file=sys.stderr)
        return 2
    report = trio.run(run_bench, config, context)
    text = msgspec.json.format(msgspec.json.encode(report), indent=2).decode()
    print(text)
    if args.json_output:
        with open(args.json_output, "w", encoding="utf-8") as file:
            file.write(text + "\n")
    return 0 if report.failed == 0 else 1
