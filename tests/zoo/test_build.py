"""Zoo build on a tiny BERT and a tiny CSV task: experts are HF folders with the base's tensor names,
cached, rebuilt when the recipe or the data changes, deterministic, sequential suites chain experts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergelab.errors import MergelabError
from mergelab.zoo import build_zoo, list_zoos
from mergelab.zoo.train import Recipe
from tests.zoo.zoo_tiny import write_suite, write_task

RECIPE = Recipe(batch_size=64)  # 40 rows -> one step


def build(suite: Path, backbone: Path, cache: Path, recipe: Recipe = RECIPE):  # type: ignore[no-untyped-def]
    return build_zoo(suite, backbone=str(backbone), cache_dir=cache, progress=False, recipe=recipe)


def test_expert_is_a_folder_with_the_base_tensor_names(tmp_path: Path, tiny_bert: Path) -> None:
    zoo = build(write_task(tmp_path / "data"), tiny_bert, tmp_path / "cache")
    expert = zoo.experts["mood"]
    base, tuned = load_file(tiny_bert / "model.safetensors"), load_file(expert / "model.safetensors")
    assert {k: v.shape for k, v in tuned.items()} == {k: v.shape for k, v in base.items()}
    assert any(not torch.equal(base[k], tuned[k]) for k in base)  # one optimiser step moved the encoder
    assert (expert / "config.json").exists() and (expert / "tokenizer.json").exists()
    meta = json.loads((expert / "mergelab_expert.json").read_text())
    assert meta["n_train"] == 40 and meta["n_test"] == 16 and meta["recipe"]["batch_size"] == 64
    assert zoo.expert_accuracy["mood"] == meta["accuracy"] and zoo.zero_shot["mood"] == meta["zero_shot"]
    assert [t.name for t in zoo.tasks] == ["mood"] and zoo.tasks[0].labels == ["positive", "negative"]
    assert list_zoos(tmp_path / "cache")[0]["suite"] == "mood"


def test_cached_expert_is_reused(tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = write_task(tmp_path / "data")
    first = build(task, tiny_bert, tmp_path / "cache")
    stamp = (first.experts["mood"] / "model.safetensors").stat().st_mtime_ns

    def no_training(*args: object, **kwargs: object) -> float:
        raise AssertionError("a cached expert was retrained")

    monkeypatch.setattr("mergelab.zoo.build.finetune", no_training)
    again = build(task, tiny_bert, tmp_path / "cache")
    assert (again.experts["mood"] / "model.safetensors").stat().st_mtime_ns == stamp
    assert again.expert_accuracy == first.expert_accuracy


def test_changed_recipe_or_data_rebuilds(tmp_path: Path, tiny_bert: Path) -> None:
    task = write_task(tmp_path / "data")
    first = build(task, tiny_bert, tmp_path / "cache")
    key = json.loads((first.experts["mood"] / "mergelab_expert.json").read_text())["key"]
    other = build(task, tiny_bert, tmp_path / "cache", replace(RECIPE, lr=1e-4))
    key2 = json.loads((other.experts["mood"] / "mergelab_expert.json").read_text())["key"]
    assert key2 != key
    write_task(tmp_path / "data", n=124)  # two more rows in the user's file
    third = build(task, tiny_bert, tmp_path / "cache", replace(RECIPE, lr=1e-4))
    assert json.loads((third.experts["mood"] / "mergelab_expert.json").read_text())["key"] not in (key, key2)
    assert not list((tmp_path / "cache" / "zoo").rglob("*.tmp"))  # no half-written folders left


def test_build_is_deterministic(tmp_path: Path, tiny_bert: Path) -> None:
    task = write_task(tmp_path / "data")
    a = build(task, tiny_bert, tmp_path / "a").experts["mood"] / "model.safetensors"
    b = build(task, tiny_bert, tmp_path / "b").experts["mood"] / "model.safetensors"
    ta, tb = load_file(a), load_file(b)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_sequential_suite_starts_each_expert_from_the_previous(tmp_path: Path, tiny_bert: Path) -> None:
    suite = write_suite(tmp_path / "data", ["t1", "t2"], sequential=True)
    zoo = build(suite, tiny_bert, tmp_path / "cache")
    metas = [json.loads((zoo.experts[t] / "mergelab_expert.json").read_text()) for t in ("t1", "t2")]
    assert [m["initialised_from"] for m in metas] == ["base", "previous expert"]
    # t2's expert = t1's expert + its own step: it differs from a t2 trained from the base alone
    independent = build(write_suite(tmp_path / "ind", ["t1", "t2"]), tiny_bert, tmp_path / "cache2")
    seq2, ind2 = load_file(zoo.experts["t2"] / "model.safetensors"), load_file(
        independent.experts["t2"] / "model.safetensors")
    assert any(not torch.equal(seq2[k], ind2[k]) for k in seq2)


def test_registered_user_expert_is_scored_not_trained(tmp_path: Path, tiny_bert: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mergelab.zoo.build.finetune", lambda *a, **k: pytest.fail("trained a registered expert"))
    suite = write_suite(tmp_path / "data", ["t1"], experts={"t1": str(tiny_bert)})
    zoo = build(suite, tiny_bert, tmp_path / "cache")
    assert zoo.experts["t1"] == tiny_bert.resolve()
    assert zoo.expert_accuracy["t1"] == zoo.zero_shot["t1"]  # the "expert" is the base itself
    assert not (tiny_bert / "mergelab_expert.json").exists()  # the user's folder is left alone


def test_unknown_backbone_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(MergelabError, match="not a backbone name"):
        build(write_task(tmp_path / "data"), tmp_path / "nowhere", tmp_path / "cache")
