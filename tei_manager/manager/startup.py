"""The manager's start-up I/O, run once in a worker thread before anything starts."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from tei_manager.config import ConfigError, ManagerConfig
from tei_manager.manager.state import (
    LoadedState,
    PersistedState,
    load_state,
    remove_stale_temp_files,
)
from tei_manager.supervisor.gpus import count_gpus
from tei_manager.supervisor.orphans import manager_alive, read_runtime, reap_orphans
from tei_manager.supervisor.procfs import read_stat

__all__ = ["Prepared", "prepare"]


class Prepared(msgspec.Struct, frozen=True, kw_only=True):
    """What start-up found on disk."""

    loaded: LoadedState
    gpu_count: int
    start_ticks: int | None


def prepare(config: ManagerConfig, *, runtime_file: Path, gpu_count: int | None) -> Prepared:
    """Directories, orphans of a crashed manager, GPUs, the state file.

    ``gpu_count`` given (tests) replaces the GPU detection.
    """
    for field, directory in (
        ("log_dir", Path(config.log_dir)),
        ("state_file", Path(config.state_file).parent),
    ):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{field}: cannot create {directory}: {e.strerror}") from None
    runtime = read_runtime(runtime_file)
    if runtime is not None:
        if manager_alive(runtime):
            raise ConfigError(
                f"state_file: another tei-manager (pid {runtime.manager_pid}) is running "
                f"with {config.state_file}: use another state_file"
            )
        reap_orphans(runtime)
    # No other manager uses this state file (checked above): a temp file beside it
    # is a save that a crash interrupted.
    remove_stale_temp_files(config.state_file)
    gpus = gpu_count if gpu_count is not None else count_gpus()
    if config.auto_restore_on_restart:
        loaded = load_state(config.state_file)
        if loaded.corrupt and loaded.moved_to is None:
            # Starting would overwrite it with the seeds' state at the first save.
            raise ConfigError(
                f"state_file: {config.state_file} is unusable ({loaded.error}) and cannot "
                "be moved aside: move or fix it, then start again"
            )
    else:
        loaded = LoadedState(state=PersistedState())
    stat = read_stat(os.getpid())
    return Prepared(
        loaded=loaded, gpu_count=gpus, start_ticks=None if stat is None else stat.start_ticks
    )
