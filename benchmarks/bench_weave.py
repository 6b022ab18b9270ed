"""Weight Weaving benchmark: ``weave``'s fast path vs its general path vs K separate inner merges
(`make bench-weave`).

Inputs: base + ``--tasks`` fine-tunes from ``_clip_set.clip_set`` (CLIP ViT-B/32-shaped, random
weights, fine-tunes = base + low-rank + dense noise; float32 safetensors, cached in
``benchmarks/_work/``), ``--layers 1`` by default so that the K separate TSV merges stay short.

Cases (the inner method and its lambdas: the paper's multi-task search space, ``preset="multitask"``):

* ``ties (scope=tensor)``: 15 lambdas (0.1..1.5); fast, general and separate.
* ``ties (scope=global)``: the default TIES; fast and separate (``path="general"`` is refused: the
  majority-sign correction after the merge pass needs the linear path).
* ``tsv``: 16 lambdas (0.5..2.0); fast, general and separate.

Jobs, each in a fresh process (clock started after the imports), one after the other in turn:

* ``inner x1``: one inner merge at scaling 1 (``mergelab.merge(inner, ...)``, written to a file): the
  unit the other rows are measured in.
* ``weave fast``: ``mergelab.merge("weave", inner=..., out=...)`` (average pooling, ``path="auto"``):
  the closed form ``(sum_t tau_t + (sum_i lambda_i) g) / (T + K)`` from one inner merge per tensor.
* ``weave general``: the same with ``path="general"``: the inner method evaluated at every lambda,
  per tensor, pooled on the fly (Algorithm 1 as written, streaming).
* ``K separate``: what a user without ``weave`` runs: K full inner merges
  ``mergelab.merge(inner, scaling=lambda_i)`` (each reads the files and returns the merged state
  dict), their task vectors summed as they come, plus the T task vectors, divided by T + K, added to
  the base and written with ``save_file``. Memory holds one merged model and the running sum.

``--threads N`` sets torch's threads in every job. Per job: wall seconds, peak RSS (``VmHWM``), and the ratio to ``inner x1``. The outputs of the three
ways are compared (relative Frobenius difference of the merged task vectors, and the worst tensor):
they compute the same thing, so they must agree to float32 rounding.

Usage: ``python benchmarks/bench_weave.py [--tasks 8] [--layers 1] [--repeat 1] [--cases ...]``
(about 10 minutes on 2 cores with the defaults, most of it the 2 x 16 TSV merges of the general and
separate rows)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from _clip_set import HERE, RESULTS, WORK, clip_set, relative_difference, run_in_turn, run_json_child
from bench_engine import machine, peak_rss_mb

CASES = {  # name -> (inner method, its hyperparameters, ways)
    "ties-tensor": ("ties", {"scope": "tensor"}, ("fast", "general", "separate")),
    "ties-global": ("ties", {}, ("fast", "separate")),
    "tsv": ("tsv", {}, ("fast", "general", "separate")),
}
LABELS = {"ties-tensor": "ties (scope=tensor)", "ties-global": "ties (scope=global)", "tsv": "tsv"}


# ----------------------------------------------------------------------------- jobs (child side)


def separate_merges(job: dict, lambdas: list[float]) -> None:
    """Algorithm 1 with the inner method as a black box: K full merges, pooled by averaging."""
    import torch
    from safetensors.torch import load_file, save_file

    import mergelab

    base = load_file(job["base"])
    total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in base.items() if v.is_floating_point()}
    for lam in lambdas:
        merged = mergelab.merge(job["inner"], job["base"], job["models"], progress=False, scaling=lam, **job["hparams"])
        for name, acc in total.items():
            acc += merged[name].float() - base[name].float()
        del merged
    for path in job["models"]:
        model = load_file(path)
        for name, acc in total.items():
            acc += model[name].float() - base[name].float()
        del model
    members = len(job["models"]) + len(lambdas)
    out = {k: (v.float() + total[k] / members).to(v.dtype) if k in total else v for k, v in base.items()}
    save_file(out, job["out"])


def child(job: dict) -> None:
    import safetensors.torch  # noqa: F401  (imported before the clock starts)
    import torch

    import mergelab
    from mergelab.methods.weave import search_space

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    lambdas = search_space(job["inner"], "multitask")
    start = time.perf_counter()
    if job["way"] == "inner":
        mergelab.merge(job["inner"], job["base"], job["models"], out=job["out"], progress=False, **job["hparams"])
    elif job["way"] == "separate":
        separate_merges(job, lambdas)
    else:
        path = "general" if job["way"] == "general" else "auto"
        mergelab.merge("weave", job["base"], job["models"], out=job["out"], progress=False, inner=job["inner"],
                       path=path, **job["hparams"])  # fmt: skip
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "lambdas": len(lambdas)}))


# ----------------------------------------------------------------------------- driver


def run_job(job: dict) -> dict:
    return run_json_child(__file__, job, f"{job['case']} {job['way']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument(
        "--layers", type=int, default=1, help="encoder layers (12 = ViT-B/32; 1 keeps K TSV merges short)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per job, in turn; the best is reported")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every job (0: torch's default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    base, models = clip_set(args.tasks, args.layers)
    load_start = os.getloadavg()[0]
    out_dir = WORK / "weave-out"
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for case in args.cases:
        inner, hparams, ways = CASES[case]
        for way in ("inner", *ways):
            jobs.append({"case": case, "way": way, "inner": inner, "hparams": hparams, "base": str(base),
                         "models": [str(m) for m in models], "out": str(out_dir / f"{case}-{way}.safetensors"),
                         "threads": args.threads})  # fmt: skip
    runs = run_in_turn(jobs, args.repeat, run_job, lambda job: (job["case"], job["way"]))
    from safetensors.torch import load_file

    base_state = load_file(str(base))
    rows = []
    for case in args.cases:
        unit = min(r["seconds"] for r in runs[(case, "inner")])
        fast = load_file(str(out_dir / f"{case}-fast.safetensors"))
        for way in ("inner", *CASES[case][2]):
            results = runs[(case, way)]
            best = min(r["seconds"] for r in results)
            row = {"case": LABELS[case], "way": way, "lambdas": results[0]["lambdas"], "seconds": best,
                   "runs_seconds": [r["seconds"] for r in results], "x_inner_merge": best / unit,
                   "peak_rss_mb": max(r["peak_rss_mb"] for r in results)}  # fmt: skip
            if way in ("general", "separate"):  # the same pooled model three ways
                other = load_file(str(out_dir / f"{case}-{way}.safetensors"))
                row["vs_fast"] = relative_difference(base_state, other, fast)
            rows.append(row)
    report = {
        "command": "python benchmarks/bench_weave.py " + " ".join(sys.argv[1:]),
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "inputs": {"tasks": args.tasks, "layers": args.layers, "base": str(base.relative_to(HERE.parent))},
        "seconds": "wall time in the job's own process, after its imports, reading the files and writing the output",
        "machine": machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if (args.tasks, args.layers) == (8, 1) else f"-t{args.tasks}-l{args.layers}"
    (RESULTS / f"weave{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows, args.repeat))


def table(rows: list[dict], repeat: int) -> str:
    lines = [
        f"| inner | way | K | wall s (best of {repeat}) | x one inner merge | peak RSS MB | differs from fast by |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        k = "1" if r["way"] == "inner" else str(r["lambdas"])
        diff = ""
        if "vs_fast" in r:
            diff = f"{r['vs_fast']['relative']:.1e} (worst tensor {r['vs_fast']['worst_tensor']:.1e})"
        lines.append(
            f"| {r['case']} | {r['way']} | {k} | {r['seconds']:.2f} | {r['x_inner_merge']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {diff} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
