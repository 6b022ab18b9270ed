"""Every model-like input of the contract, read lazily with the right specs; hostile inputs refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergelab.errors import MergelabError
from mergelab.io.sources import open_source
from tests.forms import FORMS, write_form
from tests.helpers import tiny_state, write_sharded
from tests.hostile import CASES, MARKER, STRICTER, split, write_raw


@pytest.mark.parametrize("form", FORMS)
def test_every_input_form_has_the_right_specs_and_values(tmp_path, form):
    state = tiny_state(0)
    state["layer.0.attn.weight"] = state["layer.0.attn.weight"].bfloat16()
    state["layer.0.attn.bias"] = state["layer.0.attn.bias"].half()
    state["mask"] = torch.tensor([True, False, True])
    source = open_source(write_form(form, state, tmp_path))
    assert sorted(source.specs) == sorted(state)
    for name, tensor in state.items():
        spec = source.specs[name]
        assert (spec.shape, spec.dtype) == (tuple(tensor.shape), tensor.dtype), name
        assert torch.equal(source.get(name), tensor), name
    assert source.nbytes == sum(t.numel() * t.element_size() for t in state.values())
    source.close()


def test_module_input_is_its_state_dict():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    source = open_source(module)
    assert set(source.specs) == set(module.state_dict())
    assert source.specs["1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(source.get("0.weight"), module[0].weight.detach())


def test_index_json_path_opens_its_folder(tmp_path):
    folder = write_sharded(tiny_state(0), tmp_path / "m", max_shard_bytes=150)
    source = open_source(str(folder / "model.safetensors.index.json"))
    assert set(source.specs) == set(tiny_state(0)) and source.folder == folder


def test_safetensors_data_is_read_on_get_not_on_open(tmp_path):
    state = {"a": torch.zeros(4), "b": torch.zeros(2)}
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    source = open_source(str(path))  # headers only
    header, data = split(state)
    start = path.stat().st_size - len(data) + header["a"]["data_offsets"][0]
    with open(path, "r+b") as handle:  # rewrite a's bytes after the source was opened
        handle.seek(start)
        handle.write(torch.arange(4.0).numpy().tobytes())
    assert torch.equal(source.get("a"), torch.arange(4.0))
    source.close()


def test_tied_tensors_in_a_bin_are_reported_as_aliases(tmp_path):
    state = tiny_state(0)
    state["lm_head.weight"] = state["embed.weight"]  # shares storage, as tied embeddings do
    torch.save(state, tmp_path / "tied.bin")
    assert open_source(str(tmp_path / "tied.bin")).aliases() == {"lm_head.weight": "embed.weight"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_inputs_raise_one_line_naming_file_and_tensor(tmp_path, case):
    bad = CASES[case].build(tmp_path, tiny_state(0))
    with pytest.raises(MergelabError) as info:
        open_source(str(bad.path))
    text = str(info.value)
    assert CASES[case].message in text
    assert "\n" not in text and str(bad.named) in text
    if bad.tensor is not None:
        assert f"tensor '{bad.tensor}'" in text
    assert not (tmp_path / MARKER).exists()  # the exploit pickle was never executed


@pytest.mark.parametrize(
    ("model", "message"),
    [("nowhere", "no such file or folder"), ("empty", "no checkpoint found"),
     ("notes.txt", "unknown checkpoint format"), (42, "not a model: int")],
)
def test_not_a_checkpoint(tmp_path, model, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(MergelabError, match=message):
        open_source(str(tmp_path / model) if isinstance(model, str) else model)


def test_safetensors_views_are_private_and_released_pages_read_again(tmp_path):
    state = {"a": torch.arange(5000.0), "b": torch.arange(3.0)}
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    before = path.read_bytes()
    source = open_source(str(path))
    view = source.get("a")
    view[:] = -1.0  # a copy-on-write map: the file never changes
    assert path.read_bytes() == before
    source.release("a")  # drops this process's pages (and the private copy): the next get reads the file
    assert torch.equal(source.get("a"), state["a"]) and torch.equal(source.get("b"), state["b"])
    source.close()


def test_safetensors_tensor_at_an_unaligned_offset_is_read_by_copy(tmp_path):
    # a hand-made file whose header is not padded: float32 data starting at an odd byte
    header, data = split({"w": torch.arange(6.0).reshape(2, 3)})
    path = write_raw(tmp_path / "odd.safetensors", json.dumps(header, separators=(",", ":")).encode() + b" ", data)
    assert (path.stat().st_size - len(data)) % 4 != 0
    source = open_source(str(path))
    assert torch.equal(source.get("w"), torch.arange(6.0).reshape(2, 3))
    into = torch.empty(100, dtype=torch.uint8)
    assert source.get("w", into).data_ptr() == into.data_ptr()  # the caller's buffer, as documented
    source.close()


def test_safetensors_truncated_after_opening_is_a_clean_error(tmp_path):
    state = {"a": torch.zeros(1000), "b": torch.ones(1000)}
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    source = open_source(str(path))
    source.get("a")
    with open(path, "r+b") as handle:  # someone truncates the file during the merge
        handle.truncate(path.stat().st_size - 100)
    with pytest.raises(MergelabError, match="truncated") as err:
        source.get("b")  # a map read past the end would crash the process (SIGBUS)
    assert str(err.value).startswith(f"{path}: tensor 'b': file is truncated")
    source.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_safetensors_files_are_refused_by_the_safetensors_library_too(tmp_path, case):
    # what is refused here is what the format refuses, but for a key listed twice where the library keeps
    # the last one without a word (in __metadata__; a tensor listed twice it refuses when the entries differ)
    bad = CASES[case].build(tmp_path, tiny_state(0))
    if bad.path.suffix != ".safetensors" or case in STRICTER:
        pytest.skip("not a single safetensors file, or refused by mergelab only")
    with pytest.raises(Exception) as info:  # noqa: PT011 (the library's own error type)
        with safe_open(str(bad.path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                handle.get_tensor(name)
    assert type(info.value).__name__ == "SafetensorError"
