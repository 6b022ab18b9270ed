"""What turns a task's inputs into normalised features with the merged weights: one interface, texts or images.

The adaptation loop (:mod:`.optimise`) only needs, for a list of inputs (texts, images):

* ``sizes(items)``: a cost per input, to group the forwards (the loop runs them sorted by it; equal sizes keep
  the sampled order);
* ``embed(weights, items)``: L2-normalised features ``(n, dim)`` of the backbone run on ``weights`` (a
  ``{name: tensor}`` of the merged model, through ``torch.func.functional_call``), differentiable;
* ``encode(weights, items, batch_size)``: the same without gradients, float32 on CPU (the accuracy trace);
* ``logit_scale``: logits = ``logit_scale * features @ head.T`` with the task's frozen, normalised head.

:class:`TextEncoder` is the zoo's text encoder (mean-pooled last hidden state, :mod:`mergelab.zoo.encoder`;
scale ``LOGIT_SCALE``). :class:`ClipImageEncoder` is a CLIP vision tower with its frozen ``visual_projection``:
the parameters it runs on are named ``vision_model.*`` like a ``CLIPVisionModel`` checkpoint's, so the merged
experts' weights go in unchanged; its scale is the CLIP model's ``logit_scale.exp()``, as the heads of the
official code (mlfoundations/task_vectors ``src/heads.py`` ``build_classification_head``:
``zeroshot_weights *= logit_scale.exp()`` on the normalised zero-shot weights, applied to normalised image
features by ``ClassificationHead(normalize=True)``; EnnengYang/AdaMerging ``src/heads.py`` is the same code),
so the entropies are those of the papers' classifiers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mergelab.adapt.model import Functional


class Encoder(Protocol):
    device: str

    @property
    def logit_scale(self) -> float: ...

    def sizes(self, items: Sequence[Any]) -> list[int]: ...

    def embed(self, weights: dict[str, torch.Tensor], items: Sequence[Any]) -> torch.Tensor: ...

    def encode(self, weights: dict[str, torch.Tensor], items: Sequence[Any], batch_size: int) -> torch.Tensor: ...


@dataclass
class TextEncoder:
    """The zoo's sentence encoder (``module``: a Hugging Face encoder, frozen) with its tokenizer."""

    module: torch.nn.Module
    tokenizer: Any
    device: str = "cpu"
    max_len: int = 64

    @property
    def logit_scale(self) -> float:
        from mergelab.zoo.encoder import LOGIT_SCALE

        return LOGIT_SCALE

    def sizes(self, items: Sequence[Any]) -> list[int]:
        """Each text's token count (truncated at ``max_len``): length-sorted chunks pad little."""
        ids = self.tokenizer(list(items), truncation=True, max_length=self.max_len)["input_ids"]
        return [len(i) for i in ids]

    def embed(self, weights: dict[str, torch.Tensor], items: Sequence[Any]) -> torch.Tensor:
        from mergelab.zoo.encoder import pooled, tokenize

        return pooled(Functional(self.module, weights), tokenize(self.tokenizer, items, self.device, self.max_len))

    def encode(self, weights: dict[str, torch.Tensor], items: Sequence[Any], batch_size: int) -> torch.Tensor:
        from mergelab.zoo.encoder import encode

        return encode(Functional(self.module, weights), self.tokenizer, list(items), batch_size=batch_size,
                      device=self.device, max_len=self.max_len)


class ClipVision(torch.nn.Module):
    """A CLIP model's image side: ``vision_model`` (the merged tower) then the frozen ``visual_projection``;
    ``forward(pixel_values)`` = CLIP's unnormalised image features (``CLIPModel.get_image_features``)."""

    def __init__(self, clip_model: Any):
        super().__init__()
        self.vision_model = clip_model.vision_model
        self.visual_projection = clip_model.visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled: torch.Tensor = self.vision_model(pixel_values=pixel_values).pooler_output
        out: torch.Tensor = self.visual_projection(pooled)
        return out


@dataclass
class ClipImageEncoder:
    """CLIP image features of ``items`` (image paths or PIL images), preprocessed by the CLIP image processor
    at each forward (nothing is cached: a real task's images do not fit in memory as pixel tensors)."""

    module: ClipVision
    processor: Any
    scale: float  # logit_scale.exp() of the pretrained CLIP
    device: str = "cpu"

    @property
    def logit_scale(self) -> float:
        return self.scale

    def sizes(self, items: Sequence[Any]) -> list[int]:
        return [0] * len(items)  # one size (the processor resizes): the sampled order is kept

    def pixels(self, items: Sequence[Any]) -> torch.Tensor:
        from PIL import Image

        images = [Image.open(x).convert("RGB") if isinstance(x, (str, Path)) else x.convert("RGB") for x in items]
        out: torch.Tensor = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return out.to(self.device)

    def embed(self, weights: dict[str, torch.Tensor], items: Sequence[Any]) -> torch.Tensor:
        features = Functional(self.module, weights)(self.pixels(items))
        return torch.nn.functional.normalize(features, dim=-1)

    @torch.no_grad()
    def encode(self, weights: dict[str, torch.Tensor], items: Sequence[Any], batch_size: int) -> torch.Tensor:
        chunks = [self.embed(weights, items[s: s + batch_size]).float().cpu() for s in range(0, len(items), batch_size)]
        return torch.cat(chunks) if chunks else torch.empty(0, 0)
