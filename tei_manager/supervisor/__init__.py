"""Instance processes: launch commands, spawning, supervision, orphan reaping."""

from __future__ import annotations

from tei_manager.supervisor.instance import (
    STOP_GRACE_CAP_SECS,
    InstanceRunner,
    ProcessHandle,
    RunnerSettings,
    Spawner,
)
from tei_manager.supervisor.launch import LaunchSpec, Program, launch_spec, resolve_program
from tei_manager.supervisor.probe import ProbeError, Prober, info_probe
from tei_manager.supervisor.process import InstanceProcess, SpawnError, spawn

__all__ = [
    "STOP_GRACE_CAP_SECS",
    "InstanceProcess",
    "InstanceRunner",
    "LaunchSpec",
    "ProbeError",
    "Prober",
    "ProcessHandle",
    "Program",
    "RunnerSettings",
    "SpawnError",
    "Spawner",
    "info_probe",
    "launch_spec",
    "resolve_program",
    "spawn",
]
