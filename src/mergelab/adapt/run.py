"""``mergelab.adapt(...)``: learn the coefficients on unlabelled inputs, then write or return the merged model.

The output is an ordinary merged model folder (written by ``mergelab.merge`` with the learned coefficients, so
``mergelab merge --method M --set coefficients=OUT/adapt_coefficients.json`` rebuilds it bit for bit) plus
``adapt_coefficients.json`` and ``adapt_trace.json``. The folder is assembled in a hidden sibling and renamed
into place only when complete (an existing one is replaced only with ``overwrite``, atomically); an
interruption at any point leaves nothing at ``out``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.adapt import METHODS
from mergelab.adapt.data import Inputs
from mergelab.adapt.optimise import Options
from mergelab.errors import MergelabError
from mergelab.ops import coefficients as coef


@dataclass
class AdaptResult:
    method: str
    hparams: dict[str, Any]  # the merge's hyperparameters, as resolved
    tasks: list[str]
    coefficients: dict[str, list[float]]  # group -> one coefficient per task, as merged
    trace: list[dict[str, Any]]  # {"step", "entropy"} per step; {"step", "accuracy", "average"} at evaluations
    options: dict[str, Any]
    seconds: float
    out: Path | None = None
    merged: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # when out is None

    @property
    def entropies(self) -> list[float]:
        return [e["entropy"] for e in self.trace if "entropy" in e]

    @property
    def accuracies(self) -> list[dict[str, Any]]:
        return [e for e in self.trace if "accuracy" in e]

    def payload(self) -> dict[str, Any]:
        """The coefficients file's content (what ``coefficients=`` of the merge methods takes)."""
        return {"format": coef.FORMAT, "method": self.method, "hparams": _jsonable(self.hparams), "tasks": self.tasks,
                "coefficients": self.coefficients}


def adapt(method: str, suite: Any, *, models: Mapping[str, Any] | None = None, base: Any = None,
          tasks: list[str] | None = None, out: str | Path | None = None, overwrite: bool = False,
          unlabelled: Any = "test", steps: int = 500, lr: float = 1e-3, batch_size: int = 16, batches: int = 1,
          clamp: bool = True, seed: int = 0, eval_every: int = 0, device: str = "cpu",
          deltas_dtype: str = "float32", backbone: str = "all-minilm-l6-v2", cache_dir: str | Path | None = None,
          quick: bool = False, progress: bool | None = None, max_len: int = 64, **hparams: Any) -> AdaptResult:
    """Test-time adaptation of ``method``'s coefficients (``adamerging``, ``adamerging_pp``, ``cart_pp``).

    Args:
        suite: a zoo suite name (``mt8``, ...; built or reused from the cache unless ``models`` is given), a
            suite/task YAML, or a :class:`~mergelab.zoo.Zoo`; its tasks give the heads and the inputs.
        models: ``{task: model}`` instead of the zoo's experts (``base``: the suite's backbone unless given).
        tasks: a subset of the suite's tasks (the models merged are those tasks' experts).
        out: write the merged folder there (else the merged state dict is returned in ``result.merged``).
        unlabelled: ``"test"`` (papers' protocol), ``"train"``, or ``{task: [texts] | path}`` (see :mod:`.data`).
        steps, lr, batch_size, batches, clamp, seed, eval_every, max_len: see :mod:`.optimise` (where each default
            comes from: the official AdaMerging code, or FusionBench for ``batches=1``).
        device: ``cpu``, ``cuda`` or ``auto``.
        deltas_dtype: ``float32`` or ``bfloat16`` (half the memory; float32 accumulation).
        **hparams: the method's hyperparameters (``init``, ``granularity``, ``density``, ``rank_ratio``, ...).
    """
    from mergelab.adapt.data import load_inputs
    from mergelab.zoo import Zoo, build_zoo, resolve_device, resolve_suite
    from mergelab.zoo.backbones import backbone_folder

    options = check_options(method, hparams, steps=steps, lr=lr, batch_size=batch_size, batches=batches, clamp=bool(clamp),
                            seed=seed, eval_every=eval_every, max_len=max_len)
    show = bool(progress) if progress is not None else False
    device = resolve_device(device)
    zoo = suite if isinstance(suite, Zoo) else None
    if models is None and zoo is None:
        zoo = build_zoo(suite, backbone=backbone, cache_dir=cache_dir, quick=quick, device=device, progress=show)
    spec_names = [t.name for t in (zoo.tasks if zoo is not None else resolve_suite(suite, quick)[0].tasks)]
    chosen = [t for t in spec_names if tasks is None or t in tasks]
    unknown = sorted(set(tasks or []) - set(spec_names))
    if unknown:
        raise MergelabError(f"unknown task(s) {unknown}; tasks: {', '.join(spec_names)}")
    experts: Mapping[str, Any] = models if models is not None else (zoo.experts if zoo is not None else {})
    missing = [t for t in chosen if t not in experts]
    if missing:
        raise MergelabError(f"no model for task(s) {', '.join(missing)}")
    if len(chosen) < 1:
        raise MergelabError("no task to adapt on")
    if base is None:
        base = zoo.base if zoo is not None else backbone_folder(backbone, cache_dir)

    def load() -> Inputs:
        return load_inputs(zoo if zoo is not None else suite, tasks=chosen, unlabelled=unlabelled, device=device,
                           backbone=backbone, cache_dir=cache_dir, quick=quick, progress=show, max_len=max_len)

    return run(method, base, chosen, [experts[t] for t in chosen], load, options, hparams, out=out,
               overwrite=overwrite, device=device, deltas_dtype=deltas_dtype, progress=show,
               record={"unlabelled": unlabelled if isinstance(unlabelled, str) else "given"})


def check_options(method: str, hparams: Mapping[str, Any], **given: Any) -> Options:
    """The loop's options (``init`` from the method's hyperparameters), checked with the method."""
    from mergelab.methods.registry import get_method

    if method not in METHODS:
        raise MergelabError(f"method {method!r} cannot be adapted; adaptable: {', '.join(METHODS)}")
    if "coefficients" in hparams:
        raise MergelabError("coefficients are what adapt learns; to merge with given ones use mergelab merge")
    options = Options(init=float(hparams.get("init", get_method(method).defaults["init"])), **given)
    options.check()
    return options


RECORDED = ("steps", "lr", "batch_size", "batches", "clamp", "seed", "eval_every", "max_len")


def run(method: str, base: Any, tasks: list[str], models: list[Any], load: Callable[[], Inputs], options: Options,
        hparams: Mapping[str, Any], *, out: str | Path | None, overwrite: bool, device: str, deltas_dtype: str,
        progress: bool, record: Mapping[str, Any], recorded: tuple[str, ...] = RECORDED) -> AdaptResult:
    """The adaptation shared by :func:`adapt` (text zoo) and :func:`~mergelab.adapt.images.adapt_clip`: every
    header check (``mergelab.plan``), then ``load()`` the inputs, build the deltas, optimise, and return or write
    the merged model. ``record``: what the options entry of the result adds first (the inputs' description)."""
    from mergelab import api
    from mergelab.adapt.model import build
    from mergelab.adapt.optimise import optimise
    from mergelab.methods.registry import get_method

    resolved = get_method(method).resolve(dict(hparams), len(models))
    api.plan(method, base, models, out=out, overwrite=overwrite, **hparams)  # every header check first
    inputs = load()
    with _opened(base) as base_state, _opened_all(models) as states:
        merged = build(method, resolved, base_state, states, device=device, deltas_dtype=deltas_dtype)
    outcome = optimise(merged, inputs, options, progress=progress)
    table = {g: [float(c) for c in outcome.coefficients[i].tolist()] for i, g in enumerate(merged.groups)}
    del merged
    result = AdaptResult(method, resolved, tasks, table, outcome.trace,
                         {**record, "deltas_dtype": deltas_dtype, "device": device,
                          "expert_accuracy": inputs.expert_accuracy, **{k: getattr(options, k) for k in recorded}},
                         outcome.seconds)
    if out is None:
        state = api.merge(method, base, models, coefficients=result.payload(), progress=False)
        assert isinstance(state, dict)
        result.merged = state
    else:
        result.out = write(result, Path(out), base, models, overwrite=overwrite, progress=progress)
    return result


def write(result: AdaptResult, out: Path, base: Any, models: list[Any], *, overwrite: bool, progress: bool) -> Path:
    """The merged folder + coefficients + trace, assembled beside ``out`` and renamed into place when complete."""
    from mergelab import api
    from mergelab.io import leftovers
    from mergelab.io.placing import place

    if out.suffix == ".safetensors":
        raise MergelabError("adapt writes a folder (model, coefficients, trace); give a folder name", file=str(out))
    leftovers.sweep(out)
    tag = leftovers.new_tag()
    staged = leftovers.sibling(out, "tmp", tag)
    try:
        # the merge writes inside the owner-tagged staging folder, so a run killed at any point leaves one
        # folder that the next run's sweep recognises as stale (a sibling target would get its own name)
        staged.mkdir(0o777)
        inner = staged / "model"
        api.merge(result.method, base, models, out=inner, coefficients=result.payload(), progress=progress)
        for entry in sorted(inner.iterdir()):
            os.replace(entry, staged / entry.name)
        inner.rmdir()
        _write_json(staged / coef.FILE, result.payload() | {"options": _jsonable(result.options)})
        _write_json(staged / coef.TRACE, {"method": result.method, "tasks": result.tasks, "trace": result.trace,
                                          "seconds": round(result.seconds, 3)})
        place(staged, out, tag, overwrite=overwrite)
    except OSError as err:
        raise MergelabError(f"cannot write the output ({err.strerror or err})", file=str(out)) from None
    finally:
        if staged.exists():
            leftovers.discard(staged)
    return out


def _write_json(path: Path, data: Any) -> None:
    from mergelab.io.leftovers import write_text

    write_text(path, json.dumps(data, indent=1) + "\n")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class _Lazy(Mapping[str, torch.Tensor]):
    """A model's tensors by name, read on access."""

    def __init__(self, source: Any):
        self.source = source

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.source.get(name)  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[str]:
        return iter(self.source.specs)

    def __len__(self) -> int:
        return len(self.source.specs)


class _opened:
    def __init__(self, model: Any):
        from mergelab.io.sources import open_source

        self.source = open_source(model)

    def __enter__(self) -> _Lazy:
        return _Lazy(self.source)

    def __exit__(self, *args: object) -> None:
        self.source.close()


class _opened_all:
    def __init__(self, models: list[Any]):
        self.items = [_opened(m) for m in models]

    def __enter__(self) -> list[_Lazy]:
        return [item.__enter__() for item in self.items]

    def __exit__(self, *args: object) -> None:
        for item in self.items:
            item.__exit__()
