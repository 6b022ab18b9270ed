"""Continual merging benchmark: time per ``add`` and peak RSS of mergelab's ``ContinualMerger``
(``opcm``, ``continual_ta``, ``swa``) next to FusionBench's OPCM on the same files, in the same run
(`make bench-continual`).

Inputs: base + ``--models`` fine-tunes from ``_clip_set.clip_set`` (a transformers
``CLIPVisionModel`` from its default ViT-B/32 config, random weights, fine-tunes = base + low-rank
+ dense noise; float32 safetensors files cached in ``benchmarks/_work/clip-vit-b32-l<layers>/``,
written once and reused, so the 20-model set costs 7.4 GB of disk and no RAM).

Jobs, each in a fresh process, one after the other in turn (CPU, float32 on both sides). Step 1
only stores the first task vector on both sides; the steps that project (2..n) are the ones
reported as "s / add".

* ``mergelab <method>``: ``ContinualMerger(method, base=path, **hp)`` with an in-memory state (no
  state folder), then per model ``cm.add(path)``, timed: it opens the file, hashes its bytes
  (duplicate detection), streams it tensor by tensor (read, ``tau = model - base``, update rule,
  for OPCM one exact SVD per matrix), and keeps the new state. ``opcm`` runs with
  ``exclude=["*embed*"]`` so that exactly FusionBench's matrices (the ``nn.Linear`` weights) are
  projected; the position embedding (a 50 x 768 matrix by mergelab's default) is then added and
  rescaled like FusionBench does. ``continual_ta`` and ``swa`` with their defaults.
* ``fusionbench opcm`` (in the separate venv ``benchmarks/_work/fb-venv`` of
  ``benchmarks/peer_venv.sh fusionbench``): FusionBench 0.2.33's ``OPCMForCLIP(alpha=0.5)``, whose
  per-step functions ``merge_linear_weights`` (full SVD of the merged task vector, projection) and
  ``merge_other_parameters`` are called exactly as ``OPCMForCLIP.run`` calls them: over the leaf
  modules of the merged model, followed by its norm bookkeeping (``get_task_vector_norm``) and
  global rescaling. Left out of ``run``: logging, evaluation, saving, the task pool and the order
  shuffle (models go in file order on both sides). Timed per step: building the task model
  (``CLIPVisionModel`` on the meta device + ``load_state_dict(load_file(path), assign=True)``, the
  equivalent of the model pool's ``from_pretrained``) and the merge. The pre-trained and merged
  models stay in memory, as in ``run``.

Per job: seconds of every add, seconds inside ``torch.linalg.svd`` / ``eigh`` (wrapped in the
child), with ``--threads N`` torch's threads in every job (both sides alike), RSS after every add (``VmRSS``: flat = constant memory), peak RSS (``VmHWM``). Outputs: the
merged models are written after the clock stops and compared, mergelab opcm vs FusionBench OPCM:
relative Frobenius difference of the merged task vectors, without ``class_embedding``, which
FusionBench never merges (it is not in a leaf module, see ``mergelab.continual.rules.opcm``). Its task
vector still enters both sides' global norm, so the two differ by a global factor too: the
difference left after the best global rescaling is reported next to the raw one.

With ``--at-once task_arithmetic tsv`` (OPCM's Fig. 2 contrast, measured): conventional merging of all models
seen so far, ``mergelab.merge(method, base, models[:t])`` for t = 1..n, each in a fresh process, its seconds and
peak RSS per t next to the continual jobs' seconds of add t and RSS after it. A conventional merge reads all
t models again at every step; the continual state holds one model-sized state whatever t.

Usage: ``python benchmarks/bench_continual.py [--models 8] [--layers 12] [--methods ...] [--no-fusionbench]
[--at-once METHOD ...]``
"""

from __future__ import annotations

import argparse
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
    load_clip_model,
    relative_difference,
    run_json_child,
    vm_rss_mb,
)
from bench_engine import machine, peak_rss_mb

OPCM_ALPHA = 0.5  # both defaults: mergelab DEFAULTS["opcm"], FusionBench config/method/opcm/opcm.yaml
MERGELAB_HPARAMS = {"opcm": {"alpha": OPCM_ALPHA, "exclude": ["*embed*"]}, "continual_ta": {}, "swa": {}}
SKIP_IN_COMPARISON = ("vision_model.embeddings.class_embedding",)

# ----------------------------------------------------------------------------- jobs (child side)


def mergelab_job(job: dict) -> dict:
    import mergelab

    adds, rss = [], []
    with decomposition_timer() as spent:
        cm = mergelab.ContinualMerger(job["method"], base=job["base"], **MERGELAB_HPARAMS[job["method"]])
        for path in job["models"]:
            start = time.perf_counter()
            cm.add(path)
            adds.append(time.perf_counter() - start)
            rss.append(vm_rss_mb())
    save(cm.merged(), job["out"])
    return {"add_seconds": adds, "rss_after_add_mb": rss, **spent}


def fusionbench_job(job: dict) -> dict:
    import numpy as np
    import torch
    from fusion_bench.method.opcm.opcm import OPCMForCLIP
    from fusion_bench.method.opcm.utils import get_task_vector_norm
    from fusion_bench.models.utils import is_leaf_module
    from torch import nn

    layers = job["layers"]
    algo = OPCMForCLIP(alpha=OPCM_ALPHA, shuffle_order=False, save_on_every_step=False)
    adds, loads, rss = [], [], []
    with torch.no_grad(), decomposition_timer() as spent:
        # step 1 as in run(): the merged model is the first model
        start = time.perf_counter()
        pretrained = load_clip_model(job["base"], layers)
        merged = load_clip_model(job["models"][0], layers)
        norms = [get_task_vector_norm(merged, pretrained)]
        algo.previous_lambda_t = 1
        adds.append(time.perf_counter() - start)
        loads.append(adds[-1])
        rss.append(vm_rss_mb())
        for path in job["models"][1:]:
            start = time.perf_counter()
            task = load_clip_model(path, layers)
            loads.append(time.perf_counter() - start)
            norms.append(get_task_vector_norm(task, pretrained))
            average = np.mean(norms)
            algo.lambda_t = 1  # run()'s "temporary value"
            for module_name, module in list(merged.named_modules()):
                if not is_leaf_module(module):
                    continue
                pre, tsk = pretrained.get_submodule(module_name), task.get_submodule(module_name)
                if isinstance(module, nn.Linear):
                    module.weight.data = algo.merge_linear_weights(
                        module.weight, pre.weight, tsk.weight, f"{module_name}.weight", OPCM_ALPHA, "cpu"
                    )
                    if module.bias is not None:
                        module.bias.data = algo.merge_other_parameters(
                            module.bias, pre.bias, tsk.bias, f"{module_name}.bias", "cpu"
                        )
                else:
                    for param_name, param in module.named_parameters():
                        param.data = algo.merge_other_parameters(
                            param,
                            pre.get_parameter(param_name),
                            tsk.get_parameter(param_name),
                            f"{module_name}.{param_name}",
                            "cpu",
                        )
            norm = get_task_vector_norm(merged, pretrained)
            algo.lambda_t *= norm / average
            for param_name, param in merged.named_parameters():
                w0 = pretrained.get_parameter(param_name)
                param.data = w0 + (param - w0) * (average / norm)
            algo.previous_lambda_t, algo.lambda_t = algo.lambda_t, None
            del task
            adds.append(time.perf_counter() - start)
            rss.append(vm_rss_mb())
    save(merged.state_dict(), job["out"])
    return {"add_seconds": adds, "load_seconds": loads, "rss_after_add_mb": rss, **spent}


def at_once_job(job: dict) -> dict:
    import mergelab

    start = time.perf_counter()
    mergelab.merge(job["method"], job["base"], job["models"])
    return {"seconds": time.perf_counter() - start}


def save(state: dict, out: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state.items()}, out)


def child(job: dict) -> None:
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    jobs = {"fusionbench": fusionbench_job, "at-once": at_once_job, "mergelab": mergelab_job}
    result = jobs[job["impl"]](job)
    result.update(peak_rss_mb=peak_rss_mb(), torch_threads=torch.get_num_threads())
    print(json.dumps(result))


# ----------------------------------------------------------------------------- driver


def run_job(job: dict) -> dict:
    python = str(FB_PYTHON) if job["impl"] == "fusionbench" else None
    return run_json_child(__file__, job, f"{job['impl']} {job['method']}", python)


def summarise(impl: str, method: str, result: dict) -> dict:
    adds = result["add_seconds"]
    later = adds[1:] or adds
    decomposition = result["svd"] + result["eigh"]
    return {
        "impl": impl,
        "method": method,
        "first_add_seconds": adds[0],
        "mean_add_seconds": sum(later) / len(later),  # steps 2..n
        "max_add_seconds": max(later),
        "total_seconds": sum(adds),
        "decomposition_seconds": decomposition,
        "decomposition_share": decomposition / sum(adds),
        "svd_calls": result["svd_calls"],
        "eigh_calls": result["eigh_calls"],
        "peak_rss_mb": result["peak_rss_mb"],
        "rss_after_add_mb": result["rss_after_add_mb"],
        "add_seconds": adds,
        "load_seconds": result.get("load_seconds"),
        "torch_threads": result["torch_threads"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (12 = ViT-B/32)")
    parser.add_argument("--methods", nargs="+", default=["opcm", "continual_ta", "swa"], choices=list(MERGELAB_HPARAMS))
    parser.add_argument("--no-fusionbench", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every job (0: torch's default)")
    parser.add_argument("--at-once", nargs="*", default=[], metavar="METHOD",
                        help="also merge the first t models at once with METHOD, t = 1..n (fresh process each)")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    use_fb = not args.no_fusionbench and "opcm" in args.methods
    if use_fb and not FB_PYTHON.exists():
        sys.exit(f"{FB_PYTHON} missing: run benchmarks/peer_venv.sh fusionbench (or pass --no-fusionbench)")
    base, models = clip_set(args.models, args.layers)
    load_start = os.getloadavg()[0]
    out_dir = WORK / "continual-out"
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        (impl, method)
        for method in args.methods
        for impl in ["mergelab"] + (["fusionbench"] if use_fb and method == "opcm" else [])
    ]
    rows = []
    for impl, method in jobs:
        job = {"impl": impl, "method": method, "base": str(base), "models": [str(m) for m in models],
               "layers": args.layers, "threads": args.threads, "out": str(out_dir / f"{impl}-{method}.safetensors")}  # fmt: skip
        rows.append(summarise(impl, method, run_job(job)))
        r = rows[-1]
        print(
            f"{impl:11s} {method:12s} {r['mean_add_seconds']:7.2f} s / add, peak RSS {r['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    at_once = []
    for method in args.at_once:
        for t in range(1, len(models) + 1):
            job = {"impl": "at-once", "method": method, "base": str(base), "models": [str(m) for m in models[:t]],
                   "threads": args.threads, "out": str(out_dir / "at-once.safetensors")}  # kept in memory, not written
            result = run_job(job)
            at_once.append({"method": method, "models": t, "seconds": result["seconds"],
                            "peak_rss_mb": result["peak_rss_mb"]})
            print(f"at once     {method:12s} t={t:2d} {result['seconds']:7.2f} s, peak RSS {result['peak_rss_mb']:.0f} MB",
                  flush=True)
    comparison = None
    if use_fb:
        from safetensors.torch import load_file

        files = (base, out_dir / "mergelab-opcm.safetensors", out_dir / "fusionbench-opcm.safetensors")
        comparison = relative_difference(*(load_file(str(p)) for p in files), skip=SKIP_IN_COMPARISON)
        ml, fb = (
            next(r for r in rows if r["impl"] == impl and r["method"] == "opcm") for impl in ("mergelab", "fusionbench")
        )
        comparison["speedup_per_add"] = fb["mean_add_seconds"] / ml["mean_add_seconds"]
        comparison["skipped"] = list(SKIP_IN_COMPARISON)
    report = {
        "command": "python benchmarks/bench_continual.py " + " ".join(sys.argv[1:]),
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "inputs": {"models": args.models, "layers": args.layers, "base": str(base.relative_to(HERE.parent))},
        "mergelab_hparams": {m: MERGELAB_HPARAMS[m] for m in args.methods},
        "machine": machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        "at_once": at_once,
        "opcm_comparison": comparison,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"continual-m{args.models}-l{args.layers}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows, comparison))
    if at_once:
        print(growth_table(rows, at_once))


def growth_table(rows: list[dict], at_once: list[dict]) -> str:
    """Per t, what it costs to have the merge of t models: each continual job's add t (seconds, RSS after it),
    each at-once merge of t models (seconds, peak RSS)."""
    methods = sorted({a["method"] for a in at_once})
    head = ["t"] + [f"{r['impl']} {r['method']}: add t s / RSS MB" for r in rows]
    head += [f"at once {m}: s / peak RSS MB" for m in methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for t in range(1, max(a["models"] for a in at_once) + 1):
        cells = [str(t)]
        for r in rows:
            adds = r["add_seconds"]
            cells.append(f"{adds[t - 1]:.2f} / {r['rss_after_add_mb'][t - 1]:.0f}" if t <= len(adds) else "")
        for m in methods:
            a = next((a for a in at_once if a["method"] == m and a["models"] == t), None)
            cells.append(f"{a['seconds']:.2f} / {a['peak_rss_mb']:.0f}" if a else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: list[dict], comparison: dict | None) -> str:
    lines = [
        "| impl | method | s / add (steps 2..n, mean) | max s | step 1 s | svd+eigh share | peak RSS MB | RSS after add 1 / last MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['impl']} | {r['method']} | {r['mean_add_seconds']:.2f} | {r['max_add_seconds']:.2f} | "
            f"{r['first_add_seconds']:.2f} | {r['decomposition_share']:.0%} | {r['peak_rss_mb']:.0f} | "
            f"{r['rss_after_add_mb'][0]:.0f} / {r['rss_after_add_mb'][-1]:.0f} |"
        )
    if comparison is not None:
        lines.append(
            f"\nopcm: FusionBench / mergelab = {comparison['speedup_per_add']:.2f}x per add; merged task vectors "
            f"differ by {comparison['relative']:.1e} relative (worst tensor {comparison['worst_tensor']:.1e}, "
            f"{comparison['worst_tensor_name']}; {', '.join(comparison['skipped'])} left out); "
            f"{comparison['relative_after_scale']:.1e} after a global rescaling by {comparison['scale']:.6f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
