"""What a run leaves when it is killed, and how the next run tidies it; output modes; I/O errors
while committing; what is copied beside the weights (sentence-transformers modules, the model card)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelab
from mergelab.cli.main import main
from mergelab.io import leftovers as leftovers_module
from mergelab.io import writer as writer_module
from mergelab.io.writer import CheckpointWriter
from tests.helpers import finetune_of, tiny_state, write_sharded


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def left_beside(folder: Path) -> list[str]:
    """The kinds (tmp, new, old) of the hidden folders beside outputs in ``folder``."""
    return sorted(p.name.split(".mergelab-")[1][:3] for p in folder.iterdir() if ".mergelab-" in p.name)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    base = tiny_state(0)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(finetune_of(base, 1), str(tmp_path / "m.safetensors"))
    return {"root": tmp_path, "base": tmp_path / "base.safetensors", "m": tmp_path / "m.safetensors", "out": tmp_path / "out"}


def merged(files: dict[str, Path], scaling: float) -> dict[str, torch.Tensor]:
    return mergelab.merge("task_arithmetic", str(files["base"]), [str(files["m"])], scaling=scaling)


def read_out(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# Merges files[base] + files[m] into OUT with --overwrite and SIGKILLs itself at POINT:
#   write    after two tensors were written             mark   before the complete folder is marked new
#   aside    before the old output is moved aside       place  before the new output is renamed into place
#   after    after it was, before the old one is removed
KILLER = """
import os, signal, sys
import mergelab
from mergelab.io import writer
base, model, out, point = sys.argv[1:5]
real_replace, real_write = os.replace, writer.CheckpointWriter.write
def kill():
    os.kill(os.getpid(), signal.SIGKILL)
def replace(src, dst):
    src, dst = str(src), str(dst)
    step = "mark" if "-tmp-" in src and "-new-" in dst else "aside" if "-old-" in dst else "place" if dst == out else ""
    if step == point:
        kill()
    real_replace(src, dst)
    if step == "place" and point == "after":
        kill()
def write(self, name, tensor):
    real_write(self, name, tensor)
    if point == "write" and self._next == 2:
        kill()
os.replace, writer.CheckpointWriter.write = replace, write
mergelab.merge("task_arithmetic", base, [model], out=out, overwrite=True, scaling=0.5)
print("not killed")
"""


def killed_at(files: dict[str, Path], point: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", KILLER, str(files["base"]), str(files["m"]), str(files["out"]), point],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr


def merge_argv(files: dict[str, Path], *extra: str, command: str = "merge") -> list[str]:
    return [command, "--method", "task_arithmetic", "--base", str(files["base"]), "--model", str(files["m"]),
            "--out", str(files["out"]), "-q", *extra]


@pytest.mark.parametrize(("point", "at_out", "beside", "after_rerun"), [
    ("write", "old", ["tmp"], "old"),
    ("mark", "old", ["tmp"], "old"),
    ("aside", "old", ["new"], "old"),
    ("place", None, ["new", "old"], "new"),  # neither at --out: the next run finishes the replace
    ("after", "new", ["old"], "new"),
])
def test_a_kill_at_any_point_of_an_overwrite_is_recovered_by_the_next_run(files, capsys, point, at_out, beside, after_rerun):
    outputs = {"old": merged(files, 1.0), "new": merged(files, 0.5)}
    mergelab.merge("task_arithmetic", str(files["base"]), [str(files["m"])], out=files["out"], scaling=1.0)
    killed_at(files, point)
    assert (same(read_out(files["out"]), outputs[at_out]) if at_out else not files["out"].exists())
    assert left_beside(files["root"]) == beside
    # the next merge towards the same --out (no --overwrite): tidies up, then finds the output there
    assert main(merge_argv(files)) == 2
    assert "output already exists" in capsys.readouterr().err
    assert same(read_out(files["out"]), outputs[after_rerun])
    assert names(files["root"]) == ["base.safetensors", "m.safetensors", "out"]


def test_plan_reports_an_interrupted_replace_and_changes_nothing(files, capsys):
    mergelab.merge("task_arithmetic", str(files["base"]), [str(files["m"])], out=files["out"], scaling=1.0)
    killed_at(files, "place")
    before = names(files["root"])
    for command in ("plan", "merge --dry-run"):
        argv = merge_argv(files, command=command.split()[0]) + command.split()[1:]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "output already exists" in err and "an interrupted run left it as .out.mergelab-new-" in err
        assert names(files["root"]) == before  # a dry run writes nothing, not even a repair


def test_the_previous_output_is_put_back_when_the_new_one_is_gone(files, capsys):
    old = merged(files, 1.0)
    mergelab.merge("task_arithmetic", str(files["base"]), [str(files["m"])], out=files["out"], scaling=1.0)
    killed_at(files, "place")
    for folder in files["root"].glob(".out.mergelab-new-*"):
        shutil.rmtree(folder)
    assert main(merge_argv(files)) == 2
    assert same(read_out(files["out"]), old)
    assert names(files["root"]) == ["base.safetensors", "m.safetensors", "out"]


def test_a_removal_cut_short_never_leaves_something_to_put_back(files, monkeypatch):
    mergelab.merge("task_arithmetic", str(files["base"]), [str(files["m"])], out=files["out"], scaling=1.0)
    killed_at(files, "after")  # the old output is left beside the new one, to be removed
    monkeypatch.setattr(leftovers_module.shutil, "rmtree", lambda *args, **kwargs: None)  # as if killed mid-removal
    leftovers_module.sweep(files["out"])
    assert left_beside(files["root"]) == ["tmp"]  # renamed to a temporary before its removal began
    monkeypatch.undo()
    shutil.rmtree(files["out"])
    assert leftovers_module.restorable(files["out"]) is None  # a partly removed folder is never put back
    leftovers_module.sweep(files["out"])
    assert names(files["root"]) == ["base.safetensors", "m.safetensors"]


def test_a_killed_write_is_removed_by_the_next_write_of_any_kind(files):
    killed_at(files, "write")  # no previous output: only the temporary folder is left
    assert left_beside(files["root"]) == ["tmp"] and not files["out"].exists()
    mergelab.merge("task_arithmetic", str(files["base"]), [str(files["m"])], out=files["out"], scaling=0.5)
    assert same(read_out(files["out"]), merged(files, 0.5))
    assert names(files["root"]) == ["base.safetensors", "m.safetensors", "out"]


def test_only_provably_stale_folders_are_removed(files):
    out = files["out"]
    pid, machine, boot = os.getpid(), leftovers_module._machine(), leftovers_module._boot()
    start = leftovers_module._start_ticks(pid)
    forged = {
        f".out.mergelab-tmp-{machine}-{boot}-{pid}-{start + 1}-00": False,  # this PID, another start time: reused
        f".out.mergelab-tmp-{'0' * 8 if machine != '0' * 8 else '1' * 8}-{boot}-1-1-00": True,  # another machine
        ".out.mergelab-tmp-b3k2x9": True,  # no owner in the name (an older version's)
        f".other.mergelab-tmp-{machine}-{boot}-{pid}-{start + 1}-00": True,  # beside another output
    }
    for name in forged:
        (files["root"] / name).mkdir()
    with CheckpointWriter(out, [("w", tiny_spec())], {}) as live:  # this process, alive: its folder stays
        live.write("w", torch.zeros(2))
        other = mergelab.merge("task_arithmetic", str(files["base"]), [str(files["m"])], out=files["root"] / "x.safetensors")
        leftovers_module.sweep(out)
        assert live.tmp.is_dir() and other.is_file()
        assert sorted(n for n in names(files["root"]) if n in forged) == sorted(n for n, kept in forged.items() if kept)
        live.commit()
    assert read_out(out)["w"].tolist() == [0.0, 0.0]


def tiny_spec() -> writer_module.TensorSpec:
    return writer_module.TensorSpec((2,), torch.float32)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], ids=["022", "027", "002"])
def test_outputs_get_the_modes_of_mkdir_and_open(tmp_path, umask):
    base_dir = write_sharded(tiny_state(0), tmp_path / "base", max_shard_bytes=150)
    (base_dir / "config.json").chmod(0o600)  # the source's own mode is not copied
    previous = os.umask(umask)
    try:
        folder = mergelab.merge("task_arithmetic", str(base_dir), [finetune_of(tiny_state(0), 1)], out=tmp_path / "o",
                                max_shard_size=200)
        single = mergelab.merge("task_arithmetic", str(base_dir), [finetune_of(tiny_state(0), 1)], out=tmp_path / "o.safetensors")
    finally:
        os.umask(previous)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    written = sorted(folder.iterdir())
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00004.safetensors"} <= {p.name for p in written}
    for path in [*written, single]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


class FullDisk:
    """A shard file whose writes fail once the header is written."""

    def __init__(self, path: str, mode: str):
        self.handle = open(path, mode)  # noqa: SIM115
        self.writes = 0

    def write(self, data: object) -> int:
        self.writes += 1
        if self.writes > 1:
            enospc()
        return int(self.handle.write(data))  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self.handle, name)


@pytest.mark.parametrize(("where", "named"), [
    ("shard data", "model-00001-of-00004.safetensors"),
    ("fsync", "model-00001-of-00004.safetensors"),
    ("index", "model.safetensors.index.json"),
    ("extras", "config.json"),
    ("card", "README.md"),
    ("rename", "out"),
])
def test_a_full_disk_while_committing_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, where, named):
    base_dir = write_sharded(tiny_state(0), tmp_path / "base", max_shard_bytes=150)
    (base_dir / "README.md").write_text("# base\n")
    save_file(finetune_of(tiny_state(0), 1), str(tmp_path / "m.safetensors"))
    real_write_text = Path.write_text

    def write_text(self: Path, *args: object, **kwargs: object) -> int:
        if self.name == {"index": "model.safetensors.index.json", "card": "README.md"}.get(where):
            enospc()
        return real_write_text(self, *args, **kwargs)  # type: ignore[arg-type]

    if where == "shard data":
        monkeypatch.setattr(writer_module, "open", FullDisk, raising=False)
    elif where == "fsync":
        monkeypatch.setattr(writer_module.os, "fsync", enospc)
    elif where == "extras":
        monkeypatch.setattr(shutil, "copyfile", enospc)
    elif where == "rename":
        monkeypatch.setattr(writer_module.os, "replace", enospc)
    else:
        monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "out"
    argv = ["merge", "--method", "task_arithmetic", "--base", str(base_dir), "--model", str(tmp_path / "m.safetensors"),
            "--out", str(out), "--max-shard-size", "200B", "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mergelab: error: ") and "\n" not in err, err
    assert "No space left on device" in err and str(out / named if named != "out" else out) in err, err
    assert names(tmp_path) == ["base", "m.safetensors"]  # no output, no temporary


def write_st_layout(folder: Path) -> None:
    """A sentence-transformers folder, as ``SentenceTransformer.save`` lays it out, plus things that
    must not be copied: weights of a module, hidden files, a folder modules.json does not name."""
    write_sharded(tiny_state(0), folder)  # model.safetensors + config.json: the root Transformer module
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
               {"idx": 3, "name": "3", "path": "../escape", "type": "hostile"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    for name, text in [("config_sentence_transformers.json", "{}"), ("sentence_bert_config.json", '{"max_seq_length": 8}'),
                       ("tokenizer.json", "{}"), ("README.md", "---\nlicense: mit\n---\n# The base model\n")]:
        (folder / name).write_text(text)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 6}')
    (folder / "1_Pooling" / ".hidden").write_text("x")
    (folder / "2_Normalize").mkdir()  # empty, as Normalize saves it
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_text("weights in another format")
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "trainer_state.json").write_text("{}")


def test_sentence_transformers_modules_and_a_marked_card_are_copied(tmp_path):
    write_st_layout(tmp_path / "base")
    (tmp_path / "base" / "1_Pooling" / "model.safetensors").write_bytes(b"module weights")
    out = mergelab.merge("ties", str(tmp_path / "base"), [finetune_of(tiny_state(0), 1), finetune_of(tiny_state(0), 2)],
                         out=tmp_path / "out", density=0.5)
    copied = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert copied == ["1_Pooling", "1_Pooling/config.json", "2_Normalize", "README.md", "config.json",
                      "config_sentence_transformers.json", "model.safetensors", "modules.json", "sentence_bert_config.json",
                      "tokenizer.json"]
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (tmp_path / "base" / name).read_bytes()
    card = (out / "README.md").read_text()
    head, base_card = card.split(f"## Base model card ({tmp_path / 'base'})\n\n")
    assert head.startswith("---\ntags:\n- merge\n- mergelab\n---\n\n# Merged model\n")
    assert "with the method `ties`" in head and '"density": 0.5' in head
    assert f"- base: `{tmp_path / 'base'}`" in head and "- merged model 2: `<model 2>`" in head
    assert "describes the base, not this merged model" in head
    assert base_card == "---\nlicense: mit\n---\n# The base model\n"  # unchanged, after the marker
    assert not (tmp_path / "escape").exists()


def test_without_a_base_card_none_is_made(tmp_path):
    base_dir = write_sharded(tiny_state(0), tmp_path / "base")
    out = mergelab.merge("task_arithmetic", str(base_dir), [finetune_of(tiny_state(0), 1)], out=tmp_path / "out")
    assert names(out) == ["config.json", "model.safetensors"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the models import path, renamed in recent versions
def test_a_merged_sentence_transformer_loads(tmp_path):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as token_models
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]
    tokenizer = Tokenizer(token_models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    hf = tmp_path / "hf"
    fast.save_pretrained(hf)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=7, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                         max_position_embeddings=16)).save_pretrained(hf)
    SentenceTransformer(modules=[models.Transformer(str(hf)), models.Pooling(8), models.Normalize()]).save(str(tmp_path / "base"))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    out = mergelab.merge("task_arithmetic", str(tmp_path / "base"), [finetune_of(base, 1, scale=0.01)], out=tmp_path / "out")
    merged_model = SentenceTransformer(str(out), device="cpu")
    embedding = merged_model.encode(["hello world"])
    assert embedding.shape == (1, 8)
    assert abs(float((embedding**2).sum()) - 1.0) < 1e-4  # the Normalize module is there


def test_small_text_files_are_written_atomically_and_dead_runs_temporaries_removed(tmp_path, monkeypatch):
    # reports, eval results, zoo manifests, cached rows and search jobs go through leftovers.write_text
    target = tmp_path / "report.md"
    pid, machine, boot = os.getpid(), leftovers_module._machine(), leftovers_module._boot()
    start = leftovers_module._start_ticks(pid)
    dead = tmp_path / f".report.md.mergelab-tmp-{machine}-{boot}-{pid}-{start + 1}-00"  # a killed run's
    alive = leftovers_module.sibling(target, "tmp")  # this process's: a live writer's
    other = tmp_path / f".other.md.mergelab-tmp-{machine}-{boot}-{pid}-{start + 1}-00"  # another target's
    for path in (dead, alive, other):
        path.write_text("partial")
    leftovers_module.write_text(target, "done\n")
    assert target.read_text() == "done\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report.md", alive.name, other.name])

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(leftovers_module.os, "fsync", full_disk)
    with pytest.raises(OSError):
        leftovers_module.write_text(target, "new\n")
    assert target.read_text() == "done\n"  # the old file stays whole, no temporary is left
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report.md", alive.name, other.name])
