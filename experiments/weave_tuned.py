"""Weight Weaving Table 1 on the MiniLM zoo: each base method at its lambda tuned on validation data
(``mergelab search``, grid over the paper's lambda range for the setting) against the same method woven
(data-free, average pooling: the rows already in results/weave.sqlite, weave_cl.sqlite, dg.sqlite), in the
multi-task (mt8), continual (noun-ci-5-seq, merged at once as in weave_continual.yaml) and domain-generalisation
(mt8 leave-one-out: tuned on the 7 source tasks' validation rows, scored on the held-out task's test rows)
settings; and Figure 2's data: each task's best lambda per method (argmax of that task's validation accuracy
over the grid).

    python experiments/weave_tuned.py --dry-run        # list the searches and their trials; build nothing
    python experiments/weave_tuned.py                  # resumable: every trial is stored in --db
    python experiments/weave_tuned.py --settings multitask --methods task_arithmetic,ties
    python experiments/weave_tuned.py --plot           # Figure 2 from results/weave_tuned.json
    python experiments/weave_tuned.py --table          # Table 1 per setting (markdown) from the same JSON

Writes results/weave_tuned.json: per search the tuned lambda, its validation score, its test accuracy (DG: on
the held-out task), the woven score of the earlier experiments, and each task's best lambda (Figure 2's data).
Cost: 426 trials; a trial scores up to 8 x 500 validation texts (17-100 s on 2 CPU cores, depending on the load).
The committed run (465 stored rows: trials plus each search's test scoring) took 4.6 hours of merging and scoring
on 2 CPU cores (``mergelab search --ray`` spreads the trials; see README "Ray").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SETTINGS: dict[str, dict[str, Any]] = {
    "multitask": {"suite": "mt8", "preset": "multitask", "woven": ("weave.sqlite", "weave_multitask"),
                  "methods": ["task_arithmetic", "dare", "ties", "breadcrumbs", "magmax", "pcb", "tsv", "iso_c"]},
    "continual": {"suite": "noun-ci-5-seq", "preset": "continual", "woven": ("weave_cl.sqlite", "weave_continual"),
                  "methods": ["task_arithmetic", "ties", "breadcrumbs", "magmax", "pcb", "tsv", "iso_c"]},
    "domain_generalization": {"suite": "mt8", "preset": "domain_generalization",
                              "woven": ("dg.sqlite", "domain_generalization"),
                              "methods": ["task_arithmetic", "ties", "tsv"]},
}


def searches(settings: list[str], methods: list[str] | None) -> list[dict[str, Any]]:
    """Every search to run: setting, method, suite, merged tasks, held-out task (DG), lambda grid."""
    from mergelab.experiment.config import SuiteTasks
    from mergelab.methods.weave import search_space

    out = []
    for setting in settings:
        conf = SETTINGS[setting]
        names = SuiteTasks()(conf["suite"], False)
        for method in conf["methods"]:
            if methods and method not in methods:
                continue
            lambdas = search_space(method, conf["preset"])
            if setting == "domain_generalization":
                for held in names:
                    out.append({"setting": setting, "method": method, "suite": conf["suite"], "held_out": held,
                                "tasks": [t for t in names if t != held], "lambdas": lambdas})
            else:
                out.append({"setting": setting, "method": method, "suite": conf["suite"], "held_out": None,
                            "tasks": names, "lambdas": lambdas})
    return out


def _stored_score(setting: str, held_out: str | None, match: Any) -> float | None:
    """The test accuracy of the first row of the setting's earlier experiment that ``match(row)`` accepts."""
    from mergelab.experiment import Store

    db_name, experiment = SETTINGS[setting]["woven"]
    db = HERE / "results" / db_name
    if not db.is_file():
        return None
    with Store(db, create=False) as store:
        for row in store.rows(status="ok", experiment=experiment):
            if match(row) and (held_out is None or row.config.get("eval_tasks") == [held_out]):
                return float((row.metrics or {})["average"])
    return None


def woven_score(setting: str, method: str, held_out: str | None) -> float | None:
    """The data-free weave (average pooling) row of the earlier experiments, if stored."""
    return _stored_score(setting, held_out, lambda row: row.method == "weave" and row.config.get("hparams", {}).get(
        "inner") == method and row.config.get("hparams", {}).get("pooling") == "average")


def alone_score(setting: str, method: str, held_out: str | None) -> float | None:
    """The same method at lambda = 1, untuned, from the earlier experiments, if stored."""
    return _stored_score(setting, held_out, lambda row: row.method == method and row.label == method)


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g}-{high:g}"


def _mean(values: list[float | None]) -> float | None:
    """None when any value is missing (a row not stored): a mean over part of the tasks would mislead."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present and len(present) == len(values) else None


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def table(entries: list[dict[str, Any]], setting: str) -> str:
    """Table 1 for one setting as markdown: per method, lambda = 1, the tuned lambda with its validation and test
    accuracy, the woven accuracy and woven - tuned. Domain generalisation: means over the held-out tasks (the
    tuned lambda and every per-task best lambda as a range)."""
    from mergelab.methods.weave import search_space

    rows = [e for e in entries if e["setting"] == setting]
    lines = ["| method | lambda = 1 (test) | tuned lambda | tuned: validation | tuned: test | woven, average "
             "pooling (test) | woven - tuned | per-task best lambda |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for method in dict.fromkeys(e["method"] for e in rows):
        group = [e for e in rows if e["method"] == method]
        alone = [alone_score(setting, method, e["held_out"]) for e in group]
        woven = [e["woven"] for e in group]
        lambdas = [e["lambda"] for e in group]
        edge = " (grid edge)" if max(lambdas) == search_space(method, SETTINGS[setting]["preset"])[-1] else ""
        tuned, woven_mean = _mean([e["test"] for e in group]), _mean(woven)
        gap = "-" if tuned is None or woven_mean is None else f"{100 * (woven_mean - tuned):+.1f} points"
        best = [v for e in group for v in e["per_task_best_lambda"].values()]
        lines.append(f"| {method} | {_cell(_mean(alone))} | {_span(lambdas)}{edge} | "
                     f"{_cell(_mean([e['validation'] for e in group]))} | {_cell(tuned)} | {_cell(woven_mean)} | "
                     f"{gap} | {_span(best)} |")
    return "\n".join(lines)


def held_out_table(entries: list[dict[str, Any]]) -> str:
    """Domain generalisation per held-out task: the untouched base, then per method tuned (its lambda) / woven."""
    rows = [e for e in entries if e["setting"] == "domain_generalization"]
    methods = list(dict.fromkeys(e["method"] for e in rows))
    lines = ["| held-out task | base | " + " | ".join(f"{m}: tuned (lambda) | {m}: woven" for m in methods) + " |",
             "|---|---:|" + "---:|---:|" * len(methods)]
    for held in dict.fromkeys(e["held_out"] for e in rows):
        base = _stored_score("domain_generalization", held, lambda row: row.label == "base")
        cells = []
        for method in methods:
            entry = next((e for e in rows if e["method"] == method and e["held_out"] == held), None)
            cells += ["-", "-"] if entry is None else [f"{entry['test']:.4f} ({entry['lambda']:g})",
                                                       _cell(entry["woven"])]
        lines.append(f"| {held} | {_cell(base)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", help="comma-separated subset of the base methods")
    parser.add_argument("--db", default=str(HERE / "results" / "weave_tuned.sqlite"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--plot", action="store_true", help="draw Figure 2 from the JSON of an earlier run, run nothing")
    parser.add_argument("--table", action="store_true", help="print Table 1 per setting from the JSON, run nothing")
    args = parser.parse_args()
    if args.table:
        entries = json.loads((Path(args.db).parent / "weave_tuned.json").read_text(encoding="utf-8"))
        for setting in args.settings.split(","):
            print(f"{setting}:\n\n{table(entries, setting)}\n")
        if "domain_generalization" in args.settings.split(","):
            print(f"domain_generalization per held-out task:\n\n{held_out_table(entries)}\n")
        return
    if args.plot:
        json_path = Path(args.db).parent / "weave_tuned.json"
        print(f"wrote {plot_best_lambdas(json_path, Path(args.db).parent / 'weave_tuned_files' / 'fig2_best_lambdas.png')}")
        return
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting {unknown[0]!r}: {', '.join(SETTINGS)}")
    plan = searches(settings, args.methods.split(",") if args.methods else None)
    if args.dry_run:
        from mergelab.search.space import Dim, check_space

        for s in plan:  # every lambda resolves with the method (as the search checks before running)
            check_space(s["method"], {}, {"scaling": Dim("scaling", choices=tuple(s["lambdas"]))}, len(s["tasks"]))
            held = f" held out {s['held_out']}" if s["held_out"] else ""
            print(f"{s['setting']:22} {s['method']:16} {s['suite']}{held}: {len(s['lambdas'])} trials "
                  f"(lambda {s['lambdas'][0]}..{s['lambdas'][-1]})")
        print(f"{len(plan)} searches, {sum(len(s['lambdas']) for s in plan)} trials; database {args.db}")
        return
    run(plan, Path(args.db), args.device)


def run(plan: list[dict[str, Any]], db: Path, device: str) -> None:
    from mergelab.eval import Evaluator
    from mergelab.search import search
    from mergelab.search.candidates import CandidateMerger

    results = []
    for s in plan:
        name = f"{s['setting']}/{s['method']}" + (f"/{s['held_out']}" if s["held_out"] else "")
        result = search(s["method"], s["suite"], space={"scaling": s["lambdas"]}, tasks=s["tasks"], db=db, name=name,
                        job=db.parent / "weave_tuned_jobs" / f"{name.replace('/', '-')}.yaml", device=device,
                        progress=True)
        if result.best is None or result.test is None:
            continue
        entry = {"setting": s["setting"], "method": s["method"], "held_out": s["held_out"],
                 "lambda": result.best.params["scaling"], "validation": result.best.score,
                 "test": result.test["average"], "woven": woven_score(s["setting"], s["method"], s["held_out"]),
                 "per_task_best_lambda": {t: max(result.trials, key=lambda tr: (tr.metrics or {}).get(
                     "accuracy", {}).get(t, -1.0)).params["scaling"] for t in s["tasks"]}}
        if s["held_out"]:  # the chosen lambda scored on the held-out task's test rows
            from mergelab.zoo import build_zoo

            zoo = build_zoo(s["suite"], device=device, progress=False)
            merged = CandidateMerger(zoo.base, [zoo.experts[t] for t in s["tasks"]])(s["method"], result.best_params)
            entry["test"] = Evaluator(zoo, tasks=[s["held_out"]], device=device, progress=False)(merged).average
        results.append(entry)
        print(json.dumps(entry))
    out = db.parent / "weave_tuned.json"
    key = lambda e: (e["setting"], e["method"], e["held_out"])  # noqa: E731
    done = {key(e) for e in results}  # the other settings' entries of earlier runs are kept
    kept = [e for e in json.loads(out.read_text(encoding="utf-8")) if key(e) not in done] if out.exists() else []
    out.write_text(json.dumps(kept + results, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")


def best_lambda_figure(entries: list[dict[str, Any]]) -> Any:
    """Figure 2 as a grid, a row per setting and a column per method: the histogram of the tasks' best lambdas
    (argmax of each task's validation accuracy over the grid; domain generalisation pools the searches of every
    held-out task), the tuned lambda(s) dashed."""
    from mergelab.report.plots import figure

    settings = list(dict.fromkeys(e["setting"] for e in entries))
    methods = list(dict.fromkeys(e["method"] for e in entries))
    fig = figure(2.0 * len(methods) + 0.8, 1.9 * len(settings) + 0.9)
    axes = fig.subplots(len(settings), len(methods), squeeze=False, sharex=True)
    for row, setting in enumerate(settings):
        labelled = False
        for col, method in enumerate(methods):
            ax = axes[row][col]
            group = [e for e in entries if e["setting"] == setting and e["method"] == method]
            if not group:
                ax.set_axis_off()
                continue
            best = [v for e in group for v in e["per_task_best_lambda"].values()]
            ax.hist(best, bins=[x / 10 - 0.05 for x in range(0, 27)], color="0.35")
            for tuned in sorted({e["lambda"] for e in group}):
                ax.axvline(tuned, color="black", linestyle="--", linewidth=1)
            searches = f", {len(group)} searches" if len(group) > 1 else ""
            ax.set_title(f"{method}{searches}", fontsize="x-small")
            ax.set_xlim(0.0, 2.6)
            ax.tick_params(labelsize="x-small", labelbottom=True)
            if not labelled:  # the row's first panel names the setting
                ax.set_ylabel(f"{setting}\ntasks", fontsize="x-small")
                labelled = True
    fig.supxlabel("each task's best lambda on validation data", fontsize="small")
    fig.suptitle("Weight Weaving Fig. 2 on MiniLM MT8 / noun-ci-5-seq: best lambda per task (dashed: the tuned "
                 "lambda)", fontsize="medium")
    return fig


def plot_best_lambdas(json_path: Path, png: Path) -> Path:
    """Figure 2 from the stored JSON, written to ``png``."""
    fig = best_lambda_figure(json.loads(json_path.read_text(encoding="utf-8")))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    return png


if __name__ == "__main__":
    main()
