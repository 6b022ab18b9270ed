"""What the adaptation sees: an encoder (:mod:`.encoders`), each task's unlabelled inputs and frozen head, and (for
the trace only) labelled test rows. This module loads the text zoo's; :mod:`.images` the CLIP image tasks'.

The heads are the evaluation harness's (:class:`mergelab.eval.Evaluator`): the zoo's frozen label-name heads
from the suite's pretrained encoder, logits ``LOGIT_SCALE * cos``. Unlabelled inputs (``unlabelled``):

* ``"test"`` (default): the test split's texts without labels -- the papers' protocol (AdaMerging Sec. 4,
  CART Appendix A: "Using the test dataset for each task"), as the official code's shuffled test loaders;
* ``"train"``: the train split's texts without labels, held out from the test rows that are scored;
* a mapping ``{task: [texts] or path}``: your own held-out texts (a file: one text per line).

Labels are used only to report accuracy in the trace, never by the objective.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.adapt.encoders import Encoder, TextEncoder
from mergelab.errors import MergelabError
from mergelab.zoo.encoder import MAX_LEN


@dataclass
class TaskInputs:
    name: str
    items: list[Any]  # unlabelled inputs the entropy is minimised on (texts, images)
    head: torch.Tensor  # (classes, dim), frozen, rows normalised
    test: list[tuple[Any, int]]  # labelled rows, for the accuracy trace

    @property
    def texts(self) -> list[Any]:
        """The inputs of a text task (``items``)."""
        return self.items


@dataclass
class Inputs:
    encoder: Encoder  # the base backbone, run on the merged weights at every forward
    tasks: list[TaskInputs]
    expert_accuracy: dict[str, float]

    @property
    def device(self) -> str:
        return self.encoder.device


def load_inputs(suite: Any, *, tasks: list[str] | None, unlabelled: Any, device: str, backbone: str,
                cache_dir: str | Path | None, quick: bool, progress: bool, max_len: int = MAX_LEN) -> Inputs:
    """The text suite's inputs: its evaluator's heads and test rows, the encoder truncating at ``max_len``."""
    from mergelab.eval import Evaluator
    from mergelab.zoo.datasets import load_task

    scorer = Evaluator(suite, tasks=tasks, device=device, backbone=backbone, cache_dir=cache_dir, quick=quick,
                       progress=progress)
    out = []
    for spec in scorer.tasks:
        if unlabelled == "test":
            texts = [t for t, _ in scorer.test[spec.name]]
        elif unlabelled == "train":
            texts = [t for t, _ in load_task(spec, cache_dir).train]
        elif isinstance(unlabelled, Mapping):
            texts = _texts(unlabelled, spec.name)
        else:
            raise MergelabError(f"unlabelled must be 'test', 'train' or a mapping task -> texts, got {unlabelled!r}")
        if not texts:
            raise MergelabError(f"task {spec.name!r}: no unlabelled texts")
        out.append(TaskInputs(spec.name, texts, scorer.heads[spec.name], scorer.test[spec.name]))
    for param in scorer.model.parameters():
        param.requires_grad_(False)
    return Inputs(TextEncoder(scorer.model, scorer.tokenizer, scorer.device, max_len), out, dict(scorer.expert_accuracy))


def _texts(table: Mapping[str, Any], task: str) -> list[str]:
    if task not in table:
        raise MergelabError(f"no unlabelled texts given for task {task!r} (tasks given: {', '.join(map(str, table))})")
    value = table[task]
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        try:
            return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise MergelabError(f"cannot read the unlabelled texts ({err})", file=str(path)) from None
    if isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
        return list(value)
    raise MergelabError(f"task {task!r}: unlabelled texts must be a list of strings or a file path")
