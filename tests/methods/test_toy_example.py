"""The worked example of docs/architecture.md: a method added in one module (examples/toy_method/toy_median.py)
merges through the same API, engine and command line as the built-in ones."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergelab
from mergelab.cli.main import main
from mergelab.methods import registry

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "toy_method" / "toy_median.py"


@pytest.fixture
def toy(monkeypatch):
    """Registers the example for this test only (the registry is restored afterwards)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry.all_methods()))
    spec = importlib.util.spec_from_file_location("toy_median", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "toy_median", module)
    spec.loader.exec_module(module)
    return module


def test_the_toy_method_merges_hand_checked_values(toy):
    base = {"w": torch.tensor([1.0, 2.0, 3.0]), "step": torch.tensor([7])}
    models = [{"w": base["w"] + torch.tensor(d), "step": torch.tensor([7])}
              for d in ([1.0, -2.0, 0.0], [3.0, 1.0, 0.5], [2.0, 4.0, -1.0])]
    merged = mergelab.merge("toy_median", base, models, scaling=0.5)
    # medians of the task vectors: [2, 1, 0] -> base + 0.5 * median = [2, 2.5, 3]; integer buffers copied
    assert torch.equal(merged["w"], torch.tensor([2.0, 2.5, 3.0]))
    assert torch.equal(merged["step"], torch.tensor([7]))
    assert "toy_median" in mergelab.methods()


def test_the_toy_method_is_validated_and_chunked_like_a_builtin(toy, monkeypatch):
    with pytest.raises(mergelab.MergelabError, match="method 'toy_median': scaling must be >= 0"):
        mergelab.plan("toy_median", {"w": torch.zeros(3)}, [{"w": torch.ones(3)}], scaling=-1.0)
    with pytest.raises(mergelab.MergelabError, match="has no hyperparameter 'density'"):
        mergelab.plan("toy_median", {"w": torch.zeros(3)}, [{"w": torch.ones(3)}], density=0.5)
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(40, 30, generator=gen)}
    models = [{"w": base["w"] + torch.randn(40, 30, generator=gen)} for _ in range(4)]
    whole = mergelab.merge("toy_median", base, models)
    from mergelab.engine import chunks

    monkeypatch.setitem(chunks.CHUNK_ELEMENTS, "cpu", 7)  # many column chunks per tensor
    assert torch.equal(mergelab.merge("toy_median", base, models)["w"], whole["w"])
    expected = base["w"] + torch.stack([m["w"] - base["w"] for m in models]).median(dim=0).values
    assert torch.equal(whole["w"], expected)


def test_the_toy_method_runs_from_the_command_line(toy, tmp_path, capsys):
    save_file({"w": torch.zeros(4)}, str(tmp_path / "base.safetensors"))
    save_file({"w": torch.tensor([1.0, -1.0, 2.0, 0.0])}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.tensor([3.0, 1.0, -2.0, 0.0])}, str(tmp_path / "b.safetensors"))
    assert main(["methods"]) == 0 and "toy_median: elementwise median" in capsys.readouterr().out
    code = main(["merge", "--method", "toy_median", "--base", str(tmp_path / "base.safetensors"), "--model",
                 str(tmp_path / "a.safetensors"), "--model", str(tmp_path / "b.safetensors"), "--out",
                 str(tmp_path / "out"), "--quiet"])
    assert code == 0
    from safetensors.torch import load_file

    # two models: torch's median is the lower middle value
    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["w"], torch.tensor([1.0, -1.0, -2.0, 0.0]))


def test_the_short_form_declares_almost_nothing(toy):
    """``merge_method(name, reference_url)``: the hyperparameters are the function's keyword-only parameters
    with their defaults, the summary is its docstring's first line, the source the reference; no capability
    beyond the ones named."""
    method = registry.get_method("toy_median")
    assert dict(method.defaults) == {"scaling": 1.0}
    assert method.summary == "elementwise median of the task vectors (a worked example)"
    assert method.source == "examples/toy_method/toy_median.py"
    assert method.is_elementwise({"scaling": 1.0}) and method.linear_in_scaling
    assert method.streaming is None and method.whole_tensors is None and method.fused is None


def test_the_short_form_needs_defaults_and_a_summary(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry.all_methods()))

    def no_default(taus, base, ctx, *, scaling):
        """a summary"""
        return taus.sum(dim=0) * scaling

    def no_summary(taus, base, ctx, *, scaling=1.0):
        return taus.sum(dim=0) * scaling

    with pytest.raises(ValueError, match="scaling need a default"):
        registry.merge_method("no_default", "nowhere")(no_default)
    with pytest.raises(ValueError, match="docstring"):
        registry.merge_method("no_summary", "nowhere")(no_summary)
    assert "no_default" not in registry.all_methods() and "no_summary" not in registry.all_methods()
