"""Engine benchmark: mergelab vs the I/O floor, measured side by side in one run (`make bench`).

Builds (once, cached in benchmarks/_work/) a synthetic Llama-style checkpoint set in bf16 --
base + 3 fine-tunes as sharded Hugging Face folders -- then times, each job in a fresh
subprocess (so peak RSS is per job):

* floor: read every tensor of the 4 inputs once and write one base-sized output (mergelab's own
  reader and streaming writer, no arithmetic);
* task_arithmetic, ties (global top-k, the default), ties scope=tensor.

Inputs are warm in the page cache for every job (the floor runs first once as a warm-up).
Prints a Markdown table and writes benchmarks/results/engine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
SIZES = {  # hidden, intermediate, layers, vocab
    "quick": (512, 1408, 4, 8000),
    "default": (1024, 2816, 16, 32000),
}


def build(size: str) -> tuple[Path, list[Path]]:
    import torch

    from mergelab.io.safetensors_header import TensorSpec
    from mergelab.io.writer import CheckpointWriter

    hidden, inter, layers, vocab = SIZES[size]
    root = WORK / size
    folders = [root / name for name in ("base", "ft1", "ft2", "ft3")]
    if all((f / "model.safetensors.index.json").exists() for f in folders):
        return folders[0], folders[1:]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj, shape in (("q", (hidden, hidden)), ("k", (hidden, hidden)), ("v", (hidden, hidden)), ("o", (hidden, hidden))):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = shape
        for proj, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            shapes[f"{p}mlp.{proj}_proj.weight"] = shape
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    layout = [(n, TensorSpec(s, torch.bfloat16)) for n, s in shapes.items()]
    gen = torch.Generator().manual_seed(0)
    base = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
    shard = max(sum(spec.nbytes for _, spec in layout) // 4, 1)
    for index, folder in enumerate(folders):
        with CheckpointWriter(folder, layout, {}, max_shard_bytes=shard, overwrite=True) as writer:
            for name, _ in layout:
                tensor = base[name]
                if index:
                    tensor = (tensor.float() + 0.002 * torch.randn(tensor.shape, generator=gen)).to(torch.bfloat16)
                writer.write(name, tensor)
            writer.commit()
    return folders[0], folders[1:]


def floor_job(base: str, models: list[str], out: str) -> None:
    from mergelab.io.sources import open_source
    from mergelab.io.writer import CheckpointWriter

    sources = [open_source(p) for p in [base, *models]]
    layout = list(sources[0].specs.items())
    with CheckpointWriter(out, layout, {}, overwrite=True) as writer:
        for name, _ in layout:
            tensors = [s.get(name) for s in sources]
            writer.write(name, tensors[0])
        writer.commit()


def merge_job(method: str, base: str, models: list[str], out: str, hparams: dict) -> None:
    import mergelab

    mergelab.merge(method, base, models, out=out, overwrite=True, progress=False, **hparams)


def run_child(job: dict) -> dict:
    """Run one job in a fresh interpreter (``--child``); its wall time excludes start-up and imports."""
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def child(job: dict) -> None:
    import resource

    import mergelab  # noqa: F401  (imported before the clock starts)

    start = time.perf_counter()
    if job["method"] == "floor":
        floor_job(job["base"], job["models"], job["out"])
    else:
        merge_job(job["method"], job["base"], job["models"], job["out"], job["hparams"])
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--repeat", type=int, default=2, help="runs per job; the best is reported")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    base, models = build(args.size)
    input_gb = (folder_bytes(base) + sum(folder_bytes(m) for m in models)) / 1e9
    jobs = [
        ("floor (read all inputs + write output)", "floor", {}),
        ("task_arithmetic", "task_arithmetic", {}),
        ("ties (scope=global)", "ties", {}),
        ("ties (scope=tensor)", "ties", {"scope": "tensor"}),
    ]
    common = {"base": str(base), "models": [str(m) for m in models], "out": str(WORK / "out")}
    run_child({**common, "method": "floor", "hparams": {}})  # warm the page cache
    rows = []
    for label, method, hparams in jobs:
        runs = [run_child({**common, "method": method, "hparams": hparams}) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["seconds"])
        rows.append({"job": label, "seconds": best["seconds"], "input_gb_per_s": input_gb / best["seconds"],
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)})
    floor = rows[0]["seconds"]
    for row in rows:
        row["ratio_to_floor"] = row["seconds"] / floor
    print(f"\n{args.size}: base + 3 fine-tunes, bf16, {input_gb:.2f} GB of input; {os.cpu_count()} cores\n")
    print("| job | seconds | input GB/s | x I/O floor | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['job']} | {row['seconds']:.2f} | {row['input_gb_per_s']:.2f} | {row['ratio_to_floor']:.2f} | {row['peak_rss_mb']:.0f} |")
    import torch

    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "size": args.size, "input_gb": input_gb,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__}, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"engine-{args.size}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
