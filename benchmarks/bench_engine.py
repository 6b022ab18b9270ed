"""Engine benchmark: mergelab against the I/O floor, measured side by side in one run (`make bench`).

Builds once, cached in ``benchmarks/_work/`` (git-ignored), a synthetic Llama-style checkpoint set
in bf16 -- a base and 3 fine-tunes (base + small noise), each a sharded Hugging Face safetensors
folder -- then times, each job in a fresh Python process so that peak RSS is per job:

* the I/O floor: read every tensor of the 4 inputs once with the safetensors library
  (``safe_open`` + ``get_tensor``, each tensor copied once into a reused buffer, as the default
  memory-mapped backend reads nothing until touched) and write one base-sized output with
  ``save_file`` (same shards, fsynced like mergelab's writer): the I/O any merge must do;
* a reference row: the same with ``backend="pread"`` (a fresh buffer per tensor);
* ``task_arithmetic``: ``mergelab.merge("task_arithmetic", ...)``, the elementwise fast path;
* ``ties (scope=global)``: ``mergelab.merge("ties", ...)``, the default (exact model-wide top-k);
* ``ties (scope=tensor)``: per-tensor top-k.

Inputs stay warm in the page cache (nothing is dropped; a warm-up floor run comes first, so every
job sees the same cache state). Prints a Markdown table and writes ``benchmarks/results/engine.json``
(``engine-<size>.json`` for other sizes) with the command, machine and versions.

Usage: ``python benchmarks/bench_engine.py [--size quick|default|large] [--quick] [--repeat N]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
RESULTS = HERE / "results"
FORMAT_VERSION = 1  # bump when the generated checkpoints change, so stale caches are rebuilt
N_FINETUNES = 3


@dataclass(frozen=True)
class Arch:
    """A Llama-style decoder: untied embed_tokens / lm_head, q/k/v/o, gate/up/down, two RMSNorms per layer."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    shard_mb: int  # max shard size of the generated folders (and of the outputs)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        h, i = self.hidden, self.intermediate
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            shapes.update({f"{p}self_attn.{x}_proj.weight": (h, h) for x in "qkvo"})
            shapes.update(
                {
                    f"{p}mlp.gate_proj.weight": (i, h),
                    f"{p}mlp.up_proj.weight": (i, h),
                    f"{p}mlp.down_proj.weight": (h, i),
                }
            )
            shapes.update({f"{p}input_layernorm.weight": (h,), f"{p}post_attention_layernorm.weight": (h,)})
        shapes.update({"model.norm.weight": (h,), "lm_head.weight": (self.vocab, h)})
        return shapes

    @property
    def params(self) -> int:
        total = 0
        for shape in self.shapes().values():
            n = 1
            for dim in shape:
                n *= dim
            total += n
        return total


SIZES = {
    "quick": Arch(hidden=512, intermediate=1408, layers=6, vocab=32000, shard_mb=32),  # 52 M params, smoke test
    "default": Arch(hidden=1024, intermediate=2816, layers=16, vocab=32000, shard_mb=150),  # 271 M params
    "large": Arch(hidden=2048, intermediate=5632, layers=16, vocab=32000, shard_mb=500),  # 953 M params
}
JOBS = [  # (label, method, hparams); the floor first: every ratio is to it
    ("I/O floor (safetensors mmap, copy once; save_file)", "floor", {"read": "copy"}),
    ("ref: safetensors backend=pread; save_file", "floor", {"read": "pread"}),
    ("task_arithmetic", "task_arithmetic", {}),
    ("ties (scope=global)", "ties", {}),
    ("ties (scope=tensor)", "ties", {"scope": "tensor"}),
]
TARGETS = {"task_arithmetic": 1.5, "ties (scope=global)": 2.5}  # x the I/O floor


# ----------------------------------------------------------------------------- checkpoint set


def _shard_groups(shapes: dict[str, tuple[int, ...]], max_bytes: int) -> list[list[str]]:
    """Greedy in order, as Hugging Face's ``save_pretrained`` shards (2 bytes per bf16 element)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * _numel(shape)
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def build(size: str) -> tuple[Path, list[Path]]:
    """The base and fine-tune folders for ``size``, generated on first use (seeded, reproducible)."""
    import torch
    from safetensors.torch import save_file

    arch = SIZES[size]
    root = WORK / f"llama-{size}"
    names = ["base", *(f"ft{i}" for i in range(1, N_FINETUNES + 1))]
    spec = {"format": FORMAT_VERSION, "arch": asdict(arch), "models": names}
    marker = root / "spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return root / names[0], [root / n for n in names[1:]]
    print(
        f"building the {size} checkpoint set ({arch.params / 1e6:.0f} M params x {len(names)}) in {root} ...",
        flush=True,
    )
    start = time.perf_counter()
    shapes = arch.shapes()
    groups = _shard_groups(shapes, arch.shard_mb * 2**20)
    files = [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    tmp = WORK / f".llama-{size}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for name in names:
        (tmp / name).mkdir(parents=True)
    for filename, group in zip(files, groups, strict=True):
        base = {}
        for tensor in group:  # one generator per tensor name: independent of order and shard size
            gen = torch.Generator().manual_seed(zlib.crc32(tensor.encode()))
            values = torch.randn(shapes[tensor], generator=gen)
            base[tensor] = (1.0 + 0.05 * values if tensor.endswith("norm.weight") else 0.02 * values).to(torch.bfloat16)
        save_file(base, str(tmp / "base" / filename), metadata={"format": "pt"})
        for index, model in enumerate(names[1:], start=1):
            tuned = {}
            for tensor, value in base.items():
                gen = torch.Generator().manual_seed(zlib.crc32(f"{model}/{tensor}".encode()) + index)
                noise = torch.randn(value.shape, generator=gen)
                tuned[tensor] = (value.float() + 0.002 * noise).to(torch.bfloat16)  # ~10 % of the base's scale
            save_file(tuned, str(tmp / model / filename), metadata={"format": "pt"})
    total = sum(2 * _numel(s) for s in shapes.values())
    index = {
        "metadata": {"total_size": total},
        "weight_map": {t: f for f, g in zip(files, groups, strict=True) for t in g},
    }
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": arch.hidden,
        "intermediate_size": arch.intermediate,
        "num_hidden_layers": arch.layers,
        "vocab_size": arch.vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    for name in names:
        (tmp / name / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / name / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    print(f"built in {time.perf_counter() - start:.1f} s", flush=True)
    return root / names[0], [root / n for n in names[1:]]


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def tensor_bytes(folder: Path) -> int:
    """Tensor data bytes of a sharded folder, from its index (0 if it has none or a shard is missing)."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return 0
    data = json.loads(index.read_text())
    if not all((folder / shard).is_file() for shard in set(data["weight_map"].values())):
        return 0
    return int(data["metadata"]["total_size"])


# ----------------------------------------------------------------------------- jobs (in the child)


def _read_shard(path: str, how: str, buffer: object) -> dict:
    """Every tensor of one file, each byte of it brought into this process's memory once.

    safetensors >= 0.8 serves ``get_tensor`` lazily from a memory map (nothing is read until the
    data is touched), so ``how="copy"`` copies each tensor once into one reused buffer: every byte
    moves through the CPU once, with no fresh allocation per tensor (the strict floor).
    ``how="pread"`` uses the library's ``backend="pread"``: a fresh buffer per tensor (``.clone()``
    out of the map on versions without it).
    """
    import torch
    from safetensors import safe_open

    if how == "pread":
        try:
            with safe_open(path, framework="pt", backend="pread") as handle:
                return {name: handle.get_tensor(name) for name in handle.keys()}
        except TypeError:  # no `backend` argument before safetensors 0.8
            with safe_open(path, framework="pt") as handle:
                return {name: handle.get_tensor(name).clone() for name in handle.keys()}
    assert isinstance(buffer, torch.Tensor)
    tensors = {}
    with safe_open(path, framework="pt") as handle:
        for name in handle.keys():
            tensor = handle.get_tensor(name)
            data = tensor.reshape(-1).view(torch.uint8)
            buffer[: data.numel()].copy_(data)
            tensors[name] = tensor
    return tensors


def floor_job(base: str, models: list[str], out: str, how: str) -> None:
    """Read every tensor of every input once (safetensors library), write the base's tensors back out
    with ``save_file``, shard by shard as the inputs are laid out, each shard fsynced (as mergelab's
    writer does)."""
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(1)  # the copy is memory-bound; with 2 threads a busy core stalls every copy (as in the engine)
    out_dir = Path(out)
    out_dir.mkdir(parents=True)
    folders = [base, *models]
    shards = {
        f: sorted(set(json.loads((Path(f) / "model.safetensors.index.json").read_text())["weight_map"].values()))
        for f in folders
    }
    largest = max(end - start for f in folders for start, end in _extents(Path(f), shards[f]))
    buffer = torch.empty(largest, dtype=torch.uint8) if how == "copy" else None
    for folder in folders:
        for shard in shards[folder]:
            tensors = _read_shard(str(Path(folder) / shard), how, buffer)
            if folder == base:
                target = out_dir / shard
                save_file(tensors, str(target), metadata={"format": "pt"})
                with open(target, "rb+") as written:
                    os.fsync(written.fileno())
            del tensors
    shutil.copy(Path(base) / "model.safetensors.index.json", out_dir / "model.safetensors.index.json")


def _extents(folder: Path, shards: list[str]) -> list[tuple[int, int]]:
    """``data_offsets`` of every tensor in the shards' headers (u64 length, then JSON)."""
    extents = []
    for shard in shards:
        with open(folder / shard, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        extents += [tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"]
    return extents


def merge_job(method: str, base: str, models: list[str], out: str, hparams: dict, shard_bytes: int) -> None:
    import mergelab

    mergelab.merge(method, base, models, out=out, progress=False, max_shard_size=shard_bytes, **hparams)


def peak_rss_mb() -> float:
    """This process's peak RSS (``VmHWM``). Not ``getrusage``: on Linux its ``ru_maxrss`` survives
    ``exec``, so a child would report the benchmark driver's own peak if that were higher."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    import resource  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS -- good enough as a fallback)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(job: dict) -> None:
    """One job in this (fresh) process; prints one JSON line. The clock starts after the imports."""
    import safetensors.torch  # noqa: F401  (imported before the clock starts)
    import torch  # noqa: F401

    import mergelab  # noqa: F401

    planned = 0.0
    if job["method"] != "floor":  # the dry-run estimate, from the headers alone, before the clock starts
        job_plan = mergelab.plan(job["method"], job["base"], job["models"], out=job["out"],
                                 max_shard_size=job["shard_bytes"], **job["hparams"])
        planned = job_plan.peak_ram_bytes() / 2**20
        job_plan.close()
    baseline = peak_rss_mb()
    start = time.perf_counter()
    if job["method"] == "floor":
        floor_job(job["base"], job["models"], job["out"], job["hparams"]["read"])
    else:
        merge_job(job["method"], job["base"], job["models"], job["out"], job["hparams"], job["shard_bytes"])
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline,
                      "planned_peak_rss_mb": planned}))


def run_child(job: dict) -> dict:
    out = Path(job["out"])
    shutil.rmtree(out, ignore_errors=True)  # outside the clock, for every job alike
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"job {job['method']} {job['hparams']} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start  # including interpreter start and imports
    if tensor_bytes(out) != job["output_bytes"]:
        sys.exit(f"job {job['method']} wrote {tensor_bytes(out)} bytes of tensors, expected {job['output_bytes']}")
    return result


# ----------------------------------------------------------------------------- report


def machine() -> dict:
    import psutil
    import safetensors
    import torch

    import mergelab

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "safetensors": safetensors.__version__,
        "mergelab": mergelab.__version__,
        "git_commit": commit,
        "native_kernels": native_kernels(),
    }


def native_kernels() -> str:
    """Build (or find) global TIES' compiled kernels; which library, or why there is none."""
    from mergelab.ops import native

    try:
        return native.build().name
    except (OSError, subprocess.SubprocessError) as err:
        return f"unavailable: {err}"


def table(rows: list[dict], repeat: int) -> str:
    lines = [
        f"| job | wall s (best of {repeat}) | all runs s | input GB/s | x I/O floor | target | peak RSS MB "
        "| plan's estimate MB |",
        "|---|---:|---|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        target = TARGETS.get(row["job"])
        verdict = "" if target is None else f"<= {target}x: {'met' if row['ratio_to_floor'] <= target else 'NOT met'}"
        runs = ", ".join(f"{s:.2f}" for s in row["runs_seconds"])
        planned = f"{row['planned_peak_rss_mb']:.0f}" if row["planned_peak_rss_mb"] else ""
        lines.append(
            f"| {row['job']} | {row['seconds']:.2f} | {runs} | {row['input_gb_per_s']:.2f} | "
            f"{row['ratio_to_floor']:.2f} | {verdict} | {row['peak_rss_mb']:.0f} | {planned} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="default", help="checkpoint set (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="same as --size quick (smoke test)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per job, interleaved; the best is reported")
    parser.add_argument("--json", type=Path, help="result file (default: results/engine.json, engine-<size>.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    size = "quick" if args.quick else args.size
    arch = SIZES[size]
    base, models = build(size)
    input_bytes = folder_bytes(base) + sum(folder_bytes(m) for m in models)
    input_gb = input_bytes / 1e9
    common = {
        "base": str(base),
        "models": [str(m) for m in models],
        "out": str(WORK / f"out-{size}"),
        "shard_bytes": arch.shard_mb * 2**20,
        "output_bytes": tensor_bytes(base),
    }
    jobs = [{**common, "label": label, "method": method, "hparams": hparams} for label, method, hparams in JOBS]
    run_child(jobs[0])  # warm-up: every input (and the output path) in the page cache before any timed run
    native_kernels()  # built (once per machine) before any timed run; later processes load the cached library
    runs: dict[str, list[dict]] = {job["label"]: [] for job in jobs}
    for index in range(args.repeat):  # interleaved, so that drift on a shared machine hits every job alike
        for job in jobs:
            result = run_child(job)
            runs[job["label"]].append(result)
            print(
                f"  run {index + 1}/{args.repeat} {job['label']}: {result['seconds']:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    rows = []
    for job in jobs:
        results = runs[job["label"]]
        best = min(r["seconds"] for r in results)
        rows.append(
            {
                "job": job["label"],
                "method": job["method"],
                "hparams": job["hparams"],
                "seconds": best,
                "median_seconds": statistics.median(r["seconds"] for r in results),
                "runs_seconds": [r["seconds"] for r in results],
                "process_seconds": [r["process_seconds"] for r in results],
                "input_gb_per_s": input_gb / best,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                "baseline_rss_mb": max(r["baseline_rss_mb"] for r in results),
                "planned_peak_rss_mb": results[0]["planned_peak_rss_mb"],
            }
        )
    for row in rows:
        row["ratio_to_floor"] = row["seconds"] / rows[0]["seconds"]
    info = machine()
    command = " ".join([os.path.relpath(sys.executable), *sys.argv])
    print(
        f"\n{size}: base + {N_FINETUNES} fine-tunes, Llama-style bf16, {arch.params / 1e6:.0f} M params each, "
        f"{input_gb:.2f} GB of input in {len(list(base.glob('*.safetensors')))} shards per model; "
        f"{info['cpu_count']} CPUs, torch {info['torch']}; inputs warm in the page cache\n"
    )
    print(table(rows, args.repeat))
    print(f"\ncommand: {command}", flush=True)
    record = {
        "command": command,
        "size": size,
        "arch": asdict(arch),
        "params_per_model": arch.params,
        "input_gb": input_gb,
        "output_gb": folder_bytes(base) / 1e9,
        "repeat": args.repeat,
        "page_cache": "warm (nothing dropped; a warm-up floor run precedes the timed runs)",
        "seconds": "wall time in the job's own process, after its imports; best of the runs",
        "targets_x_floor": TARGETS,
        "machine": info,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    target = args.json or RESULTS / ("engine.json" if size == "default" else f"engine-{size}.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written: {os.path.relpath(target)}")


if __name__ == "__main__":
    main()
