"""Every "model-like" input behind one lazy interface: name -> tensor, read one at a time.

Accepted (see docs/api.md): a state dict, a ``torch.nn.Module``, a ``.safetensors`` file, a
Hugging Face folder (``model.safetensors``, sharded safetensors + index, ``pytorch_model.bin``,
sharded ``.bin`` + index), or a ``.bin``/``.pt``/``.pth`` file. Torch pickles are loaded with
``weights_only=True`` and memory-mapped, never executed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import MergelabError
from mergelab.io.names import resolve_model_name
from mergelab.io.safetensors_source import SafetensorsSource
from mergelab.io.tensor_source import DictSource, TensorSource
from mergelab.io.torch_bin import TorchSource, load_torch_file

__all__ = ["DictSource", "SafetensorsSource", "TensorSource", "TorchSource", "load_torch_file", "open_source"]

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
FULL_WEIGHTS = (SAFE_INDEX, BIN_INDEX, "model.safetensors", "pytorch_model.bin")  # in the order they are preferred
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")  # PEFT's
ADAPTER_MESSAGE = ("a LoRA/PEFT adapter, not a full model: merge it into its base model first (e.g. with PEFT's "
                   "merge_and_unload()) and pass the merged model")
def open_source(model: Any, label: str | None = None) -> TensorSource:
    """Dispatch a model-like input to its lazy reader; raises MergelabError if it is not one."""
    model = resolve_model_name(model)  # a backbone name -> its packaged folder (mergelab.io.names)
    if isinstance(model, TensorSource):
        return model
    if isinstance(model, torch.nn.Module):
        return DictSource(model.state_dict(), label or type(model).__name__)
    if isinstance(model, Mapping):
        return DictSource(model, label or "<state dict>")
    if not isinstance(model, (str, os.PathLike)):
        raise MergelabError(f"not a model: {type(model).__name__} (expected a path, state dict or nn.Module)")
    path = Path(model)
    text = str(path)
    if path.is_dir():
        return _open_folder(path)
    if not path.exists():
        raise MergelabError("no such file or folder", file=text)
    if path.name.startswith("adapter_model."):
        raise MergelabError(ADAPTER_MESSAGE, file=text)
    if path.suffix == ".safetensors":
        return SafetensorsSource([text], text)
    if path.suffix in TORCH_SUFFIXES:
        return TorchSource([text], text)
    if path.suffix == ".json" and path.name.endswith("index.json"):
        return _open_folder(path.parent)
    raise MergelabError("unknown checkpoint format (expected .safetensors, .bin, .pt, .pth or a model folder)", file=text)


def _open_folder(folder: Path) -> TensorSource:
    """The folder's full-model weights (an index first, then a single file; safetensors before ``.bin``);
    the plan says which one where a folder holds several."""
    present = [name for name in FULL_WEIGHTS if (folder / name).is_file()]
    if not present and any((folder / name).is_file() for name in ADAPTER_FILES):
        raise MergelabError(ADAPTER_MESSAGE, file=str(folder))
    source = _open_weights(folder)
    chosen = next((name for name in FULL_WEIGHTS if (folder / name).is_file()), None)
    unused = [name for name in (*present, *ADAPTER_FILES[1:]) if name != chosen and (folder / name).is_file()
              and not (chosen in (SAFE_INDEX, BIN_INDEX) and str(folder / name) in source.files)]
    if chosen is not None and unused:
        source.warnings = (*source.warnings, f"{folder} holds {chosen} and {', '.join(unused)}: using {chosen}, "
                           f"the other{'s are' if len(unused) > 1 else ' is'} ignored",)
    return source


def _open_weights(folder: Path) -> TensorSource:
    label = str(folder)
    for index_name, cls in ((SAFE_INDEX, SafetensorsSource), (BIN_INDEX, TorchSource)):
        index_path = folder / index_name
        if index_path.exists():
            weight_map = _read_index(index_path)
            files = []
            for shard in sorted(set(weight_map.values())):
                shard_path = folder / shard
                if Path(shard).name != shard or not shard_path.is_file():
                    tensor = next(n for n, s in weight_map.items() if s == shard)
                    raise MergelabError(f"index names missing shard {shard!r}", file=str(index_path), tensor=tensor)
                files.append(str(shard_path))
            source = cls(files, label, folder)
            _check_index(weight_map, {n: source.file_of(n) for n in source.specs}, str(index_path))
            return source
    for single, cls in (("model.safetensors", SafetensorsSource), ("pytorch_model.bin", TorchSource)):
        if (folder / single).is_file():
            return cls([str(folder / single)], label, folder)
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:
        return SafetensorsSource([str(folder / found[0])], label, folder)
    raise MergelabError("no checkpoint found in folder (expected model.safetensors, an index, or pytorch_model.bin)", file=label)


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        data = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MergelabError(f"unreadable index ({err})", file=str(index_path)) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MergelabError("index has no valid 'weight_map'", file=str(index_path))
    if not weight_map:
        raise MergelabError("index lists no tensors (empty 'weight_map')", file=str(index_path))
    return {str(k): v for k, v in weight_map.items()}


def _check_index(index: dict[str, str], found: dict[str, str], index_file: str) -> None:
    """The index and the shards' headers must agree on every tensor and its shard."""
    for name, shard in index.items():
        if name not in found:
            raise MergelabError(f"index lists the tensor in {shard} but no shard holds it", file=index_file, tensor=name)
        if Path(found[name]).name != shard:
            raise MergelabError(f"index says {shard} but it is in {Path(found[name]).name}", file=index_file, tensor=name)
    for name, path in found.items():
        if name not in index:
            raise MergelabError("tensor is in a shard but not in the index", file=path, tensor=name)

