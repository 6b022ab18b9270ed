"""CART's loss-landscape figures (arXiv:2412.12153, Figs. 4, 7 and 8) on the MiniLM MT8 zoo.

* ``multitask`` plane (Figs. 4 and 7): through the weight average theta_avg, spanned by the first two principal
  directions of the trajectory points (Li et al. 2018's projection, ``mergelab.experiment.landscape``):
  CART at rank ratio 0 -> 1 for lambda = 0.5, 1, 2 (it leaves theta_avg and comes back to it), and task arithmetic
  on rank-reduced task vectors (``cart`` with ``center=False``, lambda 0.3) from theta_0 to full-rank task
  arithmetic, plus full-rank task arithmetic at lambda 0.125 .. 1 (Fig. 7, right). Each task's loss and the
  multi-task loss (the sum, Fig. 7) on a grid of the plane.
* one plane per task (Fig. 8): exactly through the expert theta_t, CART (8 %, lambda 1) and task arithmetic
  (lambda 0.3), with that task's loss on a grid.

Loss: the cross-entropy of the suite's frozen text heads (logit scale 20, as the zoo's experts were trained)
on ``--rows`` test texts per task (a seeded sample; accuracy on the same rows is stored too).

    python experiments/cart_landscape.py                 # resumable: the grid is saved after each row
    python experiments/cart_landscape.py --plot          # the figures from results/cart_landscape.json

Cost on this 2-core CPU: 9 merges (seconds each), then (steps^2 x 8 tasks + 8 x task_steps^2) x rows texts:
with the defaults (11 x 11, 9 x 9, 96 rows) about 155,000 texts, 25-40 min idle. A GPU makes it minutes
(``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RANKS = [0.0, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0]
CART_LAMBDAS = [0.5, 1.0, 2.0]
TA_SCALING = 0.3  # task arithmetic's default (mergelab methods)
TA_LAMBDAS = [0.125, 0.3, 0.5, 1.0]
CART_RANK = 0.08  # the paper's Table 1 point (blue star)
SCORED = ["theta_0", "theta_avg", *[f"cart lambda={lam} rank={CART_RANK}" for lam in CART_LAMBDAS],
          "cart lambda=1.0 rank=0.02", "ta rank=1.0", *[f"ta lambda={lam}" for lam in TA_LAMBDAS if lam != TA_SCALING]]


def trajectory_points(zoo: Any, names: list[str], experts: list[Any]) -> dict[str, torch.Tensor]:
    """Every named point as a flat vector: theta_0, theta_avg, experts, CART per (lambda, rank), low-rank task
    arithmetic per rank, full task arithmetic per lambda. CART is linear in lambda around theta_avg, and task
    arithmetic around theta_0, so one merge per rank gives every lambda."""
    import mergelab
    from mergelab.experiment.landscape import flatten
    from mergelab.io.sources import open_source

    def state(model: Any) -> dict[str, torch.Tensor]:
        source = open_source(model)
        try:
            return {name: source.get(name) for name in source.specs}
        finally:
            source.close()

    points = {"theta_0": flatten(state(zoo.base), names)}
    tasks = [t.name for t in zoo.tasks]
    for task, expert in zip(tasks, experts, strict=True):
        points[f"expert {task}"] = flatten(state(expert), names)
    points["theta_avg"] = torch.stack([points[f"expert {t}"] for t in tasks]).mean(0)
    for rank in RANKS:
        if 0 < rank < 1:
            cart = flatten(mergelab.merge("cart", zoo.base, experts, rank_ratio=rank, scaling=1.0), names)
        else:  # rank 0 and full rank: the weight average (the centred task vectors sum to zero)
            cart = points["theta_avg"]
        for lam in CART_LAMBDAS:
            points[f"cart lambda={lam} rank={rank}"] = points["theta_avg"] + lam * (cart - points["theta_avg"])
        if rank == 0:
            points[f"ta rank={rank}"] = points["theta_0"]
        elif rank == 1:
            points[f"ta rank={rank}"] = flatten(mergelab.merge("task_arithmetic", zoo.base, experts,
                                                               scaling=TA_SCALING), names)
        else:
            points[f"ta rank={rank}"] = flatten(mergelab.merge("cart", zoo.base, experts, rank_ratio=rank,
                                                               scaling=TA_SCALING, center=False), names)
    full = points["ta rank=1.0"] - points["theta_0"]
    for lam in TA_LAMBDAS:
        points[f"ta lambda={lam}"] = points["theta_0"] + (lam / TA_SCALING) * full
    return points


class Scorer:
    """Per task: cross-entropy and accuracy of a flat parameter vector on a fixed sample of test rows."""

    def __init__(self, zoo: Any, rows: int, device: str):
        from mergelab.eval import Evaluator
        from mergelab.experiment.landscape import float_names

        self.evaluator = Evaluator(zoo, device=device, progress=False)
        self.like = {k: v.clone() for k, v in self.evaluator.model.state_dict().items()}
        self.names = float_names(self.like)  # the coordinates of the flat parameter vectors
        self.rows = {}
        for task, table in self.evaluator.test.items():
            picked = list(table)
            random.Random(f"landscape:{task}").shuffle(picked)
            self.rows[task] = picked[:rows]

    def __call__(self, vector: torch.Tensor, tasks: list[str]) -> dict[str, dict[str, float]]:
        from mergelab.experiment.landscape import cross_entropy, unflatten
        from mergelab.zoo.encoder import LOGIT_SCALE, accuracy, encode

        ev = self.evaluator
        ev.load(unflatten(vector, self.like, self.names))
        out = {}
        for task in tasks:
            rows = self.rows[task]
            emb = encode(ev.model, ev.tokenizer, [t for t, _ in rows], batch_size=ev.batch_size, device=ev.device)
            labels = [c for _, c in rows]
            out[task] = {"loss": cross_entropy(LOGIT_SCALE * emb @ ev.heads[task].T, labels),
                         "accuracy": accuracy(emb, ev.heads[task], labels)}
        return out


def plane_grid(plane: dict[str, Any], origin: torch.Tensor, basis: torch.Tensor, tasks: list[str],
               score: Scorer, save: Any, desc: str) -> None:
    """Fill ``plane["grid"]`` row by row (``save()`` after each row; rows already there are kept)."""
    from tqdm.auto import tqdm

    from mergelab.experiment.landscape import point_on_plane

    xs, ys = plane["x"], plane["y"]
    grid = plane.setdefault("grid", {})
    for j in tqdm(range(len(ys)), desc=desc, leave=False):
        if str(j) in grid:
            continue
        grid[str(j)] = [score(point_on_plane(origin, basis, x, ys[j]), tasks) for x in xs]
        save()


def run(args: argparse.Namespace) -> Path:
    from mergelab.experiment.landscape import grid_axes, in_plane_fraction, pca_plane, plane_through, project
    from mergelab.zoo import build_zoo

    out = Path(args.out)
    data: dict[str, Any] = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    settings = {"rows": args.rows, "steps": args.steps, "task_steps": args.task_steps, "ranks": RANKS,
                "cart_lambdas": CART_LAMBDAS, "cart_rank": CART_RANK, "ta_scaling": TA_SCALING, "ta_lambdas": TA_LAMBDAS}
    if data.get("settings") not in (None, settings):
        raise SystemExit(f"{out} was made with other settings {data['settings']}; pass another --out")
    data["settings"] = settings

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")
        tmp.replace(out)

    zoo = build_zoo("mt8", device=args.device, progress=False)
    tasks = [t.name for t in zoo.tasks]
    experts = [zoo.experts[t] for t in tasks]
    data["tasks"] = tasks
    score = Scorer(zoo, args.rows, args.device)
    points = trajectory_points(zoo, score.names, experts)
    labels = list(points)
    origin = points["theta_avg"]

    # multi-task plane: PCA of the trajectories (experts and theta_0 are projected, not fitted)
    fitted = [k for k in labels if k.startswith(("cart ", "ta ")) and not torch.equal(points[k], origin)]
    offsets = torch.stack([points[k] - origin for k in fitted])
    basis, explained = pca_plane(offsets)
    del offsets
    coords = {k: project(points[k][None], origin, basis)[0] for k in labels}  # one point at a time: less memory
    xs, ys = grid_axes(torch.stack([coords[k] for k in fitted + ["theta_avg"]]), args.steps)
    plane = data.setdefault("multitask", {})
    check = {k: [round(float(v), 4) for v in coords[k]] for k in labels}
    if plane.get("points") not in (None, check):
        plane.clear()  # the merges changed: start this plane again
    plane.update({"points": check, "explained": explained, "x": xs, "y": ys,
                  "in_plane": {k: in_plane_fraction(points[k][None], origin, basis)[0] for k in labels}})
    plane_grid(plane, origin, basis, tasks, score, save, "multitask plane")
    # the marked points themselves (not their projections): the numbers RESULTS.md quotes
    exact = plane.setdefault("exact", {})
    for key in SCORED:
        if key not in exact:
            exact[key] = score(points[key], tasks)
            save()

    cart = points[f"cart lambda=1.0 rank={CART_RANK}"]
    ta = points["ta rank=1.0"]
    for task in tasks:
        expert = points[f"expert {task}"]
        basis = plane_through(expert, cart, ta)
        three = torch.stack([expert, cart, ta, origin, points["theta_0"]])
        coords = project(three, expert, basis)
        check = {k: [round(float(v), 4) for v in coords[i]]
                 for i, k in enumerate([f"expert {task}", "cart", "ta", "theta_avg", "theta_0"])}
        entry = data.setdefault(f"task {task}", {})
        if entry.get("points") not in (None, check):
            entry.clear()
        xs, ys = grid_axes(coords[:3], args.task_steps)
        entry.update({"points": check, "x": xs, "y": ys})
        plane_grid(entry, expert, basis, [task], score, save, f"plane of {task}")
    save()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "results" / "cart_landscape.json"))
    parser.add_argument("--rows", type=int, default=96, help="test texts per task")
    parser.add_argument("--steps", type=int, default=11, help="grid points per axis, multi-task plane")
    parser.add_argument("--task-steps", type=int, default=9, help="grid points per axis, each task's plane")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--plot", action="store_true", help="draw the figures from --out, run nothing")
    args = parser.parse_args()
    if not args.plot:
        print(f"wrote {run(args)}")
    for png in plot(Path(args.out), Path(args.out).parent / "cart_landscape_files"):
        print(f"wrote {png}")
    md = Path(args.out).with_suffix(".md")
    md.write_text(summary(json.loads(Path(args.out).read_text(encoding="utf-8"))), encoding="utf-8")
    print(f"wrote {md}")


def summary(data: dict[str, Any]) -> str:
    """The numbers RESULTS.md quotes, as markdown: the marked points' multi-task loss and accuracy (scored at the
    points themselves), the grid's lowest multi-task loss, and per task plane the lowest loss against the
    expert's, CART's and task arithmetic's grid-free positions."""
    tasks = data["tasks"]
    plane = data["multitask"]
    lines = [f"# CART loss landscapes (MiniLM MT8, {data['settings']['rows']} test texts per task)", "",
             f"Multi-task plane: the first two principal directions explain {plane['explained'][0]:.1%} and "
             f"{plane['explained'][1]:.1%} of the trajectory offsets' squared norm.", "",
             "| point | sum of the task losses | mean accuracy | share of its offset in the plane |", "|---|---:|---:|---:|"]
    for key, scores in plane.get("exact", {}).items():
        loss = sum(scores[t]["loss"] for t in tasks)
        acc = sum(scores[t]["accuracy"] for t in tasks) / len(tasks)
        lines.append(f"| {key} | {loss:.3f} | {acc:.4f} | {plane['in_plane'].get(key, float('nan')):.2f} |")
    cells = [(sum(c[t]["loss"] for t in tasks), plane["x"][i], plane["y"][int(j)], c)
             for j, row in plane.get("grid", {}).items() for i, c in enumerate(row)]
    if cells:
        low, x, y, cell = min(cells, key=lambda c: c[0])
        acc = sum(cell[t]["accuracy"] for t in tasks) / len(tasks)
        lines += ["", f"Grid ({len(plane['x'])} x {len(plane['y'])}, {len(cells)} points run): lowest multi-task loss "
                  f"{low:.3f} at ({x:.2f}, {y:.2f}), mean accuracy there {acc:.4f}; x spans {plane['x'][0]:.2f} to "
                  f"{plane['x'][-1]:.2f}."]
    lines += ["", "Each task's plane (through its expert, CART 8 % and task arithmetic 0.3):", "",
              "| task | lowest loss on the grid | at (x, y) | expert at | CART at | task arithmetic at |",
              "|---|---:|---|---|---|---|"]
    for task in tasks:
        entry = data.get(f"task {task}")
        if not entry or not entry.get("grid"):
            lines.append(f"| {task} | not run | | | | |")
            continue
        low, x, y = min((c[task]["loss"], entry["x"][i], entry["y"][int(j)])
                        for j, row in entry["grid"].items() for i, c in enumerate(row))
        at = {k: "({:.2f}, {:.2f})".format(*v) for k, v in entry["points"].items()}
        lines.append(f"| {task} | {low:.3f} | ({x:.2f}, {y:.2f}) | {at[f'expert {task}']} | {at['cart']} | {at['ta']} |")
    return "\n".join(lines) + "\n"


def plot(json_path: Path, folder: Path) -> list[Path]:
    """Figs. 4, 7 and 8 as PNGs in ``folder`` (planes whose grid is unfinished are drawn where filled)."""
    from mergelab.report.landscape import expert_figure, multitask_figure, task_figure, tasks_of
    from mergelab.report.plots import save

    data = json.loads(json_path.read_text(encoding="utf-8"))
    tasks = tasks_of(data)
    folder.mkdir(parents=True, exist_ok=True)
    return [save(task_figure(data, tasks), folder / "fig4_task_losses.png"),
            save(multitask_figure(data, tasks), folder / "fig7_multitask_loss.png"),
            save(expert_figure(data, tasks), folder / "fig8_expert_planes.png")]


if __name__ == "__main__":
    main()
