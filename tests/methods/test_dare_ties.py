"""DARE-TIES: official TIES on the DARE-dropped task vectors, statistics passes included."""

from __future__ import annotations

import torch

import mergelab
from mergelab.methods.dare import drop_and_rescale
from mergelab.methods.registry import TensorCtx
from tests.helpers import assert_close, finetune_of, tiny_state
from tests.methods.test_ties import official_ties


def floats(state: dict) -> list[str]:
    return [n for n, t in state.items() if t.is_floating_point()]


# ----------------------------------------------------------------------------- DARE

def test_dare_ties_is_official_ties_on_dropped_vectors():
    base = tiny_state(2)
    models = [finetune_of(base, i) for i in range(3)]
    names = floats(base)
    order = sorted(names)  # the engine's order for a state dict: by name
    dropped = {n: drop_and_rescale(torch.stack([m[n] - base[n] for m in models]), TensorCtx(n, seed=4), 0.5, True, "inverse")
               for n in names}
    flat = torch.cat([dropped[n].reshape(3, -1) for n in order], dim=1)
    expected = official_ties(flat, 0.2, "sum") * 0.5
    merged = mergelab.merge("dare_ties", base, models, seed=4)
    got = torch.cat([(merged[n] - base[n]).reshape(-1) for n in order])
    assert_close(got, expected)


# ----------------------------------------------------------------------------- Breadcrumbs


def test_dare_ties_statistics_see_the_dropped_vectors_only():
    """The thresholds are observed on the DARE-dropped task vectors; the collector offers no compiled
    observation of the stored values (which would skip the drop), so the engine cannot take one."""
    from mergelab.methods.dare_ties import DareTiesStats
    from mergelab.ops.thresholds import ThresholdPasses

    hp = {"density": 0.5, "scaling": 0.5, "rescale": True, "seed": 3, "merge_func": "sum", "ties_density": 0.2,
          "scope": "global"}
    stats = DareTiesStats(hp, 2)
    assert not hasattr(stats, "observe_raw")
    plain = ThresholdPasses(0.2, "official", 2)
    gen = torch.Generator().manual_seed(1)
    tensors = {name: torch.randn(2, 50, generator=gen) for name in ("a", "b")}
    index = 0
    while index < stats.n_passes:
        for name, taus in tensors.items():
            stats.observe(index, name, taus, torch.zeros(50))
            plain.observe(index, name, drop_and_rescale(taus, TensorCtx(name, seed=3), 0.5, True, "inverse"),
                          torch.zeros(50))
        stats.end_pass(index)
        plain.end_pass(index)
        index += 1
    assert torch.equal(stats.result().thresholds, plain.result().thresholds)
