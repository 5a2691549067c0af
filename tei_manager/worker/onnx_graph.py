"""Where a model's ONNX graph comes from: the model folder, the export cache, or an export.

A Hub repo often ships ``onnx/model.onnx``; that graph is used as it is. Otherwise the
torch model is exported once with torch's own (TorchScript) exporter and the graph is
cached under ``onnx_cache_dir()``, keyed by what decides its contents: the model's
revision (or its files' names, sizes and times for a plain folder), the part exported,
the opset and the dtype. Graphs are written atomically (a temporary file, then a
rename) under a name that carries their SHA-256, and the hash is checked on every load,
so a partial or corrupted file is never run: it is deleted and the graph exported again.
``int8`` graphs are the fp32 graph through onnxruntime's dynamic quantisation.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

OnnxDType = Literal["float32", "int8"]
# LayerNormalization is a single op from opset 17 on, which ORT runs fused.
OPSET = 17
# Bumped whenever what this module exports changes, so old cache entries are not reused.
EXPORT_FORMAT = 1
SHIPPED_GRAPH = Path("onnx") / "model.onnx"
CACHE_ENV = "TEI_MANAGER_ONNX_CACHE"
_HASH_CHUNK = 1 << 20


def onnx_cache_dir() -> Path:
    """``$TEI_MANAGER_ONNX_CACHE``, else ``$XDG_CACHE_HOME/tei-manager/onnx`` (``~/.cache``)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tei-manager" / "onnx"


def shipped_graph(model_dir: Path) -> Path | None:
    """The model folder's own ``onnx/model.onnx``, if it has one."""
    path = model_dir / SHIPPED_GRAPH
    return path if path.is_file() else None


def cache_key(model_dir: Path, revision: str | None, part: str) -> str:
    """A name for the cache entry of ``part`` of the model in ``model_dir``.

    One entry holds that part's graphs in every dtype (the dtype is in the file name).

    A Hub snapshot's revision names its contents exactly; a plain folder is described
    by its files' names, sizes and modification times (hashing gigabytes of weights on
    every start would cost more than it saves), plus its small JSON files in full.
    """
    import torch

    digest = hashlib.sha256()
    for item in (EXPORT_FORMAT, OPSET, part, torch.__version__, revision or ""):
        digest.update(f"{item}\0".encode())
    if revision is None:
        for path in sorted(model_dir.rglob("*")):
            if not path.is_file() or "onnx" in path.relative_to(model_dir).parts:
                continue
            stat = path.stat()
            name = path.relative_to(model_dir).as_posix()
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
            if path.suffix == ".json" and stat.st_size < _HASH_CHUNK:
                digest.update(path.read_bytes())
    readable = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_dir.name)[:48]
    return f"{readable}-{part}-{digest.hexdigest()[:20]}"


def cached_graph(entry: Path, dtype: OnnxDType, export: Callable[[Path], None]) -> Path:
    """The verified graph in the cache folder ``entry``; exported (and quantised) if missing."""
    found = _verified(entry, dtype)
    if found is not None:
        return found
    fp32 = _verified(entry, "float32")
    if fp32 is None:
        log.info("exporting the model to ONNX", extra={"cache": str(entry)})
        fp32 = _write_atomically(entry, "float32", export)
    if dtype == "float32":
        return fp32
    log.info("quantising the ONNX graph to int8", extra={"cache": str(entry)})
    return _write_atomically(entry, dtype, lambda target: quantize_int8(fp32, target))


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of ``source``'s weights (activations stay fp32).

    Per channel: one scale per output column kept all-MiniLM-L6-v2's embeddings at
    cosine 0.99 to fp32, against 0.93-0.97 with one scale per tensor.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantiser logs every tensor it skips on the root logger.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        logging.disable(previous)


def export_module(
    module: Any,
    target: Path,
    *,
    input_names: Sequence[str],
    output_name: str,
    example: dict[str, Any],
) -> None:
    """Trace ``module(**inputs)`` into an ONNX graph with batch and sequence left dynamic."""
    import torch

    axes = {name: {0: "batch", 1: "sequence"} for name in [*input_names, output_name]}
    args = tuple(example[name] for name in input_names)
    with warnings.catch_warnings(), torch.inference_mode():
        # The tracer warns about every Python-level branch it records; the graph is
        # checked against torch by the tests instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(target),
            input_names=list(input_names),
            output_names=[output_name],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


def _graph_name(dtype: OnnxDType, sha: str) -> str:
    return f"model.{dtype}.{sha}.onnx"


def _verified(entry: Path, dtype: OnnxDType) -> Path | None:
    """The entry's graph of ``dtype`` whose contents still hash to its name, else None."""
    for path in sorted(entry.glob(f"model.{dtype}.*.onnx")):
        sha = path.name.split(".")[2]
        if _sha256(path) == sha:
            return path
        log.warning("discarding a corrupt cached ONNX graph", extra={"path": str(path)})
        path.unlink(missing_ok=True)
    return None


def _write_atomically(entry: Path, dtype: OnnxDType, write: Callable[[Path], None]) -> Path:
    entry.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=entry, prefix=".export-") as scratch:
        temporary = Path(scratch) / "model.onnx"
        write(temporary)
        if sorted(Path(scratch).iterdir()) != [temporary]:
            # A graph over 2 GB keeps its weights in files of their own; one file is
            # what the hash in the name can vouch for.
            raise RuntimeError("the ONNX graph does not fit in one file (over 2 GB)")
        final = entry / _graph_name(dtype, _sha256(temporary))
        os.replace(temporary, final)
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
