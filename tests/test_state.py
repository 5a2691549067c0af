from __future__ import annotations

import logging
import os
import re
import stat
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from tei_manager.config import InstanceConfig, SeedInstance
from tei_manager.core.instances import DesiredState, InstanceTable
from tei_manager.core.ports import PortAllocator
from tei_manager.errors import ErrorCode, TeiError
from tei_manager.manager.state import (
    LoadedState,
    PersistedInstance,
    PersistedState,
    StateFileReport,
    decode_state,
    encode_state,
    load_state,
    merge_seeds,
    remove_stale_temp_files,
    save_state,
    state_from_instances,
)

T0 = datetime(2025, 1, 15, 10, 30, tzinfo=UTC)
T1 = datetime(2025, 1, 16, 8, 0, 0, 250000, tzinfo=UTC)


def persisted(
    name: str, desired: DesiredState = DesiredState.RUNNING, **fields: object
) -> PersistedInstance:
    config = InstanceConfig(name=name, model_id=f"org/{name}", **fields)  # type: ignore[arg-type]
    return PersistedInstance(config=config, desired_state=desired, created_at=T0)


FULL = PersistedState(
    instances=(
        persisted("b", port=8080),
        persisted(
            "a",
            DesiredState.STOPPED,
            port=8081,
            prometheus_port=8082,
            gpu_id=0,
            pooling="splade",
            max_batch_tokens=1024,
            max_concurrent_requests=8,
            startup_timeout_secs=12.5,
            extra_args=("--dtype", "float16"),
            revision="main",
            served_model_name="text-embedding-3-small",
        ),
    )
)


# --- encoding ------------------------------------------------------------------


def test_round_trip_keeps_everything_in_order() -> None:
    assert decode_state(encode_state(FULL)) == FULL


def test_encoding_is_readable_toml_without_nulls() -> None:
    text = encode_state(PersistedState(instances=(persisted("b", port=8080),))).decode()
    assert "None" not in text and "null" not in text
    assert "revision" not in text and "gpu_id" not in text
    assert 'desired_state = "running"' in text
    assert "created_at = 2025-01-15 10:30:00+00:00" in text  # a native TOML datetime
    assert 'name = "b"' in text and "port = 8080" in text


def test_microseconds_survive() -> None:
    state = PersistedState(instances=(msgspec_replace(persisted("a"), created_at=T1),))
    assert decode_state(encode_state(state)).instances[0].created_at == T1


def msgspec_replace(inst: PersistedInstance, **changes: object) -> PersistedInstance:
    return msgspec.structs.replace(inst, **changes)


def test_empty_state() -> None:
    assert decode_state(b"") == PersistedState()
    assert decode_state(encode_state(PersistedState())) == PersistedState()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"instances = [", "Invalid"),
        (b"version = 2", "version 2 is not supported"),
        (b"surprise = 1", "unknown field"),
        (
            b'[[instances]]\ndesired_state = "paused"\ncreated_at = 2025-01-01T00:00:00Z\n'
            b'[instances.config]\nname = "a"\nmodel_id = "m"\n',
            "Invalid enum value",
        ),
        (
            b'[[instances]]\ndesired_state = "running"\ncreated_at = 2025-01-01T00:00:00Z\n'
            b'[instances.config]\nname = "a b"\nmodel_id = "m"\n',
            'instances[0].config.name: "a b" is not allowed',
        ),
    ],
)
def test_decode_rejects_bad_files(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        decode_state(data)


def test_decode_rejects_duplicate_names() -> None:
    data = encode_state(PersistedState(instances=(persisted("a"), persisted("a"))))
    with pytest.raises(ValueError, match='instances\\[1\\]: duplicate name "a"'):
        decode_state(data)


# --- atomic save ---------------------------------------------------------------


def test_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "state.toml"
    save_state(path, FULL)
    assert load_state(path) == LoadedState(state=FULL)
    assert os.listdir(path.parent) == ["state.toml"]


def test_save_replaces_previous_state(tmp_path: Path) -> None:
    path = tmp_path / "state.toml"
    save_state(path, FULL)
    save_state(path, PersistedState())
    assert load_state(path).state == PersistedState()


def test_saved_file_is_world_readable_subject_to_umask(tmp_path: Path) -> None:
    path = tmp_path / "state.toml"
    old = os.umask(0o022)
    try:
        save_state(path, FULL)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_save_fsyncs_file_then_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_state(tmp_path / "state.toml", FULL)
    assert events == ["fsync file", "replace", "fsync dir"]


@pytest.mark.parametrize("failing", ["fsync", "replace", "write"])
def test_failed_write_leaves_old_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "state.toml"
    save_state(path, FULL)
    before = path.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    if failing == "write":
        monkeypatch.setattr(os, "fdopen", _fdopen_failing_write(os.fdopen))
    else:
        monkeypatch.setattr(os, failing, boom)
    with pytest.raises(TeiError) as info:
        save_state(path, PersistedState())
    monkeypatch.undo()
    assert info.value.code is ErrorCode.IO_ERROR
    assert "No space left on device" in str(info.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["state.toml"]  # the temp file is cleaned up


def _fdopen_failing_write(real_fdopen: object) -> object:
    class FailingFile:
        def __init__(self, fd: int, *args: object) -> None:
            self._f = real_fdopen(fd, *args)  # type: ignore[operator]

        def __enter__(self) -> FailingFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.close()

        def write(self, data: bytes) -> int:
            self._f.write(data[:3])  # a torn write, then the disk fills up
            raise OSError(28, "No space left on device")

    return FailingFile


def test_crash_mid_write_leaves_old_file_and_a_harmless_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill between write and rename: no cleanup runs at all."""
    path = tmp_path / "state.toml"
    save_state(path, FULL)

    class Killed(BaseException):
        pass

    def killed(*args: object) -> None:
        raise Killed

    monkeypatch.setattr(os, "replace", killed)
    # Simulate "no cleanup ran": keep the temp file where the kill left it.
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: None)
    with pytest.raises(Killed):
        save_state(path, PersistedState())
    monkeypatch.undo()
    leftovers = sorted(os.listdir(tmp_path))
    assert len(leftovers) == 2 and leftovers[1] == "state.toml"
    assert leftovers[0].startswith(".state.toml.") and leftovers[0].endswith(".tmp")
    # The complete new state sits in the temp file; the live file is the old one.
    assert decode_state((tmp_path / leftovers[0]).read_bytes()) == PersistedState()
    assert load_state(path) == LoadedState(state=FULL)


def test_stale_temp_files_are_removed_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "state.toml"
    save_state(path, FULL)
    stale = [tmp_path / ".state.toml.0a1b2c3d.tmp", tmp_path / ".state.toml.ffffffff.tmp"]
    for tmp in stale:
        tmp.write_bytes(b"half a save")
    keep = [
        tmp_path / ".other.toml.0a1b2c3d.tmp",  # another state file's
        tmp_path / "state.toml.corrupt-20250115T103000Z",
        tmp_path / "state.toml.runtime",
    ]
    for other in keep:
        other.write_bytes(b"x")
    assert sorted(remove_stale_temp_files(path)) == sorted(map(str, stale))
    assert sorted(os.listdir(tmp_path)) == sorted([p.name for p in keep] + ["state.toml"])
    assert remove_stale_temp_files(path) == []
    assert load_state(path) == LoadedState(state=FULL)


def test_unwritable_directory_raises_io_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TeiError) as info:
        save_state(blocker / "state.toml", FULL)
    assert info.value.code is ErrorCode.IO_ERROR


# --- load: missing and corrupt files -----------------------------------------------


def test_missing_file_is_empty_and_not_corrupt(tmp_path: Path) -> None:
    assert load_state(tmp_path / "none.toml") == LoadedState(state=PersistedState())


def test_corrupt_file_is_moved_aside_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.toml"
    path.write_bytes(b"[[instances]\ngarbage")
    with caplog.at_level(logging.ERROR, logger="tei_manager.manager.state"):
        loaded = load_state(path, now=T0)
    aside = tmp_path / "state.toml.corrupt-20250115T103000Z"
    assert (loaded.state, loaded.corrupt, loaded.moved_to) == (PersistedState(), True, str(aside))
    assert (loaded.error or "").startswith("Expected")  # what TOML found wrong
    assert loaded.report() == StateFileReport(
        status="moved_aside", moved_aside_to=str(aside), error=loaded.error
    )
    assert not path.exists()
    assert aside.read_bytes() == b"[[instances]\ngarbage"  # nothing is lost
    assert "state.toml is unusable" in caplog.text and str(aside) in caplog.text


def test_second_corruption_in_the_same_second_does_not_overwrite_the_first(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.toml"
    path.write_bytes(b"first")
    load_state(path, now=T0)
    path.write_bytes(b"second = [")
    loaded = load_state(path, now=T0)
    assert loaded.moved_to == str(tmp_path / "state.toml.corrupt-20250115T103000Z-1")
    assert (tmp_path / "state.toml.corrupt-20250115T103000Z").read_bytes() == b"first"
    assert (tmp_path / "state.toml.corrupt-20250115T103000Z-1").read_bytes() == b"second = ["


def test_corrupt_file_that_cannot_be_moved_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.toml"
    path.write_bytes(b"version = 99")

    def refuse(*args: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", refuse)
    with caplog.at_level(logging.ERROR, logger="tei_manager.manager.state"):
        loaded = load_state(path)
    assert (loaded.state, loaded.corrupt, loaded.moved_to) == (PersistedState(), True, None)
    assert loaded.error == "version 99 is not supported (expected 1)"
    assert path.read_bytes() == b"version = 99"
    assert "could not be moved aside" in caplog.text


def test_unreadable_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.toml"
    path.mkdir()  # reading a directory fails with an OSError other than "not found"
    loaded = load_state(path, now=T0)
    assert loaded.corrupt and loaded.moved_to is not None
    assert not path.exists()


def test_load_never_raises_on_undecodable_bytes(tmp_path: Path) -> None:
    path = tmp_path / "state.toml"
    path.write_bytes(b"\xff\xfe\x00binary")
    assert load_state(path).corrupt


# --- seeds and the registry -------------------------------------------------------


def test_merge_seeds_adds_only_absent_names() -> None:
    state = PersistedState(instances=(persisted("a", DesiredState.STOPPED, port=8100),))
    seeds = [
        SeedInstance(name="a", model_id="other/model"),
        SeedInstance(name="b", model_id="org/b", auto_start=False),
        SeedInstance(name="c", model_id="org/c"),
        SeedInstance(name="c", model_id="dup/c"),
    ]
    merged, added = merge_seeds(state, seeds, now=T1)
    assert added == ["b", "c"]
    assert merged.names() == ["a", "b", "c"]
    a, b, c = merged.instances
    assert a == state.instances[0]  # the persisted entry wins
    assert (b.desired_state, b.created_at) == (DesiredState.STOPPED, T1)
    assert type(b.config) is InstanceConfig
    assert (c.desired_state, c.config.model_id) == (DesiredState.RUNNING, "org/c")


def test_merged_seeds_round_trip() -> None:
    merged, _ = merge_seeds(PersistedState(), [SeedInstance(name="s", model_id="m")], now=T1)
    assert decode_state(encode_state(merged)) == merged


def test_state_from_registry() -> None:
    ports = PortAllocator(8080, 8090, probe=lambda port: True)
    registry = InstanceTable(ports)
    registry.add(InstanceConfig(name="z", model_id="org/z"), created_at=T0)
    registry.add(
        InstanceConfig(name="y", model_id="org/y", prometheus_port=0),
        created_at=T1,
        desired=DesiredState.STOPPED,
    )
    registry.get("z").pid = 1234  # runtime facts are not persisted
    state = state_from_instances(registry)
    assert state == PersistedState(
        instances=(
            PersistedInstance(
                config=InstanceConfig(name="z", model_id="org/z", port=8080),
                desired_state=DesiredState.RUNNING,
                created_at=T0,
            ),
            PersistedInstance(
                config=InstanceConfig(name="y", model_id="org/y", port=8081, prometheus_port=8082),
                desired_state=DesiredState.STOPPED,
                created_at=T1,
            ),
        )
    )
    assert decode_state(encode_state(state)) == state
