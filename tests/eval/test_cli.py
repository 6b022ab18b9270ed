"""`mergelab zoo build / zoo list / eval` end to end on a tiny BERT and a YAML task (tmp_path only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergelab.cli.main import main
from tests.zoo.zoo_tiny import write_suite


def test_zoo_build_list_and_eval(tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = write_suite(tmp_path / "data", ["t1", "t2"])
    cache = str(tmp_path / "cache")
    common = ["--backbone", str(tiny_bert), "--cache-dir", cache]
    assert main(["zoo", "build", str(suite), *common, "--device", "cpu", "--no-progress", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert set(built["experts"]) == {"t1", "t2"} and Path(built["experts"]["t1"], "model.safetensors").exists()

    assert main(["zoo", "list", "--cache-dir", cache]) == 0
    listing = capsys.readouterr().out
    assert "mt8" in listing and "tiny" in listing and "2 experts" in listing

    out = tmp_path / "result.json"
    assert main(["eval", built["experts"]["t2"], "--suite", str(suite), *common, "--json", "--no-progress",
                 "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["accuracy"]["t2"] == pytest.approx(built["accuracy"]["t2"], abs=1e-6)
    assert printed["normalized"]["t2"] == pytest.approx(1.0)

    assert main(["eval", "base", "--suite", str(suite), *common, "--tasks", "t1", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "t1" in table and "t2" not in table and "average" in table


@pytest.mark.parametrize("argv", [
    ["eval", "nowhere", "--suite", "SUITE"],
    ["eval", "base", "--suite", "mt9"],
    ["eval", "base", "--suite", "SUITE", "--tasks", "nope"],
    ["zoo", "build", "mt9"],
    ["zoo", "build", "SUITE", "--epochs", "0"],
])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str],
                                         argv: list[str]) -> None:
    suite = write_suite(tmp_path / "data", ["t1"])
    argv = [str(suite) if a == "SUITE" else a for a in argv]
    argv += ["--backbone", str(tiny_bert), "--cache-dir", str(tmp_path / "cache")]
    if argv[0] == "eval":
        argv.append("--no-progress")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mergelab: error:") and "\n" not in err
    assert not (tmp_path / "cache" / "zoo").exists() or argv[1] != "build"
