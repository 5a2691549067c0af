"""Which files of a repository an instance needs: exhaustive cases of the pure planner."""

from __future__ import annotations

import json

import pytest

from tei_manager.hub.selection import Plan, PlanError, plan_files

# all-MiniLM-L6-v2 as it is on the Hub: the same weights five times over, and more.
MINILM = {
    ".gitattributes", "README.md", "config.json", "config_sentence_transformers.json",
    "data_config.json", "model.safetensors", "modules.json", "pytorch_model.bin",
    "rust_model.ot", "sentence_bert_config.json", "special_tokens_map.json", "tf_model.h5",
    "tokenizer.json", "tokenizer_config.json", "train_script.py", "vocab.txt",
    "1_Pooling/config.json", "onnx/model.onnx", "onnx/model_O1.onnx", "openvino/openvino_model.bin",
    "openvino/openvino_model.xml", "2_Normalize/.gitkeep",
}  # fmt: skip
_ST = "sentence_transformers.models."
MODULES = json.dumps(
    [
        {"idx": 0, "name": "0", "path": "", "type": _ST + "Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST + "Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": _ST + "Normalize"},
    ]
).encode()


def _index(*shards: str) -> bytes:
    return json.dumps(
        {"metadata": {}, "weight_map": {f"layer.{i}": s for i, s in enumerate(shards)}}
    ).encode()


def test_modules_json_comes_first() -> None:
    assert plan_files(MINILM, {}) == Plan(pending_manifests=("modules.json",))


def test_sentence_transformers_model_gets_its_modules_and_safetensors_only() -> None:
    plan = plan_files(MINILM, {"modules.json": MODULES})
    assert plan.pending_manifests == ()
    assert set(plan.files) == {
        "modules.json",
        "config.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "model.safetensors",
        "1_Pooling/config.json",
    }


def test_plain_transformers_model() -> None:
    files = {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "README.md"}
    assert plan_files(files, {}).files == (
        "config.json",
        "tokenizer.json",
        "vocab.txt",
        "model.safetensors",
    )


def test_pytorch_weights_only_when_there_is_no_safetensors() -> None:
    files = {"config.json", "pytorch_model.bin", "tokenizer.json"}
    assert "pytorch_model.bin" in plan_files(files, {}).files
    both = files | {"model.safetensors"}
    assert "pytorch_model.bin" not in plan_files(both, {}).files


def test_sharded_weights_follow_the_index() -> None:
    files = {
        "config.json",
        "tokenizer.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "pytorch_model.bin",
    }
    first = plan_files(files, {})
    assert first.pending_manifests == ("model.safetensors.index.json",)
    index = _index(
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model-00001-of-00002.safetensors",
    )
    plan = plan_files(files, {"model.safetensors.index.json": index})
    assert plan.files == (
        "config.json",
        "tokenizer.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    )


def test_sharded_pytorch_weights() -> None:
    files = {"config.json", "pytorch_model.bin.index.json", "pytorch_model-1.bin"}
    index = {"pytorch_model.bin.index.json": _index("pytorch_model-1.bin")}
    assert plan_files(files, index).files[-1] == "pytorch_model-1.bin"


def test_transformer_in_a_module_folder_with_dense_weights() -> None:
    modules = json.dumps(
        [{"path": "0_Transformer"}, {"path": "1_Pooling"}, {"path": "2_Dense"}]
    ).encode()
    files = {
        "modules.json",
        "0_Transformer/config.json",
        "0_Transformer/model.safetensors",
        "0_Transformer/pytorch_model.bin",
        "0_Transformer/tokenizer.json",
        "1_Pooling/config.json",
        "2_Dense/config.json",
        "2_Dense/pytorch_model.bin",
    }
    plan = plan_files(files, {"modules.json": modules})
    assert set(plan.files) == files - {"0_Transformer/pytorch_model.bin"}


@pytest.mark.parametrize(
    ("files", "manifests", "says"),
    [
        ({"config.json", "tokenizer.json"}, {}, "no model weights"),
        ({"model.safetensors"}, {}, "no config.json"),
        (
            {"config.json", "model.safetensors.index.json"},
            {"model.safetensors.index.json": _index("missing.safetensors")},
            "names missing.safetensors, which the repository does not have",
        ),
        (
            {"config.json", "model.safetensors.index.json"},
            {"model.safetensors.index.json": _index("../../escape.safetensors")},
            "unsafe file name",
        ),
        (
            {"config.json", "model.safetensors.index.json"},
            {"model.safetensors.index.json": b'{"weight_map": {}}'},
            "has no weight_map",
        ),
        (
            {"config.json", "model.safetensors", "modules.json"},
            {"modules.json": json.dumps([{"path": "../../etc"}]).encode()},
            "unsafe file name",
        ),
        (
            {"config.json", "model.safetensors", "modules.json"},
            {"modules.json": b"{not json"},
            "modules.json is not valid JSON",
        ),
        (
            {"config.json", "model.safetensors", "modules.json"},
            {"modules.json": b'{"path": ""}'},
            "not a list of modules",
        ),
        (
            {"config.json", "model.safetensors", "modules.json"},
            {"modules.json": b'[{"name": "0"}]'},
            "module 0 has no path",
        ),
    ],
)
def test_unusable_repositories(files: set[str], manifests: dict[str, bytes], says: str) -> None:
    with pytest.raises(PlanError, match=says.replace("(", r"\(")):
        plan_files(files, manifests)
