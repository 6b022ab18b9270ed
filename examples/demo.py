"""`make demo`: real experts, real merges, real accuracies -- on CPU in a few minutes.

1. the quick model zoo: all-MiniLM-L6-v2 (shipped in a PyPI package) fine-tuned on three packaged tasks
   (sentiment on VADER movie snippets, WordNet noun senses, Debian package sections; 300 training rows each,
   frozen CLIP-style text heads), built once and cached (`mergelab zoo build mt8 --quick`);
2. `mergelab plan` validates a TIES merge of the three experts from headers alone, `mergelab merge` runs it;
   task arithmetic and TSV run through the Python API;
3. base, experts and merged models are scored on every task's test split with the same frozen heads
   (`mergelab eval` / `mergelab.eval.Evaluator`): per-task accuracy, average, and normalised accuracy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

OUT = Path("demo-out")


def cli(*args: str) -> None:
    print(f"\n$ mergelab {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "mergelab", *args], check=True)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import mergelab
    from mergelab.eval import Evaluator
    from mergelab.zoo import build_zoo

    print("building (or reusing) the quick zoo: 3 experts fine-tuned from all-MiniLM-L6-v2", flush=True)
    zoo = build_zoo("mt8", quick=True)
    print(f"zoo at {zoo.path}")
    args = ["--method", "ties", "--base", str(zoo.base)]
    for path in zoo.experts.values():
        args += ["--model", str(path)]
    args += ["--out", str(OUT / "merged-ties"), "--overwrite"]
    cli("plan", *args)
    cli("merge", *args)
    experts = list(zoo.experts.values())
    for method in ("task_arithmetic", "tsv"):
        mergelab.merge(method, zoo.base, experts, out=OUT / f"merged-{method}", overwrite=True, progress=False)

    print("\nscoring every model on every task with the frozen zero-shot heads ...", flush=True)
    evaluator = Evaluator(zoo, progress=False)
    models: dict[str, object] = {"base (zero-shot)": None}
    models |= {f"expert: {task}": path for task, path in zoo.experts.items()}
    models |= {f"merged: {m}": OUT / f"merged-{m}" for m in ("task_arithmetic", "ties", "tsv")}
    tasks = list(zoo.experts)
    print(f"\n{'model':<26}" + "".join(f"{t:>13}" for t in tasks) + f"{'average':>10}{'normalised':>12}")
    for label, model in models.items():
        result = evaluator(model)
        norm = result.normalized_average
        print(f"{label:<26}" + "".join(f"{result.accuracy[t]:>13.3f}" for t in tasks)
              + f"{result.average:>10.3f}" + (f"{norm:>12.3f}" if norm is not None else f"{'-':>12}"))
    print("\nnormalised = accuracy / the task's own expert accuracy, averaged over tasks (the papers' metric)")
    cli("eval", str(OUT / "merged-ties"), "--suite", "mt8-quick", "--no-progress")


if __name__ == "__main__":
    main()
