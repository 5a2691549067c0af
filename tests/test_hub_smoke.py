"""Smoke loads with stand-in backends (real processes, no model): the timeout, a backend
that dies, and what its log says. Real models are smoke-loaded in test_hub_registry."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio

from tei_manager.hub.settings import RegistrySettings
from tei_manager.hub.smoke import SmokeLoadError, _readable, smoke_load, smoke_log_path
from tei_manager.supervisor.launch import Program
from tei_manager.supervisor.procfs import read_stat


def _program(code: str) -> Program:
    # The flags an instance gets follow "-c CODE" and land in sys.argv, unused.
    return Program(argv=(sys.executable, "-c", code), is_tei=False)


async def test_a_backend_that_never_answers_times_out_and_is_stopped(tmp_path: Path) -> None:
    code = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(600)"
    settings = RegistrySettings(smoke_load_timeout_secs=1.0, readiness_interval_secs=0.05)
    started = trio.current_time()
    with pytest.raises(SmokeLoadError, match=r"^no answer within 1 s; last log lines:\n") as e:
        await smoke_load(
            "acme/m",
            None,
            gpu_id=None,
            program=_program(code),
            log_dir=tmp_path,
            env={},
            settings=settings,
        )
    assert trio.current_time() - started < 30
    pid = int(str(e.value).rsplit("pid ", 1)[1].split()[0])
    stat = read_stat(pid)
    assert stat is None or stat.state == "Z"  # SIGTERM, then reaped


async def test_a_backend_that_dies_says_why(tmp_path: Path) -> None:
    code = (
        "import os, sys; print('gpu', os.environ.get('CUDA_VISIBLE_DEVICES'), flush=True); "
        "print('cannot open model.safetensors', flush=True); sys.exit(3)"
    )
    with pytest.raises(SmokeLoadError) as e:
        await smoke_load(
            "acme/m",
            "v1",
            gpu_id=1,
            program=_program(code),
            log_dir=tmp_path,
            env={"PATH": "/usr/bin"},
            settings=RegistrySettings(),
        )
    message = str(e.value)
    assert message.startswith("the model server exited with code 3 before it answered")
    assert message.endswith("cannot open model.safetensors")
    log = smoke_log_path(tmp_path, "acme/m")
    assert log == tmp_path / "models" / "models--acme--m.log"
    text = log.read_text()
    # Launched like an instance: the model, its revision, a port; its GPU in the env.
    assert "--model-id acme/m" in text and "--revision v1" in text and "--port " in text
    assert "gpu 1\n" in text


def test_json_log_lines_are_made_readable() -> None:
    worker = json.dumps(
        {
            "level": "ERROR",
            "message": "worker failed",
            "exception": "Traceback (most recent call last):\n  | x\n"
            "  | ModelLoadError: no tokenizer.json\n  +------------",
        }
    )
    assert _readable(worker) == "ERROR worker failed: ModelLoadError: no tokenizer.json"
    tei = json.dumps({"level": "INFO", "fields": {"message": "Starting model backend"}})
    assert _readable(tei) == "INFO Starting model backend"
    assert _readable("plain text") == "plain text"
    assert _readable("{not json") == "{not json"
    assert len(_readable("x" * 5000)) == 1000
