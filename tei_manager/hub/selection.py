"""Which files of a repository an instance needs: pure, from the file list and manifests.

A repository often holds the same weights several times (safetensors, PyTorch, ONNX,
OpenVINO, TF, Flax) plus READMEs and training scripts. An instance reads:

- ``config.json`` and the tokenizer files;
- the weights, safetensors preferred: ``model.safetensors``, or the shards a
  ``model.safetensors.index.json`` names; PyTorch ``.bin`` only when there is no
  safetensors;
- for sentence-transformers models, ``modules.json``, ``sentence_bert_config.json``,
  ``config_sentence_transformers.json`` and every module folder ``modules.json``
  names (``1_Pooling/config.json``, ``2_Dense/...``), with the same rules inside.

Two files decide what else is needed (``modules.json`` and the weight indexes), so
planning is a loop: :func:`plan_files` says which of those "manifests" it still needs,
the caller fetches them and asks again.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Final

import msgspec

from tei_manager.hub.paths import safe_repo_path

__all__ = ["Plan", "PlanError", "plan_files"]

MODULES_FILE: Final = "modules.json"
_CONFIG_FILES: Final = (
    "config.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
_TOKENIZER_FILES: Final = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
# In order of preference: a single file, then a sharded set with its index.
_WEIGHTS: Final = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


class PlanError(Exception):
    """The repository cannot give an instance what it needs; ``str()`` says why."""


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """Files to download, in order, or the manifests needed before that can be said."""

    files: tuple[str, ...] = ()
    pending_manifests: tuple[str, ...] = ()


def plan_files(available: Collection[str], manifests: Mapping[str, bytes]) -> Plan:
    """The files an instance needs out of ``available`` (the repository's file names).

    ``manifests`` holds the contents of the manifests fetched so far. While some are
    missing, the answer lists them in ``pending_manifests`` (and no files). Raises
    :class:`PlanError` for a repository without weights, a broken manifest, or a
    manifest naming files that are not there or could escape the snapshot folder.
    """
    names = set(available)
    if MODULES_FILE in names and MODULES_FILE not in manifests:
        return Plan(pending_manifests=(MODULES_FILE,))
    folders = [""]
    if MODULES_FILE in manifests:
        folders += [f for f in _module_folders(manifests[MODULES_FILE]) if f not in folders]
    files: list[str] = []
    pending: list[str] = []

    def add(name: str) -> None:
        if name not in files:
            files.append(name)

    if MODULES_FILE in names:
        add(MODULES_FILE)
    for folder in folders:
        prefix = f"{folder}/" if folder else ""
        for name in (*_CONFIG_FILES, *_TOKENIZER_FILES):
            if prefix + name in names:
                add(prefix + name)
        weights = _weights(names, manifests, prefix, pending)
        if folder == "" and not weights and not _has_module_weights(names, folders):
            raise PlanError(
                "the repository has no model weights: neither model.safetensors nor "
                "pytorch_model.bin (single or sharded)"
            )
        for name in weights:
            add(name)
    if pending:
        return Plan(pending_manifests=tuple(pending))
    if "config.json" not in files and not any(f.endswith("/config.json") for f in files):
        raise PlanError("the repository has no config.json")
    return Plan(files=tuple(files))


def _weights(
    names: set[str], manifests: Mapping[str, bytes], prefix: str, pending: list[str]
) -> list[str]:
    """The weight files of one folder; an index not fetched yet goes to ``pending``."""
    for single, index in _WEIGHTS:
        if prefix + single in names:
            return [prefix + single]
        if prefix + index in names:
            key = prefix + index
            if key not in manifests:
                pending.append(key)
                return [key]
            shards = _index_shards(manifests[key], key)
            missing = [s for s in shards if prefix + s not in names]
            if missing:
                raise PlanError(f"{key} names {missing[0]}, which the repository does not have")
            return [key, *(prefix + s for s in shards)]
    return []


def _has_module_weights(names: set[str], folders: list[str]) -> bool:
    """A sentence-transformers model may keep its transformer in a module folder."""
    return any(
        f"{folder}/{single}" in names or f"{folder}/{index}" in names
        for folder in folders
        if folder
        for single, index in _WEIGHTS
    )


def _load_json(data: bytes, name: str) -> object:
    try:
        return json.loads(data)
    except ValueError as e:
        raise PlanError(f"{name} is not valid JSON: {e}") from None


def _module_folders(data: bytes) -> list[str]:
    """The folders of the modules in ``modules.json`` ("" is the repository root)."""
    modules = _load_json(data, MODULES_FILE)
    if not isinstance(modules, list):
        raise PlanError(f"{MODULES_FILE} is not a list of modules")
    folders: list[str] = []
    for i, module in enumerate(modules):
        path = module.get("path") if isinstance(module, dict) else None
        if not isinstance(path, str):
            raise PlanError(f"{MODULES_FILE}: module {i} has no path")
        path = path.strip("/")
        if path:
            try:
                path = safe_repo_path(path)
            except ValueError as e:
                raise PlanError(f"{MODULES_FILE}: module {i}: {e}") from None
        folders.append(path)
    return folders


def _index_shards(data: bytes, name: str) -> list[str]:
    """The shard files of a weight index, in first-use order."""
    index = _load_json(data, name)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise PlanError(f"{name} has no weight_map")
    shards: list[str] = []
    for shard in weight_map.values():
        if not isinstance(shard, str):
            raise PlanError(f"{name}: weight_map values must be file names")
        try:
            shard = safe_repo_path(shard)
        except ValueError as e:
            raise PlanError(f"{name}: {e}") from None
        if shard not in shards:
            shards.append(shard)
    return shards
