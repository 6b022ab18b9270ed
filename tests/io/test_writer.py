"""The streaming writer: golden header bytes, sharding + index, provenance, extras, atomicity."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open

import mergelab
from conftest import finetune_of, tiny_state, write_sharded
from mergelab.io.safetensors_header import TensorSpec
from mergelab.io.writer import CheckpointWriter, shard_header


def test_golden_header_bytes():
    raw = shard_header([("a", TensorSpec((2,), torch.float32)), ("b", TensorSpec((1, 2), torch.bfloat16))], {"k": "v"})
    body = b'{"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[1,2],"data_offsets":[8,12]}}'
    body += b" " * (-len(body) % 8)
    assert raw == struct.pack("<Q", len(body)) + body
    assert len(raw) % 8 == 0


def test_sharded_output_with_index_reads_back(tmp_path):
    base = tiny_state(0)
    models = [finetune_of(base, i) for i in range(2)]
    expected = mergelab.merge("task_arithmetic", base, models)
    out = mergelab.merge("task_arithmetic", base, models, out=tmp_path / "m", max_shard_size=200)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(base)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in base.values())
    for name, shard in index["weight_map"].items():
        with safe_open(str(out / shard), "pt") as handle:
            assert torch.equal(handle.get_tensor(name), expected[name])
            meta = handle.metadata()
    assert meta["mergelab.method"] == "task_arithmetic" and meta["mergelab.version"] == mergelab.__version__
    assert json.loads(meta["mergelab.hparams"]) == {"scaling": 0.3}
    assert [entry["role"] for entry in json.loads(meta["mergelab.inputs"])] == ["base", "model", "model"]


def test_single_file_output_and_extras_copied(tmp_path):
    base_dir = write_sharded(tiny_state(0), tmp_path / "base")
    (base_dir / "tokenizer.json").write_text("{}")
    model_dir = write_sharded(finetune_of(tiny_state(0), 1), tmp_path / "m1")
    out = mergelab.merge("weight_average", str(base_dir), [str(model_dir)], out=tmp_path / "merged")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    single = mergelab.merge("weight_average", str(base_dir), [str(model_dir)], out=tmp_path / "one.safetensors")
    assert single.is_file()


def test_failure_leaves_nothing_and_overwrite_is_atomic(tmp_path):
    layout = [("a", TensorSpec((2,), torch.float32)), ("b", TensorSpec((2,), torch.float32))]
    target = tmp_path / "out"
    with pytest.raises(ValueError):
        with CheckpointWriter(target, layout, {}) as writer:
            writer.write("a", torch.zeros(2))
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []
    with CheckpointWriter(target, layout, {}) as writer:
        writer.write("a", torch.zeros(2))
        writer.write("b", torch.ones(2))
        writer.commit()
    with pytest.raises(RuntimeError):
        with CheckpointWriter(target, layout, {}, overwrite=True) as writer:
            writer.write("a", torch.full((2,), 5.0))
            raise RuntimeError("killed")
    with safe_open(str(target / "model.safetensors"), "pt") as handle:  # the old output, untouched
        assert torch.equal(handle.get_tensor("b"), torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
