"""Spectral methods benchmark: mergelab's tsv, iso_c, iso_cts, cart on a CLIP ViT-B/32-shaped set,
next to FusionBench's TSV-M, Iso-C and Iso-CTS on the same files in the same run (`make bench-spectral`).

Inputs: base + ``--tasks`` fine-tunes from ``_clip_set.clip_set`` (a transformers ``CLIPVisionModel``
from its default ViT-B/32 config, random weights, fine-tunes = base + low-rank + dense noise; float32
safetensors files cached in ``benchmarks/_work/clip-vit-b32-l<layers>/``).

Jobs, each in a fresh process (clock started after the imports), one after the other in turn:

* ``mergelab <method>``: ``mergelab.merge(method, base, models, out=file.safetensors)`` with the
  method's defaults: reads the files, merges, writes the output (float32 compute; SVDs through the
  float64 Gram/eigh fast path with exact-SVD fallback, ``svd_dtype="float64"``).
* ``mergelab-f32 <method>`` (the ``--fb-methods``, default tsv and iso_c): the same with ``svd_dtype="float32"``, the
  official numerics (exact float32 LAPACK SVDs, wide matrices through their transpose).
* ``fusionbench <method>`` (the ``--fb-methods``; in the separate venv ``benchmarks/_work/fb-venv``, built by
  ``benchmarks/peer_venv.sh fusionbench``; never in .venv): the same files loaded with
  ``safetensors.torch.load_file``, task vectors ``model - base``, FusionBench 0.2.33's
  ``TSVM_utils.compute_and_sum_svd_mem_reduction`` (what ``TaskSingularVectorMerging.run`` calls),
  ``iso_utils.iso_c`` (``ISO_C_Merge.run``) or ``iso_utils.iso_cts`` (``ISO_CTS_Merge.run``,
  ``common_space_fraction=0.8``) with ``accelerator="cpu"``, scaled by 1.0 (their defaults), added
  to the base, saved with ``save_file``. ``fn s`` is the merging function alone; ``total s``
  includes loading and saving, like mergelab's. Float32 throughout, as FusionBench runs.

Per job: wall seconds, seconds inside ``torch.linalg.svd`` / ``torch.linalg.eigh`` / ``scipy.linalg.eigh`` /
mergelab's ``_lapack.eigh_top`` (timed by wrapping them in the child; mergelab's Gram-matrix products
are not inside; summed over the tensors mergelab merges at once), their share of the wall time (times
the tensors at once), peak RSS (``VmHWM``). ``--threads N`` sets torch's threads in every job (both sides alike): FusionBench's SVDs use them
inside LAPACK, mergelab merges N tensors at once, one thread each. Results: ``results/spectral.json``
with one thread, ``spectral-threads<N>.json`` otherwise. The outputs are compared: relative Frobenius difference of the merged task vectors
(all tensors together, and the worst tensor) between mergelab and FusionBench (FusionBench computes
its SVDs in float32, mergelab in float64). The load average before and after is recorded: on a
shared machine other work competes for the cores.

Usage: ``python benchmarks/bench_spectral.py [--tasks 8] [--layers 12] [--repeat 1] [--methods ...]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from _clip_set import (
    FB_PYTHON,
    HERE,
    RESULTS,
    WORK,
    clip_set,
    decomposition_timer,
    relative_difference,
    run_in_turn,
    run_json_child,
)
from bench_engine import machine, peak_rss_mb

FB_METHODS = ("tsv", "iso_c", "iso_cts")


# ----------------------------------------------------------------------------- jobs (child side)


def mergelab_job(job: dict) -> dict:
    import mergelab

    plan = mergelab.plan(job["method"], job["base"], job["models"], **job["hparams"])  # before the clock
    workers = plan.tensor_workers()
    plan.close()
    with decomposition_timer() as spent:
        start = time.perf_counter()
        mergelab.merge(job["method"], job["base"], job["models"], out=job["out"], progress=False, **job["hparams"])
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "fn_seconds": None, **spent, "workers": workers}


def fusionbench_job(job: dict) -> dict:
    import torch
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
    from safetensors.torch import load_file, save_file

    with decomposition_timer() as spent:
        start = time.perf_counter()
        base = load_file(job["base"])
        task_vectors = []
        for path in job["models"]:
            model = load_file(path)
            task_vectors.append({k: model[k] - v for k, v in base.items() if v.is_floating_point()})
            del model
        fn_start = time.perf_counter()
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # it prints per key
            if job["method"] == "tsv":
                merged = compute_and_sum_svd_mem_reduction(task_vectors, exclude_keys=[], accelerator="cpu")
            elif job["method"] == "iso_c":
                merged = iso_c(task_vectors, accelerator="cpu", exclude_keys=[])
            else:  # common_space_fraction 0.8: config/method/isotropic_merging/iso_cts.yaml, mergelab's default
                merged = iso_cts(task_vectors, common_space_fraction=0.8, accelerator="cpu", exclude_keys=[])
        fn_seconds = time.perf_counter() - fn_start
        scaling = 1.0  # TaskSingularVectorMerging alpha / ISO_C_Merge scaling_factor defaults
        out = {k: (v + scaling * merged[k]).contiguous() if k in merged else v for k, v in base.items()}
        save_file(out, job["out"])
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "fn_seconds": fn_seconds, **spent, "torch_threads": torch.get_num_threads(), "workers": 1}


def child(job: dict) -> None:
    import safetensors.torch  # noqa: F401  (imported before the clock starts)
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    result = fusionbench_job(job) if job["impl"] == "fusionbench" else mergelab_job(job)
    result.update(peak_rss_mb=peak_rss_mb(), torch_threads=torch.get_num_threads())
    print(json.dumps(result))


# ----------------------------------------------------------------------------- driver


def run_job(job: dict) -> dict:
    python = str(FB_PYTHON) if job["impl"] == "fusionbench" else None
    return run_json_child(__file__, job, f"{job['impl']} {job['method']}", python)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (12 = ViT-B/32)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["tsv", "iso_c", "iso_cts", "cart"])
    parser.add_argument("--no-fusionbench", action="store_true")
    parser.add_argument(
        "--fb-methods", nargs="+", default=["tsv", "iso_c"], choices=FB_METHODS, help="methods also run by FusionBench"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every job (0: torch's default)")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    use_fb = not args.no_fusionbench
    if use_fb and not FB_PYTHON.exists():
        sys.exit(f"{FB_PYTHON} missing: run benchmarks/peer_venv.sh fusionbench (or pass --no-fusionbench)")
    base, models = clip_set(args.tasks, args.layers)
    load_start = os.getloadavg()[0]
    out_dir = WORK / "spectral-out"
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for method in args.methods:
        impls = ["mergelab"] + (["mergelab-f32", "fusionbench"] if use_fb and method in args.fb_methods else [])
        for impl in impls:
            hparams = {"svd_dtype": "float32"} if impl == "mergelab-f32" else {}
            out = out_dir / f"{impl}-{method}.safetensors"
            jobs.append({"impl": impl, "method": method, "base": str(base), "models": [str(m) for m in models],
                         "out": str(out), "hparams": hparams, "threads": args.threads})  # fmt: skip
    runs = run_in_turn(jobs, args.repeat, run_job, lambda job: (job["impl"], job["method"]))
    rows = []
    for (impl, method), results in runs.items():
        best = min(results, key=lambda r: r["seconds"])
        decomposition = best["svd"] + best["eigh"]
        rows.append(
            {
                "impl": impl,
                "method": method,
                "seconds": best["seconds"],
                "runs_seconds": [r["seconds"] for r in results],
                "fn_seconds": best["fn_seconds"],
                "decomposition_seconds": decomposition,  # thread seconds: summed over tensors merged at once
                "decomposition_share": decomposition / (best["seconds"] * best["workers"]),
                "tensors_at_once": best["workers"],
                "svd_calls": best["svd_calls"],
                "eigh_calls": best["eigh_calls"],
                "peak_rss_mb": best["peak_rss_mb"],
                "torch_threads": best["torch_threads"],
            }
        )
    from safetensors.torch import load_file

    comparisons = {}
    for method in args.methods:
        if ("fusionbench", method) not in runs:
            continue
        fb = next(r for r in rows if r["impl"] == "fusionbench" and r["method"] == method)
        theirs = out_dir / f"fusionbench-{method}.safetensors"
        for impl in ("mergelab", "mergelab-f32"):
            ml = next(r for r in rows if r["impl"] == impl and r["method"] == method)
            ours = out_dir / f"{impl}-{method}.safetensors"
            comparisons[f"{impl} {method}"] = {
                **relative_difference(*(load_file(str(p)) for p in (base, ours, theirs))),
                "speedup_total": fb["seconds"] / ml["seconds"],
                "speedup_vs_fn_only": fb["fn_seconds"] / ml["seconds"],
            }
    report = {
        "command": "python benchmarks/bench_spectral.py " + " ".join(sys.argv[1:]),
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "fusionbench_methods": args.fb_methods if use_fb else [],
        "inputs": {"tasks": args.tasks, "layers": args.layers, "base": str(base.relative_to(HERE.parent))},
        "machine": machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        "comparisons": comparisons,
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if (args.tasks, args.layers) == (8, 12) else f"-t{args.tasks}-l{args.layers}"
    threads = rows[0]["torch_threads"] if rows else 1
    suffix += "" if threads == 1 else f"-threads{threads}"
    (RESULTS / f"spectral{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows, comparisons, args.repeat))


def table(rows: list[dict], comparisons: dict, repeat: int) -> str:
    lines = [
        f"| impl | method | threads | tensors at once | total s (best of {repeat}) | fn s | svd+eigh s | share | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fn = "" if r["fn_seconds"] is None else f"{r['fn_seconds']:.1f}"
        lines.append(
            f"| {r['impl']} | {r['method']} | {r['torch_threads']} | {r['tensors_at_once']} | {r['seconds']:.1f} | {fn} | {r['decomposition_seconds']:.1f} | "
            f"{r['decomposition_share']:.0%} | {r['peak_rss_mb']:.0f} |"
        )
    for key, c in comparisons.items():
        lines.append(
            f"\n{key}: FusionBench / mergelab = {c['speedup_total']:.2f}x (total), "
            f"{c['speedup_vs_fn_only']:.2f}x (FusionBench function only); outputs differ by "
            f"{c['relative']:.1e} relative (worst tensor {c['worst_tensor']:.1e}, {c['worst_tensor_name']})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
