"""Contention benchmark: each representative job alone, next to one busy process, and two of it side by
side, with the thread policy off (before) and on (after); slow-downs next to the fair-share bound
(`make bench-contention`).

Jobs (each run in a fresh process; the clock starts after the imports, when every process of the
scenario is ready):

* ``ties``: ``mergelab.merge("ties", ...)`` (scope=global, the default) on ``bench_engine``'s
  Llama-shaped bf16 set (``--size``, default ``default``: a base and 3 fine-tunes of 271 M parameters);
* ``tsv``: ``mergelab.merge("tsv", ...)`` (TSV-M) of ``--tsv-models`` fine-tunes of the CLIP
  ViT-B/32-shaped set (``_clip_set``, ``--layers`` encoder layers);
* ``opcm``: ``mergelab.ContinualMerger("opcm", ...)`` adding ``--opcm-models`` fine-tunes of the same set,
  one after the other (the timed span is all the adds).

Scenarios: ``alone``; ``busy``: next to a process spinning one core (``while True: pass``), started
first; ``pair``: two copies of the job started together (the slower one's time counts). Modes:
``before``: ``MERGELAB_THREADS=legacy`` and none of OpenMP's wait variables (torch's and the BLAS's
default thread counts, OpenMP spinning: the behaviour before the policy); ``after``: what the
``mergelab`` command does -- ``OMP_WAIT_POLICY=PASSIVE`` in the environment before torch loads, then the
policy applied (``mergelab.threads``). Scenarios and modes run in turn, ``--repeat`` times; medians reported.

Slow-down = the scenario's time / the same mode's time alone. Fair-share bound with C usable CPUs: next
to one busy core the job keeps ``max(C - 1, C / 2)`` of its C CPUs, so ``C / max(C - 1, C / 2)``
(2x on 2 cores); two equal jobs keep half each, so 2x. Target: within 1.3x of the bound in every row.
Prints a Markdown table and writes ``results/contention.json`` (``--out NAME``: another file there; not with
``--smoke``).

Usage: ``python benchmarks/bench_contention.py [--jobs ties tsv opcm] [--repeat 3] [--smoke]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _clip_set import RESULTS, WORK, clip_set  # noqa: E402
from bench_engine import SIZES, Arch, build, machine  # noqa: E402

SRC = HERE.parent / "src"
MODES = ("before", "after")
SCENARIOS = ("alone", "busy", "pair")
TARGET = 1.3  # x the fair-share bound
BURNER = "while True: pass"
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "_MERGELAB_SET_WAIT_POLICY")
SIZES.setdefault("tiny", Arch(hidden=128, intermediate=352, layers=2, vocab=2000, shard_mb=1))  # --smoke only


# ----------------------------------------------------------------------------- child side


def child(job: dict) -> None:
    """One job in this (fresh) process: imports, the policy as the command applies it (``after``), wait for
    the go, time the job; prints one JSON line."""
    import safetensors.torch  # noqa: F401  (imported before the clock starts)
    import torch

    import mergelab
    from mergelab import threads
    from mergelab.ops import native

    if job["mode"] == "after":
        threads.apply(threads.choose())  # as mergelab.cli.main does
    try:
        native.build()  # loaded (built once per machine) before the clock
    except (OSError, subprocess.SubprocessError):
        pass
    Path(job["ready"]).touch()
    while not Path(job["go"]).exists():
        time.sleep(0.005)
    start = time.perf_counter()
    if job["job"] == "opcm":
        merger = mergelab.ContinualMerger("opcm", base=job["base"], alpha=0.5, exclude=["*embed*"])
        for path in job["models"]:
            merger.add(path)
        merger.merged()
    else:
        mergelab.merge(job["method"], job["base"], job["models"], out=job["out"], progress=False, **job["hparams"])
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "torch_threads": torch.get_num_threads(),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}))


# ----------------------------------------------------------------------------- driver side


def child_env(mode: str) -> dict[str, str]:
    """This process's environment without the policy's variables, then those of ``mode``."""
    env = {k: v for k, v in os.environ.items() if k not in (*WAIT_VARIABLES, "MERGELAB_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    if mode == "before":
        env["MERGELAB_THREADS"] = "legacy"
    else:
        sys.path.insert(0, str(SRC))
        from mergelab import threads

        env.update(threads.wait_env(env))  # what the command sets before torch loads
    return env


def run_scenario(job: dict, mode: str, scenario: str, scratch: Path) -> float:
    """Seconds of ``job`` in ``scenario`` (the slower copy's for ``pair``)."""
    copies = 2 if scenario == "pair" else 1
    go = scratch / "go"
    go.unlink(missing_ok=True)
    burner = subprocess.Popen([sys.executable, "-c", BURNER]) if scenario == "busy" else None
    try:
        children = []
        for copy in range(copies):
            ready = scratch / f"ready-{copy}"
            ready.unlink(missing_ok=True)
            spec = {**job, "mode": mode, "ready": str(ready), "go": str(go), "out": job["out"].format(copy=copy)}
            if spec["job"] != "opcm":
                _remove(Path(spec["out"]))
            children.append((ready, subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)],
                                                     env=child_env(mode), stdout=subprocess.PIPE,
                                                     stderr=subprocess.PIPE, text=True)))
        while not all(ready.exists() for ready, _ in children):
            if any(process.poll() is not None for _, process in children):
                break
            time.sleep(0.01)
        go.touch()
        seconds = []
        for _, process in children:
            out, err = process.communicate()
            if process.returncode != 0:
                sys.exit(f"{job['job']} ({mode}, {scenario}) failed:\n{err[-4000:]}")
            seconds.append(float(json.loads(out.strip().splitlines()[-1])["seconds"]))
        return max(seconds)
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def bounds(cpus: int) -> dict[str, float]:
    """Fair-share slow-down bounds for ``cpus`` usable CPUs: next to one busy core, and two equal jobs."""
    return {"alone": 1.0, "busy": cpus / max(cpus - 1, cpus / 2), "pair": 2.0}


def table(rows: list[dict], cpus: int, repeat: int) -> str:
    bound = bounds(cpus)
    lines = [f"| job | policy | alone s | + busy core s | slow-down (bound {bound['busy']:.2f}x) | 2 jobs s "
             f"| slow-down (bound {bound['pair']:.2f}x) | within {TARGET}x of the bound |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        s = row["median_seconds"]
        slow = row["slowdown"]
        ok = all(slow[k] <= TARGET * bound[k] for k in ("busy", "pair"))
        lines.append(f"| {row['label']} | {row['mode']} | {s['alone']:.2f} | {s['busy']:.2f} | {slow['busy']:.2f}x "
                     f"| {s['pair']:.2f} | {slow['pair']:.2f}x | {'yes' if ok else 'NO'} |")
    lines.append(f"\nmedian of {repeat} run(s) each; {cpus} usable CPUs; the busy process spins one core")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", nargs="+", choices=("ties", "tsv", "opcm"), default=["ties", "tsv", "opcm"])
    parser.add_argument("--size", choices=[s for s in SIZES if s != "tiny"], default="default",
                        help="bench_engine's checkpoint set for ties (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=4, help="encoder layers of the ViT-B/32-shaped set (12: full)")
    parser.add_argument("--tsv-models", type=int, default=8)
    parser.add_argument("--opcm-models", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each scenario, in turn; medians reported")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--smoke", action="store_true", help="tiny inputs, one run: checks the script in seconds")
    parser.add_argument("--out", default="contention.json", help="file name under benchmarks/results/")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.smoke:
        args.size, args.layers, args.tsv_models, args.opcm_models, args.repeat = "tiny", 1, 2, 2, 1
    sys.path.insert(0, str(SRC))
    from mergelab import threads

    cpus = threads.choose(None, {k: v for k, v in os.environ.items() if k != threads.ENV}).threads or 1
    out_dir = WORK / "contention-out"
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    if "ties" in args.jobs:
        base, models = build(args.size)
        jobs.append({"job": "ties", "label": f"ties (global), engine set {args.size}", "method": "ties", "hparams": {},
                     "base": str(base), "models": [str(m) for m in models], "out": str(out_dir / "ties-{copy}")})
    if "tsv" in args.jobs:
        base, models = clip_set(args.tsv_models, args.layers)
        jobs.append({"job": "tsv", "label": f"TSV-M, {args.tsv_models} ViT-B/32-shaped ({args.layers} layers)",
                     "method": "tsv", "hparams": {}, "base": str(base), "models": [str(m) for m in models],
                     "out": str(out_dir / "tsv-{copy}.safetensors")})
    if "opcm" in args.jobs:
        base, models = clip_set(args.opcm_models, args.layers)
        jobs.append({"job": "opcm", "label": f"OPCM, {args.opcm_models} adds ViT-B/32-shaped ({args.layers} layers)",
                     "base": str(base), "models": [str(m) for m in models], "out": ""})
    load_start = os.getloadavg()[0]
    times: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="mergelab-contention-") as scratch:
        for round_ in range(args.repeat):  # in turn: drift on a shared machine hits every cell alike
            for job in jobs:
                for mode in args.modes:
                    for scenario in SCENARIOS:
                        seconds = run_scenario(job, mode, scenario, Path(scratch))
                        times.setdefault((job["label"], mode, scenario), []).append(seconds)
                        print(f"[{round_ + 1}/{args.repeat}] {job['job']:5s} {mode:6s} {scenario:5s} {seconds:8.2f} s",
                              flush=True)
    rows = []
    for job in jobs:
        for mode in args.modes:
            runs = {s: times[(job["label"], mode, s)] for s in SCENARIOS}
            median = {s: statistics.median(r) for s, r in runs.items()}
            rows.append({"label": job["label"], "job": job["job"], "mode": mode, "runs_seconds": runs,
                         "median_seconds": median, "slowdown": {s: median[s] / median["alone"] for s in SCENARIOS}})
    report = {
        "command": "python benchmarks/bench_contention.py " + " ".join(sys.argv[1:]),
        "usable_cpus": cpus,
        "fair_share_bounds": bounds(cpus),
        "target_x_bound": TARGET,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "machine": machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    if not args.smoke:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows, cpus, args.repeat))


if __name__ == "__main__":
    main()
