"""End-to-end CLI: merges from flags and YAML, plans, and every bad input (exit 2, one line, no output)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelab
from conftest import finetune_of, tiny_state, write_sharded
from mergelab.cli.main import main


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    base = tiny_state(0)
    save_file(base, str(tmp_path / "base.safetensors"))
    write_sharded(finetune_of(base, 1), tmp_path / "m1", max_shard_bytes=150)
    torch.save(finetune_of(base, 2), tmp_path / "m2.bin")
    return {"base": str(tmp_path / "base.safetensors"), "m1": str(tmp_path / "m1"), "m2": str(tmp_path / "m2.bin")}


def merge_args(files: dict[str, str], out: Path, *extra: str) -> list[str]:
    return ["merge", "--method", "ties", "--base", files["base"], "--model", files["m1"], "--model", files["m2"],
            "--set", "density=0.5", "--out", str(out), *extra]


def test_merge_from_flags_and_yaml_agree(files, tmp_path):
    assert main(merge_args(files, tmp_path / "a", "-q")) == 0
    config = tmp_path / "job.yaml"
    config.write_text(f"method: ties\nbase: {files['base']}\nmodels: [{files['m1']}, {files['m2']}]\n"
                      f"parameters: {{density: 0.5}}\nout: {tmp_path / 'b'}\n")
    assert main(["merge", str(config), "--quiet"]) == 0
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    expected = mergelab.merge("ties", files["base"], [files["m1"], files["m2"]], density=0.5)
    for name in expected:
        assert torch.equal(a[name], b[name]) and torch.equal(a[name], expected[name])


def test_python_dash_m_and_methods_listing(files, tmp_path):
    result = subprocess.run([sys.executable, "-m", "mergelab", *merge_args(files, tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and (tmp_path / "o" / "model.safetensors").exists()
    listing = subprocess.run([sys.executable, "-m", "mergelab", "methods", "--json"], capture_output=True, text=True)
    methods = json.loads(listing.stdout)
    assert methods["ties"]["defaults"]["density"] == 0.2 and "source" in methods["ties"]


def test_dry_run_and_plan_print_the_plan_and_write_nothing(files, tmp_path, capsys):
    for argv in (merge_args(files, tmp_path / "o", "--dry-run"), ["plan", *merge_args(files, tmp_path / "o")[1:]]):
        assert main(argv) == 0
        text = capsys.readouterr().out
        for field in ("tensors", "passes", "peak RAM", "shard(s)", "3 over the inputs"):
            assert field in text
        assert not (tmp_path / "o").exists()
    assert main(merge_args(files, tmp_path / "o", "--dry-run", "--device", "cuda")) == 0
    assert "peak GPU" in capsys.readouterr().out


def test_overwrite(files, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(merge_args(files, out, "-q")) == 0
    assert main(merge_args(files, out, "-q")) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(merge_args(files, out, "-q", "--overwrite")) == 0


def _bad_model(tmp_path: Path, change) -> str:
    model = finetune_of(tiny_state(0), 5)
    change(model)
    path = tmp_path / "bad.safetensors"
    save_file(model, str(path))
    return str(path)


BAD = {
    "missing tensor": (lambda m: m.pop("head.scale"), ["bad.safetensors", "head.scale", "missing"]),
    "extra tensor": (lambda m: m.update(extra=torch.zeros(2)), ["bad.safetensors", "extra", "not in the base"]),
    "shape mismatch": (lambda m: m.update({"layer.0.attn.bias": torch.zeros(7)}), ["layer.0.attn.bias", "shape"]),
    "vocabulary size": (lambda m: m.update({"embed.weight": torch.zeros(12, 6)}), ["embed.weight", "vocabulary size 12"]),
    "non-floating": (lambda m: m.update({"layer.0.attn.bias": torch.zeros(6, dtype=torch.int32)}), ["non-floating"]),
    "nan": (lambda m: m["layer.0.mlp.weight"].__setitem__((1, 1), float("nan")), ["bad.safetensors", "layer.0.mlp.weight", "NaN"]),
    "inf": (lambda m: m["head.scale"].fill_(float("inf")), ["head.scale", "Inf"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_bad_models_exit_2_with_one_line_and_no_output(files, tmp_path, capsys, case, method):
    change, expected = BAD[case]
    bad = _bad_model(tmp_path, change)
    out = tmp_path / "out"
    argv = ["merge", "--method", method, "--base", files["base"], "--model", files["m1"], "--model", bad, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("mergelab: error:")
    for word in expected:
        assert word in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "base.safetensors", "m1", "m2.bin"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "nope"], "unknown method"),
    (["--set", "colour=blue"], "no hyperparameter 'colour'"),
    (["--set", "density=2"], "density must be in [0, 1]"),
    (["--set", "merge_func=median"], "not one of"),
    (["--set", "density=high"], "should be a float"),
    (["--dtype", "float16"], "compute dtype"),
    (["--max-shard-size", "lots"], "cannot read size"),
])
def test_bad_options_exit_2(files, tmp_path, capsys, extra, message):
    assert main([*merge_args(files, tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_bad_yaml_and_unsafe_pickle(files, tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("method: ties\nbase: [unclosed\n")
    assert main(["merge", str(config)]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    config.write_text("method: ties\nmodle: x\n")
    assert main(["merge", str(config)]) == 2
    assert "unknown key(s) modle" in capsys.readouterr().err

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    assert main(["merge", "--method", "ties", "--base", files["base"], "--model", str(tmp_path / "evil.pt"),
                 "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert "refusing to unpickle" in captured.err and "executed" not in captured.out
