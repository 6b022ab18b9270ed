"""A state folder is checked, never trusted: checksums, manifest fields, hostile folders, the lock,
duplicate refusal before the merge maths, the progress bar. Every failure: exit 2, one line naming
the file (and tensor), the state folder unchanged byte for byte."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelab
from mergelab.cli.main import main
from mergelab.errors import MergelabError
from mergelab.io.safetensors_header import read_header
from tests.helpers import finetune_of, tiny_state

TENSOR = "layer.0.mlp.weight"


def make_state(tmp_path: Path, method: str = "continual_ta", added: int = 2, n: int = 4) -> tuple[Path, list[Path]]:
    """A state folder after ``added`` adds, and ``n`` fine-tuned model files (the first ``added`` in it)."""
    base = tiny_state(0)
    save_file(base, str(tmp_path / "base.safetensors"))
    models = []
    for i in range(n):
        models.append(tmp_path / f"m{i}.safetensors")
        save_file(finetune_of(base, i), str(models[-1]))
    state = tmp_path / "state"
    assert main(["continual", "init", str(state), "--method", method, "--base", str(tmp_path / "base.safetensors")]) == 0
    for path in models[:added]:
        assert main(["continual", "add", str(state), str(path), "-q"]) == 0
    return state, models


def generation(state: Path) -> Path:
    return state / (state / "CURRENT").read_text().split()[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def poke(path: Path, tensor: str, values: list[float], at: int = 0) -> None:
    """Overwrite float32 elements of one tensor in place, as a disk error or a hand edit would."""
    offset = read_header(str(path)).offsets[tensor] + 4 * at
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack(f"<{len(values)}f", *values))


def reseal(state: Path, edit=None, rehash: bool = False) -> None:
    """Rewrite the manifest (``edit``-ed, tensor checksums recomputed if ``rehash``) and CURRENT's
    checksum of it: a state that is consistent by its checksums but wrong in some other way."""
    gen = generation(state)
    manifest = json.loads((gen / "manifest.json").read_text())
    if rehash:
        tensors = load_file(str(gen / "model.safetensors"))
        for name, entry in manifest["tensors"].items():
            entry["sha256"] = hashlib.sha256(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    if edit is not None:
        edit(manifest)
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (gen / "manifest.json").write_text(text)
    (state / "CURRENT").write_text(f"{gen.name} sha256:{hashlib.sha256(text.encode()).hexdigest()}\n")


def to_format_1(state: Path) -> None:
    """What the state looked like before checksums: no 'format'/'tensors', CURRENT a bare name."""
    gen = generation(state)
    manifest = json.loads((gen / "manifest.json").read_text())
    del manifest["format"], manifest["tensors"]
    (gen / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (state / "CURRENT").write_text(gen.name + "\n")


def refused(argv: list[str], capsys, *needles: str) -> str:
    """Run the CLI: exit 2 with a one-line error containing every needle; returns the error."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mergelab: error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def assert_everything_refused(tmp_path, state, models, capsys, *needles: str) -> None:
    """add, export and status --verify all fail cleanly; the state is untouched, no output written."""
    before = snapshot(state)
    refused(["continual", "add", str(state), str(models[-1])], capsys, *needles)
    refused(["continual", "export", str(state), "--out", str(tmp_path / "out")], capsys, *needles)
    refused(["continual", "status", str(state), "--verify"], capsys, *needles)
    assert snapshot(state) == before
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- tensor content


def test_overwritten_bytes_in_a_state_tensor_are_refused(tmp_path, capsys):
    state, models = make_state(tmp_path)
    poke(generation(state) / "model.safetensors", TENSOR, [1.5, -2.0])  # finite, plausible values
    assert_everything_refused(tmp_path, state, models, capsys, str(generation(state) / "model.safetensors"),
                              f"tensor '{TENSOR}'", "does not match its checksum")
    assert main(["continual", "status", str(state)]) == 0  # headers fine: only --verify reads the data
    assert "--verify checks every tensor" in capsys.readouterr().out


@pytest.mark.parametrize("format_1", [False, True], ids=["checksummed", "format-1"])
def test_nan_in_a_state_tensor_is_refused(tmp_path, capsys, format_1):
    state, models = make_state(tmp_path)
    poke(generation(state) / "model.safetensors", TENSOR, [float("nan")], at=3)
    to_format_1(state) if format_1 else reseal(state, rehash=True)  # the checksums agree with the NaN
    assert_everything_refused(tmp_path, state, models, capsys, f"tensor '{TENSOR}'", "NaN or Inf")


@pytest.mark.parametrize("change", ["missing", "extra", "float16", "shape"])
def test_state_file_with_a_wrong_tensor_set_is_refused(tmp_path, capsys, change):
    state, models = make_state(tmp_path)
    path = generation(state) / "model.safetensors"
    tensors = load_file(str(path))
    name = {"missing": "layer.0.attn.bias", "extra": "junk", "float16": TENSOR, "shape": TENSOR}[change]
    if change == "missing":
        del tensors[name]
    elif change == "extra":
        tensors[name] = torch.zeros(3)
    elif change == "float16":
        tensors[name] = tensors[name].half()
    else:
        tensors[name] = tensors[name].reshape(-1)
    save_file(tensors, str(path))
    assert_everything_refused(tmp_path, state, models, capsys, f"tensor '{name}'")
    refused(["continual", "status", str(state)], capsys, f"tensor '{name}'")  # the headers tell


def test_state_whose_merge_would_overflow_is_not_committed(tmp_path, capsys):
    base = {"w": torch.zeros(4)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for i in (1, 2):
        save_file({"w": torch.full((4,), 3e38)}, str(tmp_path / f"m{i}.safetensors"))
    state = tmp_path / "state"
    main(["continual", "init", str(state), "--method", "continual_ta", "--base", str(tmp_path / "base.safetensors")])
    assert main(["continual", "add", str(state), str(tmp_path / "m1.safetensors")]) == 0
    before = snapshot(state)
    refused(["continual", "add", str(state), str(tmp_path / "m2.safetensors"), "--force"], capsys,
            "tensor 'w'", "overflows float32")
    assert snapshot(state) == before


# ---------------------------------------------------------------- manifest and CURRENT


def test_edited_manifest_is_refused_by_its_checksum(tmp_path, capsys):
    state, models = make_state(tmp_path)
    manifest = generation(state) / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"scaling": 0.3', '"scaling": 3.0'))
    assert_everything_refused(tmp_path, state, models, capsys, str(manifest), "checksum in CURRENT")
    refused(["continual", "status", str(state)], capsys, "checksum in CURRENT")


def _set(path: list[str], value):
    def edit(manifest):
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


MANIFEST_EDITS = {
    "norm_sum NaN": (_set(["scalars", "norm_sum"], float("nan")), "scalar 'norm_sum'"),
    "norm_sum negative": (_set(["scalars", "norm_sum"], -1.0), "scalar 'norm_sum'"),
    "norm_sum string": (_set(["scalars", "norm_sum"], "1.0"), "scalar 'norm_sum'"),
    "state_norm_sq missing": (lambda m: m["scalars"].pop("state_norm_sq"), "scalar 'state_norm_sq' is missing"),
    "step string": (_set(["step"], "2"), "'step'"),
    "step bool": (_set(["step"], True), "'step'"),
    "step not the generation": (_set(["step"], 3), "the generation is gen-000002"),
    "models too few": (lambda m: m["models"].pop(), "1 models listed for step 2"),
    "model hash": (lambda m: m["models"][0].update(sha256="xyz"), "model 1"),
    "hparams wrong": (_set(["hparams", "scaling"], "big"), "scaling='big' should be a float"),
    "hparams list": (_set(["hparams"], [1]), "'hparams'"),
    "method unknown": (_set(["method"], "nope"), "unknown continual method 'nope'"),
    "future format": (_set(["format"], 99), "state format 99 was written by a newer mergelab"),
    "tensor file outside": (lambda m: m["tensors"][TENSOR].update(file="../m0.safetensors"), f"tensor '{TENSOR}'"),
    "tensor checksum": (lambda m: m["tensors"][TENSOR].update(sha256=None), f"tensor '{TENSOR}'"),
    "tensor missing": (lambda m: m["tensors"].pop(TENSOR), f"tensor '{TENSOR}'"),
}


@pytest.mark.parametrize("edit", list(MANIFEST_EDITS))
def test_manifest_fields_are_validated(tmp_path, capsys, edit):
    state, models = make_state(tmp_path)
    change, needle = MANIFEST_EDITS[edit]
    reseal(state, change)  # consistent checksums: the fields themselves must be checked
    assert_everything_refused(tmp_path, state, models, capsys, "manifest.json", needle)
    refused(["continual", "status", str(state)], capsys, needle)


@pytest.mark.parametrize("pointer", ["gen-000007\n", "../../etc\n", "\xff\xfe garbage", "gen-000002 sha256:abc\n", ""])
def test_bad_current_pointer_is_refused(tmp_path, capsys, pointer):
    state, models = make_state(tmp_path)
    (state / "CURRENT").write_bytes(pointer.encode("latin-1"))
    needle = "gen-000007, which is missing" if pointer.startswith("gen-000007") else "corrupt CURRENT"
    assert_everything_refused(tmp_path, state, models, capsys, str(state), needle)


def test_format_1_state_is_read_with_a_warning_and_upgraded_by_the_next_add(tmp_path, capsys, caplog):
    state, models = make_state(tmp_path)
    to_format_1(state)
    expected = mergelab.ContinualMerger.load(state).merged()
    assert "written before checksums" in caplog.text
    assert main(["continual", "status", str(state)]) == 0
    assert "no checksums" in capsys.readouterr().out
    assert main(["continual", "add", str(state), str(models[2])]) == 0
    manifest = json.loads((generation(state) / "manifest.json").read_text())
    assert manifest["format"] == 2 and set(manifest["tensors"]) == {k for k, v in expected.items() if v.is_floating_point()}
    assert (state / "CURRENT").read_text().split()[1].startswith("sha256:")
    assert main(["continual", "status", str(state), "--verify"]) == 0
    assert "every tensor matches its checksum" in capsys.readouterr().out


# ---------------------------------------------------------------- folders that are not (quite) a state


def test_load_of_something_that_is_not_a_state(tmp_path, capsys):
    state, models = make_state(tmp_path)
    model_folder = tmp_path / "model"
    model_folder.mkdir()
    save_file(tiny_state(0), str(model_folder / "model.safetensors"))
    for path, why in [(model_folder, "no CURRENT file"), (models[0], "not a folder"), (tmp_path / "nowhere", "no such folder")]:
        refused(["continual", "status", str(path)], capsys, str(path), why)
        with pytest.raises(MergelabError, match=why):
            mergelab.ContinualMerger.load(path)


def test_stray_files_in_a_generation_are_ignored(tmp_path, capsys, caplog):
    state, models = make_state(tmp_path)
    assert main(["continual", "export", str(state), "--out", str(tmp_path / "before")]) == 0
    gen = generation(state)
    # a leftover index pointing at other weights would have been preferred by a plain model-folder reader
    save_file({k: v * 0 for k, v in load_file(str(gen / "model.safetensors")).items()}, str(gen / "evil.safetensors"))
    (gen / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "evil.safetensors" for k in load_file(str(gen / "model.safetensors"))}}))
    assert main(["continual", "export", str(state), "--out", str(tmp_path / "after")]) == 0
    assert "ignoring files the state manifest does not list: evil.safetensors, model.safetensors.index.json" in caplog.text
    before, after = load_file(str(tmp_path / "before" / "model.safetensors")), load_file(str(tmp_path / "after" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert main(["continual", "add", str(state), str(models[2])]) == 0  # the next generation is clean
    assert sorted(p.name for p in generation(state).iterdir()) == ["manifest.json", "model.safetensors"]


def test_model_whose_tensors_differ_from_the_base_is_refused(tmp_path, capsys):
    state, models = make_state(tmp_path)
    before = snapshot(state)
    good = load_file(str(models[3]))
    for change, name in [("missing", "layer.0.attn.bias"), ("extra", "junk"), ("shape", TENSOR)]:
        tensors = dict(good)
        if change == "missing":
            del tensors[name]
        elif change == "extra":
            tensors[name] = torch.zeros(2)
        else:
            tensors[name] = tensors[name].reshape(-1)
        path = tmp_path / f"bad-{change}.safetensors"
        save_file(tensors, str(path))
        refused(["continual", "add", str(state), str(path)], capsys, str(path), f"tensor '{name}'")
    nan = dict(good, **{TENSOR: torch.full_like(good[TENSOR], float("nan"))})
    save_file(nan, str(tmp_path / "nan.safetensors"))
    refused(["continual", "add", str(state), str(tmp_path / "nan.safetensors")], capsys, f"tensor '{TENSOR}'", "NaN")
    assert snapshot(state) == before


# ---------------------------------------------------------------- concurrent adds

HOLDER = """
import sys
from pathlib import Path
from mergelab.continual.state import locked
with locked(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_add_while_another_process_holds_the_state_is_refused(tmp_path, capsys):
    state, models = make_state(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(state)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = snapshot(state)
        refused(["continual", "add", str(state), str(models[2])], capsys, str(state), f"locked by pid {holder.pid}")
        assert snapshot(state) == before
    finally:
        holder.communicate("")
    assert main(["continual", "add", str(state), str(models[2])]) == 0  # released when the holder ended


def test_add_on_a_merger_whose_state_moved_on_is_refused(tmp_path):
    state, models = make_state(tmp_path)
    first, second = mergelab.ContinualMerger.load(state), mergelab.ContinualMerger.load(state)
    first.add(str(models[2]))
    with pytest.raises(MergelabError, match="state changed since it was loaded"):
        second.add(str(models[3]))  # would have replaced the first's step 3 with its own
    again = mergelab.ContinualMerger.load(state)
    assert again.step == 3 and again.added[-1]["name"] == str(models[2])


def test_two_adds_racing_never_lose_or_mix_a_step(tmp_path, capsys):
    base = {f"w{i}": torch.randn(256, 256, generator=torch.Generator().manual_seed(i)) for i in range(40)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for i in (1, 2, 3):
        save_file({k: v + 0.01 * i for k, v in base.items()}, str(tmp_path / f"m{i}.safetensors"))
    state = tmp_path / "state"
    main(["continual", "init", str(state), "--method", "continual_ta", "--base", str(tmp_path / "base.safetensors")])
    assert main(["continual", "add", str(state), str(tmp_path / "m1.safetensors")]) == 0
    procs = [subprocess.Popen([sys.executable, "-m", "mergelab", "continual", "add", str(state),
                               str(tmp_path / f"m{i}.safetensors"), "-q"], stderr=subprocess.PIPE, text=True)
             for i in (2, 3)]
    results = [(p.wait(), p.communicate()[1]) for p in procs]
    added = [f"m{i}" for i, (rc, _) in zip((2, 3), results, strict=True) if rc == 0]
    for rc, err in results:
        assert rc == 0 or (rc == 2 and ("locked by pid" in err or "state changed since it was loaded" in err)), err
    merger = mergelab.ContinualMerger.load(state)
    assert merger.step == 1 + len(added) and sorted(Path(m["name"]).stem for m in merger.added[1:]) == added
    merger.verify()


# ---------------------------------------------------------------- duplicate refusal, progress


def test_duplicate_and_corrupt_state_are_refused_before_any_merge_maths(tmp_path, capsys, monkeypatch):
    state, models = make_state(tmp_path, "opcm")
    calls = []
    real = mergelab.continual.rules.opcm.project_out
    monkeypatch.setattr(mergelab.continual.rules.opcm, "project_out", lambda *a: calls.append(1) or real(*a))
    refused(["continual", "add", str(state), str(models[1])], capsys, "already added as step 2")
    poke(generation(state) / "model.safetensors", "embed.weight", [0.25], at=60)
    refused(["continual", "add", str(state), str(models[2])], capsys, "tensor 'embed.weight'", "checksum")
    assert calls == []  # no SVD was started for either
    assert main(["continual", "add", str(state), str(models[1]), "--force", "-q"]) == 2  # state still corrupt


def test_add_shows_progress_on_a_terminal_and_quiet_silences_it(tmp_path, capsys, monkeypatch):
    state, models = make_state(tmp_path, added=1)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    capsys.readouterr()
    assert main(["continual", "add", str(state), str(models[1])]) == 0
    out, err = capsys.readouterr()
    assert "check" in err and "continual_ta" in err and "B/s" in err  # the tqdm bars
    assert out == f"step 2: added {models[1]}\n"
    assert main(["continual", "add", str(state), str(models[2]), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def test_a_failed_commit_leaves_the_state_and_the_merger_as_they_were(tmp_path, capsys, monkeypatch):
    state, models = make_state(tmp_path)
    before = snapshot(state)
    real = mergelab.continual.state.write_text

    def disk_full_at_current(path, text):
        if path.name == "CURRENT":
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(mergelab.continual.state, "write_text", disk_full_at_current)
    refused(["continual", "add", str(state), str(models[2])], capsys, str(state), "cannot write the state: No space")
    assert snapshot(state) == before  # the new generation is gone too
    merger = mergelab.ContinualMerger.load(state)
    with pytest.raises(MergelabError, match="No space"):
        merger.add(str(models[2]))
    assert merger.step == 2 and len(merger.added) == 2
    monkeypatch.undo()
    merger.add(str(models[2]))  # the same merger carries on
    assert mergelab.ContinualMerger.load(state).step == 3


def test_continual_ties_majority_patch_is_checksummed_as_written(tmp_path, capsys):
    """TIES re-merges a tied parameter after its tensor was written (here a[0, 0]: state -0.5 and
    tau +0.5 tie, the model-wide majority is negative): its checksum must be of the patched bytes."""
    base = {"a": torch.zeros(8, 8), "b": torch.zeros(8)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({k: torch.full_like(v, -1.0) for k, v in base.items()}, str(tmp_path / "m0.safetensors"))
    m1 = {k: torch.full_like(v, -2.0) for k, v in base.items()}
    m1["a"][0, 0] = 0.5
    save_file(m1, str(tmp_path / "m1.safetensors"))
    state = str(tmp_path / "state")
    main(["continual", "init", state, "--method", "continual_ties", "--base", str(tmp_path / "base.safetensors"),
          "--set", "density=1.0", "--set", "scaling=0.5"])
    for i in (0, 1):
        assert main(["continual", "add", state, str(tmp_path / f"m{i}.safetensors"), "-q"]) == 0
    assert main(["continual", "status", state, "--verify"]) == 0
    assert "every tensor matches its checksum" in capsys.readouterr().out
    # -0.5 + 0.5 * (majority-sign merge of [-0.5, 0.5] = -0.5) = -0.75, against -0.5 + 0.5 * 0 unpatched
    assert load_file(str(generation(tmp_path / "state") / "model.safetensors"))["a"][0, 0].item() == -0.75


# ---------------------------------------------------------------- OPCM's low_rank option


def test_opcm_states_saved_before_low_rank_continue_with_the_official_rule(tmp_path):
    state, models = make_state(tmp_path, method="opcm", added=1)
    assert mergelab.ContinualMerger.load(state).hparams["low_rank"] == "auto"  # new states: the stable rule
    reseal(state, lambda manifest: (manifest["hparams"].pop("low_rank"), manifest["hparams"].pop("rank_tol")))
    merger = mergelab.ContinualMerger.load(state)  # as written by an earlier mergelab
    assert merger.hparams["low_rank"] == "official"
    merger.add(str(models[1]))
    saved = json.loads((generation(state) / "manifest.json").read_text())
    assert saved["hparams"]["low_rank"] == "official"


def test_opcm_rank_tol_is_validated():
    with pytest.raises(MergelabError, match="rank_tol"):
        mergelab.ContinualMerger("opcm", base=tiny_state(0), rank_tol=1.5)
    with pytest.raises(MergelabError, match="low_rank"):
        mergelab.ContinualMerger("opcm", base=tiny_state(0), low_rank="sometimes")
