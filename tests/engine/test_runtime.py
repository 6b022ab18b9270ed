"""The engine's process settings (one intra-op thread for chunked work, no cyclic GC) are restored
afterwards, and the single NaN/Inf check over all task vectors still names the input at fault."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

import mergelab
from mergelab.engine import chunks, stream
from mergelab.errors import MergelabError
from tests.helpers import finetune_of, save_states, tiny_state


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
    paths = save_states(states, tmp_path)
    with pytest.raises(MergelabError, match="NaN or Inf") as err:
        mergelab.merge("task_arithmetic", paths[0], paths[1:])
    assert paths[culprit] in str(err.value) and "layer.0.mlp.weight" in str(err.value)
    assert all(p not in str(err.value) for i, p in enumerate(paths) if i != culprit)


@pytest.mark.parametrize(("method", "hparams"), [
    ("task_arithmetic", {}), ("weight_average", {}), ("magmax", {}), ("weave", {"inner": "task_arithmetic"}),
    ("ties", {}),  # global statistics: runs serially, still equal
])
def test_chunks_on_several_threads_give_the_serial_result(monkeypatch, method, hparams):
    monkeypatch.setitem(chunks.CHUNK_ELEMENTS, "cpu", 5)  # many chunks per tensor
    base = tiny_state(0)
    models = [finetune_of(base, 1), finetune_of(base, 2), finetune_of(base, 3)]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(mergelab.merge(method, base, models, **hparams))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0][k], results[1][k]) for k in base)


def test_run_chunks_runs_chunks_at_the_same_time_and_each_once():
    meeting = threading.Barrier(2, timeout=30)  # the first two chunks can only finish together
    done: list[int] = []

    def work(start: int) -> None:
        if start in (0, 3):
            meeting.wait()
        done.append(start)

    chunks.run_chunks(work, range(0, 60, 3), threads=2)
    assert sorted(done) == list(range(0, 60, 3))


def test_run_chunks_raises_the_first_error_and_stops():
    done: list[int] = []

    def work(start: int) -> None:
        if start == 4:
            raise ValueError("chunk 4 failed")
        done.append(start)

    with pytest.raises(ValueError, match="chunk 4 failed"):
        chunks.run_chunks(work, range(1000), threads=2)
    assert len(done) < 999  # the other thread stopped instead of finishing the tensor


def test_non_finite_input_is_named_when_chunks_run_in_parallel(monkeypatch, tmp_path):
    monkeypatch.setitem(chunks.CHUNK_ELEMENTS, "cpu", 4)
    states = [tiny_state(0), finetune_of(tiny_state(0), 1), finetune_of(tiny_state(0), 2)]
    states[2]["layer.0.mlp.weight"][7, 5] = float("nan")  # in the tensor's last chunk
    paths = save_states(states, tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(MergelabError, match="NaN or Inf") as err:
            mergelab.merge("task_arithmetic", paths[0], paths[1:])
    finally:
        torch.set_num_threads(threads)
    assert str(err.value).startswith(f"{paths[2]}: tensor 'layer.0.mlp.weight'")
