"""evaluate() on a tiny BERT: accuracies equal a by-hand computation, normalisation, bad models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelab.errors import MergelabError
from mergelab.eval import EvalResult, Evaluator, evaluate
from mergelab.zoo import build_zoo
from mergelab.zoo.datasets import load_task
from mergelab.zoo.encoder import TEMPLATE, encode, load_encoder
from mergelab.zoo.train import Recipe
from tests.zoo.zoo_tiny import write_task


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("eval")
    return build_zoo(write_task(root / "data"), backbone=str(tiny_bert), cache_dir=root / "cache", progress=False,
                     recipe=Recipe(batch_size=64, lr=1e-3))


def by_hand(model_folder: Path, base: Path, zoo) -> float:  # type: ignore[no-untyped-def]
    """Accuracy computed directly: base prompts -> head, model -> test embeddings, argmax."""
    base_model, tok = load_encoder(base)
    head = encode(base_model, tok, [TEMPLATE.format(n) for n in zoo.tasks[0].labels])
    model, _ = load_encoder(model_folder)
    rows = load_task(zoo.spec.tasks[0], zoo.path.parents[2]).test
    pred = (encode(model, tok, [t for t, _ in rows]) @ head.T).argmax(1)
    return float((pred == torch.tensor([c for _, c in rows])).float().mean())


def test_expert_accuracy_matches_by_hand_and_normalises_to_one(zoo) -> None:  # type: ignore[no-untyped-def]
    result = evaluate(zoo.experts["mood"], zoo, progress=False)
    assert result.accuracy["mood"] == pytest.approx(by_hand(zoo.experts["mood"], zoo.base, zoo), abs=1e-6)
    assert result.accuracy["mood"] == pytest.approx(zoo.expert_accuracy["mood"], abs=1e-6)
    assert result.normalized == {"mood": pytest.approx(1.0)} and result.average == result.accuracy["mood"]


def test_base_is_the_zero_shot_score(zoo) -> None:  # type: ignore[no-untyped-def]
    result = evaluate(None, zoo, progress=False)
    assert result.accuracy["mood"] == pytest.approx(zoo.zero_shot["mood"], abs=1e-6)
    assert result.accuracy["mood"] == pytest.approx(by_hand(zoo.base, zoo.base, zoo), abs=1e-6)


def test_any_model_form_and_explicit_expert_accuracy(zoo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    state = load_file(zoo.experts["mood"] / "model.safetensors")
    evaluator = Evaluator(zoo, progress=False, batch_size=3)
    from_file, from_dict = evaluator(zoo.experts["mood"] / "model.safetensors"), evaluator(state, {"mood": 0.5})
    assert from_dict.accuracy == pytest.approx(from_file.accuracy)
    assert from_dict.normalized == pytest.approx({"mood": from_file.accuracy["mood"] / 0.5})
    assert set(from_file.to_json()) == {"suite", "accuracy", "average", "normalized", "normalized_average", "seconds"}
    assert "average" in from_file.table().splitlines()[-1]


def test_unknown_expert_accuracy_gives_no_normalisation() -> None:
    result = EvalResult("s", {"a": 0.5, "b": 1.0}, 0.75, None, 0.0)
    assert result.normalized_average is None and result.to_json()["normalized"] is None


def test_missing_tensor_and_wrong_shape_are_one_line_errors(zoo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    state = load_file(zoo.experts["mood"] / "model.safetensors")
    name = "encoder.layer.0.attention.self.query.weight"
    save_file({k: v for k, v in state.items() if k != name}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(MergelabError, match="tensor missing") as err:
        evaluate(tmp_path / "missing.safetensors", zoo, progress=False)
    assert name in str(err.value) and "missing.safetensors" in str(err.value)
    save_file(state | {name: torch.zeros(3, 3)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(MergelabError, match=r"shape \[3, 3\]"):
        evaluate(tmp_path / "shape.safetensors", zoo, progress=False)


def test_unknown_task_subset(zoo) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MergelabError, match="unknown task"):
        evaluate(None, zoo, tasks=["nope"], progress=False)
