"""mergelab.adapt end to end on a tiny real zoo (2-layer BERT, three tasks): the entropy goes down, the
coefficients move, the folder rebuilds bit for bit from its coefficients, a seed fixes the run, bad input and
interruptions leave nothing behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

import mergelab  # noqa: E402
from mergelab.adapt import adapt  # noqa: E402
from mergelab.errors import MergelabError  # noqa: E402
from mergelab.ops import coefficients as coef  # noqa: E402
from tests.adapt.tiny import build  # noqa: E402


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build(tmp_path_factory.mktemp("adapt-zoo"))


def fixed_texts(zoo: Any) -> dict[str, list[str]]:
    """Eight unlabelled texts per task: with batch_size 4 and 2 batches every step sees all of them."""
    from tests.zoo.zoo_tiny import task_rows

    return {t.name: [text for text, _ in task_rows(8)] for t in zoo.tasks}


def quick(zoo: Any, method: str, **kw: Any) -> Any:
    args: dict[str, Any] = {"steps": 6, "lr": 0.05, "batch_size": 4, "batches": 2, "unlabelled": fixed_texts(zoo),
                            "eval_every": -1, "cache_dir": zoo.path.parents[2]}
    return adapt(method, zoo, **(args | kw))


@pytest.mark.parametrize("method", ["adamerging", "adamerging_pp", "cart_pp"])
def test_entropy_decreases_and_coefficients_leave_init(zoo: Any, method: str) -> None:
    result = quick(zoo, method, granularity="block")
    first, last = result.entropies[0], result.entropies[-1]
    assert last < first, result.entropies
    values = [c for row in result.coefficients.values() for c in row]
    assert any(abs(c - 0.3) > 1e-3 for c in values) and all(0.0 <= c <= 1.0 for c in values)  # clamped
    assert set(result.coefficients) == {"embeddings", "encoder.layer.0", "encoder.layer.1", "other"}
    assert result.merged is not None and result.out is None


def test_length_sorted_forwards_give_the_per_batch_objective(zoo: Any) -> None:
    """The fast objective (every sampled text of every task in length-sorted chunks) equals the plain loop of
    the official code (each task's batches run and averaged one by one), value and gradient."""
    from mergelab.adapt.data import load_inputs
    from mergelab.adapt.model import build as build_weights
    from mergelab.adapt.objective import mean_entropy
    from mergelab.adapt.optimise import Options, logits, step_loss, token_lengths
    from mergelab.adapt.run import _opened, _opened_all
    from mergelab.methods.registry import get_method

    texts = {t.name: [("very " * (i % 7)) + f"good day {i}" for i in range(11)] for t in zoo.tasks}
    inputs = load_inputs(zoo, tasks=None, unlabelled=texts, device="cpu", backbone="all-minilm-l6-v2",
                         cache_dir=zoo.path.parents[2], quick=False, progress=False)
    names = [t.name for t in inputs.tasks]
    hp = get_method("adamerging").resolve({"granularity": "block"}, len(names))
    with _opened(zoo.base) as base, _opened_all([zoo.experts[t] for t in names]) as states:
        merged = build_weights("adamerging", hp, base, states)
    options = Options(batch_size=4, batches=3)  # 12 > 11 texts: the last batch is short, as in the official loop
    generator = torch.Generator().manual_seed(3)
    samples = [torch.randperm(11, generator=generator)[:12].tolist() for _ in inputs.tasks]
    lengths = [token_lengths(inputs, task.texts, options.max_len) for task in inputs.tasks]
    grads = []
    for fast in (True, False):
        coefficients = torch.full((len(merged.groups), len(names)), 0.4, requires_grad=True)
        weights = merged.weights(coefficients)
        if fast:
            loss = step_loss(inputs, weights, samples, lengths, options)
        else:
            loss = torch.zeros(())
            for task, take in zip(inputs.tasks, samples, strict=True):
                for b in range(0, len(take), options.batch_size):
                    batch = [task.texts[i] for i in take[b: b + options.batch_size]]
                    loss = loss + mean_entropy(logits(inputs, task, weights, batch, options.max_len))
        loss.backward()
        grads.append((float(loss.detach()), coefficients.grad))
    (fast_loss, fast_grad), (plain_loss, plain_grad) = grads
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5)
    assert torch.allclose(fast_grad, plain_grad, rtol=1e-4, atol=1e-6)


def test_task_wise_has_one_coefficient_per_task(zoo: Any) -> None:
    result = quick(zoo, "adamerging", granularity="task", steps=2)
    assert list(result.coefficients) == ["all"] and len(result.coefficients["all"]) == 3


def test_folder_rebuilds_bit_for_bit_and_has_trace(zoo: Any, tmp_path: Path) -> None:
    result = quick(zoo, "cart_pp", out=tmp_path / "adapted", eval_every=3, steps=3)
    folder = tmp_path / "adapted"
    assert {coef.FILE, coef.TRACE, "model.safetensors", "config.json"} <= {p.name for p in folder.iterdir()}
    accs = [e for e in result.trace if "accuracy" in e]
    assert [e["step"] for e in accs] == [0, 3] and set(accs[0]["accuracy"]) == {"mood", "tone", "sky"}
    rebuilt = mergelab.merge("cart_pp", zoo.base, [zoo.experts[t] for t in result.tasks],
                             coefficients=str(folder / coef.FILE), out=tmp_path / "rebuilt")
    a, b = load_file(folder / "model.safetensors"), load_file(Path(rebuilt) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_same_seed_same_run_other_seed_other_run(zoo: Any) -> None:
    texts = {t.name: [f"good day {i}" if i % 2 else f"bad day {i}" for i in range(40)] for t in zoo.tasks}
    one, two = (quick(zoo, "adamerging", unlabelled=texts, steps=3, seed=5) for _ in range(2))
    other = quick(zoo, "adamerging", unlabelled=texts, steps=3, seed=6)
    assert one.coefficients == two.coefficients and one.entropies == two.entropies
    assert one.entropies != other.entropies
    assert all(torch.equal(one.merged[k], two.merged[k]) for k in one.merged)


def test_bad_input_is_one_line_and_writes_nothing(zoo: Any, tmp_path: Path) -> None:
    with pytest.raises(MergelabError, match="cannot be adapted"):
        quick(zoo, "ties")
    with pytest.raises(MergelabError, match="adapt learns"):
        quick(zoo, "adamerging", coefficients={})
    with pytest.raises(MergelabError, match="unknown task"):
        quick(zoo, "adamerging", tasks=["nope"])
    with pytest.raises(MergelabError, match="no unlabelled texts given for task"):
        quick(zoo, "adamerging", unlabelled={"mood": ["x"]})
    with pytest.raises(MergelabError, match="batch_size"):
        quick(zoo, "adamerging", batch_size=0)
    with pytest.raises(MergelabError, match="granularity"):
        quick(zoo, "adamerging", granularity="row")
    (tmp_path / "taken").mkdir()
    with pytest.raises(MergelabError, match="exists"):
        quick(zoo, "adamerging", out=tmp_path / "taken")
    assert list((tmp_path / "taken").iterdir()) == [] and len(list(tmp_path.iterdir())) == 1


def test_interrupted_write_leaves_nothing(zoo: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mergelab.adapt import run

    def interrupt(path: Path, data: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "_write_json", interrupt)
    with pytest.raises(KeyboardInterrupt):
        quick(zoo, "adamerging", out=tmp_path / "out", steps=1)
    assert list(tmp_path.iterdir()) == []


def test_cli_adapt_and_rebuild(zoo: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from mergelab.cli.main import main

    root = zoo.path.parents[3]  # <root>/cache/zoo/<backbone>/<suite>
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(fixed_texts(zoo)))
    assert main(["adapt", "--method", "nope", "--suite", "mt8", "--out", str(tmp_path / "x")]) == 2
    assert "cannot be adapted" in capsys.readouterr().err
    assert main(["adapt", "--method", "adamerging", "--suite", "mt8", "--out", str(tmp_path / "x"),
                 "--unlabelled", str(tmp_path / "missing.json")]) == 2
    assert not (tmp_path / "x").exists()
    assert main(["adapt", "--method", "adamerging", "--suite", str(root / "data" / "suite.yaml"), "--backbone",
                 str(root / "bert"), "--cache-dir", str(root / "cache"), "--steps", "2", "--batch-size", "4",
                 "--unlabelled", str(texts), "--eval-every", "-1", "--set", "granularity=task", "--device", "cpu",
                 "--out", str(tmp_path / "x"), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    models = [a for t in ("mood", "tone", "sky") for a in ("--model", str(zoo.experts[t]))]
    assert main(["merge", "--method", "adamerging", "--base", str(zoo.base), *models, "--set",
                 f"coefficients={tmp_path / 'x' / coef.FILE}", "--out", str(tmp_path / "y"), "--quiet"]) == 0
    a, b = load_file(tmp_path / "x" / "model.safetensors"), load_file(tmp_path / "y" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_whatever_a_kill_mid_merge_leaves_is_a_leftover_the_next_run_removes(
        zoo: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a SIGKILL runs no clean-up: what is beside --out at that moment is what stays; each entry must be
    # an owner-named folder of --out, which the next run's sweep removes once its owner is gone
    from mergelab.io import leftovers, writer

    out = tmp_path / "out"
    seen: list[tuple[set[str], set[str]]] = []
    real_write = writer.CheckpointWriter.write

    def write(self: Any, name: str, tensor: torch.Tensor) -> None:
        real_write(self, name, tensor)
        if self._next == 2:
            seen.append(({p.name for p in tmp_path.iterdir()}, {item.path.name for item in leftovers.leftovers(out)}))

    monkeypatch.setattr(writer.CheckpointWriter, "write", write)
    quick(zoo, "adamerging", out=out, steps=1)
    assert seen and all(present and present == recognised for present, recognised in seen)
