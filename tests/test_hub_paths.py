"""Model ids, revisions and repository file names on their way into cache paths."""

from __future__ import annotations

import pytest

from tei_manager.errors import ErrorCode, ValidationError
from tei_manager.hub.paths import (
    hub_cache_dir,
    is_commit_hash,
    model_id_from_folder,
    repo_folder_name,
    safe_repo_path,
    validate_hub_model_id,
    validate_revision,
)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HF_HUB_CACHE": "/c/hub", "HF_HOME": "/h", "HOME": "/home/u"}, "/c/hub"),
        ({"HUGGINGFACE_HUB_CACHE": "/old", "HF_HOME": "/h"}, "/old"),
        ({"HF_HOME": "/h", "XDG_CACHE_HOME": "/x"}, "/h/hub"),
        ({"XDG_CACHE_HOME": "/x", "HOME": "/home/u"}, "/x/huggingface/hub"),
        ({"HOME": "/home/u"}, "/home/u/.cache/huggingface/hub"),
        ({"HF_HUB_CACHE": "", "HF_HOME": "/h"}, "/h/hub"),  # empty means unset
    ],
)
def test_cache_dir_follows_huggingface_hub(env: dict[str, str], expected: str) -> None:
    assert hub_cache_dir(env) == expected


@pytest.mark.parametrize("model_id", ["BAAI/bge-small-en-v1.5", "bert-base-uncased", "a_b/c.d"])
def test_hub_model_ids(model_id: str) -> None:
    validate_hub_model_id(model_id)


@pytest.mark.parametrize(
    ("model_id", "says"),
    [
        ("../etc", "'..'"),
        ("org/../../etc", "'..'"),
        ("../../etc/passwd", "'..'"),
        ("/etc/passwd", "local path"),
        ("/models/bge", "local path"),
        ("a/b/c", "not 'org/name'"),
        ("org/na--me", "not a valid Hugging Face id"),
        ("org\\name", "backslash"),
        ("org/name\n", "control character"),
        ("", "must not be empty"),
    ],
)
def test_bad_model_ids_name_the_field(model_id: str, says: str) -> None:
    with pytest.raises(ValidationError) as error:
        validate_hub_model_id(model_id)
    assert error.value.code is ErrorCode.INVALID_MODEL_ID
    assert error.value.field == "model_id"
    assert says in error.value.message


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/1", "a" * 40, "release_2"])
def test_revisions(revision: str) -> None:
    validate_revision(revision)


@pytest.mark.parametrize("revision", ["", "../x", "a/../b", "/abs", "a//b", "a/", ".", "x y"])
def test_revisions_that_could_leave_refs_are_refused(revision: str) -> None:
    with pytest.raises(ValidationError) as error:
        validate_revision(revision)
    assert error.value.field == "revision"


def test_commit_hashes() -> None:
    assert is_commit_hash("0123456789abcdef0123456789abcdef01234567")
    assert not is_commit_hash("main")
    assert not is_commit_hash("0123456789ABCDEF0123456789ABCDEF01234567")


def test_repo_folders_round_trip() -> None:
    assert repo_folder_name("BAAI/bge-small") == "models--BAAI--bge-small"
    assert model_id_from_folder("models--BAAI--bge-small") == "BAAI/bge-small"
    assert model_id_from_folder("models--gpt2") == "gpt2"
    assert model_id_from_folder("datasets--x--y") is None


@pytest.mark.parametrize(
    ("name", "normal"),
    [("config.json", "config.json"), ("1_Pooling/config.json", "1_Pooling/config.json"),
     ("a/./b", "a/b"), ("a//b", "a/b")],
)  # fmt: skip
def test_safe_repo_paths(name: str, normal: str) -> None:
    assert safe_repo_path(name) == normal


@pytest.mark.parametrize(
    "name", ["", "/etc/passwd", "../x", "a/../../x", "..", "a\\b", "a/\x00", "."]
)
def test_unsafe_repo_paths(name: str) -> None:
    with pytest.raises(ValueError, match="unsafe file name"):
        safe_repo_path(name)
