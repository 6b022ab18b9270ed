"""Test-time adaptation of merged CLIP vision encoders: the papers' own setting (AdaMerging Sec. 4 and CART
Appendix A merge CLIP ViT-B/32 and ViT-L/14 vision towers fine-tuned on 8 image tasks).

``adapt_clip(method, base, models, clip_folder, tasks)``: the merged model is the vision tower (experts are
``CLIPVisionModel`` checkpoints or folders, ``vision_model.*`` tensors; ``base`` the pretrained tower, e.g.
:func:`mergelab.zoo.clip.save_vision_base`); each task's frozen head is its zero-shot head from the pretrained
CLIP's text tower (:func:`mergelab.zoo.clip.zero_shot_head`, the task_vectors templates); logits =
``logit_scale.exp() * normalised image features @ head.T`` (:mod:`.encoders`). Unlabelled inputs (``unlabelled``):

* ``"test"`` (default): the task's images without their labels -- the papers' protocol (AdaMerging Sec. 4,
  CART Appendix A: "Using the test dataset for each task");
* a mapping ``{task: data}``: your own held-out images -- an image folder (its sub-folders' names ignored), a
  sequence of ``{"image": ...}`` records, or of images (PIL images or paths).

Labels are used only for the accuracy trace. Everything else -- the deltas, the loop, the output folder that
``mergelab merge --set coefficients=...`` rebuilds bit for bit -- is :func:`mergelab.adapt.run.run`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergelab.adapt.data import Inputs, TaskInputs
from mergelab.adapt.encoders import ClipImageEncoder, ClipVision
from mergelab.adapt.run import AdaptResult, check_options, run
from mergelab.errors import MergelabError

RECORDED = ("steps", "lr", "batch_size", "batches", "clamp", "seed", "eval_every")


def adapt_clip(method: str, base: Any, models: Mapping[str, Any], clip_folder: str | Path,
               tasks: Mapping[str, tuple[Any, Sequence[str] | None]], *, unlabelled: Any = "test",
               out: str | Path | None = None, overwrite: bool = False, steps: int = 500, lr: float = 1e-3,
               batch_size: int = 16, batches: int = 1, clamp: bool = True, seed: int = 0, eval_every: int = 0,
               device: str = "cpu", deltas_dtype: str = "float32", progress: bool | None = None,
               **hparams: Any) -> AdaptResult:
    """Test-time adaptation of ``method``'s coefficients (``adamerging``, ``adamerging_pp``, ``cart_pp``) for
    CLIP vision encoders.

    Args:
        base: the pretrained vision tower (a ``CLIPVisionModel`` folder or checkpoint).
        models: ``{task: fine-tuned vision tower}``, one per task of ``tasks``.
        clip_folder: the pretrained ``CLIPModel`` folder (text tower, projections, ``logit_scale``, tokenizer,
            image processor): the heads and the frozen ``visual_projection``.
        tasks: ``{task: (data, classnames or None)}`` as :func:`mergelab.zoo.clip.evaluate_clip`: an image
            folder ``root/<class>/<image>`` (class names default to the folder names) or records
            ``{"image": PIL image, "label": int}``; templates are ``TEMPLATES[task]`` or "a photo of a {}.".
        unlabelled: ``"test"`` or ``{task: data}`` (see the module).
        out, overwrite, steps, lr, batch_size, batches, clamp, seed, eval_every, device, deltas_dtype, progress,
            **hparams: as :func:`mergelab.adapt.adapt`.
    """
    from mergelab.zoo import resolve_device

    options = check_options(method, hparams, steps=steps, lr=lr, batch_size=batch_size, batches=batches,
                            clamp=bool(clamp), seed=seed, eval_every=eval_every)
    if not isinstance(tasks, Mapping) or not tasks:
        raise MergelabError("tasks must be a non-empty mapping {task: (data, classnames or None)}")
    if not isinstance(models, Mapping):
        raise MergelabError("models must be a mapping {task: vision encoder}")
    names = list(tasks)
    missing, extra = [t for t in names if t not in models], [str(t) for t in models if t not in tasks]
    if missing or extra:
        raise MergelabError(f"no model for task(s) {', '.join(missing)}" if missing
                            else f"model(s) for task(s) without data: {', '.join(extra)}")
    if not (unlabelled == "test" or isinstance(unlabelled, Mapping)):
        raise MergelabError(f"unlabelled must be 'test' or a mapping task -> images, got {unlabelled!r}")
    device = resolve_device(device)
    show = bool(progress) if progress is not None else False

    def load() -> Inputs:
        return load_clip_inputs(clip_folder, tasks, unlabelled=unlabelled, device=device, base=base)

    return run(method, base, names, [models[t] for t in names], load, options, hparams, out=out, overwrite=overwrite,
               device=device, deltas_dtype=deltas_dtype, progress=show, recorded=RECORDED,
               record={"unlabelled": unlabelled if isinstance(unlabelled, str) else "given", "clip": str(clip_folder)})


def load_clip_inputs(clip_folder: str | Path, tasks: Mapping[str, Any], *, unlabelled: Any = "test",
                     device: str = "cpu", base: Any = None) -> Inputs:
    """The CLIP encoder (vision tower + frozen projection, ``logit_scale.exp()``) and each task's zero-shot head,
    unlabelled images and labelled rows; ``base`` (if given) is checked to be a vision tower of this CLIP."""
    from mergelab.zoo.clip import load_clip, task_data, templates_for, zero_shot_head

    model, tokenizer, processor = load_clip(clip_folder, device)
    for param in model.parameters():
        param.requires_grad_(False)
    module = ClipVision(model)
    if base is not None:
        check_vision(module, base)
    out = []
    for name, given in tasks.items():
        if not (isinstance(given, (tuple, list)) and len(given) == 2):
            raise MergelabError(f"task {name!r}: give (data, classnames or None)")
        images, labels, classnames = task_data(name, given[0], given[1])
        head = zero_shot_head(model, tokenizer, classnames, templates_for(name), device)
        items = images if unlabelled == "test" else unlabelled_images(unlabelled, name)
        out.append(TaskInputs(name, items, head, list(zip(images, labels, strict=True))))
    encoder = ClipImageEncoder(module, processor, float(model.logit_scale.exp()), device)
    return Inputs(encoder, out, {})


def unlabelled_images(table: Mapping[str, Any], task: str) -> list[Any]:
    """A task's held-out images: an image folder, ``{"image": ...}`` records, or images / image paths."""
    from mergelab.zoo.clip import image_folder

    if task not in table:
        raise MergelabError(f"no unlabelled images given for task {task!r} (tasks given: {', '.join(map(str, table))})")
    value = table[task]
    if isinstance(value, (str, Path)):
        return [path for path, _ in image_folder(value)[1]]
    if not isinstance(value, Sequence) or not value:
        raise MergelabError(f"task {task!r}: no unlabelled images (give a folder, records or a list of images)")
    return [x["image"] if isinstance(x, Mapping) else x for x in value]


def check_vision(module: Any, base: Any) -> None:
    """Every floating tensor of ``base`` must be one of the vision tower's, same shape: the merged weights are
    run under their own names."""
    from mergelab.io.sources import open_source

    known = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    source = open_source(base)
    try:
        for name, spec in source.specs.items():
            if not spec.dtype.is_floating_point:
                continue
            if name not in known:
                raise MergelabError("not a tensor of the CLIP vision tower (a CLIPVisionModel checkpoint, "
                                    "vision_model.* names, is needed)", file=source.label, tensor=name)
            if tuple(spec.shape) != known[name]:
                raise MergelabError(f"shape {list(spec.shape)} != CLIP's {list(known[name])}", file=source.label,
                                    tensor=name)
    finally:
        source.close()
