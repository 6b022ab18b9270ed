"""Continual merging: experts arrive one at a time and OPCM merges each into a state folder on disk.

    python examples/continual.py     # builds (or reuses) the quick zoo first: ~1 min on 2 cores

The state folder survives the process: every ``add`` is atomic, and a later process (or ``mergelab continual
add``) continues where this one stopped. The same steps from the shell::

    mergelab continual init demo-out/opcm-state --method opcm --base all-minilm-l6-v2 --set alpha=0.5
    mergelab continual add demo-out/opcm-state ~/.cache/mergelab/zoo/all-minilm-l6-v2/mt8-quick/experts/sentiment
    mergelab continual status demo-out/opcm-state
    mergelab continual export demo-out/opcm-state --out demo-out/merged-opcm --overwrite
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

OUT = Path("demo-out")


def merge_one_at_a_time(base: Any, experts: dict[str, Path], state_dir: Path, out: Path,
                        method: str = "opcm", **hparams: Any) -> Path:
    """Create ``state_dir`` for ``method`` and ``base``, add ``experts`` in order, export the merged model."""
    from mergelab import ContinualMerger

    ContinualMerger(method, base, **hparams).save(state_dir)
    for name, path in experts.items():
        merger = ContinualMerger.load(state_dir)  # as a later process would: all it needs is on disk
        merger.add(path, name=name)
        print(f"step {merger.step}: added {name}", flush=True)
    return ContinualMerger.load(state_dir).export(out, overwrite=True)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mergelab.eval import Evaluator
    from mergelab.zoo import build_zoo

    zoo = build_zoo("mt8", quick=True)
    state = OUT / "opcm-state"
    if state.exists():  # a fresh run each time (a kept state refuses experts it has already merged)
        import shutil

        shutil.rmtree(state)
    merged = merge_one_at_a_time("all-minilm-l6-v2", zoo.experts, state, OUT / "merged-opcm", alpha=0.5)
    result = Evaluator(zoo, progress=False)(merged)
    print(f"wrote {merged}\n{result.table()}")


if __name__ == "__main__":
    main()
