"""An experiment grid run locally vs as Ray tasks (``--ray local``) on this machine, and the projection of
its wall time to N nodes from the measured per-run costs (README "Ray").

Inputs: a synthetic zoo written to ``benchmarks/_work/ray-zoo`` (a base and ``--tasks`` experts: ``--layers``
MiniLM-sized layers of random float32 weights, fine-tunes = base + noise, safetensors) and a cheap
deterministic scorer (distances to each expert, as in the tests), so that a run's cost is its merge plus
reading the models: the part Ray spreads over workers. The grid: task arithmetic and TIES over 4 scalings and
TSV over 2, merging all experts (10 runs).

Measured: the wall time of ``mergelab.experiment.run`` with ``ray=None`` and with ``ray="local:CPUS"`` (Ray's
start included, a fresh database each), the per-run seconds stored in each row (merge + eval), whether both
databases hold the same runs, and the largest difference of any accuracy between them (a Ray worker runs torch
on one thread, this process on all cores: reductions may round differently, by about 1e-16). Projection to N nodes of C CPUs each: ``start + ceil(runs / (N * C)) *
mean run seconds`` (runs are independent; assumes the models are on a cache every node reads as fast as
this one, and no run shorter than Ray's ~10 ms task overhead).

Usage: ``python benchmarks/bench_ray.py [--tasks 4] [--layers 6] [--cpus 2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WORK = Path(__file__).resolve().parent / "_work" / "ray-zoo"


def write_zoo(tasks: int, layers: int) -> Any:
    from mergelab.zoo import Task, Zoo

    names = [f"task{i}" for i in range(tasks)]
    stamp = WORK / f"t{tasks}-l{layers}"
    if not (stamp / "done").exists():
        shutil.rmtree(stamp, ignore_errors=True)
        stamp.mkdir(parents=True)
        gen = torch.Generator().manual_seed(0)
        base = {}
        for i in range(layers):  # a MiniLM layer: 4 x 384^2 attention + 2 x 384 x 1536 MLP
            for part in ("q", "k", "v", "o"):
                base[f"layer.{i}.{part}.weight"] = torch.randn(384, 384, generator=gen) * 0.05
            base[f"layer.{i}.up.weight"] = torch.randn(1536, 384, generator=gen) * 0.05
            base[f"layer.{i}.down.weight"] = torch.randn(384, 1536, generator=gen) * 0.05
        save_file(base, str(stamp / "base.safetensors"))
        for j, name in enumerate(names):
            g = torch.Generator().manual_seed(100 + j)
            save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                      str(stamp / f"{name}.safetensors"))
        (stamp / "done").write_text("ok")
    return Zoo(suite="bench", backbone="synthetic", base=stamp / "base.safetensors",
               experts={n: stamp / f"{n}.safetensors" for n in names}, tasks=[Task(n, ["a", "b"]) for n in names],
               expert_accuracy={n: 1.0 for n in names})


@dataclass
class Scored:
    accuracy: dict[str, float]


class DistanceScorer:
    """``d(base, e_t) / (d(merged, e_t) + d(base, e_t))`` per task: cheap, deterministic, picklable."""

    def __call__(self, model: Any, zoo: Any, *, tasks: list[str], **_: Any) -> Scored:
        base = load_file(str(zoo.base))
        out = {}
        for task in tasks:
            expert = load_file(str(zoo.experts[task]))
            d_base = math.sqrt(sum(float((base[k] - expert[k]).double().pow(2).sum()) for k in base))
            d_model = math.sqrt(sum(float((model[k] - expert[k]).double().pow(2).sum()) for k in base))
            out[task] = d_base / (d_model + d_base)
        return Scored(out)


class Provider:
    def __init__(self, zoo: Any):
        self.zoo = zoo

    def build(self, suite: str, **_: Any) -> Any:
        return self.zoo

    def tasks(self, suite: str, quick: bool) -> list[str]:
        return list(self.zoo.experts)


GRID = {"name": "bench", "suites": ["bench"], "tasks": ["all"],
        "methods": [{"method": "task_arithmetic", "sweep": {"scaling": [0.25, 0.5, 0.75, 1.0]}},
                    {"method": "ties", "sweep": {"scaling": [0.25, 0.5, 0.75, 1.0]}},
                    {"method": "tsv", "sweep": {"scaling": [0.5, 1.0]}}]}


def timed(provider: Provider, db: Path, ray: str | None) -> tuple[float, list[Any]]:
    from mergelab.experiment import Store, run

    start = time.perf_counter()
    run(GRID, evaluate=DistanceScorer(), build_zoo=provider.build, suite_tasks=provider.tasks, db=db, progress=False,
        command="bench_ray", ray=ray)
    wall = time.perf_counter() - start
    with Store(db) as store:
        return wall, store.rows()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    provider = Provider(write_zoo(args.tasks, args.layers))
    folder = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    local_s, local_rows = timed(provider, folder / "local.sqlite", None)
    ray_s, ray_rows = timed(provider, folder / "ray.sqlite", f"local:{args.cpus}")
    remote = {r.hash: r.metrics or {} for r in ray_rows}
    same_runs = {r.hash for r in local_rows} == set(remote)
    diff = max(abs(acc - remote[r.hash]["accuracy"][t]) for r in local_rows
               for t, acc in (r.metrics or {})["accuracy"].items())
    per_run = [(r.merge_seconds or 0.0) + (r.eval_seconds or 0.0) for r in local_rows]
    mean_run = sum(per_run) / len(per_run)
    runs = len(local_rows)
    start_cost = max(0.0, ray_s - math.ceil(runs / args.cpus) * mean_run)  # what Ray added here, all told
    projection = {n: round(start_cost + math.ceil(runs / (n * args.cpus)) * mean_run, 1) for n in (1, 2, 4, 8)}
    result = {"runs": runs, "local_wall_s": round(local_s, 2), "ray_local_wall_s": round(ray_s, 2),
              "cpus": args.cpus, "mean_run_s": round(mean_run, 3), "ray_overhead_s": round(start_cost, 2),
              "same_runs": same_runs, "max_accuracy_difference": diff, "projection_wall_s_by_nodes": projection,
              "torch_threads": torch.get_num_threads(), "zoo": {"tasks": args.tasks, "layers": args.layers}}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
