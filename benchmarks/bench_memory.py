"""Memory at 7 B scale: a base and three Llama-2-7B-shaped bf16 models merged on this machine (`make bench-memory`).

The foundation issue asks that four 7 B-parameter bf16 models merge on a 24 GB machine. Writing four real
13.5 GB checkpoints is not possible on a CI-sized disk, so the inputs are *sparse* safetensors files: real
headers (Llama-2-7B's 291 tensors, 6.74 B parameters, the layout of ``bench_engine.Arch``) over a hole that
reads as zeros, 54 GB of input that takes no disk. The merges are real: every input byte goes through the
engine and a 13.5 GB output is written and fsynced. Each job runs in a fresh process; the table gives its wall
time, its peak RSS (``VmHWM``) and the plan's estimate. Zero-valued inputs say nothing about merge quality and
make the inputs cheaper to read than real files (no disk), so use the seconds only as an order of magnitude;
the point is the memory.

Usage: ``python benchmarks/bench_memory.py [--methods task_arithmetic ties]``; needs ~14 GB of free disk for the
output. Writes ``benchmarks/results/memory-7b.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

from bench_engine import Arch, machine, peak_rss_mb

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "memory-7b"
LLAMA_2_7B = Arch(hidden=4096, intermediate=11008, layers=32, vocab=32000, shard_mb=5000)


def sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A bf16 safetensors file with a real header and a hole for its data."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)


def child(method: str) -> None:
    import mergelab

    inputs = [WORK / f"m{i}.safetensors" for i in range(4)]
    out = WORK / "out"
    shutil.rmtree(out, ignore_errors=True)
    plan = mergelab.plan(method, str(inputs[0]), [str(p) for p in inputs[1:]])
    estimate = plan.peak_ram_bytes() / 2**20
    plan.close()
    start = time.perf_counter()
    mergelab.merge(method, str(inputs[0]), [str(p) for p in inputs[1:]], out=str(out), progress=False)
    seconds = time.perf_counter() - start
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    shutil.rmtree(out)
    print(json.dumps({"method": method, "seconds": seconds, "peak_rss_mb": peak_rss_mb(), "planned_peak_rss_mb": estimate,
                      "output_gb": written / 1e9}))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    shapes = LLAMA_2_7B.shapes()
    for i in range(4):
        sparse_safetensors(WORK / f"m{i}.safetensors", shapes)
    rows = []
    for method in args.methods:
        result = subprocess.run([sys.executable, __file__, "--child", method], capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"base + 3 Llama-2-7B-shaped bf16 models ({LLAMA_2_7B.params / 1e9:.2f} B parameters each, sparse inputs)\n")
    print("| method | wall s | peak RSS MB | plan's estimate MB | output GB |\n|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['method']} | {row['seconds']:.1f} | {row['peak_rss_mb']:.0f} | {row['planned_peak_rss_mb']:.0f} | "
              f"{row['output_gb']:.1f} |")
    results = HERE / "results" / "memory-7b.json"
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "params_per_model": LLAMA_2_7B.params,
              "inputs": "sparse safetensors (real headers, zero data)", "machine": machine(), "rows": rows}
    results.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten: {results.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
