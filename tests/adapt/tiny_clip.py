"""A tiny random CLIP (the config of tests/zoo/test_clip.py), its vision tower as base, experts as perturbed
copies saved as CLIPVisionModel folders, and two small image tasks (a folder and labelled records)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.zoo.zoo_tiny import VOCAB

WORDS = ["photo", "a", "of", "red", "blue", "dark", "light"]


def write_clip(folder: Path) -> Path:
    import torch
    from transformers import BertTokenizerFast, CLIPConfig, CLIPImageProcessor, CLIPModel

    folder.mkdir(parents=True)
    # a vocabulary mapping (``vocab_file=`` gives an all-[UNK] tokenizer with transformers 5), and the text
    # tower pooling at [SEP] (CLIP's default eos id is outside this vocabulary: every prompt would pool at [CLS]
    # and all heads would be one, every prediction uniform)
    words = VOCAB + WORDS
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True).save_pretrained(str(folder))
    config = CLIPConfig(
        text_config={"vocab_size": len(words), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "pad_token_id": 0, "bos_token_id": 2,
                     "eos_token_id": words.index("[SEP]")},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


def write_experts(clip_folder: Path, root: Path, n: int = 2, scale: float = 0.5) -> tuple[Path, list[Path]]:
    """The pretrained vision tower (``save_vision_base``) and ``n`` copies with every floating tensor moved by
    ``scale`` x its std (0.1 for constant tensors: the layer norms) in a random direction (seeded), as CLIPVisionModel folders."""
    import torch
    from safetensors.torch import load_file, save_file

    from mergelab.zoo.clip import save_vision_base

    base = save_vision_base(clip_folder, root / "base")
    state = load_file(str(base / "model.safetensors"))
    experts = []
    for i in range(n):
        gen = torch.Generator().manual_seed(100 + i)
        moved = {k: v + scale * (float(v.float().std().nan_to_num()) or 0.1) * torch.randn(v.shape, generator=gen)
                 if v.is_floating_point() else v for k, v in state.items()}
        folder = root / f"expert{i}"
        folder.mkdir()
        save_file(moved, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text((base / "config.json").read_text())
        experts.append(folder)
    return base, experts


def write_images(root: Path) -> Path:
    """``root/<blue|red>/<i>.png``: four noisy images per colour."""
    import torch
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for name, colour in (("blue", (0, 0, 200)), ("red", (200, 0, 0))):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = (torch.tensor(colour).view(1, 1, 3) + 50 * torch.rand(40, 40, 3, generator=gen)).clamp(0, 255)
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / name / f"{i}.png")
    return root


def records(n: int = 8, flip: bool = False) -> list[dict[str, Any]]:
    """A ``datasets``-like split of dark/light grey noise images, ``{"image": PIL image, "label": int}``."""
    import torch
    from PIL import Image

    gen = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        label = i % 2
        pixels = (40 + 150 * label + 60 * torch.rand(36, 36, 3, generator=gen)).clamp(0, 255)
        rows.append({"image": Image.fromarray(pixels.to(torch.uint8).numpy()), "label": 1 - label if flip else label})
    return rows
