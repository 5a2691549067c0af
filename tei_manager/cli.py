"""The ``tei-manager`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tei_manager import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tei-manager",
        description="Run many text-embedding model servers behind one REST and gRPC front door.",
    )
    parser.add_argument("--version", action="version", version=f"tei-manager {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from tei_manager.worker.options import build_parser as worker_flags

    worker = commands.add_parser(
        "worker",
        help="serve one model over TEI's gRPC API (text-embeddings-router compatible)",
        description="TEI-compatible embedding server: text-embeddings-router's flags and "
        "tei.v1 gRPC API, running the model with sentence-transformers.",
    )
    worker_flags(worker)

    serve = commands.add_parser(
        "serve",
        help="run the manager: instances, REST API and gRPC multiplexer",
        description="Run the manager with the configuration file (TOML) and environment overrides.",
    )
    serve.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get("TEI_MANAGER_CONFIG") or None,
        help="configuration file (TOML); default: $TEI_MANAGER_CONFIG, else built-in defaults",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
    )
    serve.add_argument("--log-format", default="text", choices=["text", "json"])

    from tei_manager.bench import add_arguments as bench_flags

    bench = commands.add_parser(
        "bench",
        help="load the gRPC multiplexer and report throughput and latency as JSON",
        description="Send generated texts to a TeiMultiplexer endpoint (unary, stream or "
        "Arrow calls, C at a time) and print one JSON report. Exit status: 0 when every "
        "request succeeded, 1 when any failed, 2 for usage errors.",
    )
    bench_flags(bench)

    from tei_manager.hub.cli import add_arguments as models_actions

    models = commands.add_parser(
        "models",
        help="pull and list models in the local Hugging Face cache (no manager needed)",
        description="Work on the local Hugging Face cache, the one the manager and its "
        "instances use: pull a model (checked, with a progress bar) or list the cached ones.",
    )
    models_actions(models)

    from tei_manager.manager.state_cli import add_arguments as state_actions

    state = commands.add_parser(
        "state",
        help="export or import the desired state of a stopped manager (backup and restore)",
        description="Back up the state file of the configuration to a TOML file, or "
        "restore one (checked whole first). With a manager running use GET /state/export "
        "and POST /state/import.",
    )
    state_actions(state)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        from tei_manager.logs import configure_logging
        from tei_manager.worker.main import run_worker_from_args

        configure_logging("INFO", json_output=args.json_output)
        return run_worker_from_args(args)
    if args.command == "serve":
        from tei_manager.manager.serve import main as serve_main

        return serve_main(args.config, log_level=args.log_level, log_format=args.log_format)
    if args.command == "bench":
        from tei_manager.bench import run_from_args as run_bench

        return run_bench(args)
    if args.command == "models":
        from tei_manager.hub.cli import main as models_main

        return models_main(args)
    if args.command == "state":
        from tei_manager.manager.state_cli import main as state_main

        return state_main(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
