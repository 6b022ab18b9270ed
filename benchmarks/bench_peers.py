"""Peers benchmark: mergelab against mergekit 0.1.5 on the engine benchmark's files, in the same run, with
an output-equality check where the semantics agree (`make bench-peers`).

Inputs: ``bench_engine``'s Llama-shaped bf16 set (``--size``, default ``default``: a base and 3 fine-tunes
of 271 M parameters, sharded safetensors folders with a ``config.json``), built once and cached in
``benchmarks/_work/``. Each job runs in a fresh process (the clock starts after the imports), one after the
other in turn, ``--repeat`` times; the best time is reported (as in ``bench_engine``):

* ``mergekit <method>``: mergekit 0.1.5 (in ``benchmarks/_work/mk-venv``, built by
  ``benchmarks/peer_venv.sh mergekit``; never in .venv or mergelab's dependencies),
  ``mergekit.merge.run_merge`` on a configuration with ``dtype: float32`` (compute), ``out_dtype:
  bfloat16`` (the inputs' dtype, as mergelab writes), every model ``weight: 1``, no tokenizer copy, no
  model card, the same shard size; its CPU path, torch's default threads.
* ``mergelab <method>``: ``mergelab.merge(...)`` (float32 compute, the thread policy's threads).

Methods and what agrees (read from mergekit 0.1.5's ``merge_methods/generalized_task_arithmetic.py``
and ``sparsify.py``):

* TIES: mergekit's is per tensor -- ``magnitude``: keep ``max(1, int(density * N))`` entries by ``argsort``;
  sign by the sign of the sum of the trimmed deltas (``>= 0`` -> +1); the mean of the agreeing entries
  (``normalize: true``, its default for TIES; divisor 0 -> 1); ``lambda`` 1; ``int8_mask`` false (an int8
  sign mask instead of one in the compute dtype: less memory, same result). Compared with mergelab's
  ``ties`` ``scope=tensor, threshold=exact`` (``density=0.2``, ``merge_func=mean``, ``scaling=1``): the same
  algorithm; they can differ only where magnitudes tie at the k-th value (mergekit keeps exactly k, by
  sort order; mergelab every entry >= the k-th -- bf16 inputs make such ties common), where the trimmed
  deltas cancel exactly (sum 0: mergekit elects +1, mergelab the tensor's majority sign) and in tensors
  of fewer than ``1 / density`` entries (mergekit keeps 1, mergelab none; none in these sets).
  mergelab's default (``scope=global``, the paper's model-wide top-k) is timed too, not compared.
* task arithmetic: ``base + lambda * sum(delta)`` on both sides (``lambda`` = ``scaling`` = 0.3); compared
  (float32 sums in another order may round differently in the last bf16 bit).
* breadcrumbs: mergekit's ``magnitude_outliers`` per tensor (sort ascending, keep ranks ``[n_bot, n_bot +
  int(density N))`` with ``n_bot = max(0, N - int(density N) - int(gamma N))``; ``density=0.15,
  gamma=0.006, lambda=0.3``, no consensus, no normalize, no rescale) against mergelab's ``breadcrumbs
  scope=tensor``: the same ranks, the same sort. (mergekit 0.1.4 and earlier kept nothing of a tensor
  with ``int(gamma N) == 0``; 0.1.5 fixed that.) mergelab's default ``scope=row`` (the official per-row
  rule) is timed, not compared.

The check loads both outputs and reports, per pair, the tensors and elements that differ and the largest
difference. Prints a Markdown table; writes ``results/peers.json`` (``peers-<size>.json`` for other sizes).

Usage: ``python benchmarks/bench_peers.py [--size quick|default|large] [--repeat 3] [--smoke]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_engine import RESULTS, SIZES, WORK, Arch, build, machine, peak_rss_mb, tensor_bytes  # noqa: E402

MK_PYTHON = WORK / "mk-venv" / "bin" / "python"
MERGEKIT_VERSION = "0.1.5"
SIZES.setdefault("tiny", Arch(hidden=256, intermediate=704, layers=2, vocab=2000, shard_mb=1))  # --smoke only
TIES = {"density": 0.2}
TA = {"scaling": 0.3}
BREADCRUMBS = {"density": 0.15, "gamma": 0.006, "scaling": 0.3}
# (label, impl, method, mergelab hparams or mergekit config, compared with (label) or None)
JOBS = [
    ("mergekit ties (per tensor)", "mergekit", "ties", {"density": TIES["density"], "lambda": 1.0}, None),
    ("mergelab ties (scope=tensor, threshold=exact)", "mergelab", "ties",
     {**TIES, "scope": "tensor", "threshold": "exact", "merge_func": "mean", "scaling": 1.0}, "mergekit ties (per tensor)"),
    ("mergelab ties (scope=global, default)", "mergelab", "ties", {**TIES}, None),
    ("mergekit task_arithmetic", "mergekit", "task_arithmetic", {"lambda": TA["scaling"]}, None),
    ("mergelab task_arithmetic", "mergelab", "task_arithmetic", {**TA}, "mergekit task_arithmetic"),
    ("mergekit breadcrumbs", "mergekit", "breadcrumbs",
     {"density": BREADCRUMBS["density"], "gamma": BREADCRUMBS["gamma"], "lambda": BREADCRUMBS["scaling"]}, None),
    ("mergelab breadcrumbs (scope=tensor)", "mergelab", "breadcrumbs", {**BREADCRUMBS, "scope": "tensor"},
     "mergekit breadcrumbs"),
    ("mergelab breadcrumbs (scope=row, default)", "mergelab", "breadcrumbs", {**BREADCRUMBS}, None),
]


# ----------------------------------------------------------------------------- child side


def mergekit_config(job: dict) -> dict:
    """mergekit's configuration for ``job``: per-model ``weight`` 1 (and ``density`` / ``gamma``), global
    ``normalize`` (TIES only: its default), ``int8_mask`` false, ``lambda``; float32 compute, bf16 output."""
    options = dict(job["hparams"])
    per_model = {"weight": 1.0, **{k: options.pop(k) for k in ("density", "gamma") if k in options}}
    parameters = {"int8_mask": False, "lambda": options.pop("lambda")}
    if job["method"] == "ties":
        parameters["normalize"] = True
    return {
        "merge_method": job["method"],
        "base_model": job["base"],
        "models": [{"model": m, "parameters": dict(per_model)} for m in job["models"]],
        "parameters": parameters,
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }


def child(job: dict) -> None:
    """One job in this (fresh) process; prints one JSON line. The clock starts after the imports."""
    import safetensors.torch  # noqa: F401
    import torch

    if job["impl"] == "mergekit":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        config = MergeConfiguration.model_validate(mergekit_config(job))
        options = MergeOptions(copy_tokenizer=False, write_model_card=False, out_shard_size=job["shard_bytes"],
                               quiet=True, cuda=False)
        start = time.perf_counter()
        run_merge(config, out_path=job["out"], options=options)
    else:
        import mergelab

        start = time.perf_counter()
        mergelab.merge(job["method"], job["base"], job["models"], out=job["out"], progress=False,
                       max_shard_size=job["shard_bytes"], **job["hparams"])
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "torch_threads": torch.get_num_threads()}))


# ----------------------------------------------------------------------------- driver side


def run_child(job: dict) -> dict:
    out = Path(job["out"])
    shutil.rmtree(out, ignore_errors=True)
    python = str(MK_PYTHON) if job["impl"] == "mergekit" else sys.executable
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(HERE.parent / "src"), str(HERE)) if p)}
    if job["impl"] == "mergekit":
        env["PYTHONPATH"] = str(HERE)  # bench_engine only: mergelab is not imported there
    done = subprocess.run([python, __file__, "--child", json.dumps(job)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"job {job['label']} failed:\n{done.stderr[-4000:]}")
    if tensor_bytes(out) != job["output_bytes"]:
        sys.exit(f"job {job['label']} wrote {tensor_bytes(out)} bytes of tensors, expected {job['output_bytes']}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def compare(ours: Path, theirs: Path) -> dict:
    """Element-wise comparison of two sharded bf16 outputs: tensors and elements that differ, the largest
    difference."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        return {name: folder / shard for name, shard in index.items()}

    a, b = tensors(ours), tensors(theirs)
    if set(a) != set(b):
        return {"same_names": False, "only_mergelab": sorted(set(a) - set(b))[:5],
                "only_mergekit": sorted(set(b) - set(a))[:5]}
    differing, elements, total, largest = [], 0, 0, 0.0
    for name in sorted(a):
        with safe_open(str(a[name]), "pt") as fa, safe_open(str(b[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.dtype != y.dtype:
            return {"same_names": True, "dtype_mismatch": f"{name}: {x.dtype} vs {y.dtype}"}
        total += x.numel()
        diff = (x.float() - y.float()).abs()
        count = int((diff > 0).sum())
        if count:
            differing.append(name)
            elements += count
            largest = max(largest, float(diff.max()))
    return {"same_names": True, "tensors": len(a), "tensors_differing": len(differing), "elements": total,
            "elements_differing": elements, "max_abs_difference": largest, "examples": differing[:5]}


def table(rows: list[dict], checks: dict, repeat: int) -> str:
    lines = [f"| job | wall s (best of {repeat}) | all runs s | torch threads | peak RSS MB | output vs mergekit |",
             "|---|---:|---|---:|---:|---|"]
    for row in rows:
        check = checks.get(row["job"])
        if check is None:
            verdict = ""
        elif not check.get("same_names", False):
            verdict = "different tensor names"
        elif "dtype_mismatch" in check:
            verdict = f"different dtypes ({check['dtype_mismatch']})"
        elif check["elements_differing"] == 0:
            verdict = f"identical ({check['tensors']} tensors)"
        else:
            verdict = (f"{check['elements_differing']:,} of {check['elements']:,} elements differ in "
                       f"{check['tensors_differing']} tensors (max {check['max_abs_difference']:.3g})")
        runs = ", ".join(f"{s:.2f}" for s in row["runs_seconds"])
        lines.append(f"| {row['job']} | {row['seconds']:.2f} | {runs} | {row['torch_threads']} | "
                     f"{row['peak_rss_mb']:.0f} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", choices=[s for s in SIZES if s != "tiny"], default="default")
    parser.add_argument("--repeat", type=int, default=3, help="runs per job, in turn; the best is reported")
    parser.add_argument("--smoke", action="store_true", help="a tiny set, one run: checks the script in seconds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if not MK_PYTHON.exists():
        sys.exit(f"{MK_PYTHON} missing: run benchmarks/peer_venv.sh mergekit (make bench-peers does)")
    size, repeat = ("tiny", 1) if args.smoke else (args.size, args.repeat)
    arch = SIZES[size]
    base, models = build(size)
    common = {"base": str(base), "models": [str(m) for m in models], "shard_bytes": arch.shard_mb * 2**20,
              "output_bytes": tensor_bytes(base)}
    out_dir = WORK / f"peers-out-{size}"
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [{**common, "label": label, "impl": impl, "method": method, "hparams": hparams, "compare": against,
             "out": str(out_dir / f"{i:02d}-{impl}-{method}")}
            for i, (label, impl, method, hparams, against) in enumerate(JOBS)]
    run_child(jobs[0])  # warm-up: the inputs in the page cache before any timed run
    runs: dict[str, list[dict]] = {job["label"]: [] for job in jobs}
    for round_ in range(repeat):  # in turn: drift on a shared machine hits every job alike
        for job in jobs:
            result = run_child(job)
            runs[job["label"]].append(result)
            print(f"[{round_ + 1}/{repeat}] {job['label']:48s} {result['seconds']:7.2f} s", flush=True)
    rows = []
    for job in jobs:
        best = min(runs[job["label"]], key=lambda r: r["seconds"])
        rows.append({"job": job["label"], "impl": job["impl"], "method": job["method"], "hparams": job["hparams"],
                     "seconds": best["seconds"], "runs_seconds": [r["seconds"] for r in runs[job["label"]]],
                     "torch_threads": best["torch_threads"], "peak_rss_mb": best["peak_rss_mb"]})
    checks = {}
    by_label = {job["label"]: job for job in jobs}
    for job in jobs:
        if job["compare"]:
            checks[job["label"]] = compare(Path(job["out"]), Path(by_label[job["compare"]]["out"]))
    mk_version = subprocess.run([str(MK_PYTHON), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True).stdout.strip()
    report = {
        "command": "python benchmarks/bench_peers.py " + " ".join(sys.argv[1:]),
        "size": size,
        "arch": {k: getattr(arch, k) for k in ("hidden", "intermediate", "layers", "vocab", "shard_mb")},
        "repeat": repeat,
        "mergekit": mk_version,
        "seconds": "wall time in the job's own process, after its imports; best of the runs",
        "machine": machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        "output_checks": checks,
    }
    if mk_version != MERGEKIT_VERSION:
        print(f"warning: mergekit {mk_version} in {MK_PYTHON}, not {MERGEKIT_VERSION}", file=sys.stderr)
    if not args.smoke:
        RESULTS.mkdir(exist_ok=True)
        name = "peers.json" if size == "default" else f"peers-{size}.json"
        (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows, checks, repeat))


if __name__ == "__main__":
    main()
