"""Streaming engine vs a plain in-memory reference; dtypes; tied tensors; GPU vs CPU."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelab
from conftest import assert_close, finetune_of, tiny_state, write_sharded
from mergelab.engine import stream


def reference_task_arithmetic(base: dict, models: list[dict], scaling: float) -> dict:
    out = {}
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        taus = torch.stack([m[name].float() - tensor.float() for m in models])
        out[name] = (tensor.float() + scaling * taus.sum(0)).to(tensor.dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streamed_sharded_equals_in_memory_reference(tmp_path, dtype, monkeypatch):
    monkeypatch.setitem(stream.CHUNK_ELEMENTS, "cpu", 5)  # force several chunks per tensor
    base = tiny_state(0, dtype)
    models = [finetune_of(base, i) for i in range(3)]
    expected = reference_task_arithmetic(base, models, 0.4)
    base_dir = write_sharded(base, tmp_path / "base", max_shard_bytes=100)
    paths = []
    for i, model in enumerate(models):
        if i == 0:
            paths.append(str(write_sharded(model, tmp_path / f"m{i}", max_shard_bytes=70)))
        else:
            save_file(model, str(tmp_path / f"m{i}.safetensors"))
            paths.append(str(tmp_path / f"m{i}.safetensors"))
    out = mergelab.merge("task_arithmetic", str(base_dir), paths, scaling=0.4, out=tmp_path / "out", max_shard_size=150)
    written = {}
    for shard in out.glob("*.safetensors"):
        written.update(load_file(str(shard)))
    in_memory = mergelab.merge("task_arithmetic", base, models, scaling=0.4)
    for name, tensor in expected.items():
        assert written[name].dtype == tensor.dtype
        assert torch.equal(written[name], in_memory[name])
        assert_close(written[name].float(), tensor.float(), rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-3)


def test_float64_compute_option():
    base = tiny_state(1)
    models = [finetune_of(base, i) for i in range(2)]
    merged = mergelab.merge("task_arithmetic", base, models, dtype="float64", scaling=1.0)
    exact = {n: (base[n].double() + sum(m[n].double() - base[n].double() for m in models)).float() for n in base if base[n].is_floating_point()}
    for name, tensor in exact.items():
        assert torch.equal(merged[name], tensor)


def test_tied_tensors_are_merged_once_and_both_names_written(tmp_path):
    def tied(seed: int) -> dict:
        state = tiny_state(seed)
        state["lm_head.weight"] = state["embed.weight"]  # shares storage
        return state

    base = tied(0)
    models = []
    for i in range(2):
        model = finetune_of(base, i)
        model["lm_head.weight"] = model["embed.weight"]
        models.append(model)
    plan = mergelab.plan("task_arithmetic", base, models)
    assert plan.aliases == {"lm_head.weight": "embed.weight"}
    assert "lm_head.weight" not in plan.merged
    merged = mergelab.merge("task_arithmetic", base, models)
    assert merged["lm_head.weight"] is merged["embed.weight"]
    torch.save(base, tmp_path / "base.bin")
    out = mergelab.merge("task_arithmetic", str(tmp_path / "base.bin"), models, out=tmp_path / "o")
    written = load_file(str(out / "model.safetensors"))
    assert torch.equal(written["lm_head.weight"], written["embed.weight"])
    assert torch.equal(written["embed.weight"], merged["embed.weight"])


def test_integer_buffers_are_copied_from_base():
    base = tiny_state(2)
    models = [finetune_of(base, 0)]
    models[0]["position_ids"] = torch.arange(11) * 7  # ignored: buffers come from the base
    assert torch.equal(mergelab.merge("ties", base, models)["position_ids"], base["position_ids"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "weight_average"])
def test_gpu_equals_cpu(method):
    base = tiny_state(3, torch.bfloat16)
    models = [finetune_of(base, i) for i in range(3)]
    cpu = mergelab.merge(method, base, models)
    gpu = mergelab.merge(method, base, models, device="cuda")
    for name in base:
        assert_close(gpu[name].float(), cpu[name].float(), rtol=1e-2, atol=1e-2)
