"""Tensor-parallel merges (the SVD methods on CPU): several whole tensors merged at once, one torch
thread each, give bit for bit what one tensor at a time on one thread gives, in order, with errors
named and nothing written; the plan says how many run at once and counts their memory."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest
import torch
from safetensors.torch import load_file

import mergelab
from mergelab.engine import plan as plan_module
from mergelab.engine import stream
from mergelab.errors import MergelabError
from tests.helpers import finetune_of, save_states, tiny_state

METHODS = [("tsv", {}), ("iso_c", {}), ("iso_cts", {}), ("cart", {}), ("weave", {"inner": "tsv"}),
           ("weave", {"inner": "iso_c", "pooling": "random"})]


@pytest.fixture
def torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def states(n_models: int = 3, tied: bool = True) -> list[dict[str, torch.Tensor]]:
    inputs = [tiny_state(0), *[finetune_of(tiny_state(0), i) for i in range(n_models)]]
    if tied:
        for state in inputs:
            state["head.weight"] = state["embed.weight"]  # tied: merged once, written under both names
    return inputs


def save_bin(inputs: list[dict[str, torch.Tensor]], folder) -> list[str]:
    """As .bin files, which keep tied tensors tied (safetensors refuses them)."""
    paths = [str(folder / f"m{i}.bin") for i in range(len(inputs))]
    for state, path in zip(inputs, paths, strict=True):
        torch.save(state, path)
    return paths


def merge_with_threads(threads: int, method: str, hparams: dict, inputs: list, **kwargs) -> dict[str, torch.Tensor]:
    torch.set_num_threads(threads)
    out = mergelab.merge(method, inputs[0], inputs[1:], **hparams, **kwargs)
    if isinstance(out, dict):
        return out
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize(("method", "hparams"), METHODS)
@pytest.mark.parametrize("to_file", [False, True])
def test_at_once_equals_one_at_a_time(tmp_path, torch_threads, method, hparams, to_file):
    inputs = states()
    paths = save_bin(inputs, tmp_path) if to_file else inputs
    serial = merge_with_threads(1, method, hparams, paths, **({"out": tmp_path / "one"} if to_file else {}))
    at_once = merge_with_threads(2, method, hparams, paths, **({"out": tmp_path / "two"} if to_file else {}))
    assert list(at_once) == list(serial)
    for name in serial:
        assert torch.equal(at_once[name], serial[name]), name
    assert torch.equal(at_once["head.weight"], at_once["embed.weight"])


def test_two_tensors_are_merged_at_once(monkeypatch, torch_threads):
    """Each of the first two merges waits for the other to start: one at a time would time out."""
    both_started = threading.Barrier(2, timeout=30)
    real, calls = stream.merge_tensor, []

    def merge_tensor(plan, name, *args, **kwargs):
        calls.append((threading.current_thread().name, torch.get_num_threads()))
        if len(calls) <= 2:
            both_started.wait()
        return real(plan, name, *args, **kwargs)

    monkeypatch.setattr(stream, "merge_tensor", merge_tensor)
    inputs = states()
    torch.set_num_threads(2)
    merged = mergelab.merge("tsv", inputs[0], inputs[1:])
    assert torch.get_num_threads() == 2
    assert {threads for _, threads in calls} == {1}  # one torch thread per tensor
    assert len({thread for thread, _ in calls}) == 2 and all("tensors" in thread for thread, _ in calls)
    torch.set_num_threads(1)
    assert all(torch.equal(merged[n], t) for n, t in mergelab.merge("tsv", inputs[0], inputs[1:]).items())


@pytest.mark.parametrize("culprit", [1, 3])
def test_error_names_the_input_and_writes_nothing(tmp_path, torch_threads, culprit):
    inputs = states(tied=False)
    inputs[culprit]["layer.0.mlp.weight"][1, 2] = float("nan")
    paths = save_states(inputs, tmp_path)
    torch.set_num_threads(2)
    with pytest.raises(MergelabError, match="NaN or Inf") as err:
        mergelab.merge("iso_c", paths[0], paths[1:], out=tmp_path / "out")
    assert paths[culprit] in str(err.value) and "layer.0.mlp.weight" in str(err.value)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == [f"m{i}.safetensors" for i in range(4)]
    assert torch.get_num_threads() == 2
    assert not [t for t in threading.enumerate() if "tensors" in t.name and _busy(t)]


def _busy(thread: threading.Thread) -> bool:
    """A pool thread is idle when it waits for work; nothing is left running after the error."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == "merge_tensor":
            return True
        frame = frame.f_back
    return False


def test_plan_says_how_many_at_once_and_counts_their_memory(torch_threads):
    inputs = states()
    torch.set_num_threads(2)
    plan = mergelab.plan("tsv", inputs[0], inputs[1:])
    try:
        assert plan.tensor_workers() == 2 and "2 tensors at once" in plan.summary()
        at_once = plan.peak_ram_bytes()
        torch.set_num_threads(1)
        assert plan.tensor_workers() == 1 and "at once" not in plan.summary()
        assert at_once > plan.peak_ram_bytes()
    finally:
        plan.close()


@pytest.mark.parametrize(("method", "hparams"), [("task_arithmetic", {}), ("ties", {"scope": "tensor"}), ("breadcrumbs", {}),
                                                 ("weave", {"inner": "ties", "scope": "tensor"})])
def test_other_methods_merge_one_tensor_at_a_time(torch_threads, method, hparams):
    inputs = states()
    torch.set_num_threads(2)
    plan = mergelab.plan(method, inputs[0], inputs[1:], **hparams)
    try:
        assert plan.tensor_workers() == 1
    finally:
        plan.close()


def test_memory_caps_how_many_at_once(monkeypatch, torch_threads):
    inputs = states()
    torch.set_num_threads(2)
    plan = mergelab.plan("tsv", inputs[0], inputs[1:])
    try:
        monkeypatch.setattr(plan_module, "physical_memory", lambda: 3 * plan._tensor_bytes())  # half: one tensor
        assert plan.tensor_workers() == 1
        monkeypatch.setattr(plan_module, "physical_memory", lambda: 4 * plan._tensor_bytes())
        assert plan.tensor_workers() == 2
    finally:
        plan.close()
