"""The papers' CLIP setting on a tiny CLIP built from a small config (random weights), images in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergelab.errors import MergelabError
from mergelab.zoo import clip

pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertTokenizerFast, CLIPConfig, CLIPImageProcessor, CLIPModel

    from tests.zoo.zoo_tiny import VOCAB

    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(VOCAB + ["photo", "a", "of", "red", "blue"]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    config = CLIPConfig(
        text_config={"vocab_size": len(VOCAB) + 5, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    for name, colour in (("blue", (0, 0, 200)), ("red", (200, 0, 0))):
        (root / name).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 40), tuple(c + 10 * i for c in colour)).save(root / name / f"{i}.png")
    (root / "red" / "notes.txt").write_text("not an image")
    return root


def test_templates_are_task_vectors_lists() -> None:
    assert len(clip.TEMPLATES) == 8
    assert [len(clip.TEMPLATES[k]) for k in ("resisc45", "dtd", "cars", "eurosat", "gtsrb")] == [18, 8, 8, 3, 3]
    assert clip.TEMPLATES["resisc45"][0] == "satellite imagery of {}."
    assert clip.TEMPLATES["resisc45"][-1] == "aerial view of the {}."
    assert clip.TEMPLATES["dtd"][3] == "a photo of a {} object." and clip.TEMPLATES["dtd"][4] == "a photo of the {} texture."


def test_zero_shot_head_is_the_mean_of_normalised_prompts(tiny_clip: Path) -> None:
    model, tok, _ = clip.load_clip(tiny_clip)
    head = clip.zero_shot_head(model, tok, ["red", "blue"], ["a photo of a {}.", "{}"])
    assert torch.allclose(head.norm(dim=1), torch.ones(2), atol=1e-6)
    with torch.no_grad():
        feats = [clip._features(model.get_text_features(**tok([p], return_tensors="pt"))) for p in ("a photo of a red.", "red")]
    expected = torch.nn.functional.normalize(sum(torch.nn.functional.normalize(f, dim=-1) for f in feats)[0], dim=-1)
    assert torch.allclose(head[0], expected, atol=1e-5)


def test_image_folder(images: Path, tmp_path: Path) -> None:
    classes, items = clip.image_folder(images)
    assert classes == ["blue", "red"] and len(items) == 6 and items[-1][1] == 1
    with pytest.raises(MergelabError, match="no images"):
        clip.image_folder(tmp_path)


def test_evaluate_clip_base_equals_its_own_vision_tower(tiny_clip: Path, images: Path, tmp_path: Path) -> None:
    from PIL import Image

    base = clip.evaluate_clip(None, tiny_clip, {"colours": (images, None)}, progress=False)
    vision = clip.save_vision_base(tiny_clip, tmp_path / "vision")
    again = clip.evaluate_clip(vision, tiny_clip, {"colours": (images, None)}, progress=False,
                               expert_accuracy={"colours": 1.0})
    records = [{"image": Image.open(p), "label": c} for p, c in clip.image_folder(images)[1]]  # a `datasets` split
    from_records = clip.evaluate_clip(vision, tiny_clip, {"colours": (records, ["blue", "red"])}, progress=False)
    assert base.accuracy == again.accuracy == from_records.accuracy
    assert 0.0 <= base.accuracy["colours"] <= 1.0 and again.normalized == again.accuracy


def test_load_vision_changes_features_and_checks_tensors(tiny_clip: Path, images: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    vision = load_file(clip.save_vision_base(tiny_clip, tmp_path / "vision") / "model.safetensors")
    model, _, processor = clip.load_clip(tiny_clip)
    paths = [p for p, _ in clip.image_folder(images)[1]]
    before = clip.encode_images(model, processor, paths)
    name = "vision_model.post_layernorm.weight"
    clip.load_vision(model, vision | {name: torch.zeros_like(vision[name])})
    assert not torch.allclose(before, clip.encode_images(model, processor, paths))
    save_file({k: v for k, v in vision.items() if k != name}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(MergelabError, match="tensor missing"):
        clip.load_vision(model, tmp_path / "bad.safetensors")
