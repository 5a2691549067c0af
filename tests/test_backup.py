"""Backup documents (pure) and ``tei-manager state export|import`` on a stopped node."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
import tomli_w

from tei_manager.cli import main
from tei_manager.config import InstanceConfig, ManagerConfig
from tei_manager.core.instances import DesiredState
from tei_manager.errors import ErrorCode, ValidationError
from tei_manager.manager.backup import Backup, BackupModel, decode_backup, encode_backup
from tei_manager.manager.state import PersistedInstance, PersistedState, load_state, save_state
from tei_manager.supervisor.orphans import RuntimeFile, runtime_path, write_runtime
from tei_manager.supervisor.procfs import read_stat

CREATED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
CONFIG = ManagerConfig(state_file="/unused/state.toml", log_dir="/unused/logs", max_instances=3)


def _instance(name: str, **fields: object) -> PersistedInstance:
    config = InstanceConfig(name=name, model_id="org/model", **fields)  # type: ignore[arg-type]
    return PersistedInstance(config=config, desired_state=DesiredState.RUNNING, created_at=CREATED)


def _doc(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {"kind": "tei-manager-state", "version": 1}
    base.update(fields)
    return base


def _instance_doc(name: str, **config: object) -> dict[str, object]:
    return {
        "config": {"name": name, "model_id": "org/model", **config},
        "desired_state": "stopped",
        "created_at": CREATED,
    }


def test_a_backup_round_trips_through_toml() -> None:
    backup = Backup(
        exported_at=CREATED,
        instances=(
            _instance("a", port=9100, pooling="cls"),
            PersistedInstance(
                config=InstanceConfig(name="b", model_id="/models/b", gpu_id=0),
                desired_state=DesiredState.STOPPED,
                created_at=CREATED,
            ),
        ),
        models=(BackupModel(model_id="org/model", revision="main"),),
    )
    data = encode_backup(backup)
    assert b'kind = "tei-manager-state"' in data and b"gpu_id = 0" in data
    assert decode_backup(data, CONFIG, gpu_count=1) == backup


@pytest.mark.parametrize(
    ("document", "field", "code"),
    [
        (_doc(version=2), "version", ErrorCode.VALIDATION_ERROR),
        (_doc(kind="other"), "kind", ErrorCode.VALIDATION_ERROR),
        (_doc(extra=1), "", ErrorCode.VALIDATION_ERROR),  # "unknown field \"extra\""
        (_doc(instances=[_instance_doc("ok"), _instance_doc("-bad")]), "instances[1].config.name",
         ErrorCode.INVALID_NAME),
        (_doc(instances=[_instance_doc("a", port=80)]), "instances[0].config.port",
         ErrorCode.INVALID_PORT),
        (_doc(instances=[_instance_doc("a", gpu_id=1)]), "instances[0].config.gpu_id",
         ErrorCode.INVALID_GPU_ID),
        (_doc(instances=[_instance_doc("a"), _instance_doc("a")]), "instances[1].config.name",
         ErrorCode.VALIDATION_ERROR),
        (_doc(instances=[_instance_doc("a", port=9000)]), "instances[0].config.port",
         ErrorCode.VALIDATION_ERROR),
        (_doc(instances=[_instance_doc("a", port=9100), _instance_doc("b", prometheus_port=9100)]),
         "instances[1].config.prometheus_port", ErrorCode.VALIDATION_ERROR),
        (_doc(instances=[_instance_doc(n) for n in "abcd"]), "instances",
         ErrorCode.VALIDATION_ERROR),
        (_doc(models=[{"model_id": "org/a"}, {"model_id": "org/a"}]), "models[1].model_id",
         ErrorCode.VALIDATION_ERROR),
        (_doc(models=[{"model_id": "/local/dir"}]), "models[0].model_id",
         ErrorCode.VALIDATION_ERROR),
        (_doc(models=[{"model_id": "a/b/c"}]), "models[0].model_id", ErrorCode.INVALID_MODEL_ID),
    ],
)  # fmt: skip
def test_a_bad_backup_is_refused_naming_the_field(
    document: dict[str, object], field: str, code: ErrorCode
) -> None:
    with pytest.raises(ValidationError) as caught:
        decode_backup(tomli_w.dumps(document).encode(), CONFIG, gpu_count=1)
    assert caught.value.field == field, caught.value
    assert caught.value.code is code


def test_invalid_toml_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match=r"^body: invalid TOML"):
        decode_backup(b"instances = [", CONFIG, gpu_count=None)


# --- the CLI ------------------------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stopped node: its config file, an empty Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for var in ("TEI_MANAGER_STATE_FILE", "TEI_MANAGER_CONFIG", "TEI_MANAGER_LOG_DIR"):
        monkeypatch.delenv(var, raising=False)
    config = tmp_path / "config.toml"
    config.write_text(
        f'state_file = "{tmp_path / "state.toml"}"\nlog_dir = "{tmp_path / "logs"}"\n'
        'models = ["org/configured"]\n'
    )
    return config


def test_export_then_import_moves_a_node_to_another(
    node: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = PersistedState(instances=(_instance("a", port=9100), _instance("b")))
    save_state(tmp_path / "state.toml", state)
    backup = tmp_path / "backup.toml"
    assert main(["state", "export", str(backup), "--config", str(node)]) == 0
    exported = decode_backup(backup.read_bytes(), CONFIG, gpu_count=None)
    assert exported.instances == state.instances
    assert [m.model_id for m in exported.models] == ["org/configured"]
    # The "other node": an empty state file of its own.
    other = tmp_path / "other.toml"
    other.write_text(f'state_file = "{tmp_path / "other" / "state.toml"}"\n')
    assert main(["state", "import", str(backup), "--config", str(other)]) == 0
    assert "imported 2 instance(s)" in capsys.readouterr().out
    assert load_state(tmp_path / "other" / "state.toml").state == state


def test_a_bad_import_changes_nothing(
    node: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_state(tmp_path / "state.toml", PersistedState(instances=(_instance("keep"),)))
    before = (tmp_path / "state.toml").read_bytes()
    bad = tmp_path / "bad.toml"
    bad.write_text(tomli_w.dumps(_doc(instances=[_instance_doc("a"), _instance_doc("-x")])))
    assert main(["state", "import", str(bad), "--config", str(node)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tei-manager state: ") and "instances[1].config.name" in err
    assert (tmp_path / "state.toml").read_bytes() == before


def test_import_refuses_to_write_under_a_running_manager(
    node: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parent = read_stat(os.getppid())  # a process certainly alive: "the manager"
    assert parent is not None
    write_runtime(
        runtime_path(tmp_path / "state.toml"),
        RuntimeFile(manager_pid=parent.pid, manager_start_ticks=parent.start_ticks),
    )
    backup = tmp_path / "backup.toml"
    backup.write_bytes(encode_backup(Backup()))
    assert main(["state", "import", str(backup), "--config", str(node)]) == 1
    assert "use POST /state/import" in capsys.readouterr().err
    assert not (tmp_path / "state.toml").exists()
