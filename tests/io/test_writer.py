"""The streaming writer: golden header bytes, shards + index, provenance, extras, atomic (over)writes."""

from __future__ import annotations

import ctypes
import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, save_file

import mergelab
from mergelab.errors import MergelabError
from mergelab.io import writer as writer_module
from mergelab.io.safetensors_header import TensorSpec
from mergelab.io.writer import CheckpointWriter, plan_shards, shard_header
from tests.helpers import finetune_of, tiny_state, write_sharded

LAYOUT = [("w", TensorSpec((2, 3), torch.float32)), ("b", TensorSpec((3,), torch.bfloat16)), ("n", TensorSpec((), torch.int64))]


def read_all(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")) if out.is_dir() else [out]:
        with safe_open(str(shard), "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_golden_header_bytes():
    raw = shard_header(LAYOUT, {"mergelab.method": "ties"})
    # u64 LE length 0xd8 = 216, compact JSON in layout order, padded with spaces to a multiple of 8
    assert raw == (
        b"\xd8\x00\x00\x00\x00\x00\x00\x00"
        b'{"__metadata__":{"mergelab.method":"ties"},'
        b'"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},'
        b'"b":{"dtype":"BF16","shape":[3],"data_offsets":[24,30]},'
        b'"n":{"dtype":"I64","shape":[],"data_offsets":[30,38]}}' + b" " * 7
    )
    parsed = load(raw + bytes(38))  # the reference parser accepts it
    assert {k: (tuple(v.shape), v.dtype) for k, v in parsed.items()} == {n: (s.shape, s.dtype) for n, s in LAYOUT}


def test_sharded_output_has_index_and_reads_back_exactly(tmp_path):
    base = tiny_state(0)
    models = [finetune_of(base, i) for i in range(2)]
    expected = mergelab.merge("task_arithmetic", base, models)
    out = mergelab.merge("task_arithmetic", base, models, out=tmp_path / "m", max_shard_size=200)
    n = len(plan_shards([(k, TensorSpec(tuple(v.shape), v.dtype)) for k, v in base.items()], 200))
    assert n > 2
    shards = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert entries(out) == sorted([*shards, "model.safetensors.index.json"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in base.values())
    assert sorted(index["weight_map"]) == sorted(base) and set(index["weight_map"].values()) == set(shards)
    for name, shard in index["weight_map"].items():
        with safe_open(str(out / shard), "pt") as handle:
            assert torch.equal(handle.get_tensor(name), expected[name]), name
    for shard in shards:  # no shard passes the limit unless it holds a single larger tensor
        with safe_open(str(out / shard), "pt") as handle:
            names = list(handle.keys())
            assert len(names) == 1 or sum(handle.get_tensor(k).nbytes for k in names) <= 200


def test_single_safetensors_output_path(tmp_path):
    base = tiny_state(0)
    models = [finetune_of(base, 1)]
    out = mergelab.merge("task_arithmetic", base, models, out=tmp_path / "merged.safetensors", max_shard_size=100)
    assert out == tmp_path / "merged.safetensors" and out.is_file()
    assert entries(tmp_path) == ["merged.safetensors"]
    expected = mergelab.merge("task_arithmetic", base, models)
    written = read_all(out)
    assert sorted(written) == sorted(base)
    assert all(torch.equal(written[k], expected[k]) for k in base)


def test_config_and_tokenizer_files_are_copied_but_not_weights(tmp_path):
    base_dir = write_sharded(tiny_state(0), tmp_path / "base", max_shard_bytes=150)  # shards, index, config.json
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        (base_dir / name).write_text("{}")
    torch.save(tiny_state(0), base_dir / "pytorch_model.bin")  # weights in another format: not copied
    (base_dir / ".cache").write_text("x")
    (base_dir / "sub").mkdir()
    out = mergelab.merge("task_arithmetic", str(base_dir), [finetune_of(tiny_state(0), 1)], out=tmp_path / "out")
    assert entries(out) == ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                            "tokenizer.json", "tokenizer_config.json"]
    assert (out / "config.json").read_text() == (base_dir / "config.json").read_text()


def test_provenance_metadata(tmp_path):
    base = tiny_state(0)
    save_file(finetune_of(base, 1), str(tmp_path / "a.safetensors"))
    out = mergelab.merge("ties", base, [str(tmp_path / "a.safetensors"), finetune_of(base, 2)], out=tmp_path / "o",
                         density=0.5, scope="tensor")
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert meta["mergelab.method"] == "ties" and meta["mergelab.version"] == mergelab.__version__
    hparams = json.loads(meta["mergelab.hparams"])
    assert hparams["density"] == 0.5 and hparams["scope"] == "tensor" and "scaling" in hparams
    inputs = json.loads(meta["mergelab.inputs"])
    assert [(i["role"], i["name"]) for i in inputs] == [
        ("base", "<base>"), ("model", str(tmp_path / "a.safetensors")), ("model", "<model 2>")]
    assert inputs[1]["bytes"] == sum(t.numel() * t.element_size() for t in base.values())


def write_layout(target: Path, values: float, fail_after: int | None = None, **kwargs) -> Path:
    """Write LAYOUT (every entry ``values``) in three tiny shards; raise after ``fail_after`` tensors."""
    with CheckpointWriter(target, LAYOUT, {}, max_shard_bytes=8, **kwargs) as writer:
        for count, (name, spec) in enumerate(LAYOUT):
            if count == fail_after:
                raise RuntimeError("killed mid-write")
            writer.write(name, torch.full(spec.shape, values, dtype=spec.dtype))
        return writer.commit()


@pytest.mark.parametrize("out", ["folder", "single.safetensors"])
def test_failure_mid_write_leaves_no_output_and_no_temp_folder(tmp_path, out):
    with pytest.raises(RuntimeError, match="killed"):
        write_layout(tmp_path / out, 1.0, fail_after=2)
    assert entries(tmp_path) == []


def test_engine_error_mid_merge_leaves_nothing(tmp_path):
    base = tiny_state(0)
    bad = finetune_of(base, 1)
    bad["layer.0.norm.weight"][2] = float("nan")  # late in the order: earlier shards are already written
    with pytest.raises(MergelabError, match="NaN"):
        mergelab.merge("task_arithmetic", base, [bad], out=tmp_path / "o", max_shard_size=100)
    assert entries(tmp_path) == []


@pytest.mark.parametrize("out", ["folder", "single.safetensors"])
def test_overwrite_replaces_only_a_complete_output(tmp_path, out):
    target = tmp_path / out
    write_layout(target, 1.0)
    with pytest.raises(MergelabError, match="already exists") as info:
        write_layout(target, 2.0)
    assert str(target) in str(info.value)
    with pytest.raises(RuntimeError):
        write_layout(target, 3.0, fail_after=1, overwrite=True)
    assert torch.equal(read_all(target)["w"], torch.ones(2, 3))  # the old output, untouched
    assert entries(tmp_path) == [out]
    write_layout(target, 4.0, overwrite=True)
    assert torch.equal(read_all(target)["w"], torch.full((2, 3), 4.0))
    assert entries(tmp_path) == [out]  # no temp or old copy left beside it


def test_failed_final_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    write_layout(target, 1.0)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".out.mergelab-new-"):  # the complete new output, renamed to out
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(writer_module.os, "replace", replace)
    with pytest.raises(MergelabError, match=r"out: cannot move the output into place \(No space left on device\)"):
        write_layout(target, 2.0, overwrite=True)
    assert torch.equal(read_all(target)["w"], torch.ones(2, 3))
    assert entries(tmp_path) == ["out"]


def test_bad_output_locations(tmp_path):
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(MergelabError, match="other kind"):
        write_layout(tmp_path / "dir.safetensors", 1.0, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(MergelabError, match="is not a folder") as info:
        mergelab.merge("task_arithmetic", tiny_state(0), [tiny_state(1)], out=tmp_path / "file" / "out")
    assert str(tmp_path / "file" / "out") in str(info.value)


@pytest.mark.parametrize(("code", "fails"), [(errno.ENOSPC, True), (errno.EOPNOTSUPP, False)])
def test_shard_space_is_reserved_before_writing(monkeypatch, tmp_path, code, fails):
    calls: list[int] = []

    def refuse(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append(length)
        ctypes.set_errno(code)
        return -1

    monkeypatch.setattr(writer_module, "_libc_fallocate", lambda: refuse)
    base = tiny_state(0)
    out = tmp_path / "merged"
    if fails:
        with pytest.raises(MergelabError, match="not enough disk space") as err:
            mergelab.merge("task_arithmetic", base, [finetune_of(base, 1)], out=out)
        assert str(out) in str(err.value)
        assert list(tmp_path.iterdir()) == []  # nothing half-written, no temporary left
    else:  # no preallocation on this file system: written all the same
        mergelab.merge("task_arithmetic", base, [finetune_of(base, 1)], out=out)
        assert set(read_all(out)) == set(base)
    data = sum(t.numel() * t.element_size() for t in base.values())
    assert len(calls) == 1 and data < calls[0] < data + 4096  # one shard: header + data


def test_shards_are_preallocated_to_exactly_their_size(tmp_path):
    if writer_module._libc_fallocate() is None:
        pytest.skip("no fallocate on this platform")
    base = tiny_state(0)
    out = mergelab.merge("task_arithmetic", base, [finetune_of(base, 1)], out=tmp_path / "m", max_shard_size=300)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    for shard in shards:  # no slack left by the reservation: u64 header length + header + data
        raw = shard.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + length])
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        assert len(raw) == 8 + length + end


def test_metadata_reserved_blank_is_filled_before_commit_in_every_shard(tmp_path):
    spec = TensorSpec((4,), torch.float32)
    layout = [("a", spec), ("b", spec)]
    writer = CheckpointWriter(tmp_path / "out", layout, {"note": " " * 20, "other": "x"}, max_shard_bytes=16)
    for name in ("a", "b"):
        writer.write(name, torch.ones(4))
    with pytest.raises(RuntimeError, match="no blank reservation"):
        writer.fill_metadata("note", "x" * 21)  # longer than the reservation: refused, nothing changed
    writer.fill_metadata("note", '{"k":1}')
    out = writer.commit()
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) == 2
    for shard in shards:
        with safe_open(str(shard), "pt") as handle:
            assert handle.metadata()["note"].rstrip() == '{"k":1}'  # JSON value, blank-padded
            assert handle.metadata()["other"] == "x"


def test_a_rank_record_too_long_for_its_reservation_drops_its_example():
    from mergelab.engine.provenance import RANK_WIDTH, fitting

    short = json.dumps({"matrices": 3, "worst": {"tensor": "w"}})
    assert fitting(short) == short
    long = json.dumps({"matrices": 3, "worst": {"tensor": "w" * RANK_WIDTH}})
    assert json.loads(fitting(long)) == {"matrices": 3}
