"""``tei-manager serve`` start-up failures: one line on stderr and exit status 2.

The running service (signals, graceful shutdown, restore) is tested with real
processes in ``tests/e2e/test_manager_processes.py``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tei_manager.manager.serve import main
from tei_manager.supervisor.orphans import RuntimeFile, runtime_path, write_runtime
from tei_manager.supervisor.procfs import read_stat

ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """``main`` configures the root logger; give pytest's handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.toml"
    state = tmp_path / "state.toml"
    path.write_text(f'state_file = "{state}"\nlog_dir = "{tmp_path / "logs"}"\n{body}')
    return path


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()


def test_an_invalid_config_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(str(_config(tmp_path, "api_port = 80\n"))) == 2
    assert _one_line(capsys) == "tei-manager: api_port: 80 is privileged: use 1024-65535"


def test_a_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(str(tmp_path / "nope.toml")) == 2
    assert _one_line(capsys).startswith("tei-manager: ")


def test_a_tei_binary_that_cannot_run_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, f'tei_binary_path = "{tmp_path / "tei"}"\n')
    assert main(str(config)) == 2
    assert _one_line(capsys).startswith("tei-manager: tei_binary_path: ")


def test_a_second_manager_on_the_same_state_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tei_manager.api.server")
    # The "other manager" is a process that is certainly alive: our parent.
    parent = read_stat(os.getppid())
    assert parent is not None
    write_runtime(
        runtime_path(tmp_path / "state.toml"),
        RuntimeFile(manager_pid=parent.pid, manager_start_ticks=parent.start_ticks),
    )
    config = _config(tmp_path, "api_port = 0\ngrpc_port = 0\napi_host = '127.0.0.1'\n")
    assert main(str(config)) == 2
    line = _one_line(capsys)
    assert line.startswith(f"tei-manager: state_file: another tei-manager (pid {parent.pid})")


def test_a_log_dir_that_cannot_be_created_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tei_manager.api.server")
    (tmp_path / "file").write_text("")
    config = _config(tmp_path, "api_port = 0\ngrpc_port = 0\napi_host = '127.0.0.1'\n")
    config.write_text(config.read_text().replace(str(tmp_path / "logs"), str(tmp_path / "file/x")))
    assert main(str(config)) == 2
    assert _one_line(capsys).startswith(f"tei-manager: log_dir: cannot create {tmp_path}/file/x")


def test_the_cli_runs_serve(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tei_manager", "serve", "--config", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "nope.toml" in done.stderr


@pytest.mark.parametrize(
    ("auth", "field"),
    [
        (
            '[auth]\nenabled = true\nproviders = ["mtls"]\nrequire_cert_headers = true\n'
            'trusted_proxies = ["127.0.0.1"]\n[auth.mtls]\nca_cert = "{dir}/none.pem"\n',
            "auth.mtls.ca_cert: cannot read",
        ),
        (
            '[auth]\nenabled = true\nproviders = ["api_key"]\n[auth.api_key]\n'
            'keys = [{{ name = "a", scopes = ["read"], env = "TEI_TEST_UNSET_KEY" }}]\n',
            "auth.api_key.keys[0].env: TEI_TEST_UNSET_KEY is not set",
        ),
        (
            '[auth.mtls]\nserver_cert = "{dir}/config.toml"\nserver_key = "{dir}/config.toml"\n',
            "auth.mtls.server_cert: cannot load",
        ),
    ],
)
def test_unusable_security_files_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], auth: str, field: str
) -> None:
    assert main(str(_config(tmp_path, auth.format(dir=tmp_path)))) == 2
    assert _one_line(capsys).startswith(f"tei-manager: {field}")
