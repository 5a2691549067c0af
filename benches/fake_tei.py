"""A tiny stand-in for TEI's ``text-embeddings-router``, for the chaos suites.

Takes the flags the manager passes (``--model-id``, ``--hostname``, ``--port``,
``--max-batch-tokens``, ``--max-concurrent-requests``, ``--json-output``,
``--pooling``, ``--prometheus-port``, ``--revision``, ``--uds-path``; others are
ignored) and serves ``tei.v1`` Info, Embed and EmbedStream over the project's gRPC
server: no model, no torch, so an instance is up in a fraction of a second and
costs next to nothing while it runs. An embedding is ``DIM`` floats derived from
the text's length, so a client can check that an answer belongs to its question.

Point a manager at it with ``tei_binary_path`` (an executable that runs
``python benches/fake_tei.py "$@"``; see ``benches/chaos.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Final

import trio

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.grpc.calls import CallContext
from tei_manager.grpc.server import GrpcServer

DIM: Final = 8


def embedding(text: str) -> list[float]:
    """What the fake answers for ``text``: recognisable, cheap, deterministic."""
    return [float(len(text))] + [1.0] * (DIM - 1)


class FakeInfo(tei_grpc.InfoServicer):
    def __init__(self, model_id: str, max_concurrent_requests: int, max_batch_tokens: int) -> None:
        self._info = tei_pb2.InfoResponse(
            version="fake",
            model_id=model_id,
            model_dtype="float32",
            model_type=tei_pb2.MODEL_TYPE_EMBEDDING,
            max_concurrent_requests=max_concurrent_requests,
            max_input_length=512,
            max_batch_tokens=max_batch_tokens,
            max_client_batch_size=32,
            tokenization_workers=1,
        )

    async def Info(
        self, request: tei_pb2.InfoRequest, context: CallContext
    ) -> tei_pb2.InfoResponse:
        return self._info


class FakeEmbed(tei_grpc.EmbedServicer):
    async def Embed(
        self, request: tei_pb2.EmbedRequest, context: CallContext
    ) -> tei_pb2.EmbedResponse:
        return tei_pb2.EmbedResponse(embeddings=embedding(request.inputs))

    async def EmbedStream(
        self, requests: AsyncIterator[tei_pb2.EmbedRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.EmbedResponse]:
        async for request in requests:
            yield tei_pb2.EmbedResponse(embeddings=embedding(request.inputs))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--hostname", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--max-concurrent-requests", type=int, default=512)
    parser.add_argument("--json-output", action="store_true")
    # Accepted and ignored, as TEI's own flags.
    for flag in ("--pooling", "--prometheus-port", "--revision", "--uds-path"):
        parser.add_argument(flag)
    args, _ = parser.parse_known_args(argv)  # a chaos run's marker, extra_args: ignored
    return args


async def serve(args: argparse.Namespace) -> None:
    info = FakeInfo(args.model_id, args.max_concurrent_requests, args.max_batch_tokens)
    server = GrpcServer([info, FakeEmbed()], host=args.hostname, port=args.port)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        line = {
            "timestamp": datetime.now(UTC).isoformat(),
            "level": "INFO",
            "message": "Ready",
            "port": port,
        }
        print(json.dumps(line) if args.json_output else f"Ready on port {port}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, args)


if __name__ == "__main__":
    main()
