"""Score any model on a zoo suite: per-task accuracy with the suite's frozen text heads, the average, and
normalised accuracy (accuracy / the task's expert accuracy), as in Task Arithmetic / TIES / TSV / CART tables.

``evaluate(model, "mt8")`` loads the suite's base encoder once, builds the frozen heads from it, then loads
``model``'s weights (any checkpoint mergelab reads: folder, safetensors, state dict, ...) into it and scores
every task's test split. :class:`Evaluator` keeps the base, heads and test rows for many models in a row.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError
from mergelab.zoo.scores import EvalResult

__all__ = ["EvalResult", "Evaluator", "evaluate"]


class Evaluator:
    """The suite's base encoder, frozen heads and test rows, kept for scoring many models.

    Args:
        suite: a :class:`~mergelab.zoo.Zoo`, a built-in suite name, or a suite/task YAML path.
        tasks: only these tasks (default: all of the suite's).
        device: ``cpu``, ``cuda`` or ``auto``.
        batch_size: texts per forward pass.
        backbone: the suite's backbone when ``suite`` is a name (the base the heads come from).
        cache_dir: cache root of the zoo (datasets and experts).
        quick: the suite's quick version when ``suite`` is a name.
        progress: show progress bars.
    """

    def __init__(self, suite: Any, *, tasks: list[str] | None = None, device: str = "cpu", batch_size: int = 64,
                 backbone: str = "all-minilm-l6-v2", cache_dir: str | Path | None = None, quick: bool = False,
                 progress: bool = True):
        from tqdm.auto import tqdm

        from mergelab.zoo import Zoo, resolve_device, resolve_suite
        from mergelab.zoo.backbones import backbone_folder
        from mergelab.zoo.build import read_meta, zoo_dir
        from mergelab.zoo.datasets import load_task, task_path
        from mergelab.zoo.encoder import load_encoder, text_head

        if isinstance(suite, Zoo):
            spec = suite.spec if suite.spec is not None else resolve_suite(suite.suite)[0]
            base, known = suite.base, dict(suite.expert_accuracy)
            if cache_dir is None and suite.path is not None:  # <cache>/zoo/<backbone>/<suite>
                cache_dir = suite.path.parents[2]
        else:
            spec, registered = resolve_suite(suite, quick)
            base = backbone_folder(backbone, cache_dir)
            known = {}
            for task in spec.tasks:  # expert accuracies recorded by a previous build, if any
                path = registered.get(task.name)
                meta = read_meta(zoo_dir(spec, backbone, cache_dir) / ("registered" if path else "experts") /
                                 (f"{task.name}.json" if path else f"{task.name}/mergelab_expert.json"))
                if meta is not None:
                    known[task.name] = float(meta["accuracy"])
        names = [t.name for t in spec.tasks]
        unknown = sorted(set(tasks or []) - set(names))
        if unknown:
            raise MergelabError(f"unknown task(s) {unknown} for suite {spec.name!r}; tasks: {', '.join(names)}")
        self.suite = spec.name
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.progress = progress
        self.model, self.tokenizer = load_encoder(base, self.device)
        self.base = Path(base)
        self.expert_accuracy = known
        self.tasks = [t for t in spec.tasks if tasks is None or t.name in tasks]
        self.heads = {t.name: text_head(self.model, self.tokenizer, t.eval_names or t.names, self.device)
                      for t in self.tasks}
        uncached = [t for t in self.tasks if not task_path(t, cache_dir).exists()]
        # made from the packaged sources the first time (minutes for mt8): show it
        self.test = {t.name: load_task(t, cache_dir).test
                     for t in tqdm(self.tasks, desc="task data", disable=not (progress and uncached), leave=False)}
        self._base_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def __call__(self, model: Any, expert_accuracy: dict[str, float] | None = None) -> EvalResult:
        from mergelab.zoo.encoder import accuracy, encode

        start = time.perf_counter()
        self.load(model)
        acc: dict[str, float] = {}
        for task in self.tasks:
            rows = self.test[task.name]
            emb = encode(self.model, self.tokenizer, [t for t, _ in rows], batch_size=self.batch_size,
                         device=self.device, progress=self.progress, desc=f"eval {task.name}")
            acc[task.name] = accuracy(emb, self.heads[task.name], [c for _, c in rows])
        experts = self.expert_accuracy if expert_accuracy is None else expert_accuracy
        normalized = None
        if all(experts.get(name) for name in acc):
            normalized = {name: value / experts[name] for name, value in acc.items()}
        return EvalResult(self.suite, acc, sum(acc.values()) / len(acc), normalized, time.perf_counter() - start)

    def load(self, model: Any) -> None:
        """Copy ``model``'s tensors into ``self.model`` (``None``: the base); every encoder tensor must be present,
        with its shape. For analyses that need more than accuracy (e.g. losses on a loss landscape)."""
        from mergelab.io.sources import open_source

        if model is None:  # the base itself
            self.model.load_state_dict(self._base_state)
            return
        source = open_source(model)
        try:
            state = {}
            for name, ref in self._base_state.items():
                if name not in source.specs:
                    raise MergelabError("tensor missing from the model (not the suite's architecture?)",
                                        file=source.label, tensor=name)
                tensor = source.get(name)
                if tuple(tensor.shape) != tuple(ref.shape):
                    raise MergelabError(f"shape {list(tensor.shape)} != the suite base's {list(ref.shape)}",
                                        file=source.label, tensor=name)
                state[name] = tensor.to(ref.dtype)
        finally:
            source.close()
        self.model.load_state_dict(state)


def evaluate(model: Any, suite: Any, *, tasks: list[str] | None = None, device: str = "cpu", batch_size: int = 64,
             expert_accuracy: dict[str, float] | None = None, progress: bool = True,
             cache_dir: str | Path | None = None, backbone: str = "all-minilm-l6-v2",
             quick: bool = False) -> EvalResult:
    """Per-task accuracy of ``model`` on ``suite`` with the suite's frozen heads (see :class:`Evaluator`).

    ``model=None`` scores the suite's base (zero-shot). ``expert_accuracy`` defaults to the accuracies
    recorded when the suite's experts were built (``normalized`` is None when they are unknown).
    """
    evaluator = Evaluator(suite, tasks=tasks, device=device, batch_size=batch_size, backbone=backbone,
                          cache_dir=cache_dir, quick=quick, progress=progress)
    return evaluator(model, expert_accuracy)
