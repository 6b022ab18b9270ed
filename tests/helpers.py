"""Helpers the tests share: tiny real checkpoints (a base and its fine-tunes), written in every supported
format, and the comparison used throughout. Imported as ``from tests.helpers import ...``; the fixtures
built on them are in ``conftest.py``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergelab.io.safetensors_header import TensorSpec
from mergelab.io.writer import plan_shards


def tiny_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A small transformer-like state dict: matrices, vectors, a scalar and an int buffer."""
    gen = torch.Generator().manual_seed(seed)
    state = {
        "embed.weight": torch.randn(11, 6, generator=gen),
        "layer.0.attn.weight": torch.randn(6, 6, generator=gen),
        "layer.0.attn.bias": torch.randn(6, generator=gen),
        "layer.0.mlp.weight": torch.randn(8, 6, generator=gen),
        "layer.0.norm.weight": 1 + 0.1 * torch.randn(6, generator=gen),
        "head.scale": torch.randn((), generator=gen),
    }
    state = {k: v.to(dtype) for k, v in state.items()}
    state["position_ids"] = torch.arange(11)
    return state


def finetune_of(base: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for name, tensor in base.items():
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=gen) * scale
            out[name] = (tensor.float() + noise).to(tensor.dtype)
        else:
            out[name] = tensor.clone()
    return out


def write_sharded(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = 200) -> Path:
    """A Hugging Face style sharded safetensors folder with an index (tiny shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    layout = [(n, TensorSpec(tuple(t.shape), t.dtype)) for n, t in state.items()]
    shards = plan_shards(layout, max_shard_bytes)
    weight_map = {}
    for shard in shards:
        save_file({n: state[n].contiguous() for n in shard.names}, str(folder / shard.filename))
        weight_map.update({n: shard.filename for n in shard.names})
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 6}))
    return folder


def save_states(states: list[dict[str, torch.Tensor]], folder: Path) -> list[str]:
    """Each state as ``folder/m{i}.safetensors``; their paths, in order."""
    paths = [str(folder / f"m{i}.safetensors") for i in range(len(states))]
    for state, path in zip(states, paths, strict=True):
        save_file(state, path)
    return paths


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
