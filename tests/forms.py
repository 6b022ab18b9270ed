"""Every model-like input form of the contract, written from a state dict (tests/io and tests/cli)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.helpers import write_sharded


def write_bin_sharded(state: dict[str, torch.Tensor], folder: Path) -> Path:
    folder.mkdir(parents=True)
    names = list(state)
    weight_map = {}
    for i, part in enumerate((names[:3], names[3:]), start=1):
        filename = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({n: state[n] for n in part}, folder / filename)
        weight_map.update(dict.fromkeys(part, filename))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def write_form(form: str, state: dict[str, torch.Tensor], root: Path) -> object:
    """``state`` written as one input form of the contract; returns what to pass as the model."""
    root.mkdir(parents=True, exist_ok=True)
    if form == "dict":
        return state
    if form == "safetensors file":
        save_file(state, str(root / "m.safetensors"))
        return str(root / "m.safetensors")
    if form == "folder, model.safetensors":
        (root / "hf").mkdir()
        save_file(state, str(root / "hf" / "model.safetensors"))
        return str(root / "hf")
    if form == "folder, sharded safetensors":
        folder = write_sharded(state, root / "sharded", max_shard_bytes=150)
        assert (folder / "model.safetensors.index.json").exists()
        return str(folder)
    if form == "folder, pytorch_model.bin":
        (root / "bin").mkdir()
        torch.save(state, root / "bin" / "pytorch_model.bin")
        return str(root / "bin")
    if form == "folder, sharded .bin":
        return str(write_bin_sharded(state, root / "binshards"))
    if form == ".pt":
        torch.save(state, root / "m.pt")
        return str(root / "m.pt")
    if form == ".pth with a state_dict wrapper":
        torch.save({"state_dict": state, "epoch": 3, "optimizer": None}, root / "m.pth")
        return str(root / "m.pth")
    raise ValueError(form)


FORMS = ["dict", "safetensors file", "folder, model.safetensors", "folder, sharded safetensors",
         "folder, pytorch_model.bin", "folder, sharded .bin", ".pt", ".pth with a state_dict wrapper"]
