"""The continual merger and its rule registry: a rule is one module (registered update and read-out), checked
by the same code as a merge method's, listed by ``mergelab methods``; the merger dispatches on no name."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

import mergelab
from mergelab.cli.main import main
from mergelab.continual import DEFAULTS, rules
from mergelab.continual.rules import RuleCtx, all_rules, get_rule, register_rule
from tests.helpers import finetune_of, tiny_state


def test_the_builtin_rules_are_registered_with_their_defaults():
    assert sorted(all_rules()) == ["continual_ta", "continual_ties", "opcm", "swa"]
    assert DEFAULTS == {name: dict(rule.defaults) for name, rule in all_rules().items()}
    assert get_rule("continual_ties").defaults == {"scaling": 0.5, "density": 0.2, "merge_func": "sum"}
    with pytest.raises(mergelab.MergelabError, match="unknown continual method 'nope'; available: continual_ta"):
        get_rule("nope")


def test_rule_hyperparameters_are_checked_like_a_methods():
    base = tiny_state(0)
    with pytest.raises(mergelab.MergelabError, match="method 'opcm': alpha must be in"):
        mergelab.ContinualMerger("opcm", base, alpha=1.5)
    with pytest.raises(mergelab.MergelabError, match="method 'continual_ties': merge_func='median' is not one of"):
        mergelab.ContinualMerger("continual_ties", base, merge_func="median")
    with pytest.raises(mergelab.MergelabError, match="method 'swa' has no hyperparameter 'scaling'"):
        mergelab.ContinualMerger("swa", base, scaling=1.0)


def test_a_new_rule_is_one_registration(monkeypatch):
    """A rule registered from anywhere (here: the running maximum of the task vectors, read at half scale)
    is a ContinualMerger method at once: the merger has no per-rule code."""
    monkeypatch.setattr(rules, "_RULES", dict(all_rules()))

    def read(state: torch.Tensor, ctx: RuleCtx, *, half: bool) -> torch.Tensor:
        return 0.5 * state if half else state

    @register_rule("running_max", defaults={"half": True}, read=read, summary="s", source="test")
    def running_max(state: torch.Tensor | None, tau: torch.Tensor, ctx: RuleCtx, **hp: Any) -> torch.Tensor:
        return tau if state is None else torch.maximum(state, tau)

    base = tiny_state(0)
    models = [finetune_of(base, i) for i in range(3)]
    cm = mergelab.ContinualMerger("running_max", base)
    for model in models:
        cm.add(model, progress=False)
    merged = cm.merged()
    for name, tensor in base.items():
        if tensor.is_floating_point():
            taus = torch.stack([m[name].float() - tensor.float() for m in models])
            assert torch.equal(merged[name], (tensor.float() + 0.5 * taus.amax(dim=0)).to(tensor.dtype))
    with pytest.raises(ValueError, match="already registered"):
        register_rule("running_max", defaults={}, read=read, summary="s", source="test")(running_max)
    with pytest.raises(ValueError, match="lower case"):
        register_rule("Running", defaults={}, read=read, summary="s", source="test")(running_max)


def test_mergelab_methods_lists_the_rules(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "continual rules" in text and "\nopcm: " in text and "    alpha = 0.5" in text
    assert main(["methods", "--continual", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(rows) == sorted(all_rules()) and rows["opcm"]["choices"]["projection"] == ["official", "paper"]


def test_a_rule_module_dropped_into_the_rules_package_is_listed(monkeypatch, tmp_path):
    """A new rule is one module: put in the rules package (here a folder added to the package's path), it
    is imported, registered and listed; nothing else names it."""
    (tmp_path / "toy_rule.py").write_text(
        "from mergelab.continual.rules import register_rule, state_itself\n\n\n"
        "@register_rule('toy_rule', defaults={}, read=state_itself, summary='the first model only', source='a test')\n"
        "def toy_rule(state, tau, ctx, **hp):\n"
        "    return tau if state is None else state\n"
    )
    (tmp_path / "_toy_helpers.py").write_text("raise AssertionError('a private module is not imported')\n")
    monkeypatch.setattr(rules, "_RULES", dict(all_rules()))
    monkeypatch.setattr(rules, "__path__", [*rules.__path__, str(tmp_path)])
    try:
        assert "toy_rule" in all_rules()
        merger = mergelab.ContinualMerger("toy_rule", tiny_state(0))
        merger.add(finetune_of(tiny_state(0), 1))
        assert sorted(merger.merged()) == sorted(tiny_state(0))
    finally:
        import sys

        sys.modules.pop("mergelab.continual.rules.toy_rule", None)
