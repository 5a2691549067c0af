"""Our worker on each engine against offline encoding and Infinity, on one CPU box.

Systems (all on the packaged all-MiniLM-L6-v2, all started once, then measured in
alternating rounds so a slow spell of a shared machine hits every system alike):

- ``worker-torch`` / ``worker-onnx``: ``tei-manager worker --engine torch|onnx``, driven
  by one grpc.aio client: 32 clients x 1 text (unary Embed) and 4 clients x 32 texts
  (one EmbedStream of 32 messages each);
- ``offline-st`` / ``offline-ort``: a child process encoding the texts in batches of 32
  with sentence-transformers, or with ONNX Runtime (default session options) on the
  worker's exported graph plus mean pooling in numpy: the limits to measure against;
- ``infinity-torch`` / ``infinity-onnx``: ``infinity_emb v2 --engine torch|optimum
  --pooling-method mean`` (REST only: one small raw HTTP/1.1 client, 32 x 1 text and
  4 x 32 texts per POST), when ``--infinity`` or ``$INFINITY_EMB`` names its binary;
  skipped otherwise.

Per system: texts/s for both workloads, the server's CPU-seconds per 1000 texts (from
/proc/PID/stat), its RSS after the run, and the p50 latency of one text at concurrency 1.
Also: the cosine of ``--dtype int8`` embeddings to float32 ones on the bench's texts.
Targets (issue 19) are printed as PASS/MISS.

    python benches/worker_engines.py [--quick] [--rounds 4] [--texts 512] [--json F]
        [--infinity /path/to/infinity_emb]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benches.worker_batching import make_texts
from tei_manager.testing import packaged_model_dir, run_worker_process

CLIENTS_SINGLE = 32
CLIENTS_BATCHED = 4
BATCH = 32
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its finished children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- clients ---------------------------------------------------------------------------


class GrpcClient:
    """tei.v1 over one grpc.aio channel."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def run(self, texts: list[str], clients: int, batch: int) -> float:
        import grpc

        from tei_manager._proto.tei.v1 import tei_pb2

        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            embed = channel.unary_unary(
                "/tei.v1.Embed/Embed",
                request_serializer=tei_pb2.EmbedRequest.SerializeToString,
                response_deserializer=tei_pb2.EmbedResponse.FromString,
            )
            stream = channel.stream_stream(
                "/tei.v1.Embed/EmbedStream",
                request_serializer=tei_pb2.EmbedRequest.SerializeToString,
                response_deserializer=tei_pb2.EmbedResponse.FromString,
            )
            queue = list(reversed(texts))

            async def client() -> None:
                while queue:
                    if batch == 1:
                        await embed(tei_pb2.EmbedRequest(inputs=queue.pop()))
                        continue
                    chunk = [queue.pop() for _ in range(min(batch, len(queue)))]
                    call = stream(iter(tei_pb2.EmbedRequest(inputs=t) for t in chunk))
                    async for _ in call:
                        pass

            start = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(clients)))
            return time.perf_counter() - start

    async def latency(self, texts: list[str]) -> float:
        import grpc

        from tei_manager._proto.tei.v1 import tei_pb2

        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            embed = channel.unary_unary(
                "/tei.v1.Embed/Embed",
                request_serializer=tei_pb2.EmbedRequest.SerializeToString,
                response_deserializer=tei_pb2.EmbedResponse.FromString,
            )
            times = []
            for text in texts:
                start = time.perf_counter()
                await embed(tei_pb2.EmbedRequest(inputs=text))
                times.append(time.perf_counter() - start)
            return statistics.median(times)


class HttpClient:
    """POST /embeddings over raw keep-alive HTTP/1.1: as little client cost as gRPC's."""

    def __init__(self, port: int, model: str) -> None:
        self.port = port
        self.model = model

    async def _post(self, conn: tuple[Any, Any], texts: list[str]) -> None:
        reader, writer = conn
        body = json.dumps({"model": self.model, "input": texts}).encode()
        writer.write(
            b"POST /embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n")[0].decode())
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)

    async def run(self, texts: list[str], clients: int, batch: int) -> float:
        queue = list(reversed(texts))

        async def client() -> None:
            conn = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                while queue:
                    await self._post(conn, [queue.pop() for _ in range(min(batch, len(queue)))])
            finally:
                conn[1].close()

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - start

    async def latency(self, texts: list[str]) -> float:
        conn = await asyncio.open_connection("127.0.0.1", self.port)
        times = []
        try:
            for text in texts:
                start = time.perf_counter()
                await self._post(conn, [text])
                times.append(time.perf_counter() - start)
        finally:
            conn[1].close()
        return statistics.median(times)


# --- offline children --------------------------------------------------------------------


def offline_child(kind: str, texts_file: Path) -> None:
    """Load the model, then encode all texts once per line read from stdin."""
    texts = json.loads(texts_file.read_text())
    model_dir = packaged_model_dir()
    if kind == "st":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(model_dir), device="cpu")

        def encode() -> None:
            model.encode(texts, batch_size=BATCH)
    else:
        import numpy as np
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from tei_manager.worker.model import load_model
        from tei_manager.worker.options import WorkerOptions

        graph = load_model(WorkerOptions(model_id=str(model_dir), engine="onnx")).graph_path
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.enable_padding()
        tokenizer.enable_truncation(256)

        def encode() -> None:
            for at in range(0, len(texts), BATCH):
                batch = tokenizer.encode_batch(texts[at : at + BATCH])
                ids = np.array([e.ids for e in batch], dtype=np.int64)
                mask = np.array([e.attention_mask for e in batch], dtype=np.int64)
                feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": 0 * ids}
                [hidden] = session.run(None, feed)
                pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
                pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)

    encode()  # warm-up
    print("ready", flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        encode()
        print(time.perf_counter() - start, flush=True)


class Offline:
    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process

    async def run(self, texts: list[str], clients: int, batch: int) -> float:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return float(await asyncio.to_thread(self.process.stdout.readline))


@contextlib.contextmanager
def start_offline(kind: str, texts_file: Path) -> Iterator[tuple[int, Offline]]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--offline-child", kind, "--texts-file", str(texts_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"offline {kind} did not start")
        yield process.pid, Offline(process)
    finally:
        process.kill()
        process.wait()


@contextlib.contextmanager
def start_infinity(
    binary: str, engine: str, model_dir: Path, log: Path
) -> Iterator[tuple[int, HttpClient]]:
    import urllib.request

    port = free_port()
    # Run from inside the model folder: Infinity's ONNX engine (with the optimum it
    # installs) only finds a local graph by a path relative to the working directory.
    command = [
        binary, "v2", "--model-id", ".", "--engine", engine, "--device", "cpu",
        "--pooling-method", "mean", "--batch-size", str(BATCH), "--port", str(port),
        "--no-model-warmup",
    ]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(log.parent / "infinity-hub"),  # where it keeps optimised graphs
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=model_dir
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"infinity ({engine}) did not start: see {log}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2),
            ):
                break
            time.sleep(1)
        yield process.pid, HttpClient(port, str(model_dir))
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


# --- measuring -----------------------------------------------------------------------------


def int8_quality(texts: list[str]) -> tuple[dict[str, float], Path]:
    """Cosine of int8 to float32 pooled embeddings of ``texts`` (the worker's own models).

    Also: the worker's float32 graph, which Infinity's ONNX engine is given too.
    """
    import torch

    from tei_manager.worker.model import Row, load_model
    from tei_manager.worker.options import WorkerOptions

    model_id = str(packaged_model_dir())
    vectors = []
    graphs = []
    for dtype in ("float32", "int8"):
        model = load_model(WorkerOptions(model_id=model_id, engine="onnx", dtype=dtype))  # type: ignore[arg-type]
        rows = [Row(model.tokenization.encode(t, truncate=True), "pooled") for t in texts]
        vectors.append(torch.tensor(model.forward(rows)))
        graphs.append(model.graph_path)
    cosines = torch.nn.functional.cosine_similarity(vectors[0], vectors[1], dim=1)
    quality = {"min": round(float(cosines.min()), 5), "mean": round(float(cosines.mean()), 5)}
    assert graphs[0] is not None
    return quality, graphs[0]


def with_graph(model_dir: Path, graph: Path, folder: Path) -> Path:
    """A copy of ``model_dir`` (files linked) with ``graph`` as its ``model.onnx``."""
    folder.mkdir()
    for item in model_dir.iterdir():
        (folder / item.name).symlink_to(item)
    (folder / "model.onnx").symlink_to(graph)
    return folder


def measure(
    systems: dict[str, tuple[int, Any]], texts: list[str], rounds: int, latency_calls: int
) -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, list[float]]] = {
        name: {"single": [], "batched": [], "cpu_single": [], "cpu_batched": [], "p50": []}
        for name in systems
    }
    for _ in range(rounds):
        for name, (pid, client) in systems.items():
            figures = runs[name]
            workloads = [("batched", CLIENTS_BATCHED, BATCH)]
            if not name.startswith("offline"):
                workloads.insert(0, ("single", CLIENTS_SINGLE, 1))
            for workload, clients, batch in workloads:
                cpu = cpu_seconds(pid)
                seconds = asyncio.run(client.run(texts, clients, batch))
                figures[workload].append(len(texts) / seconds)
                figures[f"cpu_{workload}"].append(1000 * (cpu_seconds(pid) - cpu) / len(texts))
            if not name.startswith("offline"):
                figures["p50"].append(asyncio.run(client.latency(texts[:latency_calls])))
    results: dict[str, dict[str, Any]] = {}
    for name, figures in runs.items():
        pid = systems[name][0]
        results[name] = {
            key: round(statistics.median(values), 4 if key == "p50" else 1)
            for key, values in figures.items()
            if values
        }
        results[name]["rss_mib"] = round(rss_mib(pid), 1)
        results[name]["rounds"] = {k: [round(v, 1) for v in vs] for k, vs in figures.items() if vs}
    return results


def targets(results: dict[str, dict[str, Any]]) -> list[tuple[str, bool]]:
    onnx, torch_ = results["worker-onnx"], results["worker-torch"]
    limit = results["offline-ort"]["batched"]
    checks = [
        ("onnx 32x1 >= 0.95 offline onnxruntime", onnx["single"] >= 0.95 * limit),
        ("onnx 4x32 >= 0.95 offline onnxruntime", onnx["batched"] >= 0.95 * limit),
        ("onnx RSS <= torch worker RSS", onnx["rss_mib"] <= torch_["rss_mib"]),
        ("onnx p50 at concurrency 1 <= torch worker's", onnx["p50"] <= torch_["p50"]),
    ]
    infinity = [results[n] for n in ("infinity-torch", "infinity-onnx") if n in results]
    if infinity:
        best_single = max(r["single"] for r in infinity)
        best_batched = max(r["batched"] for r in infinity)
        checks += [
            ("onnx 32x1 ahead of Infinity's best", onnx["single"] > best_single),
            ("onnx 4x32 ahead of Infinity's best", onnx["batched"] > best_batched),
        ]
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--latency-calls", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 64 texts, 1 round")
    parser.add_argument("--infinity", default=os.environ.get("INFINITY_EMB"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--offline-child", choices=["st", "ort"], help=argparse.SUPPRESS)
    parser.add_argument("--texts-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.offline_child:
        offline_child(args.offline_child, args.texts_file)
        return
    if args.quick:
        args.texts, args.rounds, args.latency_calls = 64, 1, 5
    began = time.monotonic()
    texts = make_texts(args.texts)
    infinity = args.infinity if args.infinity and shutil.which(args.infinity) else None
    if args.infinity and infinity is None:
        print(f"infinity: {args.infinity} not found; skipped")
    elif infinity is None:
        print("infinity: not given (--infinity or $INFINITY_EMB); skipped")
    quality, graph = int8_quality(texts)
    model_dir = packaged_model_dir()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        texts_file = Path(tmp) / "texts.json"
        texts_file.write_text(json.dumps(texts))
        starters: dict[str, Callable[[], tuple[int, Any]]] = {}
        for engine in ("torch", "onnx"):

            def worker(engine: str = engine) -> tuple[int, Any]:
                process = stack.enter_context(
                    run_worker_process(model_dir, Path(tmp) / f"{engine}.log", ["--engine", engine])
                )
                return process.process.pid, GrpcClient(process.port)

            starters[f"worker-{engine}"] = worker
        for kind in ("st", "ort"):
            starters[f"offline-{kind}"] = lambda kind=kind: stack.enter_context(
                start_offline(kind, texts_file)
            )
        if infinity is not None:
            # Infinity's ONNX engine wants a graph in the model folder: the worker's own.
            onnx_dir = with_graph(model_dir, graph, Path(tmp) / "model-with-onnx")
            for name, engine, folder in (
                ("infinity-torch", "torch", model_dir),
                ("infinity-onnx", "optimum", onnx_dir),
            ):
                log = Path(tmp) / f"{name}.log"
                starters[name] = lambda e=engine, f=folder, log=log: stack.enter_context(
                    start_infinity(infinity, e, f, log)
                )
        systems: dict[str, tuple[int, Any]] = {}
        for name, start in starters.items():
            try:
                systems[name] = start()
            except RuntimeError as exc:
                print(f"{name}: skipped ({exc})")
        for name, (_, client) in systems.items():  # warm-up, outside the rounds
            asyncio.run(client.run(texts[:64], 4, 16 if name.startswith("offline") else 1))
        results = measure(systems, texts, args.rounds, args.latency_calls)
    header = (
        f"{'system':<16}{'32x1 t/s':>10}{'4x32 t/s':>10}{'CPU-s/1k':>10}{'RSS MiB':>9}{'p50 ms':>8}"
    )
    print(header)
    for name, r in results.items():
        single = f"{r['single']:>10.1f}" if "single" in r else f"{'-':>10}"
        p50 = f"{1000 * r['p50']:>8.1f}" if "p50" in r else f"{'-':>8}"
        print(
            f"{name:<16}{single}{r['batched']:>10.1f}{r['cpu_batched']:>10.2f}{r['rss_mib']:>9.0f}{p50}"
        )
    print(f"int8 vs float32 cosine on these texts: min {quality['min']}, mean {quality['mean']}")
    checks = (
        targets(results) if {"worker-onnx", "worker-torch", "offline-ort"} <= set(results) else []
    )
    for label, ok in checks:
        print(f"{'PASS' if ok else 'MISS'}  {label}")
    print(f"took {time.monotonic() - began:.0f} s")
    if args.json:
        summary = {
            "bench": "worker_engines",
            "texts": len(texts),
            "rounds": args.rounds,
            "results": results,
            "int8_cosine": quality,
            "targets": {label: ok for label, ok in checks},
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
