"""Hyperparameters a preset chooses are resolved once, by the registry: the plan, the output's metadata and
the experiment store show the values used (CART's rank_ratio / scaling), and the merge is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

import mergelab
from mergelab.cli.main import main
from mergelab.experiment import parse_config
from mergelab.methods.cart import PRESETS, cart
from mergelab.methods.registry import TensorCtx, get_method
from tests.experiment.tiny import Zoos
from tests.helpers import finetune_of, tiny_state


def states() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = tiny_state(0)
    return base, [finetune_of(base, seed) for seed in (1, 2, 3)]


def test_plan_and_metadata_show_the_presets_values(tmp_path: Path, capsys) -> None:
    base, models = states()
    plan = mergelab.plan("cart", base, models, preset="official_8")
    assert plan.hparams["rank_ratio"] == 0.12 and plan.hparams["scaling"] == 2.0
    assert '"rank_ratio": 0.12' in plan.summary() and "null" not in plan.summary()

    out = mergelab.merge("cart", base, models, preset="official_8", scaling=0.5, out=tmp_path / "o")
    with safe_open(str(Path(out) / "model.safetensors"), "pt") as handle:
        used = json.loads(handle.metadata()["mergelab.hparams"])
    assert used["rank_ratio"] == 0.12 and used["scaling"] == 0.5 and used["preset"] == "official_8"


def test_cli_plan_shows_no_null(tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file

    base, models = states()
    paths = []
    for i, state in enumerate([base, *models]):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file(state, paths[-1])
    assert main(["plan", "--method", "weave", "--set", "inner=cart", "--base", paths[0],
                 *[a for p in paths[1:] for a in ("--model", p)]]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "null" not in line and '"rank_ratio": 0.08' in line


def test_merge_is_the_same_as_with_the_values_spelled_out() -> None:
    base, models = states()
    for preset, values in PRESETS.items():
        from_preset = mergelab.merge("cart", base, models, preset=preset)
        spelled = mergelab.merge("cart", base, models, preset=preset, **values)
        assert isinstance(from_preset, dict) and isinstance(spelled, dict)
        assert all(torch.equal(from_preset[k], spelled[k]) for k in base)


def test_direct_calls_still_take_none() -> None:
    taus = torch.randn(3, 6, 5, dtype=torch.float64)
    hp = get_method("cart").resolve({}, 3)
    direct = cart(taus, torch.zeros(6, 5, dtype=torch.float64), TensorCtx("w"),
                  **(hp | {"rank_ratio": None, "scaling": None}))
    resolved = cart(taus, torch.zeros(6, 5, dtype=torch.float64), TensorCtx("w"), **hp)
    assert torch.equal(direct, resolved)


def test_experiment_stores_the_values_used_and_keeps_its_hashes(tmp_path: Path) -> None:
    raw = {"suites": ["tiny"], "methods": ["cart", {"method": "cart", "params": {"rank_ratio": 0.08, "scaling": 1.0},
                                                    "label": "spelled"}]}
    cfg = parse_config(raw, path=tmp_path / "exp.yaml", suite_tasks=Zoos(tmp_path).tasks)
    plain = next(r for r in cfg.runs if r.label == "cart")
    assert plain.to_json()["hparams_used"]["rank_ratio"] == 0.08
    assert plain.resolved["rank_ratio"] is None  # the hash keeps the declared values: stored runs stay valid
    assert len({r.hash for r in cfg.runs}) == 2
