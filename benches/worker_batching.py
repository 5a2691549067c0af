"""Worker dynamic batching: 32 concurrent single-text Embed calls vs offline batched encode.

(a) SentenceTransformer.encode of all texts at once (the model's best batched throughput);
(b) a real ``tei-manager worker`` process serving the same model, driven by 32 concurrent
    clients each sending one text per Embed call (grpc.aio client, one channel).
Prints both throughputs and the ratio b/a (target >= 0.80); ``--json PATH`` writes them.

    python benches/worker_batching.py [--texts 1500] [--concurrency 32] [--rounds 5] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from tei_manager._proto.tei.v1 import tei_pb2
from tei_manager.testing import packaged_model_dir, run_worker_process

WORDS = (
    "the a model server embedding vector search query document fast slow batch queue "
    "river mountain city night morning data network cluster memory token sentence "
    "learning language retrieval ranking quick brown fox jumps over lazy dog system "
    "request response latency throughput engine python trio stream cache disk"
).split()


def make_texts(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(8, 24))) + "." for _ in range(count)]


def load_offline_model(model_dir: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    model.encode(make_texts(64), batch_size=32)  # warm-up
    return model


def offline_throughput(model: Any, texts: list[str]) -> float:
    start = time.perf_counter()
    model.encode(texts, batch_size=32)
    return len(texts) / (time.perf_counter() - start)


async def served_throughput(port: int, texts: list[str], concurrency: int) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        embed = channel.unary_unary(
            "/tei.v1.Embed/Embed",
            request_serializer=tei_pb2.EmbedRequest.SerializeToString,
            response_deserializer=tei_pb2.EmbedResponse.FromString,
        )
        for text in texts[:64]:  # warm-up
            await embed(tei_pb2.EmbedRequest(inputs=text))
        queue = list(reversed(texts))

        async def client() -> None:
            while queue:
                await embed(tei_pb2.EmbedRequest(inputs=queue.pop()))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return len(texts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    texts = make_texts(args.texts)
    model_dir = packaged_model_dir()
    offline: list[float] = []
    served: list[float] = []
    # Rounds alternate (a) and (b) so that a slow spell of the machine hits both; the
    # figures reported are the medians.
    with (
        tempfile.TemporaryDirectory() as tmp,
        run_worker_process(model_dir, Path(tmp) / "worker.log") as worker,
    ):
        model = load_offline_model(model_dir)
        for _ in range(args.rounds):
            offline.append(offline_throughput(model, texts))
            served.append(asyncio.run(served_throughput(worker.port, texts, args.concurrency)))
    a, b = statistics.median(offline), statistics.median(served)
    result = {
        "bench": "worker_batching",
        "texts": len(texts),
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "offline_texts_per_sec": round(a, 1),
        "worker_texts_per_sec": round(b, 1),
        "ratio": round(b / a, 3),
        "target_ratio": 0.80,
        "offline_rounds": [round(x, 1) for x in offline],
        "worker_rounds": [round(x, 1) for x in served],
    }
    print(f"offline batched encode : {a:8.1f} texts/s   rounds {result['offline_rounds']}")
    clients = f"worker, {args.concurrency} clients"
    print(f"{clients:<23}: {b:8.1f} texts/s   rounds {result['worker_rounds']}")
    print(f"ratio b/a              : {b / a:8.3f}  (target >= 0.80)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
