"""End-to-end CLI: merges from flags and YAML for every input form, plans, and every bad input
(exit 2, one line naming the file and tensor, nothing left at --out or beside it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelab
from mergelab.cli.main import main
from mergelab.io.safetensors_header import TensorSpec
from mergelab.io.writer import plan_shards
from mergelab.methods.registry import all_methods
from tests.forms import FORMS, write_form
from tests.helpers import finetune_of, tiny_state, write_sharded
from tests.hostile import CASES, MARKER


def read_out(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in out.glob("*.safetensors"):
        tensors.update(load_file(str(shard)))
    return tensors


def leftovers(folder: Path) -> list[str]:
    """Temporary or replaced outputs left beside the target."""
    return sorted(p.name for p in folder.iterdir() if "mergelab-" in p.name)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    base = tiny_state(0)
    save_file(base, str(tmp_path / "base.safetensors"))
    write_sharded(finetune_of(base, 1), tmp_path / "m1", max_shard_bytes=150)
    torch.save(finetune_of(base, 2), tmp_path / "m2.bin")
    return {"base": str(tmp_path / "base.safetensors"), "m1": str(tmp_path / "m1"), "m2": str(tmp_path / "m2.bin")}


def merge_args(files: dict[str, str], out: Path, *extra: str, method: str = "ties") -> list[str]:
    return ["merge", "--method", method, "--base", files["base"], "--model", files["m1"], "--model", files["m2"],
            "--set", "density=0.5", "--out", str(out), *extra]


@pytest.mark.parametrize("form", [f for f in FORMS if f != "dict"])
def test_merge_every_input_form(tmp_path, form):
    states = [tiny_state(0), finetune_of(tiny_state(0), 1), finetune_of(tiny_state(0), 2)]
    base, m1, m2 = (str(write_form(form, s, tmp_path / name)) for s, name in zip(states, "abc", strict=True))
    argv = ["merge", "--method", "ties", "--base", base, "--model", m1, "--model", m2,
            "--set", "density=0.4", "--set", "scaling=0.8", "--out", str(tmp_path / "out"), "-q"]
    assert main(argv) == 0
    expected = mergelab.merge("ties", states[0], states[1:], density=0.4, scaling=0.8)
    written = read_out(tmp_path / "out")
    assert sorted(written) == sorted(expected)
    assert all(torch.equal(written[k], expected[k]) for k in expected)


def test_yaml_config_equals_flags_and_flags_override_it(files, tmp_path):
    assert main(merge_args(files, tmp_path / "flags", "-q")) == 0
    config = tmp_path / "job.yaml"
    config.write_text(f"method: ties\nbase: {files['base']}\nmodels:\n  - {files['m1']}\n  - {files['m2']}\n"
                      f"parameters:\n  density: 0.5\nout: {tmp_path / 'ignored'}\n")
    assert main(["merge", str(config), "--out", str(tmp_path / "yaml"), "--quiet"]) == 0
    assert not (tmp_path / "ignored").exists()
    flags, yaml = read_out(tmp_path / "flags"), read_out(tmp_path / "yaml")
    assert sorted(flags) == sorted(yaml) and all(torch.equal(flags[k], yaml[k]) for k in flags)


def test_python_dash_m_end_to_end(files, tmp_path):
    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mergelab", *argv], capture_output=True, text=True, timeout=120)

    done = run(*merge_args(files, tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and (tmp_path / "o" / "model.safetensors").exists()
    listing = json.loads(run("methods", "--json").stdout)
    assert sorted(listing) == sorted(all_methods()) and listing["ties"]["defaults"]["density"] == 0.2
    bad = finetune_of(tiny_state(0), 3)
    bad["layer.0.norm.weight"][0] = float("nan")
    save_file(bad, str(tmp_path / "nan.safetensors"))
    failed = run("merge", "--method", "task_arithmetic", "--base", files["base"], "--model", files["m1"],
                 "--model", str(tmp_path / "nan.safetensors"), "--out", str(tmp_path / "o2"))
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1
    assert "nan.safetensors" in failed.stderr and "layer.0.norm.weight" in failed.stderr
    assert not (tmp_path / "o2").exists() and leftovers(tmp_path) == []


def test_methods_listing(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name in all_methods():
        assert f"\n{name}: " in f"\n{text}"
    assert "density = 0.2" in text and "merge_func = 'mean'  (one of mean, sum, max)" in text
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["ties"]["choices"]["scope"] == ["global", "tensor"] and rows["task_arithmetic"]["source"]


def test_api_methods_function_survives_its_first_call():
    # importing the subpackage mergelab.methods must not rebind the contract's function mergelab.methods
    assert callable(mergelab.methods) and mergelab.methods() == mergelab.methods()
    assert "ties" in mergelab.methods()


@pytest.mark.parametrize("command", ["merge --dry-run", "plan"])
def test_dry_run_and_plan_print_the_plan_and_write_nothing(files, tmp_path, capsys, command):
    argv = merge_args(files, tmp_path / "o", "--max-shard-size", "200B")
    argv = [*argv, "--dry-run"] if command == "merge --dry-run" else ["plan", *argv[1:]]
    assert main(argv) == 0
    text = capsys.readouterr().out
    base = tiny_state(0)
    n_shards = len(plan_shards([(k, TensorSpec(tuple(v.shape), v.dtype)) for k, v in base.items()], 200))
    assert "tensors       6 merged, 1 copied from base, 0 tied" in text
    assert "passes        3 over the inputs (2 statistics + 1 merge)" in text  # global TIES: 2 statistics passes
    assert "peak RAM      ~" in text and "peak GPU" not in text
    assert f"output        {tmp_path / 'o'}: 740 B in {n_shards} shard(s)" in text  # 163 float32 + 11 int64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "m1", "m2.bin"]


def test_cuda_dry_run_shows_peak_gpu(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a plan reads no data: no GPU needed to check it
    assert main(merge_args(files, tmp_path / "o", "--dry-run", "--device", "cuda")) == 0
    text = capsys.readouterr().out
    assert "peak GPU      ~" in text and "compute       float32 on cuda" in text
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["plan", "merge"])
@pytest.mark.parametrize(("device", "gpus", "message"), [
    ("cuda", 0, "device 'cuda' requested but no CUDA GPU is available"),
    ("cuda:2", 2, "device 'cuda:2' requested but this machine has 2 CUDA GPU(s) (cuda:0 to cuda:1)"),
])
def test_a_device_the_machine_lacks_is_refused_before_the_plan_is_printed(files, tmp_path, capsys, monkeypatch,
                                                                         command, device, gpus, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    argv = merge_args(files, tmp_path / "o", "--device", device)
    argv = argv if command == "merge" else ["plan", *argv[1:]]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == f"mergelab: error: {message}\n" and captured.out == ""  # no plan printed first
    assert not (tmp_path / "o").exists()
    with pytest.raises(mergelab.MergelabError, match="requested but"):
        mergelab.plan("ties", files["base"], [files["m1"]], device=device)


def expect_exit_2(argv: list[str], capsys, out: Path, *fragments: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("mergelab: error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not out.exists() and leftovers(out.parent) == []
    return err


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_model_files(files, tmp_path, capsys, case):
    bad = CASES[case].build(tmp_path, finetune_of(tiny_state(0), 4))
    argv = ["merge", "--method", "ties", "--base", files["base"], "--model", files["m1"], "--model", str(bad.path),
            "--out", str(tmp_path / "out")]
    named = [f"tensor '{bad.tensor}'"] if bad.tensor else []
    expect_exit_2(argv, capsys, tmp_path / "out", CASES[case].message, str(bad.named), *named)
    assert not (tmp_path / MARKER).exists()


def _poison(value: float):
    def change(model: dict) -> None:
        model["layer.0.norm.weight"][3] = value  # late in the order: earlier tensors are already written

    return change


BAD_MODELS = {
    "missing tensor": (lambda m: m.pop("head.scale"), "head.scale", "tensor missing"),
    "extra tensor": (lambda m: m.update(extra=torch.zeros(2)), "extra", "tensor not in the base"),
    "shape mismatch": (lambda m: m.update({"layer.0.attn.bias": torch.zeros(7)}), "layer.0.attn.bias", "shape (7,)"),
    "vocab size mismatch": (lambda m: m.update({"embed.weight": torch.zeros(12, 6)}), "embed.weight",
                            "vocabulary size 12 vs the base's 11"),
    "non-floating": (lambda m: m.update({"layer.0.attn.bias": torch.zeros(6, dtype=torch.int32)}), "layer.0.attn.bias",
                     "non-floating dtype torch.int32"),
    "NaN": (_poison(float("nan")), "layer.0.norm.weight", "NaN or Inf"),
    "Inf": (_poison(float("-inf")), "layer.0.norm.weight", "NaN or Inf"),
}


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])  # ties: found in a statistics pass
@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_models(files, tmp_path, capsys, case, method):
    change, tensor, message = BAD_MODELS[case]
    model = finetune_of(tiny_state(0), 5)
    change(model)
    save_file(model, str(tmp_path / "bad.safetensors"))
    argv = ["merge", "--method", method, "--base", files["base"], "--model", files["m1"],
            "--model", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "out"), "--max-shard-size", "100B"]
    expect_exit_2(argv, capsys, tmp_path / "out", str(tmp_path / "bad.safetensors"), f"tensor '{tensor}'", message)


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--set", "colour=blue"], "method 'ties' has no hyperparameter 'colour'"),
    (["--set", "density=2"], "density must be in [0, 1], got 2"),
    (["--set", "merge_func=median"], "merge_func='median' is not one of"),
    (["--set", "density=high"], "should be a float"),
    (["--dtype", "float16"], "compute dtype must be float32 or float64"),
    (["--max-shard-size", "lots"], "cannot read size"),
])
def test_bad_options(files, tmp_path, capsys, extra, message):
    expect_exit_2([*merge_args(files, tmp_path / "o"), *extra], capsys, tmp_path / "o", message)


def test_missing_out_is_refused_before_anything_runs(files, capsys, tmp_path):
    assert main(merge_args(files, tmp_path / "o")[:-2]) == 2
    captured = capsys.readouterr()
    assert "no --out given" in captured.err and captured.out == ""


def test_bad_yaml(files, tmp_path, capsys):
    config = tmp_path / "job.yaml"
    for text, message in [("method: ties\nbase: [unclosed\n", "invalid YAML"), ("method: ties\nmodle: x\n", "unknown key(s) modle"),
                          ("- a\n- b\n", "must be a YAML mapping"), (f"method: ties\nbase: {files['base']}\nmodels: [{files['m1']}]\n"
                                                                     "overwrite: 'no'\n", "'overwrite' must be true or false")]:
        config.write_text(text)
        expect_exit_2(["merge", str(config), "--out", str(tmp_path / "o")], capsys, tmp_path / "o", str(config), message)


def test_existing_out_needs_overwrite_and_is_then_replaced(files, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(merge_args(files, out, "-q", "--set", "scaling=1.0")) == 0
    before = read_out(out)
    (out / "stale.txt").write_text("from the old output")
    assert main(merge_args(files, out, "-q", "--set", "scaling=0.5")) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and str(out) in err and err.count("\n") == 1
    assert (out / "stale.txt").exists() and torch.equal(read_out(out)["embed.weight"], before["embed.weight"])
    assert main(merge_args(files, out, "-q", "--set", "scaling=0.5", "--overwrite")) == 0
    after = read_out(out)
    expected = mergelab.merge("ties", files["base"], [files["m1"], files["m2"]], density=0.5, scaling=0.5)
    assert not (out / "stale.txt").exists() and torch.equal(after["embed.weight"], expected["embed.weight"])
    assert leftovers(tmp_path) == []
