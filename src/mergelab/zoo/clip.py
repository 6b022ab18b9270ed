"""The papers' own setting: CLIP vision encoders, zero-shot heads from the text tower, image-folder data.

Task Arithmetic (Ilharco et al. 2023), TIES, TSV, CART, Weight Weaving and OPCM all merge the *vision*
encoders of CLIP ViT-B/32 (or L/14) fine-tuned on 8 tasks, each scored with its frozen zero-shot head: per
class, the mean of the normalised text embeddings of the dataset's prompt templates, renormalised
(``build_classification_head`` in mlfoundations/task_vectors ``src/heads.py``; templates from its
``src/datasets/templates.py``, reproduced as data below). Logits = image features @ head.T (the logit
scale does not change the argmax; the test-time adaptation, :func:`mergelab.adapt.adapt_clip`, whose entropy
it does change, multiplies by CLIP's ``logit_scale.exp()`` as the official heads). Everything loads from local
folders; see README "The papers' setting".
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import MergelabError
from mergelab.zoo.backbones import offline
from mergelab.zoo.scores import EvalResult

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_PHOTO = ["a photo of a {}.", "a photo of the {}."]
TEMPLATES: dict[str, list[str]] = {
    "sun397": _PHOTO,
    "cars": ["a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!", "a photo of my dirty {}.",
             "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}."],
    "resisc45": [f"{kind} {view} of {art}{{}}." for art in ("", "a ", "the ")
                 for kind, view in (("satellite", "imagery"), ("aerial", "imagery"), ("satellite", "photo"),
                                    ("aerial", "photo"), ("satellite", "view"), ("aerial", "view"))],
    "eurosat": ["a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."],
    "svhn": ['a photo of the number: "{}".'],
    "gtsrb": ['a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
              'a close up photo of a "{}" traffic sign.'],
    "mnist": ['a photo of the number: "{}".'],
    "dtd": [f"a photo of {art} {{}} {thing}." for art in ("a", "the") for thing in ("texture", "pattern", "thing", "object")],
}


def load_clip(folder: str | Path, device: str = "cpu") -> tuple[Any, Any, Any]:
    """``(CLIPModel, tokenizer, image processor)`` from a local folder (e.g. openai/clip-vit-base-patch32)."""
    offline()
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    path = str(folder)
    model: Any = CLIPModel.from_pretrained(path, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)  # type: ignore[no-untyped-call]
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path, local_files_only=True), processor


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a model output from get_*_features; older versions a tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def zero_shot_head(model: Any, tokenizer: Any, classnames: Sequence[str], templates: Sequence[str],
                   device: str = "cpu") -> torch.Tensor:
    """``(classes, dim)``: per class, mean of the normalised template embeddings, renormalised."""
    rows = []
    for name in classnames:
        batch = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt").to(device)
        emb = torch.nn.functional.normalize(_features(model.get_text_features(**batch)), dim=-1).mean(0)
        rows.append(torch.nn.functional.normalize(emb, dim=-1))
    return torch.stack(rows).float().cpu()


def image_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """``(classes, [(image path, class index)])`` from ``root/<class>/<image>`` (torchvision ImageFolder order)."""
    root = Path(root)
    if not root.is_dir():
        raise MergelabError("no such image folder", file=str(root))
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [(path, i) for i, c in enumerate(classes) for path in sorted((root / c).iterdir())
             if path.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise MergelabError("no images in <folder>/<class>/ sub-folders", file=str(root))
    return classes, items


def templates_for(task: str) -> list[str]:
    """The task's prompt templates: ``TEMPLATES[task]`` (case-insensitive) or CLIP's "a photo of a {}."."""
    return TEMPLATES.get(task.lower(), _PHOTO[:1])


def task_data(task: str, data: Any, classnames: Sequence[str] | None) -> tuple[list[Any], list[int], list[str]]:
    """``(images, labels, class names)`` of a task given as an image folder (``root/<class>/<image>``; class
    names default to the folder names) or a sequence of ``{"image": PIL image, "label": int}`` records (a
    Hugging Face ``datasets`` split, whose class names must then be given); one-line MergelabError otherwise."""
    if isinstance(data, (str, Path)):
        folder_classes, items = image_folder(data)
        images: list[Any] = [p for p, _ in items]
        labels = [c for _, c in items]
        classnames = classnames or folder_classes
    else:
        try:
            images, labels = [r["image"] for r in data], [int(r["label"]) for r in data]
        except (TypeError, KeyError, ValueError):
            raise MergelabError(f"task {task!r}: data must be an image folder or records with an image and an "
                                "integer label") from None
        if not images:
            raise MergelabError(f"task {task!r}: no images")
    if not classnames:
        raise MergelabError(f"task {task!r}: class names needed for its zero-shot head")
    return images, labels, list(classnames)


@torch.no_grad()
def encode_images(model: Any, processor: Any, images: Sequence[Any], *, batch_size: int = 64, device: str = "cpu",
                  progress: bool = False, desc: str = "images") -> torch.Tensor:
    """Normalised image features ``(n, dim)``; ``images`` are paths or PIL images."""
    from PIL import Image
    from tqdm.auto import tqdm

    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = [Image.open(x).convert("RGB") if isinstance(x, (str, Path)) else x.convert("RGB")
                 for x in images[start: start + batch_size]]
        pixels = processor(images=chunk, return_tensors="pt")["pixel_values"].to(device)
        out.append(torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1))
    return torch.cat(out).float().cpu()


def load_vision(model: Any, vision: Any) -> None:
    """Put a vision encoder's weights (a CLIPVisionModel folder/checkpoint: ``vision_model.*`` names, or a
    whole CLIPModel's) into ``model``'s vision tower, checking every tensor's presence and shape."""
    from mergelab.io.sources import open_source

    target = {k: v for k, v in model.state_dict().items() if k.startswith("vision_model.")}
    source = open_source(vision)
    try:
        state = {}
        for name, ref in target.items():
            if name not in source.specs:
                raise MergelabError("tensor missing from the vision encoder", file=source.label, tensor=name)
            tensor = source.get(name)
            if tuple(tensor.shape) != tuple(ref.shape):
                raise MergelabError(f"shape {list(tensor.shape)} != CLIP's {list(ref.shape)}", file=source.label,
                                    tensor=name)
            state[name] = tensor.to(ref.dtype)
    finally:
        source.close()
    model.load_state_dict(state, strict=False)


def evaluate_clip(vision: Any, clip_folder: str | Path, tasks: dict[str, tuple[Any, Sequence[str] | None]], *,
                  device: str = "cpu", batch_size: int = 64, progress: bool = True,
                  expert_accuracy: dict[str, float] | None = None) -> Any:
    """Score a (merged) CLIP vision encoder on image tasks with zero-shot heads from ``clip_folder``'s text tower.

    Args:
        vision: the vision encoder to score (CLIPVisionModel folder, checkpoint or state dict; None = the base).
        clip_folder: the pretrained CLIPModel folder (text tower, projections, tokenizer, image processor).
        tasks: ``{task: (data, classnames)}``: ``data`` an image folder (``root/<class>/<image>``, classnames
            default to the folder names) or a sequence of ``{"image": PIL image, "label": int}`` records
            (a Hugging Face ``datasets`` split); templates are ``TEMPLATES[task]`` or CLIP's "a photo of a {}.".
    """
    start = time.perf_counter()
    model, tokenizer, processor = load_clip(clip_folder, device)
    if vision is not None:
        load_vision(model, vision)
    acc = {}
    for task, (data, names) in tasks.items():
        images, labels, classnames = task_data(task, data, names)
        head = zero_shot_head(model, tokenizer, classnames, templates_for(task), device)
        emb = encode_images(model, processor, images, batch_size=batch_size, device=device, progress=progress,
                            desc=f"eval {task}")
        acc[task] = float(((emb @ head.T).argmax(1) == torch.tensor(labels)).float().mean())
    normalized = ({t: a / expert_accuracy[t] for t, a in acc.items()}
                  if expert_accuracy and all(expert_accuracy.get(t) for t in acc) else None)
    return EvalResult("clip", acc, sum(acc.values()) / len(acc), normalized, time.perf_counter() - start)


def save_vision_base(clip_folder: str | Path, out: str | Path) -> Path:
    """Write the pretrained CLIP's vision tower as a CLIPVisionModel folder: the ``--base`` for merging
    fine-tuned CLIPVisionModel experts (same tensor names)."""
    offline()
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(str(clip_folder), local_files_only=True)
    model.save_pretrained(str(out))
    return Path(out)
