"""The offline model zoo: experts fine-tuned from a packaged backbone on packaged datasets (docs/data.md).

``build_zoo("mt8")`` fine-tunes (or reuses from the cache) one expert per task of a suite and returns a
:class:`Zoo`: the base folder, one Hugging Face folder per expert (same tensor names and shapes as the base),
and the tasks whose frozen text heads score every model. See README "Model zoo" for suites and costs.
Heavy dependencies (transformers) are imported only when a zoo is built or evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError

__all__ = ["Task", "Zoo", "build_zoo", "list_zoos", "resolve_suite", "suite_names"]


@dataclass(frozen=True)
class Task:
    """One classification task of a suite."""

    name: str
    labels: list[str]  # label names used for the frozen head prompts (training head)
    eval_labels: list[str] | None = None  # scoring head if different (class-incremental: all classes)


@dataclass(frozen=True)
class Zoo:
    suite: str
    backbone: str
    base: Path  # HF folder of the pretrained backbone
    experts: dict[str, Path]  # task name -> HF folder of its fine-tuned encoder
    tasks: list[Task]
    expert_accuracy: dict[str, float] = field(default_factory=dict)  # each expert on its own task
    zero_shot: dict[str, float] = field(default_factory=dict)  # the base on each task
    path: Path | None = None  # the zoo's cache folder (zoo.json)
    spec: Any = field(default=None, compare=False, repr=False)  # the suites.Suite it was built from


def suite_names() -> list[str]:
    from mergelab.zoo.suites import suite_names as names

    return names()


def resolve_suite(suite: Any, quick: bool = False) -> tuple[Any, dict[str, Path]]:
    """``(Suite, registered experts)`` from a built-in name, a suite/task YAML path, or a Suite."""
    from mergelab.zoo.suites import Suite, get_suite, quick_version
    from mergelab.zoo.user import is_yaml, load_suite_yaml

    if isinstance(suite, Suite):
        return (quick_version(suite) if quick else suite), {}
    if isinstance(suite, (str, Path)) and is_yaml(suite):
        spec, experts = load_suite_yaml(suite)
        return (quick_version(spec) if quick else spec), experts
    if not isinstance(suite, str):
        raise MergelabError(f"not a suite: {type(suite).__name__}")
    return get_suite(suite, quick), {}


def build_zoo(suite: str | Path, *, backbone: str = "all-minilm-l6-v2", cache_dir: str | Path | None = None,
              quick: bool = False, device: str = "cpu", progress: bool = True, recipe: Any = None) -> Zoo:
    """Fine-tune (or reuse) the experts of ``suite`` and return the zoo.

    Args:
        suite: a built-in suite (``mt8``, ``noun-ci-5-seq``, ``vader-domains``, ... see :func:`suite_names`;
            ``NAME-quick`` = ``quick=True``) or a suite/task YAML file (see :mod:`mergelab.zoo.user`).
        backbone: ``all-minilm-l6-v2`` (default), ``all-mpnet-base-v2``, or a local model folder.
        cache_dir: cache root (default ``$MERGELAB_CACHE`` or ``~/.cache/mergelab``); experts live in ``zoo/``.
        quick: the small version (3 mt8 tasks, 300 train / 200 test rows) for tests and demos.
        device: ``cpu``, ``cuda`` or ``auto``.
        recipe: a :class:`mergelab.zoo.train.Recipe` (default: its documented defaults).
    """
    from mergelab.zoo.build import build_experts

    spec, registered = resolve_suite(suite, quick)
    manifest = build_experts(spec, backbone=backbone, recipe=recipe, cache_dir=cache_dir,
                             device=resolve_device(device), progress=progress, user_experts=registered)
    from mergelab.zoo.build import zoo_dir

    return _zoo_from_manifest(manifest, spec, zoo_dir(spec, backbone, cache_dir))


def _zoo_from_manifest(manifest: dict[str, Any], spec: Any, path: Path | None) -> Zoo:
    experts = manifest["experts"]
    tasks = [Task(t.name, list(t.names), list(t.eval_names) if t.eval_names else None) for t in spec.tasks]
    return Zoo(
        suite=manifest["suite"], backbone=manifest["backbone"], base=Path(manifest["base"]),
        experts={name: Path(e["path"]) for name, e in experts.items()}, tasks=tasks,
        expert_accuracy={name: float(e["accuracy"]) for name, e in experts.items()},
        zero_shot={name: float(e["zero_shot"]) for name, e in experts.items()}, path=path, spec=spec,
    )


def list_zoos(cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The zoos built in the cache: one manifest (``zoo.json``) per (backbone, suite)."""
    from mergelab.zoo.datasets import cache_root

    out = []
    for path in sorted((cache_root(cache_dir) / "zoo").glob("*/*/zoo.json")):
        try:
            out.append(json.loads(path.read_text(encoding="utf-8")) | {"path": str(path.parent)})
        except ValueError:
            continue
    return out


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
