"""Inputs that make a valid job which is likely not what was meant: ``mergelab plan`` (and merge) say so
in the plan summary and on stderr (logged), and still exit 0; inputs that cannot be merged as a full
model (a LoRA/PEFT adapter) and models whose tensors differ from the base's are one-line errors."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergelab.cli.main import main
from tests.helpers import finetune_of, tiny_state


def plan_argv(base: Path, *models: Path, method: str = "task_arithmetic") -> list[str]:
    argv = ["plan", "--method", method, "--base", str(base)]
    for model in models:
        argv += ["--model", str(model)]
    return argv


def plan(capsys, caplog, base: Path, *models: Path) -> tuple[int, list[str], str]:
    """Exit status, the summary's warning lines, and stderr (with the warnings logged, as the CLI shows them)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mergelab"):
        code = main(plan_argv(base, *models))
    captured = capsys.readouterr()
    warnings = [line.removeprefix("warning       ") for line in captured.out.splitlines() if line.startswith("warning ")]
    logged = "".join(f"mergelab: {r.getMessage()}\n" for r in caplog.records)
    return code, warnings, logged + captured.err


def expect_warning(capsys, caplog, base: Path, *models: Path, text: str) -> None:
    code, warnings, err = plan(capsys, caplog, base, *models)
    assert code == 0 and warnings == [text], warnings
    assert err == f"mergelab: warning: {text}\n"


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    base = tiny_state(0)
    paths = {"base": tmp_path / "base.safetensors", "m1": tmp_path / "m1.safetensors", "m2": tmp_path / "m2.safetensors"}
    save_file(base, str(paths["base"]))
    save_file(finetune_of(base, 1), str(paths["m1"]))
    save_file(finetune_of(base, 2), str(paths["m2"]))
    return paths


def test_two_different_models_have_no_warning(inputs, capsys, caplog):
    assert plan(capsys, caplog, inputs["base"], inputs["m1"], inputs["m2"]) == (0, [], "")


def test_the_same_model_twice(inputs, tmp_path, capsys, caplog):
    m1 = inputs["m1"]
    expect_warning(capsys, caplog, inputs["base"], m1, tmp_path / "." / "m1.safetensors",
                   text=f"model 2 ({tmp_path / '.' / 'm1.safetensors'}) is the same file as model 1 ({m1}): it counts "
                        "twice in the merge")
    shutil.copy(m1, tmp_path / "copy.safetensors")  # another name, the same bytes
    expect_warning(capsys, caplog, inputs["base"], m1, tmp_path / "copy.safetensors",
                   text=f"model 2 ({tmp_path / 'copy.safetensors'}) is the same content as (same size, header and "
                        f"sampled bytes) model 1 ({m1}): it counts twice in the merge")
    shutil.copy(inputs["base"], tmp_path / "base-copy.safetensors")  # the base passed as a model
    expect_warning(capsys, caplog, inputs["base"], m1, tmp_path / "base-copy.safetensors",
                   text=f"model 2 ({tmp_path / 'base-copy.safetensors'}) is the same content as (same size, header and "
                        f"sampled bytes) the base ({inputs['base']}): its task vector is zero")


def test_a_single_model(inputs, capsys, caplog):
    expect_warning(capsys, caplog, inputs["base"], inputs["m1"], text=f"only one model ({inputs['m1']}): the result is the "
                   "base plus its task vector as task_arithmetic weighs it, not a merge of several models")


@pytest.mark.parametrize(("base_dtype", "loss"), [(torch.float16, "; precision or range may be lost"), (torch.float32, "")])
def test_a_base_in_another_floating_dtype(tmp_path, capsys, caplog, base_dtype, loss):
    save_file(tiny_state(0, base_dtype), str(tmp_path / "base.safetensors"))
    for i in (1, 2):
        save_file(finetune_of(tiny_state(0, torch.bfloat16), i), str(tmp_path / f"m{i}.safetensors"))
    code, warnings, err = plan(capsys, caplog, tmp_path / "base.safetensors", tmp_path / "m1.safetensors", tmp_path / "m2.safetensors")
    name = str(base_dtype).removeprefix("torch.")
    assert code == 0 and warnings == [
        f"model {i} ({tmp_path / f'm{i}.safetensors'}) stores 6 merged tensor(s) in another floating dtype than the base "
        f"(e.g. 'embed.weight': bfloat16 vs the base's {name}): the output keeps the base's dtypes{loss}" for i in (1, 2)]
    assert err.count("mergelab: warning: ") == 2


def test_a_folder_with_safetensors_and_bin_weights_says_which_is_used(inputs, tmp_path, capsys, caplog):
    folder = tmp_path / "m1-folder"
    folder.mkdir()
    shutil.copy(inputs["m1"], folder / "model.safetensors")
    torch.save(finetune_of(tiny_state(0), 7), folder / "pytorch_model.bin")  # not the same weights
    expect_warning(capsys, caplog, inputs["base"], folder, inputs["m2"],
                   text=f"{folder} holds model.safetensors and pytorch_model.bin: using model.safetensors, the other is "
                        "ignored")


def _adapter(folder: Path) -> Path:
    folder.mkdir()
    lora = {f"base_model.model.layer.0.attn.lora_{ab}.weight": torch.zeros(2, 6) for ab in "AB"}
    save_file(lora, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    return folder


@pytest.mark.parametrize("given", ["folder", "adapter_model.safetensors", "renamed file"])
def test_a_lora_adapter_is_refused_with_what_to_do(inputs, tmp_path, capsys, caplog, given):
    folder = _adapter(tmp_path / "adapter")
    model = {"folder": folder, "adapter_model.safetensors": folder / "adapter_model.safetensors",
             "renamed file": tmp_path / "lora.safetensors"}[given]
    if given == "renamed file":
        shutil.copy(folder / "adapter_model.safetensors", model)
    code, _, err = plan(capsys, caplog, inputs["base"], inputs["m1"], model)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"mergelab: error: {model}: a LoRA/PEFT adapter, not a full model: merge it into its base "
                          "model first (e.g. with PEFT's merge_and_unload()) and pass the merged model")


def test_missing_and_extra_tensors_in_one_message(inputs, tmp_path, capsys, caplog):
    model = finetune_of(tiny_state(0), 3)
    for name in ("head.scale", "layer.0.attn.bias"):
        model.pop(name)
    model.update({"extra.a": torch.zeros(2), "extra.b": torch.zeros(2)})
    save_file(model, str(tmp_path / "bad.safetensors"))
    code, _, err = plan(capsys, caplog, inputs["base"], inputs["m1"], tmp_path / "bad.safetensors")
    assert code == 2
    assert err == (f"mergelab: error: {tmp_path / 'bad.safetensors'}: tensor 'head.scale': tensor missing, present in "
                   "the base (and 1 more: 'layer.0.attn.bias'); and 2 tensors not in the base: 'extra.a', 'extra.b'\n")


def test_warnings_reach_stderr_from_the_command_line_once(inputs, tmp_path):
    argv = plan_argv(inputs["base"], inputs["m1"])
    argv = ["merge", *argv[1:], "--out", str(tmp_path / "out")]  # planned twice: for the summary, then to merge
    done = subprocess.run([sys.executable, "-m", "mergelab", *argv],
                          capture_output=True, text=True, timeout=120)
    text = f"only one model ({inputs['m1']}): the result is the base plus its task vector as task_arithmetic weighs " \
           "it, not a merge of several models"
    assert done.returncode == 0 and done.stderr == f"mergelab: warning: {text}\n"
    assert f"\nwarning       {text}\n" in done.stdout and (tmp_path / "out" / "model.safetensors").is_file()
