"""Weight Weaving: hand-checked pooling, Algorithm 1 run literally as the reference, the fast path
against the general path, random pooling's reproducibility, presets, errors and the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import mergelab
from mergelab.cli.main import main
from mergelab.engine import chunks
from mergelab.errors import MergelabError
from mergelab.methods.registry import all_methods
from mergelab.methods.weave import STANDARD, search_space
from tests.helpers import assert_close, finetune_of, tiny_state

SCALED = sorted(n for n, m in all_methods().items() if "scaling" in m.defaults)
LINEAR = sorted(n for n in SCALED if all_methods()[n].linear_in_scaling)
# small-rank settings so the spectral methods keep something of tiny matrices; density below 1 so TIES trims
INNER_HP: dict[str, dict[str, Any]] = {
    "ties": {"density": 0.5}, "dare_ties": {"density": 0.5}, "dare": {"density": 0.5}, "breadcrumbs": {},
    "pcb": {"ratio": 0.4}, "cart": {"rank_ratio": 0.5}, "iso_cts": {"common_space_fraction": 0.5},
}


def weave_by_algorithm(inner: str, base, models, lambdas, pooling, **inner_hp) -> dict[str, torch.Tensor]:
    """Algorithm 1 literally: K separate merges, their task vectors pooled with the T originals, added to base."""
    merged = [mergelab.merge(inner, base, models, scaling=lam, **inner_hp) for lam in lambdas]
    out = {}
    for name, theta in base.items():
        if not theta.is_floating_point():
            out[name] = theta
            continue
        members = [m[name].float() - theta.float() for m in models] + [m[name].float() - theta.float() for m in merged]
        stack = torch.stack(members)
        if pooling == "average":
            pooled = stack.mean(dim=0)
        else:  # magmax: the last member of largest magnitude (MagMax's >= scan)
            pooled = stack[0]
            for member in stack[1:]:
                pooled = torch.where(member.abs() >= pooled.abs(), member, pooled)
        out[name] = (theta.float() + pooled).to(theta.dtype)
    return out


def test_one_lambda_of_one_with_average_pooling_by_hand():
    base = {"w": torch.tensor([1.0, 2.0, 3.0])}
    models = [{"w": torch.tensor([2.0, 2.0, 1.0])}, {"w": torch.tensor([1.0, 4.0, 3.0])}]
    # taus [1, 0, -2], [0, 2, 0]; A_1 = 1 * (tau_1 + tau_2) = [1, 2, -2]; A* has 3 members, their mean
    # (tau_1 + tau_2 + A_1) / 3 = [2/3, 4/3, -4/3] is added to base without rescaling
    merged = mergelab.merge("weave", base, models, lambdas=[1.0])
    assert_close(merged["w"], torch.tensor([5 / 3, 10 / 3, 5 / 3]))


@pytest.mark.parametrize("path", ["auto", "general"])
def test_magmax_pooling_by_hand(path):
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([1.0, 3.0, 0.1, -1.0])}, {"w": torch.tensor([-2.0, -3.0, 0.2, 4.0])}]
    # A_i = lambda_i * (tau_1 + tau_2), sums [-1, 0, 0.3, 3], lambdas 0.5, 1, -2:
    # e0: members 1, -2, -0.5, -1, 2 -> |2| twice, the later member (A_3) wins: 2
    # e1: members 3, -3, 0, 0, 0 -> |3| twice: tau_2 = -3
    # e2: members 0.1, 0.2, 0.15, 0.3, -0.6 -> -0.6;  e3: -1, 4, 1.5, 3, -6 -> -6
    merged = mergelab.merge("weave", base, models, lambdas=[0.5, 1.0, -2.0], pooling="magmax", path=path)
    assert_close(merged["w"], torch.tensor([2.0, -3.0, -0.6, -6.0]))


def test_ties_exact_cancellation_takes_the_model_wide_majority_sign():
    # density 1: sums [0, -5, -5, -5], so the majority sign is -1 and entry 0's elected sign is -1:
    # g = [-1, -2.5, -2.5, -2.5]; with lambdas [1]: pooled = (tau_1 + tau_2 + g) / 3
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([1.0, -3.0, -3.0, -3.0])}, {"w": torch.tensor([-1.0, -2.0, -2.0, -2.0])}]
    merged = mergelab.merge("weave", base, models, inner="ties", density=1.0, lambdas=[1.0])
    assert_close(merged["w"], torch.tensor([-1 / 3, -7.5 / 3, -7.5 / 3, -7.5 / 3]))
    reference = weave_by_algorithm("ties", base, models, [1.0], "average", density=1.0)
    assert_close(merged["w"], reference["w"])


@pytest.mark.parametrize("pooling", ["average", "magmax"])
@pytest.mark.parametrize("inner", SCALED)
def test_equals_algorithm_one_run_literally(inner, pooling):
    base = tiny_state(5)
    models = [finetune_of(base, i) for i in range(3)]
    lambdas = [0.3, 0.7, 1.2]
    hp = INNER_HP.get(inner, {})
    merged = mergelab.merge("weave", base, models, inner=inner, lambdas=lambdas, pooling=pooling, **hp)
    reference = weave_by_algorithm(inner, base, models, lambdas, pooling, **hp)
    for name in base:
        assert_close(merged[name], reference[name], rtol=1e-5, atol=1e-6)


def test_ties_global_with_a_corrected_entry_in_chunks_equals_the_algorithm(monkeypatch):
    monkeypatch.setitem(chunks.CHUNK_ELEMENTS, "cpu", 3)  # the corrected entries sit in later chunks
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 5, generator=gen), "b": torch.randn(7, generator=gen)}
    first = {k: v - 1.0 for k, v in base.items()}  # mostly negative task vectors: majority sign -1
    second = {k: v - 2.0 for k, v in base.items()}
    first["w"][2, 3], second["w"][2, 3] = base["w"][2, 3] + 4.0, base["w"][2, 3] - 4.0  # exact cancellation
    first["b"][5], second["b"][5] = base["b"][5] + 0.5, base["b"][5] - 0.5
    models = [first, second]
    for pooling in ["average", "magmax"]:
        merged = mergelab.merge("weave", base, models, inner="ties", density=1.0, lambdas=[0.5, 1.5], pooling=pooling,
                                dtype="float64")
        reference = weave_by_algorithm("ties", base, models, [0.5, 1.5], pooling, density=1.0, dtype="float64")
        for name in base:
            assert_close(merged[name], reference[name], rtol=1e-6, atol=1e-6)
    # the corrected entry really is -1-signed: with density 1 its TIES value is -4 (the agreeing entry)
    ties = mergelab.merge("ties", base, models, density=1.0, dtype="float64")
    assert_close(ties["w"][2, 3] - base["w"][2, 3], torch.tensor(-4.0))


@pytest.mark.parametrize("pooling", ["average", "random", "magmax"])
@pytest.mark.parametrize("inner", LINEAR)
def test_fast_path_equals_general_path(inner, pooling):
    base = tiny_state(6)
    models = [finetune_of(base, i) for i in range(3)]
    hp = dict(INNER_HP.get(inner, {}))
    if inner in ("ties", "dare_ties"):
        hp["scope"] = "tensor"  # the global scope corrects entries after the pass: linear path only
    common = {"inner": inner, "pooling": pooling, "lambdas": [0.2, 0.9, 1.4, -0.5], "seed": 3, **hp}
    fast = mergelab.merge("weave", base, models, **common)
    general = mergelab.merge("weave", base, models, path="general", **common)
    for name in base:
        assert_close(fast[name], general[name], rtol=1e-5, atol=1e-6)


def _random_weave(seed: int, base, models, lambdas=(0.5, 1.0)) -> dict[str, torch.Tensor]:
    return mergelab.merge("weave", base, models, pooling="random", lambdas=list(lambdas), seed=seed)


def test_random_pooling_picks_members_uniformly_and_reproducibly():
    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.zeros(200, 50)}
    models = [{"w": torch.randn(200, 50, generator=gen)} for _ in range(3)]
    lambdas = (0.5, 1.0)
    merged = _random_weave(7, base, models, lambdas)["w"]
    taus = [m["w"] for m in models]
    members = torch.stack(taus + [lam * sum(taus) for lam in lambdas])  # (5, 200, 50), distinct almost surely
    hit = (members - merged).abs() <= 1e-6 * (1 + members.abs())
    assert bool(hit.any(dim=0).all())  # every element is one of A*'s members
    counts = hit.float().sum(dim=(1, 2))
    expected = merged.numel() / len(members)  # 2000 each; binomial sd ~40
    assert bool(((counts - expected).abs() < 6 * (expected * (1 - 1 / len(members))) ** 0.5).all()), counts
    assert torch.equal(merged, _random_weave(7, base, models, lambdas)["w"])
    assert not torch.equal(merged, _random_weave(8, base, models, lambdas)["w"])


def test_random_pooling_draws_per_tensor_whatever_the_tensor_order():
    base = tiny_state(2)
    models = [finetune_of(base, i) for i in range(2)]
    forward = _random_weave(5, base, models)
    backward = _random_weave(5, dict(reversed(list(base.items()))), [dict(reversed(list(m.items()))) for m in models])
    for name in base:
        assert torch.equal(forward[name], backward[name])


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.lists(st.floats(-2, 2), min_size=1, max_size=5), st.integers(0, 10_000))
def test_average_over_task_arithmetic_is_a_rescaled_sum(n_models, lambdas, seed):
    # (sum_t tau_t + (sum_i lambda_i) sum_t tau_t) / (T + K): task arithmetic at scaling (1 + sum lambda) / (T + K)
    base = tiny_state(seed)
    models = [finetune_of(base, seed + i) for i in range(n_models)]
    woven = mergelab.merge("weave", base, models, lambdas=lambdas)
    ta = mergelab.merge("task_arithmetic", base, models, scaling=(1 + sum(lambdas)) / (n_models + len(lambdas)))
    for name in base:
        assert_close(woven[name], ta[name], rtol=1e-4, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 4), st.integers(0, 10_000), st.sampled_from(["average", "magmax"]),
       st.sampled_from(["task_arithmetic", "ties", "magmax", "tsv"]))
def test_copies_of_base_give_base_and_model_order_does_not_matter(n_models, seed, pooling, inner):
    base = tiny_state(seed)
    same = mergelab.merge("weave", base, [base] * n_models, inner=inner, pooling=pooling)
    for name in base:
        assert torch.equal(same[name], base[name])
    models = [finetune_of(base, seed + i) for i in range(n_models)]
    forward = mergelab.merge("weave", base, models, inner=inner, pooling=pooling)
    backward = mergelab.merge("weave", base, models[::-1], inner=inner, pooling=pooling)
    for name in base:
        assert_close(forward[name], backward[name], rtol=1e-5, atol=1e-6)


def test_presets_are_the_papers_search_spaces():
    assert STANDARD == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert search_space("ties", "multitask") == [round(0.1 * i, 1) for i in range(1, 16)]
    assert search_space("pcb", "multitask")[-1] == 2.5 and len(search_space("pcb", "multitask")) == 25
    assert search_space("tsv", "multitask") == [round(0.5 + 0.1 * i, 1) for i in range(16)]
    assert search_space("iso_c", "multitask") == [round(0.1 * i, 1) for i in range(1, 21)]
    for inner in ["task_arithmetic", "breadcrumbs", "magmax"]:
        assert search_space(inner, "multitask") == STANDARD
    for preset in ["continual", "domain_generalization"]:
        assert all(search_space(inner, preset) == STANDARD for inner in ["ties", "pcb", "tsv", "iso_c"])
    base = tiny_state(0)
    models = [finetune_of(base, 1), finetune_of(base, 2)]
    by_preset = mergelab.merge("weave", base, models, inner="ties", preset="continual")
    by_list = mergelab.merge("weave", base, models, inner="ties", lambdas=STANDARD)
    assert all(torch.equal(by_preset[n], by_list[n]) for n in base)


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"scaling": 0.5}, "scaling is the searched lambda"),
        ({"inner": "weight_average"}, "has no scaling to search over"),
        ({"inner": "weave"}, "has no scaling to search over"),
        ({"inner": "nope"}, "unknown method 'nope'"),
        ({"lambdas": []}, "non-empty list of numbers"),
        ({"lambdas": ["a"]}, "non-empty list of numbers"),
        ({"pooling": "median"}, "pooling"),
        ({"inner": "ties", "density": 2.0}, "density"),
        ({"inner": "ties", "path": "general"}, "needs the linear path"),
        ({"inner": "ties", "bogus": 1}, "bogus"),
    ],
)
def test_bad_hyperparameters_are_refused_before_merging(hparams, message):
    base = tiny_state(0)
    with pytest.raises(MergelabError, match=message):
        mergelab.merge("weave", base, [finetune_of(base, 1)], **hparams)


def test_cli_flags_and_yaml(tmp_path: Path, capsys):
    base = tiny_state(0)
    states = [finetune_of(base, 1), finetune_of(base, 2)]
    save_file(base, str(tmp_path / "base.safetensors"))
    for i, state in enumerate(states):
        save_file(state, str(tmp_path / f"m{i}.safetensors"))
    inputs = ["--base", str(tmp_path / "base.safetensors"), "--model", str(tmp_path / "m0.safetensors"),
              "--model", str(tmp_path / "m1.safetensors")]
    argv = ["merge", "--method", "weave", *inputs, "--set", "inner=breadcrumbs", "--set", "pooling=average",
            "--out", str(tmp_path / "flags"), "-q"]
    assert main(argv) == 0
    written = load_file(str(tmp_path / "flags" / "model.safetensors"))
    expected = mergelab.merge("weave", base, states, inner="breadcrumbs")
    assert all(torch.equal(written[n], expected[n]) for n in base)

    config = tmp_path / "job.yaml"
    config.write_text(f"method: weave\nbase: {tmp_path / 'base.safetensors'}\nmodels:\n"
                      f"  - {tmp_path / 'm0.safetensors'}\n  - {tmp_path / 'm1.safetensors'}\n"
                      "parameters:\n  inner: ties\n  density: 0.5\n  lambdas: [0.5, 1.0, 1.5]\n  pooling: magmax\n")
    assert main(["merge", str(config), "--out", str(tmp_path / "yaml"), "-q"]) == 0
    written = load_file(str(tmp_path / "yaml" / "model.safetensors"))
    expected = mergelab.merge("weave", base, states, inner="ties", density=0.5, lambdas=[0.5, 1.0, 1.5],
                              pooling="magmax")
    assert all(torch.equal(written[n], expected[n]) for n in base)

    capsys.readouterr()
    assert main(["merge", "--method", "weave", *inputs, "--set", "scaling=0.5", "--out", str(tmp_path / "bad")]) == 2
    assert "scaling is the searched lambda" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("inner", "pooling"), [("ties", "average"), ("task_arithmetic", "random"), ("tsv", "magmax"),
                                                ("cart", "random")])
def test_gpu_equals_cpu(inner, pooling):
    base = tiny_state(4)
    models = [finetune_of(base, i) for i in range(3)]
    hp = {"inner": inner, "pooling": pooling, **INNER_HP.get(inner, {})}
    cpu = mergelab.merge("weave", base, models, **hp)
    gpu = mergelab.merge("weave", base, models, device="cuda", **hp)
    for name in base:
        assert_close(gpu[name], cpu[name], rtol=1e-4, atol=1e-5)


def test_weave_over_global_ties_that_keeps_nothing():
    # inner TIES with density 0 and the exact rule keeps nothing (its statistics end after one pass), so the
    # average pool of {tau_1, tau_2, 0.5 * 0, 1.0 * 0} is (tau_1 + tau_2) / 4
    base = tiny_state(0)
    models = [finetune_of(base, 1), finetune_of(base, 2)]
    merged = mergelab.merge("weave", base, models, inner="ties", density=0.0, threshold="exact", lambdas=[0.5, 1.0])
    for k, v in base.items():
        if v.is_floating_point():
            assert_close(merged[k], v + (models[0][k] - v + models[1][k] - v) / 4)
