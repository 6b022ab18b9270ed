"""An input truncated by another process while the merge reads it: one line naming the file, exit 2,
nothing left at --out or beside it (the memory-mapped read would otherwise die of SIGBUS, exit 135)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergelab.io import sigbus
from tests.helpers import finetune_of, tiny_state

pytestmark = pytest.mark.skipif(not sigbus.available(), reason="no C++ compiler: no SIGBUS handler (see io/sigbus.py)")

SCRIPT = Path(__file__).with_name("truncating_merge.py")
LATE = "layer.0.norm.weight"  # late in the output order: earlier shards are written when it is read


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("victim", ["m1.safetensors", "m2.bin"])
@pytest.mark.parametrize(("method", "written"), [("task_arithmetic", True), ("ties", False)])  # ties: statistics pass
def test_input_truncated_while_read_is_a_one_line_error(tmp_path, victim, method, written):
    base = tiny_state(0)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(finetune_of(base, 1), str(tmp_path / "m1.safetensors"))
    torch.save(finetune_of(base, 2), tmp_path / "m2.bin")
    others = {p: _digest(p) for p in (tmp_path / "base.safetensors", tmp_path / "m1.safetensors", tmp_path / "m2.bin")
              if p.name != victim}
    report = tmp_path / "report.json"
    argv = ["merge", "--method", method, "--base", str(tmp_path / "base.safetensors"), "--model",
            str(tmp_path / "m1.safetensors"), "--model", str(tmp_path / "m2.bin"), "--out", str(tmp_path / "out"),
            "--max-shard-size", "100B", "-q"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(sys.modules["mergelab"].__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / victim), LATE, str(report), *argv],
                          capture_output=True, text=True, timeout=300, env=env)
    expected = f"mergelab: error: {tmp_path / victim}: file changed size while being read (truncated by another process?)\n"
    assert (done.returncode, done.stderr) == (2, expected)
    assert bool(json.loads(report.read_text())) == written  # output shards were on disk when the read faulted
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base.safetensors", "m1.safetensors", "m2.bin",
                                                                 "report.json"])
    assert (tmp_path / victim).stat().st_size == 0 and all(_digest(p) == d for p, d in others.items())


FOREIGN = """
import mmap, os, signal, sys
from mergelab.io import sigbus
def mapped(path):
    with open(path, "wb") as handle:
        handle.write(bytes(8192))
    handle = open(path, "r+b")
    return handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
_, ours = mapped(sys.argv[1] + ".ours")
_, other = mapped(sys.argv[1] + ".other")
assert sigbus.watch_mmap(ours, sys.argv[1] + ".ours") is not None
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGBUS)
else:
    os.truncate(sys.argv[1] + ".other", 0)
    other[100]  # faults in a mapping nobody watches
print("survived")
"""


@pytest.mark.parametrize("how", ["kill", "fault elsewhere"])
def test_other_bus_errors_still_end_the_process_as_before(tmp_path, how):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(sys.modules["mergelab"].__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", FOREIGN, str(tmp_path / "map"), how], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == -signal.SIGBUS and "survived" not in done.stdout and "mergelab" not in done.stderr, done
