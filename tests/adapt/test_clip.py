"""mergelab.adapt.adapt_clip on a tiny random CLIP: the vision tower merged, zero-shot heads from the text tower,
images as inputs. The entropy goes down, equal coefficients are task arithmetic, the folder rebuilds bit for
bit, the accuracy trace scores the image labels, bad input is one MergelabError and writes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
pytest.importorskip("PIL")

import mergelab  # noqa: E402
from mergelab.adapt import adapt_clip  # noqa: E402
from mergelab.errors import MergelabError  # noqa: E402
from mergelab.ops import coefficients as coef  # noqa: E402
from mergelab.zoo import clip  # noqa: E402
from tests.adapt.tiny_clip import records, write_clip, write_experts, write_images  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("adapt-clip")
    folder = write_clip(root / "clip")
    base, experts = write_experts(folder, root)
    return {"clip": folder, "base": base, "models": {"colours": experts[0], "shades": experts[1]},
            "tasks": {"colours": (write_images(root / "images"), None), "shades": (records(), ["dark", "light"])}}


def quick(setup: dict[str, Any], method: str, **kw: Any) -> Any:
    """Every image of a task in each step's one batch: the objective is a function of the coefficients."""
    args: dict[str, Any] = {"steps": 5, "lr": 0.05, "batch_size": 8, "eval_every": -1, "granularity": "block"}
    given = {k: kw.pop(k, setup[k]) for k in ("base", "models", "tasks")}
    return adapt_clip(method, given["base"], given["models"], setup["clip"], given["tasks"], **(args | kw))


@pytest.mark.parametrize("method", ["adamerging", "adamerging_pp", "cart_pp"])
def test_entropy_decreases_and_coefficients_leave_init(setup: dict[str, Any], method: str) -> None:
    result = quick(setup, method)
    assert result.entropies[-1] < result.entropies[0], result.entropies
    values = [c for row in result.coefficients.values() for c in row]
    assert any(abs(c - 0.3) > 1e-3 for c in values) and all(0.0 <= c <= 1.0 for c in values)
    assert set(result.coefficients) == {"embeddings", "vision_model.encoder.layers.0", "other"}
    assert result.tasks == ["colours", "shades"] and result.options["clip"] == str(setup["clip"])
    assert result.merged is not None and all(k.startswith("vision_model.") for k in result.merged)


def test_features_are_clips_on_the_merged_weights(setup: dict[str, Any]) -> None:
    """The functional forward under ``vision_model.*`` names is CLIP's image features with those weights
    loaded; the scale is the model's ``logit_scale.exp()``."""
    from mergelab.adapt.images import load_clip_inputs

    inputs = load_clip_inputs(setup["clip"], setup["tasks"], base=setup["base"])
    expert = load_file(str(Path(setup["models"]["shades"]) / "model.safetensors"))
    images = inputs.tasks[0].items
    features = inputs.encoder.encode({k: v for k, v in expert.items() if v.is_floating_point()}, images, 3)
    model, _, processor = clip.load_clip(setup["clip"])
    clip.load_vision(model, setup["models"]["shades"])
    assert torch.allclose(features, clip.encode_images(model, processor, images), atol=1e-5)
    assert inputs.encoder.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    heads = [t.head for t in inputs.tasks]
    assert heads[1].shape == (2, 8) and torch.allclose(heads[1].norm(dim=1), torch.ones(2), atol=1e-6)


@pytest.mark.parametrize(("method", "reference", "params"), [
    ("adamerging", "task_arithmetic", {}),
    ("cart_pp", "cart", {"rank_ratio": 0.5}),
])
def test_equal_coefficients_are_the_data_free_merge(setup: dict[str, Any], method: str, reference: str,
                                                    params: dict[str, Any]) -> None:
    from mergelab.adapt.model import build
    from mergelab.adapt.run import _opened, _opened_all
    from mergelab.methods.registry import get_method

    models = list(setup["models"].values())
    plain = mergelab.merge(reference, setup["base"], models, scaling=0.4, **params)
    result = quick(setup, method, steps=0, init=0.4, **params)  # the model written from the coefficients
    hp = get_method(method).resolve({"granularity": "block", **params}, 2)
    with _opened(setup["base"]) as base, _opened_all(models) as states:
        weights = build(method, hp, base, states).weights(torch.full((3, 2), 0.4))  # the model optimised
    assert isinstance(plain, dict) and result.merged is not None
    for name, tensor in plain.items():
        assert torch.allclose(result.merged[name].double(), tensor.double(), atol=1e-6), name
        if tensor.is_floating_point():
            assert torch.allclose(weights[name].double(), tensor.double(), atol=1e-6), name


def test_folder_rebuilds_bit_for_bit(setup: dict[str, Any], tmp_path: Path) -> None:
    result = quick(setup, "adamerging_pp", out=tmp_path / "adapted", steps=2)
    folder = tmp_path / "adapted"
    assert {coef.FILE, coef.TRACE, "model.safetensors", "config.json"} <= {p.name for p in folder.iterdir()}
    rebuilt = mergelab.merge("adamerging_pp", setup["base"], list(setup["models"].values()),
                             coefficients=str(folder / coef.FILE), out=tmp_path / "rebuilt")
    a, b = load_file(folder / "model.safetensors"), load_file(Path(rebuilt) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert result.out == folder and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_accuracy_trace_scores_the_image_labels(setup: dict[str, Any], tmp_path: Path) -> None:
    """The trace's accuracies are the harness's (``evaluate_clip``) on the adapted model; flipping the labels
    changes the accuracies only: the objective never sees them."""
    result = quick(setup, "adamerging", eval_every=3, out=tmp_path / "m")
    accs = result.accuracies
    assert [e["step"] for e in accs] == [0, 3, 5] and set(accs[-1]["accuracy"]) == {"colours", "shades"}
    scored = clip.evaluate_clip(tmp_path / "m", setup["clip"], setup["tasks"], progress=False)
    assert accs[-1]["accuracy"] == pytest.approx(scored.accuracy, abs=1e-6)
    assert any(e["accuracy"]["shades"] != 0.5 for e in accs)  # so that flipping the labels shows
    flipped = quick(setup, "adamerging", eval_every=3,
                    tasks=setup["tasks"] | {"shades": (records(flip=True), ["dark", "light"])})
    assert flipped.entropies == result.entropies and flipped.coefficients == result.coefficients
    for mine, theirs in zip(result.accuracies, flipped.accuracies, strict=True):
        assert theirs["accuracy"]["colours"] == mine["accuracy"]["colours"]
        assert theirs["accuracy"]["shades"] == pytest.approx(1.0 - mine["accuracy"]["shades"])


def test_held_out_unlabelled_images(setup: dict[str, Any]) -> None:
    folder = setup["tasks"]["colours"][0]
    given = quick(setup, "adamerging", steps=2, unlabelled={"colours": folder, "shades": records(6)})
    default = quick(setup, "adamerging", steps=2)
    assert given.options["unlabelled"] == "given" and default.options["unlabelled"] == "test"
    assert given.entropies[0] != default.entropies[0]  # shades: 6 other images


def test_bad_input_is_one_error_and_writes_nothing(setup: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    (empty / "red").mkdir(parents=True)
    cases = [
        ({"tasks": setup["tasks"] | {"shades": (empty, None)}}, "no images"),
        ({"tasks": setup["tasks"] | {"shades": ([], ["dark", "light"])}}, "no images"),
        ({"tasks": setup["tasks"] | {"shades": (records(), None)}}, "class names needed"),
        ({"tasks": setup["tasks"] | {"shades": ([{"picture": 1}], ["dark"])}}, "records with an image"),
        ({"tasks": setup["tasks"] | {"shades": records()}}, "give \\(data, classnames"),
        ({"tasks": {"colours": setup["tasks"]["colours"]}}, "without data: shades"),
        ({"models": {"colours": setup["models"]["colours"]}}, "no model for task"),
        ({"unlabelled": "train"}, "unlabelled must be"),
        ({"unlabelled": {"colours": setup["tasks"]["colours"][0]}}, "no unlabelled images given for task 'shades'"),
        ({"unlabelled": {"colours": [], "shades": []}}, "task 'colours': no unlabelled images"),
        ({"base": setup["clip"]}, "tensor missing"),  # the experts are vision towers: mergelab.plan says so
        ({"base": setup["clip"], "models": dict.fromkeys(setup["tasks"], setup["clip"])},  # whole CLIPModels
         "not a tensor of the CLIP vision tower"),
        ({"coefficients": {}}, "adapt learns"),
    ]
    for change, message in cases:
        args = {k: setup[k] for k in ("base", "models", "tasks")} | change
        options = {k: v for k, v in change.items() if k not in ("base", "models", "tasks")}
        with pytest.raises(MergelabError, match=message):
            adapt_clip("adamerging", args["base"], args["models"], setup["clip"], args["tasks"], steps=1, out=out,
                       **options)
    with pytest.raises(MergelabError, match="cannot be adapted"):
        quick(setup, "ties")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
