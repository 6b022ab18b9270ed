"""Shared by ``bench_spectral.py`` and ``bench_continual.py``: the CLIP ViT-B/32-shaped checkpoint
set, loading it back into a ``CLIPVisionModel`` (the FusionBench side), and a timer of the SVD /
eigendecomposition calls.

The set (built lazily, cached in ``benchmarks/_work/clip-vit-b32-l<layers>/``, git-ignored): a
transformers ``CLIPVisionModel`` created from its default config (ViT-B/32: hidden 768, MLP 3072,
patch 32, 224 px; 12 layers, 88 M parameters) with random weights (``torch.manual_seed(0)``), saved
as a float32 safetensors file with the keys of a transformers 4 checkpoint (``vision_model.*``,
the hub's layout, which both transformers 4 and 5 load), and fine-tunes ``ftNN.safetensors`` = base + structured low-rank noise:
per 2-D tensor ``W``, ``0.05 std(W) (A B / 4 + 0.1 N)`` with ``A (m, 16)``, ``B (16, n)``, ``N``
dense, all standard normal; other tensors ``W + 0.01 std(W) N``. Every tensor draws from its own
generator (``crc32`` of model index and name), so fine-tune ``i`` is the same file whatever the
number of models asked for: the 8-model set is the first 8 of the 20-model one, each written once.

Runs in both venvs (.venv and the FusionBench one): only the standard library at import time.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
RESULTS = HERE / "results"
FB_PYTHON = WORK / "fb-venv" / "bin" / "python"
FORMAT_VERSION = 2  # bump when the generated checkpoints change, so stale caches are rebuilt
RANK, LOW_RANK_SCALE, NOISE = 16, 0.05, 0.1
PREFIX = "vision_model."  # key prefix of CLIPVisionModel checkpoints saved by transformers 4 (5 drops it)


def clip_set(n_models: int, layers: int = 12) -> tuple[Path, list[Path]]:
    """Base + ``n_models`` fine-tunes of a CLIP ViT-B/32-shaped vision tower (built once, cached)."""
    folder = WORK / f"clip-vit-b32-l{layers}"
    spec = {"format": FORMAT_VERSION, "layers": layers, "rank": RANK, "scale": LOW_RANK_SCALE, "noise": NOISE}
    spec_file = folder / "spec.json"
    if not spec_file.exists() or json.loads(spec_file.read_text()) != spec:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        _base_state(folder / "base.safetensors", layers)
        spec_file.write_text(json.dumps(spec))
    models = [folder / f"ft{i:02d}.safetensors" for i in range(n_models)]
    for index, path in enumerate(models):
        if not path.exists():
            _finetune(folder / "base.safetensors", path, index)
    return folder / "base.safetensors", models


def clip_config(layers: int) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(num_hidden_layers=layers)  # ViT-B/32 defaults otherwise


def load_clip_model(path: str | Path, layers: int) -> Any:
    """A ``CLIPVisionModel`` holding the tensors of ``path`` (strict: every key must match)."""
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    with torch.device("meta"):  # no random init: load_state_dict(assign=True) brings the real tensors
        model = CLIPVisionModel(clip_config(layers))
    expected = set(model.state_dict())
    state = load_file(str(path))
    if not expected <= set(state):  # transformers 5 names the keys without the prefix
        state = {k.removeprefix(PREFIX): v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _base_state(path: Path, layers: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(clip_config(layers))
    state = {
        (k if k.startswith(PREFIX) else PREFIX + k): v.detach().contiguous() for k, v in model.state_dict().items()
    }
    save_file(state, str(path))


def _finetune(base_path: Path, path: Path, index: int) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    out = {}
    for name, w in load_file(str(base_path)).items():
        if not w.is_floating_point():
            out[name] = w
            continue
        gen = torch.Generator().manual_seed(zlib.crc32(f"{index}:{name}".encode()))
        std = float(w.float().std()) if w.numel() > 1 else 1.0
        if w.ndim == 2:
            m, n = w.shape
            low = torch.randn(m, RANK, generator=gen) @ torch.randn(RANK, n, generator=gen) / RANK**0.5
            tau = LOW_RANK_SCALE * std * (low + NOISE * torch.randn(m, n, generator=gen))
        else:
            tau = 0.01 * std * torch.randn(w.shape, generator=gen)
        out[name] = (w + tau).contiguous()
    tmp = path.with_suffix(".tmp")  # a killed build leaves no half-written fine-tune behind
    save_file(out, str(tmp))
    tmp.replace(path)


@contextlib.contextmanager
def decomposition_timer() -> Iterator[dict[str, float]]:
    """Accumulates seconds and calls inside ``torch.linalg.svd``, ``torch.linalg.eigh``,
    ``scipy.linalg.eigh`` and mergelab's GIL-free LAPACK calls (its float64 CPU path: ``eigh_top``
    counted as eigh, ``lapack_svd`` as svd, wrapped where ``ops.svd`` looks them up). Every
    implementation looks them up on their module at call time, so wrapping them there counts all.
    Calls on several threads at once add up: thread seconds."""
    import torch

    wrapped = [(torch.linalg, "svd", "svd"), (torch.linalg, "eigh", "eigh")]
    try:
        import scipy.linalg

        wrapped.append((scipy.linalg, "eigh", "eigh"))
    except ImportError:  # a benchmark venv without SciPy
        pass
    try:
        from mergelab.ops import svd as _svd

        wrapped += [(_svd, "eigh_top", "eigh"), (_svd, "lapack_svd", "svd")]
    except ImportError:  # FusionBench's venv
        pass
    spent = {"svd": 0.0, "eigh": 0.0, "svd_calls": 0, "eigh_calls": 0}
    lock = threading.Lock()
    originals = {(module, name): getattr(module, name) for module, name, _ in wrapped}

    def timed(original: Any, kind: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with lock:
                    spent[kind] += time.perf_counter() - start
                    spent[f"{kind}_calls"] += 1

        return call

    for module, name, kind in wrapped:
        setattr(module, name, timed(originals[module, name], kind))
    try:
        yield spent
    finally:
        for (module, name), original in originals.items():
            setattr(module, name, original)


def relative_difference(
    base: dict[str, Any], one: dict[str, Any], two: dict[str, Any], skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Relative Frobenius difference of two merged task vectors (``one - base`` vs ``two - base``,
    float64, all floating tensors together, names in ``skip`` left out), the worst tensor, and the
    difference left after the best global rescaling of the first (``scale``): a global norm factor
    computed over different tensors shows up in ``relative`` but not in ``relative_after_scale``."""
    xx = yy = xy = dd = 0.0
    worst, worst_name = 0.0, ""
    for name, w in base.items():
        if not w.is_floating_point() or name in skip:
            continue
        tx, ty = one[name].double() - w.double(), two[name].double() - w.double()
        d, n = float((tx - ty).norm() ** 2), float(ty.norm() ** 2)
        xx, yy, xy, dd = xx + float(tx.norm() ** 2), yy + n, xy + float((tx * ty).sum()), dd + d
        if n > 0 and (d / n) ** 0.5 > worst:
            worst, worst_name = (d / n) ** 0.5, name
    if yy == 0:
        return {
            "relative": 0.0,
            "worst_tensor": 0.0,
            "worst_tensor_name": "",
            "scale": 1.0,
            "relative_after_scale": 0.0,
        }
    scale = xy / xx if xx else 1.0  # argmin_c ||c x - y||
    return {
        "relative": dd**0.5 / yy**0.5,  # summed directly: xx - 2 xy + yy cancels to 0 for tiny differences
        "worst_tensor": worst,
        "worst_tensor_name": worst_name,
        "scale": scale,
        "relative_after_scale": max(yy - xy * scale, 0.0) ** 0.5 / yy**0.5,
    }


def run_json_child(script: str, job: dict[str, Any], label: str, python: str | None = None) -> dict[str, Any]:
    """Runs ``script --child JOB`` in a fresh process (``python``: this interpreter by default) after
    removing the job's output, and returns the JSON its last line of output prints; exits on failure."""
    Path(job["out"]).unlink(missing_ok=True)
    command = [python or sys.executable, script, "--child", json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"job {label} failed:\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run_in_turn(
    jobs: list[dict[str, Any]],
    repeat: int,
    run: Callable[[dict[str, Any]], dict[str, Any]],
    key: Callable[[dict[str, Any]], tuple[str, ...]],
) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    """Every job ``repeat`` times, one after the other in turn (drift on a shared machine hits every
    job alike), printing each run's seconds; the results grouped by ``key(job)`` in job order."""
    runs: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for round_ in range(repeat):
        for job in jobs:
            result = run(job)
            runs.setdefault(key(job), []).append(result)
            names = " ".join(f"{part:12s}" for part in key(job))
            print(f"[{round_ + 1}/{repeat}] {names} {result['seconds']:7.2f} s", flush=True)
    return runs


def vm_rss_mb() -> float:
    """This process's current RSS (``VmRSS``), MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
