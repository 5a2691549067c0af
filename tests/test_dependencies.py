"""The dependency list is honest: every runtime dependency is imported, and none that
only tests use is pulled by ``pip install .``."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Distribution name → the module the package imports it as, where they differ.
IMPORT_NAMES = {
    "quart-trio": "quart_trio",
    "tomli-w": "tomli_w",
    "prometheus-client": "prometheus_client",
    "protobuf": "google.protobuf",
    "huggingface-hub": "huggingface_hub",
}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def _project() -> dict[str, object]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        project: dict[str, object] = tomllib.load(f)["project"]
    return project


def test_runtime_needs_none_of_the_test_peers() -> None:
    runtime = _names(_project()["dependencies"])  # type: ignore[arg-type]
    # purerpc and trio-util: imported by nothing; h2: only tests and benches use it
    # (Hypercorn still brings it, for its own HTTP/2).
    assert not runtime & {"purerpc", "h2", "hyperframe", "trio-util"}
    dev = _names(_project()["optional-dependencies"]["dev"])  # type: ignore[index]
    assert {"h2", "hyperframe", "schemathesis"} <= dev


def test_every_runtime_dependency_is_imported() -> None:
    source = "\n".join(path.read_text() for path in (ROOT / "tei_manager").rglob("*.py"))
    for name in _names(_project()["dependencies"]):  # type: ignore[arg-type]
        module = IMPORT_NAMES.get(name, name)
        pattern = rf"^\s*(?:import|from) {re.escape(module)}[\s.]"
        assert re.search(pattern, source, re.MULTILINE), f"{name} is imported by nothing"
