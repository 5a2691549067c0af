"""A/B of ONNX Runtime session options for the worker's graph, in one process, alternating.

Each variant changes one option of ``tei_manager.worker.onnx_session.session_options``.
A round runs every variant once, in a rotating order, on the same work: a batch of 32
mixed-length texts split into the worker's length groups, plus 8 single texts. The
figures are the medians over rounds of each variant's wall time and CPU time as a ratio
to the chosen options (below 1: faster or cheaper), and the RSS a new session adds.

    python benches/onnx_session_options.py [--rounds 15] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benches.worker_batching import make_texts
from tei_manager.testing import packaged_model_dir
from tei_manager.worker.model import length_groups, load_model
from tei_manager.worker.onnx_session import session_options
from tei_manager.worker.options import WorkerOptions


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def variants() -> dict[str, Callable[[], Any]]:
    import onnxruntime as ort

    def changed(**edit: Any) -> Callable[[], Any]:
        def build() -> Any:
            options = session_options(
                threads=edit.pop("threads", None), spinning=edit.pop("spinning", False)
            )
            for key, value in edit.items():
                if key == "config":
                    options.add_session_config_entry(*value)
                else:
                    setattr(options, key, value)
            return options

        return build

    level = ort.GraphOptimizationLevel
    return {
        "chosen": changed(),
        "1 thread": changed(threads=1),
        "spinning": changed(spinning=True),
        "opt level extended": changed(graph_optimization_level=level.ORT_ENABLE_EXTENDED),
        "opt level basic": changed(graph_optimization_level=level.ORT_ENABLE_BASIC),
        "no memory arena": changed(enable_cpu_mem_arena=False),
        "parallel execution": changed(execution_mode=ort.ExecutionMode.ORT_PARALLEL),
        "no weight prepacking": changed(config=("session.disable_prepacking", "1")),
    }


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = load_model(WorkerOptions(model_id=str(packaged_model_dir()), engine="onnx"))
    encodings = [model.tokenization.encode(t, truncate=True).ids for t in make_texts(40, seed=3)]

    def padded(rows: list[list[int]]) -> dict[str, np.ndarray]:
        width = max(map(len, rows))
        ids = np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64)
        mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": 0 * ids}

    batch = encodings[:32]
    work = [padded([batch[i] for i in g]) for g in length_groups([len(r) for r in batch], 32)]
    work += [padded([row]) for row in encodings[32:]]
    sessions: dict[str, Any] = {}
    added: dict[str, float] = {}
    for name, build in variants().items():
        before = rss_mib()
        sessions[name] = ort.InferenceSession(
            str(model.graph_path), build(), providers=["CPUExecutionProvider"]
        )
        for feed in work:
            sessions[name].run(None, feed)
        added[name] = rss_mib() - before
    wall: dict[str, list[float]] = {name: [] for name in sessions}
    cpu: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for number in range(args.rounds):
        # Each round starts at another variant, so no variant always follows the same one.
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            session = sessions[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            for feed in work:
                session.run(None, feed)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    result = {}
    print(f"{'variant':<22}{'wall ratio':>11}{'CPU ratio':>11}{'RSS +MiB':>10}")
    for name in sessions:
        ratios = [a / b for a, b in zip(wall[name], wall["chosen"], strict=True)]
        cpu_ratios = [a / b for a, b in zip(cpu[name], cpu["chosen"], strict=True)]
        result[name] = {
            "wall_ratio": round(statistics.median(ratios), 3),
            "cpu_ratio": round(statistics.median(cpu_ratios), 3),
            "rss_added_mib": round(added[name], 1),
            "wall_ms": round(1000 * statistics.median(wall[name]), 1),
        }
        r = result[name]
        print(
            f"{name:<22}{r['wall_ratio']:>11.3f}{r['cpu_ratio']:>11.3f}{r['rss_added_mib']:>10.1f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"rounds": args.rounds, "variants": result}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
