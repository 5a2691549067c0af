"""Command line of ``tei-manager worker``: text-embeddings-router's flags."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Literal

import msgspec

Pooling = Literal["cls", "mean", "splade", "last-token"]
DType = Literal["float16", "float32", "bfloat16", "int8"]
EngineName = Literal["auto", "torch", "onnx"]


class WorkerOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a worker is started with; defaults are text-embeddings-router's."""

    model_id: str
    revision: str | None = None
    tokenization_workers: int | None = None
    dtype: DType | None = None
    pooling: Pooling | None = None
    max_concurrent_requests: int = 512
    max_batch_tokens: int = 16384
    max_batch_requests: int | None = None
    max_client_batch_size: int = 32
    auto_truncate: bool = False
    default_prompt_name: str | None = None
    default_prompt: str | None = None
    hostname: str = "0.0.0.0"
    port: int = 3000
    uds_path: str | None = None
    huggingface_hub_cache: str | None = None
    served_model_name: str | None = None
    json_output: bool = False
    prometheus_port: int | None = None
    api_key: str | None = None
    device: str | None = None
    engine: EngineName = "auto"


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {value}")
    return number


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add text-embeddings-router's flags to ``parser`` (or a new one)."""
    p = parser or argparse.ArgumentParser(
        prog="tei-manager worker",
        description="TEI-compatible embedding server (tei.v1 gRPC API) on sentence-transformers.",
    )
    env = os.environ.get
    p.add_argument("--model-id", default=env("MODEL_ID"), required=env("MODEL_ID") is None)
    p.add_argument("--revision", default=env("REVISION"))
    p.add_argument("--tokenization-workers", type=_positive)
    p.add_argument(
        "--dtype",
        choices=["float16", "float32", "bfloat16", "int8"],
        default=env("DTYPE"),
        help="int8: ONNX Runtime's dynamic quantisation (ONNX engine only)",
    )
    p.add_argument(
        "--pooling", choices=["cls", "mean", "splade", "last-token"], default=env("POOLING")
    )
    p.add_argument("--max-concurrent-requests", type=_positive, default=512)
    p.add_argument("--max-batch-tokens", type=_positive, default=16384)
    p.add_argument("--max-batch-requests", type=_positive)
    p.add_argument("--max-client-batch-size", type=_positive, default=32)
    p.add_argument("--auto-truncate", action="store_true")
    p.add_argument("--default-prompt-name")
    p.add_argument("--default-prompt")
    p.add_argument("--hostname", default=env("HOSTNAME_BIND", "0.0.0.0"))
    p.add_argument("-p", "--port", type=_port, default=int(env("PORT", "3000")))
    p.add_argument("--uds-path")
    p.add_argument("--huggingface-hub-cache", default=env("HUGGINGFACE_HUB_CACHE"))
    p.add_argument("--served-model-name")
    p.add_argument("--json-output", action="store_true")
    p.add_argument("--prometheus-port", type=_port)
    p.add_argument("--api-key", default=env("API_KEY"))
    p.add_argument("--device", help="torch device (cpu, cuda, cuda:1); default: cuda if present")
    p.add_argument(
        "--engine",
        choices=["auto", "torch", "onnx"],
        default=env("TEI_MANAGER_ENGINE", "auto"),
        help="auto: ONNX Runtime on CPU when the model can run there, torch otherwise",
    )
    return p


def parse_options(argv: Sequence[str] | None = None) -> WorkerOptions:
    """Parse the command line into ``WorkerOptions``."""
    args = build_parser().parse_args(argv)
    return options_from_namespace(args)


def options_from_namespace(args: argparse.Namespace) -> WorkerOptions:
    fields = {f: getattr(args, f) for f in WorkerOptions.__struct_fields__ if hasattr(args, f)}
    return WorkerOptions(**fields)
