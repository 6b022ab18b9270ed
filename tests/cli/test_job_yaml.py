"""`mergelab merge JOB.yaml`: relative paths in the file are relative to the file, flags to the working
directory; --method replacing the file's method drops the file's (other method's) parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelab
from mergelab.cli.main import main
from tests.helpers import finetune_of, tiny_state


@pytest.fixture
def job(tmp_path: Path) -> Path:
    """jobs/job.yaml naming base.safetensors, a.safetensors, b.safetensors beside it (relative paths)."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    base = tiny_state(0)
    save_file(base, str(folder / "base.safetensors"))
    save_file(finetune_of(base, 1), str(folder / "a.safetensors"))
    save_file(finetune_of(base, 2), str(folder / "b.safetensors"))
    (folder / "job.yaml").write_text("method: ties\nbase: base.safetensors\nmodels: [a.safetensors, b.safetensors]\n"
                                     "parameters: {density: 0.5}\nout: merged.safetensors\n", encoding="utf-8")
    return folder / "job.yaml"


def expected(folder: Path, method: str, **hparams: object) -> dict[str, torch.Tensor]:
    base = load_file(str(folder / "base.safetensors"))
    models = [load_file(str(folder / f"{n}.safetensors")) for n in "ab"]
    merged = mergelab.merge(method, base, models, **hparams)
    assert isinstance(merged, dict)
    return merged


def test_paths_in_the_file_are_relative_to_the_file(job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["merge", str(job), "-q"]) == 0
    written = load_file(str(job.parent / "merged.safetensors"))
    want = expected(job.parent, "ties", density=0.5)
    assert all(torch.equal(written[k], want[k]) for k in want)
    assert list(elsewhere.iterdir()) == []

    # a flag stays relative to the working directory
    assert main(["merge", str(job), "--out", "here.safetensors", "-q"]) == 0
    assert (elsewhere / "here.safetensors").is_file()


def test_plan_shows_the_files_paths_resolved(job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "jobs/job.yaml"]) == 0
    assert "output        jobs/merged.safetensors" in capsys.readouterr().out


def test_method_flag_drops_the_files_parameters(job: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = job.parent / "cart.safetensors"
    assert main(["merge", str(job), "--method", "cart", "--set", "rank_ratio=0.5", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note: --method cart replaces the file's method ties; its parameters (density) are not used" in err
    written = load_file(str(out))
    want = expected(job.parent, "cart", rank_ratio=0.5)
    assert all(torch.equal(written[k], want[k]) for k in want)


def test_same_method_flag_keeps_the_files_parameters(job: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(job), "--method", "ties", "--set", "scaling=0.5"]) == 0
    captured = capsys.readouterr()
    assert "note:" not in captured.err
    assert '"density": 0.5' in captured.out and '"scaling": 0.5' in captured.out
