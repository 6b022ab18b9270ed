"""The streaming engine equals a plain in-memory merge, whatever the input form, dtype and device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelab
from mergelab.engine import chunks, stream
from tests.helpers import assert_close, finetune_of, tiny_state, write_sharded

Combine = Callable[[torch.Tensor], torch.Tensor]  # (T, *shape) task vectors -> merged task vector


def reference(base: dict, models: list[dict], combine: Combine, dtype: torch.dtype = torch.float32) -> dict:
    """``{k: base[k] + f(stack(m[k] - base[k]))}`` in ``dtype``, cast back; int/bool buffers copied."""
    out = {}
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        taus = torch.stack([m[name].to(dtype) - tensor.to(dtype) for m in models])
        out[name] = (tensor.to(dtype) + combine(taus)).to(tensor.dtype)
    return out


def ties_official(taus: torch.Tensor, density: float, merge_func: str = "mean") -> torch.Tensor:
    """TIES over the flattened task vectors, a literal port of prateeky2806/ties-merging
    src/utils/merge_utils.py (topk_values_mask, resolve_sign, resolve_zero_signs, disjoint_merge)."""
    shape, flat = taus.shape[1:], taus.reshape(taus.shape[0], -1)
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())  # resolve_zero_signs(..., "majority")
    selected = trimmed * torch.where(sign[None] > 0, trimmed > 0, trimmed < 0)
    if merge_func == "mean":
        merged = selected.sum(dim=0) / (selected != 0).sum(dim=0).float().clamp(min=1)
    elif merge_func == "sum":
        merged = selected.sum(dim=0)
    else:
        merged = selected.abs().max(dim=0).values * sign
    return merged.reshape(shape)


def ties_global_reference(base: dict, models: list[dict], density: float, merge_func: str = "mean",
                          dtype: torch.dtype = torch.float32) -> dict:
    """TIES with one top-k over the concatenation of every floating tensor, then split back."""
    names = [n for n, t in base.items() if t.is_floating_point()]
    flat = torch.cat([torch.stack([m[n].to(dtype) - base[n].to(dtype) for m in models]).reshape(len(models), -1)
                      for n in names], 1)
    merged, out, start = ties_official(flat, density, merge_func), dict(base), 0
    for name in names:
        size = base[name].numel()
        delta = merged[start : start + size].reshape(base[name].shape)
        out[name] = (base[name].to(dtype) + delta).to(base[name].dtype)
        start += size
    return out


CASES = {
    "task_arithmetic": ({"scaling": 0.4}, lambda b, ms: reference(b, ms, lambda t: t.sum(0) * 0.4)),
    "ties tensor": ({"density": 0.3, "scope": "tensor"}, lambda b, ms: reference(b, ms, lambda t: ties_official(t, 0.3))),
    "ties global": ({"density": 0.3, "scope": "global"}, lambda b, ms: ties_global_reference(b, ms, 0.3)),
}


def as_form(form: str, states: list[dict], root: Path) -> list[object]:
    if form == "state dicts":
        return states
    paths: list[object] = []
    for i, state in enumerate(states):
        if form == "sharded folders":  # a different tiny shard size per model: different file layouts
            paths.append(str(write_sharded(state, root / f"m{i}", max_shard_bytes=60 + 40 * i)))
        else:
            save_file(state, str(root / f"m{i}.safetensors"))
            paths.append(str(root / f"m{i}.safetensors"))
    return paths


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": torch.finfo(dtype).eps, "atol": 1e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_equals_in_memory_reference_for_every_form(tmp_path, monkeypatch, case, dtype):
    monkeypatch.setitem(chunks.CHUNK_ELEMENTS, "cpu", 5)  # several column chunks per tensor
    hparams, expected_of = CASES[case]
    base = tiny_state(0, dtype)
    models = [finetune_of(base, i) for i in range(3)]
    expected = expected_of(base, models)
    results = {}
    for form in ("state dicts", "single files", "sharded folders"):
        root = tmp_path / form.replace(" ", "_")
        root.mkdir()
        base_in, *model_in = as_form(form, [base, *models], root)
        results[form] = mergelab.merge(case.split()[0], base_in, model_in, **hparams)
    for name, tensor in expected.items():
        for form, merged in results.items():
            assert merged[name].dtype == tensor.dtype and merged[name].device.type == "cpu", (form, name)
            assert_close(merged[name].float(), tensor.float(), **tolerance(dtype))
            assert torch.equal(merged[name], results["state dicts"][name]), (form, name)


@pytest.mark.parametrize("copied", [False, True])  # inputs memory-mapped (the default) or copied into buffers
@pytest.mark.parametrize("case", sorted(CASES))
def test_written_output_with_reused_buffers_equals_in_memory_merge(tmp_path, monkeypatch, case, copied):
    """Inputs are views of memory maps released after each tensor, or (where a tensor cannot be
    mapped, e.g. at an unaligned offset) copies in reused, growing buffers; outputs are computed into
    two alternating buffers while the other is written: the shards hold exactly what the plain
    in-memory merge returns."""
    from mergelab.io.sources import SafetensorsSource

    monkeypatch.setitem(chunks.CHUNK_ELEMENTS, "cpu", 5)
    if copied:
        monkeypatch.setattr(SafetensorsSource, "copies", lambda self, name: True)
    into_given: list[bool] = []
    real_get = SafetensorsSource.get
    monkeypatch.setattr(SafetensorsSource, "get", lambda self, name, into=None: into_given.append(into is not None)
                        or real_get(self, name, into))
    hparams = CASES[case][0]
    base = tiny_state(6, torch.bfloat16)
    models = [finetune_of(base, i) for i in range(3)]
    base_in, *model_in = as_form("sharded folders", [base, *models], tmp_path)
    expected = mergelab.merge(case.split()[0], base, models, **hparams)
    out = mergelab.merge(case.split()[0], base_in, model_in, out=tmp_path / "out", max_shard_size=100, **hparams)
    written = {}
    for shard in sorted(out.glob("*.safetensors")):
        written.update(load_file(str(shard)))
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
    n_floating = sum(t.is_floating_point() for t in base.values())
    if copied:
        assert sum(into_given) >= 4 * n_floating  # base + 3 models of every merged tensor, into reused buffers
    else:
        assert not any(into_given)  # views of the maps: no buffer is even allocated


@pytest.mark.parametrize("merge_func", ["sum", "max"])
def test_ties_global_other_merge_funcs(merge_func):
    base = tiny_state(1)
    models = [finetune_of(base, i) for i in range(3)]
    merged = mergelab.merge("ties", base, models, density=0.4, merge_func=merge_func)
    for name, tensor in ties_global_reference(base, models, 0.4, merge_func).items():
        assert_close(merged[name], tensor)


def test_ties_global_exact_cancellation_takes_the_model_wide_majority_sign(tmp_path):
    # taus are exactly +d and -d in "a" (every elected sign 0), negative in "b": majority -1
    base = {"a": torch.zeros(4), "b": torch.zeros(6)}
    d = torch.tensor([1.0, 2.0, 3.0, 4.0])
    models = [{"a": d, "b": -torch.ones(6)}, {"a": -d, "b": -torch.ones(6)}]
    expected = ties_global_reference(base, models, density=0.9)
    assert torch.equal(expected["a"], -d)  # the negative entries win
    merged = mergelab.merge("ties", base, models, density=0.9)
    written = load_file(str(mergelab.merge("ties", base, models, density=0.9, out=tmp_path / "o") / "model.safetensors"))
    for name in base:
        assert torch.equal(merged[name], expected[name]) and torch.equal(written[name], expected[name])


def test_float64_compute_option():
    base = tiny_state(2)
    models = [finetune_of(base, i) for i in range(2)]
    ta = mergelab.merge("task_arithmetic", base, models, scaling=0.7, dtype="float64")
    ties = mergelab.merge("ties", base, models, density=0.3, scope="tensor", dtype="float64")
    exact_ta = reference(base, models, lambda t: t.sum(0) * 0.7, torch.float64)
    exact_ties = reference(base, models, lambda t: ties_official(t, 0.3), torch.float64)
    for name in base:
        assert ta[name].dtype == base[name].dtype
        assert torch.equal(ta[name], exact_ta[name]) and torch.equal(ties[name], exact_ties[name]), name


@pytest.mark.parametrize("density", [0.3, 0.5, 0.9])
def test_float64_ties_global_threshold_is_exact(density):
    """float64 taus get float64 selection keys (4 radix passes): the threshold is the exact k-th
    magnitude, not its float32 rounding (which dropped the k-th entry when it rounded up)."""
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(50, generator=gen, dtype=torch.float64) * 1e-3,  # taus not representable in float32
            "v": torch.randn(3, 7, generator=gen, dtype=torch.float64)}
    models = [{k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in base.items()} for _ in range(2)]
    job = mergelab.plan("ties", base, models, density=density, dtype="float64")
    assert job.n_stat_passes == 4 and "5 over the inputs (4 statistics + 1 merge)" in job.summary()
    merged = mergelab.merge("ties", base, models, density=density, dtype="float64")
    expected = ties_global_reference(base, models, density, dtype=torch.float64)
    for name in base:
        assert torch.equal(merged[name], expected[name]), name


def tied(state: dict) -> dict:
    state = dict(state)
    state["lm_head.weight"] = state["embed.weight"]  # two names, one storage
    return state


@pytest.mark.parametrize("form", ["state dict", ".bin"])
def test_tied_tensors_merged_once_and_both_names_written(tmp_path, monkeypatch, form):
    calls: list[str] = []
    real = stream.merge_tensor
    monkeypatch.setattr(stream, "merge_tensor", lambda plan, name, *a, **k: calls.append(name) or real(plan, name, *a, **k))
    base = tied(tiny_state(0))
    models = [tied(finetune_of(tiny_state(0), i)) for i in range(2)]
    if form == ".bin":
        for i, state in enumerate([base, *models]):
            torch.save(state, tmp_path / f"{i}.bin")
        base, models = str(tmp_path / "0.bin"), [str(tmp_path / f"{i}.bin") for i in (1, 2)]
    out = mergelab.merge("task_arithmetic", base, models, out=tmp_path / "out")
    assert sorted(calls) == sorted(n for n, t in tiny_state(0).items() if t.is_floating_point())  # once each
    written = load_file(str(out / "model.safetensors"))
    assert torch.equal(written["lm_head.weight"], written["embed.weight"])
    expected = reference(tiny_state(0), [finetune_of(tiny_state(0), i) for i in range(2)], lambda t: t.sum(0) * 0.3)
    assert_close(written["embed.weight"], expected["embed.weight"])


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_int_and_bool_buffers_are_copied_unchanged(method):
    base = tiny_state(3)
    base["mask"] = torch.tensor([True, False, True])
    models = [finetune_of(base, 0), finetune_of(base, 1)]
    models[0]["position_ids"] = torch.arange(11) * 7  # differing buffers are ignored: they come from the base
    models[1]["mask"] = torch.tensor([False, False, False])
    merged = mergelab.merge(method, base, models)
    for name in ("position_ids", "mask"):
        assert merged[name].dtype == base[name].dtype and torch.equal(merged[name], base[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("method", "hparams"), [("task_arithmetic", {}), ("ties", {"scope": "global"}),
                                                 ("ties", {"scope": "tensor"})])
def test_gpu_equals_cpu(method, hparams):
    base = tiny_state(4)
    models = [finetune_of(base, i) for i in range(3)]
    cpu = mergelab.merge(method, base, models, **hparams)
    gpu = mergelab.merge(method, base, models, device="cuda", **hparams)
    for name in base:
        assert gpu[name].device.type == "cpu" and gpu[name].dtype == base[name].dtype
        assert_close(gpu[name], cpu[name], rtol=1e-5, atol=1e-6)
