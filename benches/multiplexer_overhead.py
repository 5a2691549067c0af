"""Multiplexer overhead: the same client, direct to an instance vs through port 9001.

A real ``tei-manager serve`` (gRPC multiplexer on) runs one instance of the packaged
all-MiniLM-L6-v2 on the built-in worker. One grpcio (asyncio) client in this process
measures each workload directly on the instance's port and through the multiplexer,
back to back (direct first in even rounds, multiplexer first in odd ones), ``--rounds``
times. A figure is the median over rounds of that round's multiplexer / direct ratio,
so a machine whose speed drifts between rounds still compares like with like (the JSON
keeps every round's ratio):

- unary Embed, concurrency 1: latency p50 (multiplexer / direct);
- unary Embed, concurrency 16: throughput ratio (target >= 0.90);
- EmbedStream, streams of 20 messages, 4 at once: throughput ratio (target >= 0.97);
- Tokenize, concurrency 16 (transport-bound): throughput ratio (target >= 0.70);
- EmbedArrow of 1k and 10k texts vs the same texts over a direct EmbedStream: time ratio;
- noop EmbedArrow of 10k texts: round trip p50 (target <= 10 ms), asking for LZ4
  answers (the old default; answers are uncompressed unless asked now), so the
  figure stays comparable with earlier runs.

Prints a table; ``--json PATH`` writes the figures.

``--secure`` is the cost of security: the manager serves TLS (a throwaway CA and
server certificate made here) and requires an API key, and the multiplexer side
connects with TLS and sends the key as call credentials, while the direct side stays
plaintext to the instance. Against a plain run, its ratios give the overhead of
TLS + authentication on port 9001.

    python benches/multiplexer_overhead.py [--rounds 5] [--secure] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import ipaddress
import json
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pyarrow as pa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))

from control_plane import (
    HOST,
    free_port,
    print_table,
    run_concurrent,
    run_manager,
    verdict,
    wait_status,
)

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from tei_manager.testing import packaged_model_dir

M = multiplexer_grpc.TeiMultiplexer
INSTANCE = "bench"
STREAM_BATCH = 20
STREAMS_AT_ONCE = 4
API_KEY = "bench-api-key"


class Secure:
    """A throwaway CA and server certificate, and the [auth] tables that use them."""

    def __init__(self, directory: Path) -> None:
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-ca")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_pem = ca.public_bytes(serialization.Encoding.PEM)
        self.cert_path = directory / "server.pem"
        self.key_path = directory / "server-key.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def toml(self) -> str:
        digest = hashlib.sha256(API_KEY.encode()).hexdigest()
        return f"""
[auth]
enabled = true
providers = ["api_key"]
[auth.mtls]
server_cert = "{self.cert_path}"
server_key = "{self.key_path}"
[auth.api_key]
keys = [{{ name = "bench", scopes = ["admin", "inference", "read"], sha256 = "{digest}" }}]
"""

    def rest_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca_pem.decode())

    def channel(self, target: str, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        credentials = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(self.ca_pem),
            grpc.access_token_call_credentials(API_KEY),
        )
        return grpc.aio.secure_channel(target, credentials, options=options)


def make_texts(count: int) -> list[str]:
    words = "the quick brown fox jumps over a lazy dog while embeddings map text to vectors".split()
    return [" ".join(words[(i + k) % len(words)] for k in range(8 + i % 9)) for i in range(count)]


def arrow_ipc(texts: list[str]) -> bytes:
    table = pa.table({"text": pa.array(texts, pa.string())})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1000)
    return bytes(sink.getvalue().to_pybytes())


class Client:
    """grpcio asyncio stubs for one endpoint; ``via_mux`` wraps requests with the target."""

    def __init__(self, channel: grpc.aio.Channel, via_mux: bool) -> None:
        self.via_mux = via_mux
        target = multiplexer_pb2.Target(instance_name=INSTANCE)

        def stub(kind: str, direct: Any, muxed: Any) -> Any:
            spec = muxed if via_mux else direct
            return getattr(channel, kind)(
                spec.path,
                request_serializer=spec.request_type.SerializeToString,
                response_deserializer=spec.response_type.FromString,
            )

        self.embed = stub("unary_unary", tei_grpc.Embed.Embed, M.Embed)
        self.tokenize = stub("unary_unary", tei_grpc.Tokenize.Tokenize, M.Tokenize)
        self.embed_stream = stub("stream_stream", tei_grpc.Embed.EmbedStream, M.EmbedStream)
        self.target = target

    def embed_request(self, text: str) -> Any:
        inner = tei_pb2.EmbedRequest(inputs=text)
        return (
            multiplexer_pb2.EmbedRequest(target=self.target, request=inner)
            if self.via_mux
            else inner
        )

    def tokenize_request(self, text: str) -> Any:
        inner = tei_pb2.EncodeRequest(inputs=text)
        if self.via_mux:
            return multiplexer_pb2.EncodeRequest(target=self.target, request=inner)
        return inner


async def unary(client: Client, kind: str, texts: list[str], concurrency: int) -> dict[str, float]:
    call = client.embed if kind == "embed" else client.tokenize
    make = client.embed_request if kind == "embed" else client.tokenize_request
    requests = [make(t) for t in texts]
    started = time.perf_counter()
    latencies = await run_concurrent(
        len(texts), concurrency, lambda i: call(requests[i], timeout=60)
    )
    elapsed = time.perf_counter() - started
    return {"throughput": len(texts) / elapsed, "p50_ms": statistics.median(latencies) * 1e3}


async def streams(client: Client, texts: list[str]) -> dict[str, float]:
    batches = [texts[i : i + STREAM_BATCH] for i in range(0, len(texts), STREAM_BATCH)]
    requests = [[client.embed_request(t) for t in batch] for batch in batches]
    if client.via_mux:  # only the first message of a stream needs the target
        for batch in requests:
            for request in batch[1:]:
                request.ClearField("target")

    async def one(i: int) -> None:
        replies = [r async for r in client.embed_stream(iter(requests[i]), timeout=120)]
        assert len(replies) == len(requests[i])

    started = time.perf_counter()
    await run_concurrent(len(batches), STREAMS_AT_ONCE, one)
    return {"throughput": len(texts) / (time.perf_counter() - started)}


async def direct_stream_seconds(client: Client, texts: list[str]) -> float:
    requests = [tei_pb2.EmbedRequest(inputs=t) for t in texts]
    started = time.perf_counter()
    replies = [r async for r in client.embed_stream(iter(requests), timeout=600)]
    assert len(replies) == len(texts)
    return time.perf_counter() - started


async def arrow_seconds(channel: grpc.aio.Channel, payload: bytes, *, noop: bool) -> float:
    call = channel.unary_unary(
        M.EmbedArrow.path,
        request_serializer=M.EmbedArrow.request_type.SerializeToString,
        response_deserializer=M.EmbedArrow.response_type.FromString,
    )
    request = multiplexer_pb2.EmbedArrowRequest(
        target=multiplexer_pb2.Target(instance_name=INSTANCE),
        arrow_ipc=payload,
        noop=noop,
        normalize=True,
        compression=multiplexer_pb2.ARROW_COMPRESSION_LZ4 if noop else None,
    )
    started = time.perf_counter()
    reply = await call(request, timeout=600)
    seconds = time.perf_counter() - started
    assert reply.arrow_ipc
    return seconds


async def measure(
    instance_port: int,
    mux_port: int,
    rounds: int,
    quick: bool,
    arrow: bool = True,
    secure: Secure | None = None,
) -> dict[str, list[dict[str, float]]]:
    """Each workload's figures, one entry per round and side (``name/side``)."""
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    scale = 4 if quick else 1
    texts = make_texts(4000)
    results: dict[str, list[dict[str, float]]] = {}

    def record(name: str, value: dict[str, float]) -> None:
        results.setdefault(name, []).append(value)

    async with (
        grpc.aio.insecure_channel(f"{HOST}:{instance_port}", options=options) as direct_channel,
        (
            secure.channel(f"{HOST}:{mux_port}", options)
            if secure is not None
            else grpc.aio.insecure_channel(f"{HOST}:{mux_port}", options=options)
        ) as mux_channel,
    ):
        clients = {"direct": Client(direct_channel, False), "mux": Client(mux_channel, True)}
        for side in clients.values():  # warm up both paths and the model
            await unary(side, "embed", texts[:64], 16)
            await unary(side, "tokenize", texts[:64], 16)
        workloads: list[tuple[str, Callable[[Client], Awaitable[dict[str, float]]]]] = [
            ("embed_c1", lambda client: unary(client, "embed", texts[: 200 // scale], 1)),
            ("embed_c16", lambda client: unary(client, "embed", texts[: 800 // scale], 16)),
            ("stream20", lambda client: streams(client, texts[: 800 // scale])),
            ("tokenize_c16", lambda client: unary(client, "tokenize", texts[: 4000 // scale], 16)),
        ]
        for round_ in range(rounds):
            sides = ("direct", "mux") if round_ % 2 == 0 else ("mux", "direct")
            for name, workload in workloads:
                for which in sides:
                    record(f"{name}/{which}", await workload(clients[which]))
            print(f"round {round_ + 1}/{rounds} done", file=sys.stderr)
        for size in (1000, 10000) if arrow else ():
            if quick and size > 1000:
                continue
            many = (texts * (size // len(texts) + 1))[:size]
            payload = arrow_ipc(many)
            for _ in range(rounds if size == 1000 else 1):
                record(
                    f"arrow_{size}/direct_stream",
                    {"seconds": await direct_stream_seconds(clients["direct"], many)},
                )
                record(
                    f"arrow_{size}/mux",
                    {"seconds": await arrow_seconds(mux_channel, payload, noop=False)},
                )
        noop_payload = arrow_ipc((texts * 3)[:10000])
        for _ in range(5 if arrow else 0):
            await arrow_seconds(mux_channel, noop_payload, noop=True)
        noop = [
            await arrow_seconds(mux_channel, noop_payload, noop=True)
            for _ in range(30 if arrow else 0)
        ]
    if noop:
        results["arrow_noop_10k"] = [{"p50_ms": statistics.median(noop) * 1e3}]
    return results


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    m = {
        name: {key: statistics.median(v[key] for v in values) for key in values[0]}
        for name, values in results.items()
    }

    per_round: dict[str, list[float]] = {}

    def ratio(name: str, key: str) -> float:
        # Per round, then the median: the two sides of a round ran back to back.
        pairs = zip(results[f"{name}/mux"], results[f"{name}/direct"], strict=True)
        ratios = per_round[f"{name}_{key}"] = [mux[key] / direct[key] for mux, direct in pairs]
        return statistics.median(ratios)

    figures: dict[str, Any] = {
        "embed_c1_p50_ms": {
            "direct": m["embed_c1/direct"]["p50_ms"],
            "mux": m["embed_c1/mux"]["p50_ms"],
        },
        "embed_c1_p50_ratio": ratio("embed_c1", "p50_ms"),
        "embed_c16_throughput_ratio": ratio("embed_c16", "throughput"),
        "stream20_throughput_ratio": ratio("stream20", "throughput"),
        "tokenize_c16_throughput_ratio": ratio("tokenize_c16", "throughput"),
        "throughput_per_sec": {k: v["throughput"] for k, v in m.items() if "throughput" in v},
        "ratios_per_round": per_round,
    }
    if "arrow_noop_10k" in m:
        figures["arrow_noop_10k_p50_ms"] = m["arrow_noop_10k"]["p50_ms"]
    for size in (1000, 10000):
        if f"arrow_{size}/mux" in m:
            direct = m[f"arrow_{size}/direct_stream"]["seconds"]
            through = m[f"arrow_{size}/mux"]["seconds"]
            figures[f"arrow_{size}"] = {
                "direct_stream_secs": direct,
                "mux_arrow_secs": through,
                "speed_ratio": direct / through,
            }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a quarter of the work (a smoke run)")
    parser.add_argument("--skip-arrow", action="store_true", help="leave out the Arrow figures")
    parser.add_argument(
        "--secure", action="store_true", help="TLS and an API key on the multiplexer side"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    model = packaged_model_dir()
    with tempfile.TemporaryDirectory() as workdir:
        mux_port = free_port()
        secure = Secure(Path(workdir)) if args.secure else None
        with run_manager(
            Path(workdir),
            grpc_port=mux_port,
            extra_toml=secure.toml() if secure is not None else "",
            api_ssl=secure.rest_context() if secure is not None else None,
            api_token=API_KEY if secure is not None else None,
        ) as (manager, _):
            status, body = manager.api.request(
                "POST",
                "/instances",
                {"name": INSTANCE, "model_id": str(model), "max_concurrent_requests": 1024},
            )
            if status != 201:
                raise RuntimeError(f"create failed: {status} {body}")
            info = wait_status(
                manager, INSTANCE, lambda i: bool(i["status"] == "running"), "running"
            )
            results = asyncio.run(
                measure(
                    int(info["port"]),
                    mux_port,
                    args.rounds,
                    args.quick,
                    not args.skip_arrow,
                    secure,
                )
            )
    figures = summarize(results)
    figures["secure"] = args.secure
    c1 = figures["embed_c1_p50_ms"]

    def ratio_row(label: str, key: str, target: float) -> tuple[str, str, str, str]:
        value = figures[key]
        return (label, f"{value:.3f}", f">= {target:.2f}", verdict(value >= target))

    rows = [
        (
            "Embed c1 p50 latency (mux/direct)",
            f"{figures['embed_c1_p50_ratio']:.3f}",
            f"{c1['direct']:.2f} -> {c1['mux']:.2f} ms",
            "",
        ),
        ratio_row("Embed c16 throughput ratio", "embed_c16_throughput_ratio", 0.90),
        ratio_row("EmbedStream x20 throughput ratio", "stream20_throughput_ratio", 0.97),
        ratio_row("Tokenize c16 throughput ratio", "tokenize_c16_throughput_ratio", 0.70),
    ]
    for size in (1000, 10000):
        if f"arrow_{size}" in figures:
            a = figures[f"arrow_{size}"]
            times = f"{a['direct_stream_secs']:.2f} s vs {a['mux_arrow_secs']:.2f} s"
            label = f"EmbedArrow {size} vs direct EmbedStream (speed)"
            rows.append((label, f"{a['speed_ratio']:.3f}", times, ""))
    if "arrow_noop_10k_p50_ms" in figures:
        noop = figures["arrow_noop_10k_p50_ms"]
        rows.append(("noop EmbedArrow 10k p50", f"{noop:.2f} ms", "<= 10 ms", verdict(noop <= 10)))
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
