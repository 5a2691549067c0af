"""Backup and restore: the manager's desired state as one TOML document.

``tei-manager state export FILE`` and ``GET /state/export`` write it;
``state import FILE`` and ``POST /state/import`` read it back. It holds what an
operator set up: every instance (its config, whether it is wanted running, when it
was created) and the registered models, so a node's set-up moves to another node
or survives losing its volume. Runtime facts (pids, statuses, counters) are not in
it, as they are not in the state file.

Pure: :func:`decode_backup` checks the whole document against the configuration it
will be restored under and raises :class:`ValidationError` naming the first bad
field, so an import changes nothing unless everything in it is usable.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal

import msgspec
import tomli_w

from tei_manager.config import ManagerConfig, validate_instance_config, validate_model_id
from tei_manager.errors import ValidationError, from_msgspec_error, quote
from tei_manager.manager.state import PersistedInstance

__all__ = [
    "BACKUP_KIND",
    "BACKUP_VERSION",
    "Backup",
    "BackupModel",
    "decode_backup",
    "encode_backup",
]

BACKUP_KIND: Final = "tei-manager-state"
BACKUP_VERSION: Final = 1


class BackupModel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A registered model: its Hugging Face id and the revision it was registered at."""

    model_id: str
    revision: str | None = None


class Backup(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The exported desired state; instances in creation order."""

    kind: Literal["tei-manager-state"] = BACKUP_KIND
    version: int = BACKUP_VERSION
    exported_at: datetime | None = None
    instances: tuple[PersistedInstance, ...] = ()
    models: tuple[BackupModel, ...] = ()


def _drop_none(value: object) -> object:
    # TOML has no null: an absent key means None (every optional field defaults to it).
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_drop_none(v) for v in value]
    return value


def encode_backup(backup: Backup) -> bytes:
    """``backup`` as TOML; datetimes become native TOML datetimes."""
    builtins = msgspec.to_builtins(backup, builtin_types=(datetime,))
    document = _drop_none(builtins)
    assert isinstance(document, dict)
    return tomli_w.dumps(document).encode()


def decode_backup(data: bytes, config: ManagerConfig, *, gpu_count: int | None) -> Backup:
    """Parse and check a backup for restoring under ``config``.

    Every instance config passes the same checks as ``POST /instances`` (``gpu_count``
    bounds ``gpu_id`` when known); names are unique; fixed ports are distinct and not
    the manager's own; the count fits ``max_instances``; models are Hugging Face ids,
    listed once. Raises :class:`ValidationError` naming the field.
    """
    try:
        backup = msgspec.toml.decode(data, type=Backup)
    except msgspec.ValidationError as e:
        raise from_msgspec_error(e) from None
    except msgspec.DecodeError as e:
        raise ValidationError("body", f"invalid TOML: {e}") from None
    if backup.version != BACKUP_VERSION:
        raise ValidationError(
            "version", f"{backup.version} is not supported: this manager reads {BACKUP_VERSION}"
        )
    if config.max_instances is not None and len(backup.instances) > config.max_instances:
        raise ValidationError(
            "instances",
            f"{len(backup.instances)} instances exceed max_instances = {config.max_instances}",
        )
    names: set[str] = set()
    port_owner = {port: "the manager" for port in config.manager_ports()}
    for i, instance in enumerate(backup.instances):
        where = f"instances[{i}].config"
        try:
            validate_instance_config(instance.config, gpu_count=gpu_count)
        except ValidationError as e:
            raise e.at(where) from None
        name = instance.config.name
        if name in names:
            raise ValidationError(f"{where}.name", f"duplicate name {quote(name)}")
        names.add(name)
        for field in ("port", "prometheus_port"):
            port = getattr(instance.config, field)
            if not port:
                continue
            if port in port_owner:
                raise ValidationError(
                    f"{where}.{field}", f"{port} is already used by {port_owner[port]}"
                )
            port_owner[port] = f"instance {quote(name)}"
    models: set[str] = set()
    for i, model in enumerate(backup.models):
        validate_model_id(model.model_id, f"models[{i}].model_id")
        if model.model_id.startswith("/"):
            raise ValidationError(
                f"models[{i}].model_id",
                f"{quote(model.model_id)} is a local path: list Hugging Face ids ('org/name')",
            )
        if model.model_id in models:
            raise ValidationError(f"models[{i}].model_id", f"duplicate {quote(model.model_id)}")
        models.add(model.model_id)
    return backup
