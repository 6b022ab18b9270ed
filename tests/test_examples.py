"""The files in examples/ run: the job YAML (its paths swapped for tiny models) merges and plans, and the
continual example merges experts one at a time through a state folder, as ContinualMerger does in memory."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import mergelab
import mergelab.io.names as names
import mergelab.zoo.backbones as backbones
from mergelab.cli.main import main
from tests.helpers import finetune_of, tiny_state

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def fake_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Tiny models where the job file looks: the backbone name and the quick zoo's experts under ~."""
    base = tiny_state(0)
    (tmp_path / "minilm").mkdir()
    save_file(base, str(tmp_path / "minilm" / "model.safetensors"))
    for module in (backbones, names):  # where names are resolved, and the zoo's own name
        monkeypatch.setattr(module, "backbone_folder", lambda name, cache_dir=None: tmp_path / "minilm")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    job = yaml.safe_load((EXAMPLES / "merge_job.yaml").read_text(encoding="utf-8"))
    experts = {}
    for seed, model in enumerate(job["models"], 1):
        folder = Path(model).expanduser()
        assert str(folder).startswith(str(tmp_path / "home"))
        folder.mkdir(parents=True)
        save_file(finetune_of(base, seed), str(folder / "model.safetensors"))
        experts[folder.name] = folder
    return experts


def test_the_job_file_merges(fake_zoo: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "repo" / "examples" / "merge_job.yaml"
    copy.parent.mkdir(parents=True)
    shutil.copy(EXAMPLES / "merge_job.yaml", copy)
    monkeypatch.chdir(tmp_path)
    assert main(["merge", str(copy), "-q"]) == 0
    written = load_file(str(tmp_path / "repo" / "demo-out" / "merged-ties" / "model.safetensors"))
    want = mergelab.merge("ties", tiny_state(0), [str(p) for p in fake_zoo.values()], density=0.2, scaling=1.0)
    assert isinstance(want, dict) and all(torch.equal(written[k], want[k]) for k in want)


def test_the_job_file_plans_in_place(fake_zoo: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(EXAMPLES / "merge_job.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"output        {EXAMPLES / '..' / 'demo-out' / 'merged-ties'}" in out and "plan is valid" in out


def test_the_continual_example(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("continual_example", EXAMPLES / "continual.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    base = tiny_state(0)
    save_file(base, str(tmp_path / "base.safetensors"))
    experts = {}
    for seed, name in enumerate(["sentiment", "noun_sense", "pkg_section"], 1):
        experts[name] = tmp_path / f"{name}.safetensors"
        save_file(finetune_of(base, seed), str(experts[name]))
    out = example.merge_one_at_a_time(str(tmp_path / "base.safetensors"), experts, tmp_path / "state",
                                      tmp_path / "merged", alpha=0.5)
    in_memory = mergelab.ContinualMerger("opcm", str(tmp_path / "base.safetensors"), alpha=0.5)
    for path in experts.values():
        in_memory.add(path)
    written, want = load_file(str(Path(out) / "model.safetensors")), in_memory.merged()
    assert sorted(written) == sorted(want) and all(torch.equal(written[k], want[k]) for k in want)
