"""Backbone names (``all-minilm-l6-v2``) wherever a model path is accepted: merge/plan API and CLI,
continual init, eval; an existing path wins over a name; an unknown name names the backbones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergelab
import mergelab.io.names as names
import mergelab.zoo.backbones as backbones
from mergelab.cli.main import main
from mergelab.errors import MergelabError
from tests.helpers import finetune_of, tiny_state


@pytest.fixture
def packaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny stand-in for the packaged all-minilm-l6-v2 folder (the real one is 90 MB)."""
    folder = tmp_path / "site-packages" / "minilm"
    folder.mkdir(parents=True)
    save_file(tiny_state(0), str(folder / "model.safetensors"))
    for module in (backbones, names):  # where names are resolved, and the zoo's own name
        monkeypatch.setattr(module, "backbone_folder", lambda name, cache_dir=None: folder)
    return folder


def test_api_and_cli_take_a_backbone_name_as_base(packaged: Path, tmp_path: Path, capsys) -> None:
    model = finetune_of(tiny_state(0), 1)
    by_name = mergelab.merge("task_arithmetic", "all-minilm-l6-v2", [model])
    by_path = mergelab.merge("task_arithmetic", str(packaged), [model])
    assert isinstance(by_name, dict) and isinstance(by_path, dict)
    assert all(torch.equal(by_name[k], by_path[k]) for k in by_path)

    save_file(model, str(tmp_path / "m.safetensors"))
    assert main(["plan", "--method", "ties", "--base", "all-minilm-l6-v2", "--model", str(tmp_path / "m.safetensors"),
                 "--model", "all-minilm-l6-v2"]) == 0
    assert "plan is valid" in capsys.readouterr().out


def test_continual_init_takes_a_backbone_name(packaged: Path, tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    assert main(["continual", "init", str(state), "--method", "continual_ta", "--base", "all-minilm-l6-v2"]) == 0
    assert main(["continual", "status", str(state)]) == 0
    assert f"base    {packaged.resolve()}" in capsys.readouterr().out


def test_an_existing_path_wins_over_a_name(packaged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    local = finetune_of(tiny_state(0), 5)
    (tmp_path / "all-minilm-l6-v2").mkdir()  # a folder of that name in the working directory
    save_file(local, str(tmp_path / "all-minilm-l6-v2" / "model.safetensors"))
    merged = mergelab.merge("weight_average", "all-minilm-l6-v2", ["all-minilm-l6-v2"])
    assert isinstance(merged, dict) and all(torch.equal(merged[k], local[k]) for k in local)


def test_unknown_name_is_no_such_file_naming_the_backbones(tmp_path: Path, capsys) -> None:
    with pytest.raises(MergelabError, match=r"no such file or folder \(or a backbone name: all-minilm-l6-v2"):
        mergelab.plan("ties", "all-minilm-l6-v3", [tiny_state(0)])
    assert main(["plan", "--method", "ties", "--base", "nowhere", "--model", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mergelab: error: nowhere: no such file or folder "
                   "(or a backbone name: all-minilm-l6-v2, all-mpnet-base-v2)")


def test_zoo_list_prints_each_backbones_folder(packaged: Path, tmp_path: Path, capsys) -> None:
    assert main(["zoo", "list", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert f"all-minilm-l6-v2   {packaged}" in out and "all-mpnet-base-v2" in out
