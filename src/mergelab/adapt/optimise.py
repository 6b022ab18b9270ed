"""The test-time adaptation loop (AdaMerging's, which CART++ adopts): Adam on the coefficients, entropy objective.

Each step: merge the weights once from the (clamped) coefficients, run every task's sampled unlabelled batches
through the backbone with its frozen head, sum the tasks' mean entropies (:mod:`.objective`), one backward pass
to the coefficients, one Adam step. Defaults and where they come from:

================== ======== ==================================================================================
option             default  source
================== ======== ==================================================================================
``init``           0.3      official ``prior = 0.3`` (EnnengYang/AdaMerging ``src/main_*_adamerging*.py``);
                            FusionBench ``init_values: 0.3`` (``config/method/adamerging/clip.yaml``)
``lr``             1e-3     official ``torch.optim.Adam(..., lr=1e-3, betas=(0.9, 0.999), weight_decay=0.)``;
                            FusionBench ``lr: 1e-3``
``batch_size``     16       official ``get_dataset(..., batch_size=16)``; FusionBench ``batch_size: 16``
``batches``        1        FusionBench (one batch per task per step). The official code reads two, batches
                            ``i = 0`` and ``i = 1`` of a freshly shuffled loader per task (``if i > 0: break``
                            after the second), summing their mean entropies: ``batches=2``. One is the default
                            because a step's cost is its forwards: on a 2-core CPU, MT8 MiniLM takes ~1.6 s
                            per step with one batch and ~3.1 s with two (``benchmarks/bench_adapt.py``), i.e.
                            ~13 against ~26 minutes for the 500 steps
``steps``          500      official ``epochs = 500`` (one optimiser step each); FusionBench ``max_steps: 1000``
``clamp``          True     official ``torch.clamp(lambdas_raw, 0, 1)`` in every forward (the raw values are
                            optimised; the clamped ones merge); FusionBench ``clamp_weights: false``
================== ======== ==================================================================================

The base's own coefficient is fixed at 1 (official ``pretrain_lambdas = ones``); CART++ likewise keeps
``theta_avg`` at 1. Sampling: each step draws, per task, ``batch_size * batches`` distinct inputs from a
``torch.Generator`` seeded with ``seed`` (a fresh shuffle per step, as the official loaders), so a seed
fixes the run on a given device and thread count.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mergelab.adapt.data import Inputs, TaskInputs
from mergelab.adapt.encoders import Encoder, TextEncoder
from mergelab.adapt.model import MergedWeights
from mergelab.adapt.objective import entropy


@dataclass(frozen=True)
class Options:
    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 16
    batches: int = 1
    init: float = 0.3
    clamp: bool = True
    seed: int = 0
    eval_every: int = 0  # accuracy every N steps (0: before and after only; -1: never)
    max_len: int = 64
    eval_batch_size: int = 64

    def check(self) -> None:
        from mergelab.errors import MergelabError

        for key in ("steps", "batch_size", "batches", "eval_every", "max_len", "eval_batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise MergelabError(f"{key} must be an integer, got {value!r}")
        if self.steps < 0 or self.batch_size < 1 or self.batches < 1 or self.max_len < 2 or self.eval_batch_size < 1:
            raise MergelabError("steps >= 0, batch_size >= 1, batches >= 1, max_len >= 2 and eval_batch_size >= 1 are needed")
        if self.eval_every < -1:
            raise MergelabError("eval_every must be -1 (never), 0 (before and after) or a number of steps")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1e3):
            raise MergelabError(f"lr must be a positive number, got {self.lr!r}")


@dataclass
class Outcome:
    coefficients: torch.Tensor  # (groups, tasks), as merged (clamped)
    trace: list[dict[str, Any]] = field(default_factory=list)  # {"step", "entropy"} and {"step", "accuracy", ...}
    seconds: float = 0.0


def _encoder(inputs: Inputs, max_len: int | None) -> Encoder:
    encoder = inputs.encoder
    if max_len is not None and isinstance(encoder, TextEncoder) and encoder.max_len != max_len:
        return dataclasses.replace(encoder, max_len=max_len)
    return encoder


def logits(inputs: Inputs, task: TaskInputs, weights: dict[str, torch.Tensor], items: list[Any],
           max_len: int | None = None) -> torch.Tensor:
    """The task's logits on ``items`` with the merged ``weights``: scale * cos(features, frozen head)
    (``max_len``: the texts' truncation, if not the encoder's)."""
    encoder = _encoder(inputs, max_len)
    return head_logits(encoder.logit_scale, encoder.embed(weights, items), task.head)


def head_logits(scale: float, emb: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """``scale * emb @ head.T``: normalised features against a frozen head's normalised rows."""
    return scale * emb @ head.to(emb.device, emb.dtype).T


def token_lengths(inputs: Inputs, items: list[Any], max_len: int | None = None) -> list[int]:
    """Each input's size (a text's token count, truncated at ``max_len``), to group the forwards by it."""
    return _encoder(inputs, max_len).sizes(items)


def step_loss(inputs: Inputs, weights: dict[str, torch.Tensor], samples: list[list[int]], lengths: list[list[int]],
              options: Options) -> torch.Tensor:
    """``sum_tasks sum_batches mean_{x in batch} H(x)`` for each task's sampled input indices ``samples[t]``,
    batches of ``batch_size`` in the sampled order (as the official loop).

    The value depends only on which inputs form each batch, not on how they are run through the backbone, so
    the forwards take every sampled input of every task sorted by size (``lengths``: the encoder's ``sizes``),
    in chunks of ``batch_size``. For texts: little padding (MT8 texts average ~20 tokens, a random batch pads
    to ~45) and the same objective, to float rounding; padded positions are masked out of attention and
    pooling. Images are all one size: the chunks are the sampled batches."""
    encoder = inputs.encoder
    flat = [(t, i) for t, take in enumerate(samples) for i in take]
    order = sorted(range(len(flat)), key=lambda k: lengths[flat[k][0]][flat[k][1]])
    pieces = []
    for start in range(0, len(order), options.batch_size):
        chunk = order[start: start + options.batch_size]
        pieces.append(encoder.embed(weights, [inputs.tasks[flat[k][0]].items[flat[k][1]] for k in chunk]))
    emb = torch.empty(len(flat), pieces[0].shape[1], dtype=pieces[0].dtype, device=pieces[0].device)
    emb = emb.index_copy(0, torch.tensor(order, device=emb.device), torch.cat(pieces))
    loss = torch.zeros((), device=emb.device)
    offset = 0
    for task, take in zip(inputs.tasks, samples, strict=True):
        scores = entropy(head_logits(encoder.logit_scale, emb[offset: offset + len(take)], task.head))
        for b in range(0, len(take), options.batch_size):
            loss = loss + scores[b: b + options.batch_size].mean()
        offset += len(take)
    return loss


def accuracy(inputs: Inputs, weights: dict[str, torch.Tensor], options: Options) -> dict[str, float]:
    """Top-1 accuracy of each task's labelled rows (the trace; never the objective)."""
    from mergelab.zoo.encoder import accuracy as top1

    detached = {k: v.detach() for k, v in weights.items()}
    out = {}
    for task in inputs.tasks:
        emb = inputs.encoder.encode(detached, [x for x, _ in task.test], options.eval_batch_size)
        out[task.name] = top1(emb, task.head.float().cpu(), [c for _, c in task.test])
    return out


def optimise(merged: MergedWeights, inputs: Inputs, options: Options, *, progress: bool = False,
             on_step: Callable[[int, float], None] | None = None) -> Outcome:
    """Learn the coefficients; returns those the merged model uses and the trace."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    device = next(iter(merged.anchor.values())).device if merged.anchor else torch.device("cpu")
    raw = torch.nn.Parameter(torch.full((len(merged.groups), merged.n_tasks), float(options.init), device=device))
    optimizer = torch.optim.Adam([raw], lr=options.lr, betas=(0.9, 0.999), weight_decay=0.0)
    generator = torch.Generator().manual_seed(options.seed)
    trace: list[dict[str, Any]] = []

    def used() -> torch.Tensor:
        return raw.clamp(0.0, 1.0) if options.clamp else raw * 1.0

    def record_accuracy(step: int) -> None:
        with torch.no_grad():
            acc = accuracy(inputs, merged.weights(used()), options)
        trace.append({"step": step, "accuracy": acc, "average": sum(acc.values()) / len(acc)})

    if options.eval_every >= 0:
        record_accuracy(0)
    lengths = [inputs.encoder.sizes(task.items) for task in inputs.tasks]
    bar = tqdm(range(options.steps), desc="adapt", disable=not progress, dynamic_ncols=True)
    for step in bar:
        weights = merged.weights(used())
        samples = [torch.randperm(len(task.items), generator=generator)[: options.batch_size * options.batches].tolist()
                   for task in inputs.tasks]
        loss = step_loss(inputs, weights, samples, lengths, options)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        value = float(loss.detach())
        trace.append({"step": step, "entropy": value})
        bar.set_postfix(entropy=f"{value:.4f}")
        if on_step is not None:
            on_step(step, value)
        done = step + 1
        if options.eval_every > 0 and done % options.eval_every == 0 and done != options.steps:
            record_accuracy(done)
    if options.eval_every >= 0 and options.steps > 0:
        record_accuracy(options.steps)
    return Outcome(used().detach().cpu(), trace, time.perf_counter() - start)
