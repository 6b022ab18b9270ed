"""The ready configs under experiments/ validate against the real registry and suite definitions (no zoo is
built), label their runs unambiguously and state their expected runtime; configs using `weave` are skipped until that method is registered."""

from __future__ import annotations

from pathlib import Path

import pytest

import mergelab
from mergelab.experiment import load_config

CONFIGS = sorted((Path(__file__).parents[2] / "experiments").glob("*.yaml"))


def test_configs_exist() -> None:
    assert {p.stem for p in CONFIGS} >= {"weave_multitask", "cart", "cart_scalability", "cosine", "opcm_continual",
                                         "opcm_continual_seq", "opcm_mt8", "domain_generalization", "smoke_quick",
                                         "smoke_quick_continual", "smoke_quick_cosine"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates_and_states_its_runtime(path: Path) -> None:
    text = path.read_text()
    assert "Expected runtime" in text
    if "method: weave" in text and "weave" not in mergelab.methods():
        pytest.skip("the `weave` method is not registered yet (src/mergelab/methods/weave.py, another issue)")
    config = load_config(path)
    assert config.runs and config.db.parent == path.parent / "results"
    keys = [(r.suite, r.subset, tuple(r.tasks), r.label) for r in config.runs]
    assert len(set(keys)) == len(keys)  # reports key runs by label within a suite and subset
