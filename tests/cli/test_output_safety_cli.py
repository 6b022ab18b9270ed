"""The output never destroys an input, never holds Inf from an overflowing cast, and an interrupted
run (SIGINT, SIGTERM) leaves nothing: through the CLI on real files, for merges and continual states."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelab
from mergelab.cli.main import main
from mergelab.errors import MergelabError
from tests.helpers import finetune_of, tiny_state, write_sharded


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (following no symlink), by relative path: to prove nothing changed."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


@pytest.fixture
def job(tmp_path: Path) -> dict[str, Path]:
    """A base folder and a model folder (both sharded, with an index) and a model file, in ``tmp_path/in``."""
    inputs = tmp_path / "in"
    base = tiny_state(0)
    write_sharded(base, inputs / "base", max_shard_bytes=150)
    write_sharded(finetune_of(base, 1), inputs / "m1", max_shard_bytes=150)
    save_file(finetune_of(base, 2), str(inputs / "m2.safetensors"))
    return {"root": tmp_path, "in": inputs, "base": inputs / "base", "m1": inputs / "m1", "m2": inputs / "m2.safetensors"}


def merge_argv(job: dict[str, Path], out: str, *extra: str, command: str = "merge") -> list[str]:
    return [command, "--method", "task_arithmetic", "--base", str(job["base"]), "--model", str(job["m1"]),
            "--model", str(job["m2"]), "--out", out, "-q", *extra]


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], *fragments: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mergelab: error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def out_spellings(job: dict[str, Path]) -> list[tuple[str, str]]:
    """(--out as typed, what the error names) for outputs that are, hold or lie in an input."""
    root = job["root"]
    (root / "link").symlink_to(job["base"], target_is_directory=True)
    (root / "sub").mkdir()
    shard = sorted(job["m1"].glob("model-00001-of-*.safetensors"))[0]
    return [
        (str(job["base"]), "is an input of this job"),
        (str(job["base"]) + "/", "is an input of this job"),
        (str(root / "sub" / ".." / "in" / "base"), "is an input of this job"),
        (str(root / "link"), "is an input of this job"),  # a symlink to the base folder
        ("in/base", "is an input of this job"),  # relative (the tests run in tmp_path)
        (str(job["m1"]), "is an input of this job"),
        (str(job["m2"]), "is an input of this job"),
        (str(shard), "is an input of this job"),  # one shard of the indexed model m1
        (str(job["base"] / "merged"), "inside an input folder"),
        (str(root / "link" / "merged.safetensors"), "inside an input folder"),
        (str(job["in"]), "is inside the output"),  # --overwrite would delete every input
        (str(root), "is inside the output"),
    ]


@pytest.mark.parametrize("command", ["merge", "merge --dry-run", "plan"])
def test_an_input_is_never_the_output_or_in_it(job, capsys, monkeypatch, command):
    monkeypatch.chdir(job["root"])
    before = snapshot(job["in"])
    for out, message in out_spellings(job):
        extra = ["--overwrite", "--dry-run"] if command == "merge --dry-run" else ["--overwrite"]
        refused(merge_argv(job, out, *extra, command=command.split()[0]), capsys, str(Path(out)), message)
        assert snapshot(job["in"]) == before, out
    assert sorted(p.name for p in job["root"].iterdir()) == ["in", "link", "sub"]  # no temporary left


def test_the_api_refuses_an_input_as_output_too(job):
    before = snapshot(job["in"])
    for out in (job["base"], job["m2"], job["base"] / "x", job["in"]):
        with pytest.raises(MergelabError, match="input"):
            mergelab.merge("task_arithmetic", str(job["base"]), [str(job["m1"]), str(job["m2"])], out=out, overwrite=True)
        with pytest.raises(MergelabError, match="input"):
            mergelab.plan("task_arithmetic", str(job["base"]), [str(job["m1"]), str(job["m2"])], out=out, overwrite=True)
    assert snapshot(job["in"]) == before


def test_an_output_beside_the_inputs_is_fine(job):
    out = mergelab.merge("task_arithmetic", str(job["base"]), [str(job["m1"])], out=job["in"] / "merged")
    assert set(load_file(str(out / "model.safetensors"))) == set(tiny_state(0))


def test_overflowing_the_output_dtype_is_refused_and_nothing_written(tmp_path, capsys):
    base = {"w": torch.full((4,), 60000.0, dtype=torch.float16), "b": torch.ones(3, dtype=torch.float16)}
    model = {"w": torch.full((4,), 65000.0, dtype=torch.float16), "b": torch.ones(3, dtype=torch.float16)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(model, str(tmp_path / "m.safetensors"))
    for out in ("o", "o.safetensors"):  # 60000 + 3 * 5000 = 75000 > 65504, the float16 maximum
        argv = ["merge", "--method", "task_arithmetic", "--base", str(tmp_path / "base.safetensors"), "--model",
                str(tmp_path / "m.safetensors"), "--set", "scaling=3", "--out", str(tmp_path / out), "-q"]
        refused(argv, capsys, str(tmp_path / out), "tensor 'w'", "overflow the output dtype float16")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "m.safetensors"]
    with pytest.raises(MergelabError, match="tensor 'w': merged values overflow the output dtype float16"):
        mergelab.merge("task_arithmetic", base, [model], scaling=3.0)  # in memory as well
    # in range: merged and written
    argv[argv.index("scaling=3")] = "scaling=0.5"
    assert main(argv) == 0
    expected = (base["w"].float() + 0.5 * (model["w"].float() - base["w"].float())).half()
    assert torch.equal(load_file(str(tmp_path / "o.safetensors"))["w"], expected)


def test_continual_export_refuses_an_overflow(tmp_path, capsys):
    base = {"w": torch.full((4,), 60000.0, dtype=torch.float16)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({"w": torch.full((4,), 65000.0, dtype=torch.float16)}, str(tmp_path / "m.safetensors"))
    state = tmp_path / "state"
    assert main(["continual", "init", str(state), "--method", "continual_ta", "--base", str(tmp_path / "base.safetensors"),
                 "--set", "scaling=3"]) == 0
    assert main(["continual", "add", str(state), str(tmp_path / "m.safetensors")]) == 0
    capsys.readouterr()
    refused(["continual", "export", str(state), "--out", str(tmp_path / "o")], capsys, str(tmp_path / "o"),
            "tensor 'w'", "overflow the output dtype float16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "m.safetensors", "state"]


@pytest.fixture
def state(tmp_path: Path) -> dict[str, Path]:
    """A continual state (one model added) whose base is a model folder."""
    base = tiny_state(0)
    write_sharded(base, tmp_path / "base", max_shard_bytes=150)
    save_file(finetune_of(base, 1), str(tmp_path / "m.safetensors"))
    assert main(["continual", "init", str(tmp_path / "state"), "--method", "continual_ta", "--base", str(tmp_path / "base")]) == 0
    assert main(["continual", "add", str(tmp_path / "state"), str(tmp_path / "m.safetensors")]) == 0
    return {"root": tmp_path, "state": tmp_path / "state", "base": tmp_path / "base"}


def test_continual_export_never_replaces_the_state_or_the_base(state, capsys):
    root = state["root"]
    capsys.readouterr()
    before = snapshot(root)
    for out, message in [(state["state"], "is an input of this job"), (str(state["state"]) + "/.", "is an input of this job"),
                         (state["state"] / "x", "inside an input folder"), (state["base"], "is an input of this job"),
                         (state["base"] / "x", "inside an input folder"), (root, "is inside the output")]:
        refused(["continual", "export", str(state["state"]), "--out", str(out), "--overwrite"], capsys, message)
        assert snapshot(root) == before, out
    assert main(["continual", "export", str(state["state"]), "--out", str(root / "o")]) == 0
    assert main(["continual", "status", str(state["state"])]) == 0  # the state is whole


def test_continual_init_wants_a_new_or_empty_folder(state, capsys):
    root = state["root"]
    (root / "empty").mkdir()
    (root / "file").write_text("mine")
    capsys.readouterr()
    before = snapshot(root)
    init = ["continual", "init", "--method", "continual_ta", "--base", str(state["base"])]
    for target, message in [(state["base"], "folder exists and is not empty"), (root / "file", "exists and is not a folder"),
                            (state["base"] / "state", "inside an input folder"),
                            (state["state"], "already holds a continual-merging state")]:
        refused([*init[:2], str(target), *init[2:]], capsys, str(target), message)
        assert snapshot(root) == before, target
    assert main([*init[:2], str(root / "empty"), *init[2:]]) == 0
    assert (root / "empty" / "CURRENT").is_file()


HOLD = """
import glob, signal, sys, time
from pathlib import Path
from mergelab.engine import stream
from mergelab.cli.main import main
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started with SIGINT ignored
real, calls = stream.merge_tensor, []
def merge_tensor(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:  # two tensors merged and handed to the writer: say where, then wait to be stopped
        Path(sys.argv[1]).write_text(glob.glob(sys.argv[2] + "/.out.mergelab-tmp-*")[0])
        while True:
            time.sleep(0.01)
    return real(*args, **kwargs)
stream.merge_tensor = merge_tensor
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_stop_a_merge_cleanly(job, sig, code):
    ready = job["root"] / "ready"
    out = job["root"] / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(ready), str(job["root"]), *merge_argv(job, str(out))],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        while not ready.exists() and proc.poll() is None:
            time.sleep(0.01)  # the merge is under way once the file appears
        assert Path(ready.read_text()).is_dir()  # its temporary folder, half written
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == "mergelab: interrupted; nothing was written"
    assert sorted(p.name for p in job["root"].iterdir()) == ["in", "ready"]  # no temporary, no output


LATE = """
import os, signal, sys
from mergelab.cli.main import main
real = os.replace
def replace(src, dst):
    if "-old-" in str(dst):  # the old output is being moved aside: the replace has begun
        os.kill(os.getpid(), signal.SIGTERM)
    real(src, dst)
os.replace = replace
sys.exit(main(sys.argv[1:]))
"""


def test_a_sigterm_during_the_final_renames_waits_for_them(job):
    out = job["root"] / "out"
    assert main(merge_argv(job, str(out), "--set", "scaling=1.0")) == 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", LATE, *merge_argv(job, str(out), "--set", "scaling=0.5", "--overwrite")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip() == f"mergelab: interrupted after {out} was written"
    expected = mergelab.merge("task_arithmetic", str(job["base"]), [str(job["m1"]), str(job["m2"])], scaling=0.5)
    written = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert sorted(p.name for p in job["root"].iterdir()) == ["in", "out"]  # the old output removed, nothing beside
