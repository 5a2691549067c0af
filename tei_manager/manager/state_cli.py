"""``tei-manager state export|import FILE``: back up and restore a stopped node's state.

They work on the state file of the configuration (``--config``, env overrides as for
``serve``) with no manager running; with one running, use ``GET /state/export`` and
``POST /state/import`` instead (``import`` refuses to write under a live manager).
Exit status: 0 done, 1 refused or I/O error, 2 bad configuration or backup.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from tei_manager.config import ConfigError, ManagerConfig, load_config
from tei_manager.errors import ErrorCode, TeiError, ValidationError
from tei_manager.manager.backup import Backup, BackupModel, decode_backup, encode_backup
from tei_manager.manager.state import PersistedState, decode_state, save_state
from tei_manager.supervisor.orphans import manager_alive, read_runtime, runtime_path

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("export", "write the desired state (instances, run states, models) to FILE ('-': stdout)"),
        ("import", "replace the state file with FILE's instances, after checking all of it"),
    ):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("file", metavar="FILE")
        action.add_argument(
            "--config",
            metavar="CONFIG",
            default=os.environ.get("TEI_MANAGER_CONFIG") or None,
            help="the manager's configuration (TOML); default: $TEI_MANAGER_CONFIG",
        )


def _fail(message: str, status: int) -> int:
    print(f"tei-manager state: {message}", file=sys.stderr)
    return status


def _cached_models() -> list[str]:
    from tei_manager.hub.cache import scan_cache
    from tei_manager.hub.settings import HubSettings

    return [
        snapshot.model_id for snapshot in scan_cache(HubSettings.from_env(os.environ).cache_dir)
    ]


def _read_state(config: ManagerConfig) -> PersistedState:
    """The state file as it is (no file: empty); never moves a bad one aside."""
    try:
        data = Path(config.state_file).read_bytes()
    except FileNotFoundError:
        return PersistedState()
    except OSError as e:
        raise TeiError(ErrorCode.IO_ERROR, f"{config.state_file}: {e.strerror}") from None
    try:
        return decode_state(data)
    except ValueError as e:
        raise ConfigError(f"state_file: {config.state_file} is unusable: {e}") from None


def export_state(config: ManagerConfig) -> Backup:
    """The backup of a stopped node: its state file, and the models the manager would
    register at start-up (configured, then found in the Hugging Face cache)."""
    state = _read_state(config)
    model_ids = list(dict.fromkeys([*config.models, *_cached_models()]))
    return Backup(
        exported_at=datetime.now(UTC),
        instances=state.instances,
        models=tuple(BackupModel(model_id=m) for m in model_ids if not m.startswith("/")),
    )


def main(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        if args.action == "export":
            data = encode_backup(export_state(config))
            if args.file == "-":
                sys.stdout.buffer.write(data)
            else:
                Path(args.file).write_bytes(data)
            return 0
        runtime = read_runtime(runtime_path(config.state_file))
        if runtime is not None and manager_alive(runtime):
            return _fail(
                f"a manager (pid {runtime.manager_pid}) runs on {config.state_file}: "
                "use POST /state/import",
                1,
            )
        source = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
        with source:
            backup = decode_backup(source.read(), config, gpu_count=None)
        save_state(config.state_file, PersistedState(instances=backup.instances))
    except ConfigError as e:
        return _fail(str(e), 2)
    except ValidationError as e:
        return _fail(f"{args.file}: {e}", 2)
    except TeiError as e:
        return _fail(str(e), 1)
    except OSError as e:
        return _fail(f"{args.file}: {e.strerror or e}", 1)
    missing = [m.model_id for m in backup.models if m.model_id not in config.models]
    print(f"imported {len(backup.instances)} instance(s) into {config.state_file}")
    if missing:
        print(
            "models the next start finds only if they are cached (else add them with "
            f"POST /models or list them in models = [...]): {', '.join(missing)}"
        )
    return 0
