"""Durable state: save/load mid-sequence, atomic adds under SIGKILL, constant memory, the CLI."""

from __future__ import annotations

import json
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
from tests.helpers import assert_close, finetune_of, tiny_state

METHODS = [("opcm", {"alpha": 0.4}), ("continual_ta", {"scaling": 0.3}), ("continual_ties", {}), ("swa", {})]


def write_models(folder: Path, n: int, seed: int = 0) -> tuple[Path, list[Path]]:
    base = tiny_state(seed)
    save_file(base, str(folder / "base.safetensors"))
    paths = []
    for i in range(n):
        path = folder / f"m{i}.safetensors"
        save_file(finetune_of(base, seed + i), str(path))
        paths.append(path)
    return folder / "base.safetensors", paths


@pytest.mark.parametrize(("method", "hp"), METHODS)
def test_save_load_mid_sequence_equals_uninterrupted(tmp_path, method, hp):
    base, models = write_models(tmp_path, 4)
    straight = mergelab.ContinualMerger(method, str(base), **hp)
    for path in models:
        straight.add(str(path))
    resumed = mergelab.ContinualMerger(method, str(base), **hp)
    resumed.add(str(models[0]))
    resumed.add(str(models[1]))
    resumed.save(tmp_path / "state")
    resumed = mergelab.ContinualMerger.load(tmp_path / "state")
    for path in models[2:]:
        resumed.add(str(path))
    again = mergelab.ContinualMerger.load(tmp_path / "state")  # every add was committed
    assert again.step == 4 and [m["name"] for m in again.added][2:] == [str(p) for p in models[2:]]
    expected = straight.merged()
    for merged in (resumed.merged(), again.merged()):
        for name, tensor in expected.items():
            assert_close(merged[name], tensor)


def test_cli_init_add_export_status(tmp_path, capsys):
    base, models = write_models(tmp_path, 3)
    state = str(tmp_path / "state")
    assert main(["continual", "init", state, "--method", "opcm", "--base", str(base), "--set", "alpha=0.5"]) == 0
    for path in models:
        assert main(["continual", "add", state, str(path)]) == 0
    assert main(["continual", "add", state, str(models[1])]) == 2
    assert "already added as step 2" in capsys.readouterr().err
    assert main(["continual", "status", state]) == 0
    assert "step    3" in capsys.readouterr().out
    out = tmp_path / "merged"
    assert main(["continual", "export", state, "--out", str(out)]) == 0
    reference = mergelab.ContinualMerger("opcm", str(base), alpha=0.5)
    for path in models:
        reference.add(str(path))
    exported = load_file(str(out / "model.safetensors"))
    for name, tensor in reference.merged().items():
        assert torch.equal(exported[name], tensor)
    manifest = json.loads((tmp_path / "state" / "gen-000003" / "manifest.json").read_text())
    assert manifest["step"] == 3 and len(manifest["models"]) == 3 and manifest["method"] == "opcm"
    assert main(["continual", "add", str(tmp_path / "nowhere"), str(models[0])]) == 2


def big_state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"layer.{i}.weight": torch.randn(256, 256, generator=gen) for i in range(60)}


def test_kill_during_add_leaves_previous_state(tmp_path):
    base = big_state(0)
    save_file(base, str(tmp_path / "base.safetensors"))
    for i in (1, 2):
        save_file({k: v + 0.01 * torch.randn(v.shape) for k, v in base.items()}, str(tmp_path / f"m{i}.safetensors"))
    state = tmp_path / "state"
    cm = mergelab.ContinualMerger("continual_ta", str(tmp_path / "base.safetensors"), scaling=1.0)
    cm.add(str(tmp_path / "m1.safetensors"))
    cm.save(state)
    before = cm.merged()
    killed_mid_write = 0
    for _attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "mergelab", "continual", "add", str(state),
                                 str(tmp_path / "m2.safetensors")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if any(".mergelab-tmp-" in p.name for p in state.iterdir()):
                proc.send_signal(signal.SIGKILL)
                killed_mid_write += 1
                break
            time.sleep(0.001)
        proc.wait()
        after = mergelab.ContinualMerger.load(state)
        if after.step == 1:
            for name, tensor in before.items():
                assert torch.equal(after.merged()[name], tensor)  # the old state, whole
        else:  # the add finished before the kill: the new state, whole
            assert after.step == 2
            break
    assert killed_mid_write >= 1
    resumed = mergelab.ContinualMerger.load(state)
    if resumed.step == 1:
        resumed.add(str(tmp_path / "m2.safetensors"))
    assert not [p for p in state.iterdir() if ".mergelab-" in p.name]  # temporaries cleaned up
    expected = mergelab.merge("task_arithmetic", str(tmp_path / "base.safetensors"),
                              [str(tmp_path / "m1.safetensors"), str(tmp_path / "m2.safetensors")], scaling=1.0)
    for name, tensor in resumed.merged().items():
        assert_close(tensor, expected[name])


MEMORY_PROBE = r"""
import json, sys, psutil, torch
from safetensors.torch import save_file
import mergelab
folder = sys.argv[1]
gen = torch.Generator().manual_seed(0)
base = {f"w{i}": torch.randn(256, 512, generator=gen) for i in range(16)}  # 8 MB
save_file(base, f"{folder}/base.safetensors")
cm = mergelab.ContinualMerger("opcm", f"{folder}/base.safetensors")
cm.save(f"{folder}/state")
rss = []
for t in range(20):
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}, f"{folder}/m.safetensors")
    cm.add(f"{folder}/m.safetensors", name=f"m{t}")
    rss.append(psutil.Process().memory_info().rss)
print(json.dumps(rss))
"""


def test_add_memory_does_not_grow_with_steps(tmp_path):
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True, check=True)
    rss = json.loads(out.stdout)
    # holding past models would add 8 MB per step (~80 MB over the last ten); allocator and
    # page-cache noise is about +-10 MB
    growth = max(rss[10:]) - max(rss[:10])
    assert growth < 3 * 8 * 2**20, f"peak RSS of adds 11-20 exceeds adds 1-10 by {growth / 2**20:.1f} MB"
