"""Fine-tune the encoder of one expert against a frozen text head (the CLIP fine-tuning protocol of
Task Arithmetic, Ilharco et al. 2023, ``src/finetune.py`` in mlfoundations/task_vectors: frozen zero-shot
head, AdamW, cosine schedule with warm-up, only the encoder trained).

Defaults (:class:`Recipe`): AdamW lr 5e-5, batch 32, max_len 64, logit scale 20 (docs/data.md §6);
weight decay 0.1, cosine decay after a linear warm-up and gradient-norm clipping at 1.0 as task_vectors'
``finetune.py`` / ``args.py`` (warm-up there is 500 steps; ours is 10 % of the steps, as our runs are ~60 steps). One epoch
over 2,000 examples keeps the MiniLM MT8 zoo near 30 minutes on 2 CPU cores. Seeded: the same recipe gives
the same expert on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.zoo.encoder import LOGIT_SCALE, MAX_LEN, pooled, tokenize


@dataclass(frozen=True)
class Recipe:
    epochs: int = 1
    lr: float = 5e-5
    batch_size: int = 32
    max_len: int = MAX_LEN
    weight_decay: float = 0.1
    warmup: float = 0.1  # fraction of the steps
    grad_clip: float = 1.0  # max gradient norm
    logit_scale: float = LOGIT_SCALE
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def finetune(model: Any, tokenizer: Any, head: torch.Tensor, rows: Sequence[tuple[str, int]], recipe: Recipe, *,
             device: str = "cpu", progress: bool = True, desc: str = "fine-tune") -> float:
    """Train ``model`` in place on ``rows`` (text, class index into ``head``); returns the last epoch's mean loss."""
    from tqdm.auto import tqdm

    torch.manual_seed(recipe.seed)  # dropout masks
    gen = torch.Generator().manual_seed(recipe.seed)  # batch order
    head = head.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    per_epoch = math.ceil(len(rows) / recipe.batch_size)
    total = per_epoch * recipe.epochs
    warmup = max(1, round(recipe.warmup * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total, warmup))
    model.train()
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    mean_loss = float("nan")
    for _ in range(recipe.epochs):
        order = torch.randperm(len(rows), generator=gen).tolist()
        losses = []
        for start in range(0, len(order), recipe.batch_size):
            chunk = [rows[i] for i in order[start: start + recipe.batch_size]]
            batch = tokenize(tokenizer, [t for t, _ in chunk], device, recipe.max_len)
            logits = recipe.logit_scale * pooled(model, batch) @ head.T
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([c for _, c in chunk], device=device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        mean_loss = sum(losses) / len(losses)
    bar.close()
    model.eval()
    return mean_loss


def save_expert(model: Any, base_folder: Path, out: Path) -> None:
    """Write ``model`` as a Hugging Face folder with exactly the base's tensor names, shapes and dtypes.

    Buffers that transformers does not save (e.g. BERT's ``embeddings.position_ids``) are copied from the
    base file, so merging sees the same keys in base and experts. Config and tokenizer files come from the base.
    """
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from mergelab.errors import MergelabError

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    merged: dict[str, torch.Tensor] = {}
    with safe_open(str(base_folder / "model.safetensors"), "pt") as base:
        for name in base.keys():
            ref = base.get_slice(name)
            value = state.get(name)
            if value is None:
                value = base.get_tensor(name)
            if list(value.shape) != list(ref.get_shape()):
                raise MergelabError(f"fine-tuned shape {list(value.shape)} != base {ref.get_shape()}",
                                    file=str(out), tensor=name)
            merged[name] = value.to(base.get_tensor(name).dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    for item in base_folder.iterdir():
        if item.name in ("model.safetensors", "README.md", ".gitattributes") or item.suffix in (".bin", ".onnx", ".h5"):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, out / item.name)
