"""End to end on the real zoo and evaluator (no fakes): a tiny BERT backbone, a two-task suite YAML, experts
fine-tuned by ``build_zoo``, scored by the default cached :class:`mergelab.eval.Evaluator`; the stored
accuracies equal ``mergelab.eval.evaluate`` on the same merge."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

import mergelab  # noqa: E402
from mergelab.eval import evaluate  # noqa: E402
from mergelab.experiment import Store, run  # noqa: E402
from mergelab.zoo import build_zoo  # noqa: E402
from tests.zoo.zoo_tiny import write_suite, write_tiny_bert  # noqa: E402


def test_multitask_and_continual_on_a_tiny_real_zoo(tmp_path: Path) -> None:
    bert = write_tiny_bert(tmp_path / "bert")
    suite = write_suite(tmp_path / "data", ["mood", "tone"])
    zoo_cfg = {"backbone": str(bert), "cache_dir": str(tmp_path / "cache")}
    config = {"name": "real", "suites": [str(suite)], "zoo": zoo_cfg, "tasks": ["all", ["tone"]],
              "methods": ["task_arithmetic", {"method": "ties", "params": {"density": 0.5}}]}
    summary = run(config, db=tmp_path / "r.sqlite", progress=False)
    assert (summary.ran, summary.failed) == (4, 0), summary.errors
    continual = {"name": "real-cl", "kind": "continual", "suites": [str(suite)], "zoo": zoo_cfg,
                 "methods": ["opcm"]}
    assert run(continual, db=tmp_path / "r.sqlite", progress=False).failed == 0

    with Store(tmp_path / "r.sqlite") as store:
        rows = {(r.label, r.config["subset"]): r for r in store.rows()}
    zoo = build_zoo(suite, backbone=str(bert), cache_dir=tmp_path / "cache", progress=False)  # cached: no training
    merged = mergelab.merge("ties", zoo.base, [zoo.experts["mood"], zoo.experts["tone"]], density=0.5)
    direct = evaluate(merged, zoo, progress=False)
    stored = rows[("ties density=0.5" if ("ties density=0.5", "all") in rows else "ties", "all")].metrics
    assert stored is not None and stored["accuracy"] == pytest.approx(direct.accuracy)
    assert stored["normalized"] == pytest.approx(direct.normalized)
    only_tone = rows[("task_arithmetic", "tone")].metrics
    assert only_tone is not None and list(only_tone["accuracy"]) == ["tone"]
    cl = rows[("opcm", "identity")].metrics
    assert cl is not None and len(cl["matrix"]) == 2 and cl["matrix"][0][1] is None
