"""Every input form of the contract, read lazily, and hostile files refused with one-line errors."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergelab
from conftest import finetune_of, tiny_state, write_sharded
from mergelab.errors import MergelabError
from mergelab.io.sources import open_source


def write_bin_sharded(state: dict, folder: Path) -> Path:
    folder.mkdir(parents=True)
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[:3], "pytorch_model-00002-of-00002.bin": names[3:]}
    weight_map = {}
    for filename, part in halves.items():
        torch.save({n: state[n] for n in part}, folder / filename)
        weight_map.update({n: filename for n in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def all_forms(state: dict, root: Path) -> dict[str, object]:
    root.mkdir(parents=True, exist_ok=True)
    save_file(state, str(root / "file.safetensors"))
    (root / "single").mkdir()
    save_file(state, str(root / "single" / "model.safetensors"))
    (root / "bin").mkdir()
    torch.save(state, root / "bin" / "pytorch_model.bin")
    torch.save(state, root / "ckpt.pt")
    torch.save({"state_dict": state, "epoch": 3}, root / "wrapped.pth")
    module = torch.nn.Module()
    for name, tensor in state.items():
        module.register_buffer(name.replace(".", "_"), tensor)
    return {
        "dict": state,
        "safetensors file": str(root / "file.safetensors"),
        "folder": str(root / "single"),
        "sharded folder": str(write_sharded(state, root / "sharded", max_shard_bytes=150)),
        "bin folder": str(root / "bin"),
        "sharded bin": str(write_bin_sharded(state, root / "binshards")),
        ".pt": str(root / "ckpt.pt"),
        "wrapped .pth": str(root / "wrapped.pth"),
    }


def test_every_input_form_reads_the_same_tensors(tmp_path):
    state = tiny_state(0)
    for label, form in all_forms(state, tmp_path).items():
        source = open_source(form)
        assert set(source.specs) == set(state), label
        for name, tensor in state.items():
            assert source.specs[name].shape == tuple(tensor.shape), label
            assert torch.equal(source.get(name), tensor), label
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()


def test_every_form_merges_identically_and_modules_are_accepted(tmp_path):
    base = tiny_state(0)
    models = [finetune_of(base, i) for i in range(2)]
    expected = mergelab.merge("task_arithmetic", base, models, scaling=0.5)
    forms_a, forms_b = all_forms(models[0], tmp_path / "a"), all_forms(models[1], tmp_path / "b")
    for key in forms_a:
        merged = mergelab.merge("task_arithmetic", base, [forms_a[key], forms_b[key]], scaling=0.5)
        for name in base:
            assert torch.equal(merged[name], expected[name]), key
    linear = torch.nn.Linear(3, 2)
    merged = mergelab.merge("weight_average", linear, [linear, linear])
    assert torch.equal(merged["weight"], linear.weight.detach())


def _header_file(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> str:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return str(path)


HOSTILE = {
    "header length larger than the file": (lambda p: _header_file(p, b"{}", length=10**6), "truncated safetensors header"),
    "header not JSON": (lambda p: _header_file(p, b"not json"), "not JSON"),
    "header not an object": (lambda p: _header_file(p, b"[1, 2]"), "not a JSON object"),
    "too short": (lambda p: (p.write_bytes(b"abc"), str(p))[1], "shorter than 8 bytes"),
    "unknown dtype": (lambda p: _header_file(p, json.dumps({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}).encode(), b"x"), "unsupported dtype"),
    "size mismatch": (lambda p: _header_file(p, json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(), b"x" * 8), "bytes stored for shape"),
    "truncated data": (lambda p: _header_file(p, json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode(), b"x" * 8), "truncated"),
    "overlapping data": (lambda p: _header_file(p, json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode(), b"x" * 12), "overlaps"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_safetensors_are_refused(tmp_path, case):
    build, message = HOSTILE[case]
    path = build(tmp_path / "bad.safetensors")
    with pytest.raises(MergelabError, match=message) as info:
        open_source(path)
    text = str(info.value)
    assert "\n" not in text and "bad.safetensors" in text


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_needing_code_execution_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "evil": Exploit(marker)}, tmp_path / "evil.bin")
    with pytest.raises(MergelabError, match="refusing to unpickle") as info:
        open_source(str(tmp_path / "evil.bin"))
    assert "evil.bin" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_truncated_and_garbage_torch_files(tmp_path):
    torch.save(tiny_state(0), tmp_path / "ok.bin")
    data = (tmp_path / "ok.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    for name in ("cut.bin", "junk.pt"):
        with pytest.raises(MergelabError, match="corrupt|truncated") as info:
            open_source(str(tmp_path / name))
        assert name in str(info.value)


def test_index_problems(tmp_path):
    state = tiny_state(0)
    folder = write_sharded(state, tmp_path / "m", max_shard_bytes=150)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    broken = dict(index, weight_map=dict(index["weight_map"], extra="model-00009-of-00009.safetensors"))
    index_path.write_text(json.dumps(broken))
    with pytest.raises(MergelabError, match="missing shard"):
        open_source(str(folder))
    wrong = dict(index["weight_map"])
    wrong.pop("head.scale")
    index_path.write_text(json.dumps({"weight_map": wrong}))
    with pytest.raises(MergelabError, match="not in the index") as info:
        open_source(str(folder))
    assert "head.scale" in str(info.value)
    with pytest.raises(MergelabError, match="no such file"):
        open_source(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergelabError, match="no checkpoint found"):
        open_source(str(tmp_path / "empty"))
