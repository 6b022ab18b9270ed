"""The engine's process settings (one intra-op thread for chunked work, no cyclic GC) are restored
afterwards, and the single NaN/Inf check over all task vectors still names the input at fault."""

from __future__ import annotations

import gc

import pytest
import torch
from safetensors.torch import save_file

import mergelab
from conftest import finetune_of, tiny_state
from mergelab.engine import stream
from mergelab.errors import MergelabError


@pytest.mark.parametrize(("method", "hparams"), [("task_arithmetic", {}), ("ties", {"scope": "tensor"})])
@pytest.mark.parametrize("fails", [False, True])
def test_threads_and_gc_restored(monkeypatch, method, hparams, fails):
    seen: list[int] = []
    real = stream.merge_tensor
    monkeypatch.setattr(stream, "merge_tensor", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    base = tiny_state(0)
    models = [finetune_of(base, 1), finetune_of(base, 2)]
    if fails:
        models[1]["layer.0.attn.bias"][0] = float("nan")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if fails:
            with pytest.raises(MergelabError):
                mergelab.merge(method, base, models, **hparams)
        else:
            mergelab.merge(method, base, models, **hparams)
        assert torch.get_num_threads() == 2 and gc.isenabled()
        assert set(seen) == ({1} if method == "task_arithmetic" else {2})  # chunked work only runs serially
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("culprit", [0, 1, 2])  # the base, the first model, the second model
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_is_named(tmp_path, dtype, culprit, value):
    states = [tiny_state(0, dtype), finetune_of(tiny_state(0, dtype), 1), finetune_of(tiny_state(0, dtype), 2)]
    states[culprit]["layer.0.mlp.weight"][2, 3] = value
    paths = []
    for i, state in enumerate(states):
        save_file(state, str(tmp_path / f"m{i}.safetensors"))
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    with pytest.raises(MergelabError, match="NaN or Inf") as err:
        mergelab.merge("task_arithmetic", paths[0], paths[1:])
    assert paths[culprit] in str(err.value) and "layer.0.mlp.weight" in str(err.value)
    assert all(p not in str(err.value) for i, p in enumerate(paths) if i != culprit)
