"""Names and places in the Hugging Face cache, and the checks that keep them inside it.

Pure: no I/O. A model id and a revision both end up in file system paths
(``models--org--name/refs/<revision>``), and a repository's own file names (from the
Hub, from ``modules.json``, from a weight index) end up under a snapshot folder, so
every one of them is checked here before anything is joined to a path.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Mapping
from typing import Final

from tei_manager.config import validate_model_id
from tei_manager.errors import ErrorCode, ValidationError, quote

__all__ = [
    "REPO_PREFIX",
    "REVISION_SCHEMA",
    "hub_cache_dir",
    "is_commit_hash",
    "model_id_from_folder",
    "repo_folder_name",
    "safe_repo_path",
    "validate_hub_model_id",
    "validate_revision",
]

REPO_PREFIX: Final = "models--"
_COMMIT_RE: Final = re.compile(r"[0-9a-f]{40}")
# Branch and tag names as git allows them, less what could climb out of refs/.
_REVISION_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")
# The same rule as JSON Schema for the OpenAPI document: no empty, "." or ".." part.
REVISION_SCHEMA: Final = {
    "pattern": r"^(?!.*//)(?!.*/$)(?!(?:.*/)?\.\.?(?:/|$))[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$"
}
_MAX_REPO_PATH: Final = 1024


def hub_cache_dir(env: Mapping[str, str]) -> str:
    """Where huggingface_hub keeps models, by its own rules.

    ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE`` (older name), else
    ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
    ``~/.cache/huggingface/hub``.
    """
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return os.path.expanduser(os.path.expandvars(env[name]))
    home = env.get("HF_HOME")
    if not home:
        xdg = env.get("XDG_CACHE_HOME") or os.path.join(
            env.get("HOME") or os.path.expanduser("~"), ".cache"
        )
        home = os.path.join(xdg, "huggingface")
    return os.path.join(os.path.expanduser(os.path.expandvars(home)), "hub")


def validate_hub_model_id(model_id: str, field: str = "model_id") -> None:
    """A Hugging Face repo id (``org/name`` or ``name``); a local path is refused.

    The registry keeps models in the Hugging Face cache, so a path (which an
    instance may use directly) has no place here.
    """
    validate_model_id(model_id, field)
    if model_id.startswith("/"):
        raise ValidationError(
            field,
            f"{quote(model_id)} is a local path: the registry holds Hugging Face models, "
            "use 'org/name'",
            code=ErrorCode.INVALID_MODEL_ID,
        )


def validate_revision(revision: str, field: str = "revision") -> None:
    """A branch, tag or commit hash that stays inside ``refs/`` when used as a path."""
    parts = revision.split("/")
    if not _REVISION_RE.fullmatch(revision) or any(p in ("", ".", "..") for p in parts):
        shown = revision if len(revision) <= 64 else revision[:64] + "..."
        raise ValidationError(
            field,
            f"{quote(shown)} is not a valid revision: use a branch, tag or commit hash "
            "(letters, digits, '.', '_', '-' and '/', no '..')",
        )


def is_commit_hash(revision: str) -> bool:
    """Whether ``revision`` is a full 40-hex-digit commit hash."""
    return _COMMIT_RE.fullmatch(revision) is not None


def repo_folder_name(model_id: str) -> str:
    """``org/name`` → ``models--org--name``, huggingface_hub's folder for the repo."""
    return REPO_PREFIX + model_id.replace("/", "--")


def model_id_from_folder(folder: str) -> str | None:
    """``models--org--name`` → ``org/name``; None for a folder that is not a model's."""
    if not folder.startswith(REPO_PREFIX):
        return None
    return folder[len(REPO_PREFIX) :].replace("--", "/")


def safe_repo_path(path: str) -> str:
    """A file name from a repository, normalised; raises ValueError if it could escape.

    Names come from the Hub's file list, ``modules.json`` and weight indexes: none of
    them may be absolute, contain ``..`` or a backslash, or be empty.
    """
    if (
        not path
        or len(path) > _MAX_REPO_PATH
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
    ):
        raise ValueError(f"unsafe file name in the repository: {quote(path[:200])}")
    normal = posixpath.normpath(path)
    if (
        normal in (".", "..")
        or normal.startswith("../")
        or any(part in ("", "..") for part in normal.split("/"))
    ):
        raise ValueError(f"unsafe file name in the repository: {quote(path[:200])}")
    return normal
