"""Text encoder, frozen zero-shot heads and scoring, as in CLIP (Radford et al. 2021) and the merging papers.

Embedding = mean of ``last_hidden_state`` over the attention mask, L2-normalised (how all-MiniLM-L6-v2 was
trained; docs/data.md §1). A task's frozen head = the normalised embeddings of ``"This is about {name}."``
from the *pretrained* encoder; logits = ``LOGIT_SCALE * emb @ head.T`` (scale 20, docs/data.md §6). Experts and
merged models are all scored with the same heads, as in Task Arithmetic / TIES / TSV on CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mergelab.zoo.backbones import offline

TEMPLATE = "This is about {}."
LOGIT_SCALE = 20.0
MAX_LEN = 64


def load_encoder(folder: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local Hugging Face folder, in eval mode."""
    offline()
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    return model, tokenizer


def pooled(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the attention mask of the last hidden state, L2-normalised: ``(batch, dim)``."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


def tokenize(tokenizer: Any, texts: Sequence[str], device: str = "cpu", max_len: int = MAX_LEN) -> dict[str, torch.Tensor]:
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}


@torch.no_grad()
def encode(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 64, device: str = "cpu",
           max_len: int = MAX_LEN, progress: bool = False, desc: str = "encode") -> torch.Tensor:
    """Embeddings of ``texts`` ``(n, dim)`` on CPU; batches of similar length (less padding), original order kept."""
    from tqdm.auto import tqdm

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[torch.Tensor] = []
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = [texts[i] for i in order[start: start + batch_size]]
        out.append(pooled(model, tokenize(tokenizer, chunk, device, max_len)).float().cpu())
    emb = torch.cat(out) if out else torch.empty(0, 0)
    result = torch.empty_like(emb)
    result[torch.tensor(order, dtype=torch.long)] = emb
    return result


def text_head(model: Any, tokenizer: Any, names: Sequence[str], device: str = "cpu") -> torch.Tensor:
    """The frozen classification head ``(classes, dim)``: normalised embeddings of the class prompts."""
    return encode(model, tokenizer, [TEMPLATE.format(n) for n in names], device=device)


def accuracy(emb: torch.Tensor, head: torch.Tensor, labels: Sequence[int]) -> float:
    """Top-1 accuracy of ``emb @ head.T`` (the logit scale does not change the argmax)."""
    pred = (emb @ head.T).argmax(dim=1)
    return float((pred == torch.tensor(list(labels))).float().mean())
