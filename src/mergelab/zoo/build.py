"""Build (or reuse) a suite's experts: one fine-tuned encoder per task, cached as Hugging Face folders.

Layout: ``<cache>/zoo/<backbone>/<suite>/experts/<task>/`` (model.safetensors + config + tokenizer +
``mergelab_expert.json``) and ``<cache>/zoo/<backbone>/<suite>/zoo.json``. An expert is reused only when its
recorded key -- sha256 of the recipe, the task's rows, the head prompts, the base weights and (sequential
suites) the previous expert's key -- matches; anything changed rebuilds it. Folders appear atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError
from mergelab.io.leftovers import write_text
from mergelab.zoo.backbones import DEFAULT, backbone_folder, backbone_id, weights_sha256
from mergelab.zoo.datasets import TaskData, cache_root, load_task
from mergelab.zoo.encoder import TEMPLATE, accuracy, encode, load_encoder, text_head
from mergelab.zoo.suites import Suite, TaskSpec
from mergelab.zoo.train import Recipe, finetune, save_expert

log = logging.getLogger(__name__)
META = "mergelab_expert.json"
FORMAT = 1  # bump when training code changes what a recipe produces


def zoo_dir(suite: Suite, backbone: str, cache_dir: str | Path | None) -> Path:
    return cache_root(cache_dir) / "zoo" / backbone_id(backbone) / suite.name


def expert_key(recipe: Recipe, spec: TaskSpec, data: TaskData, base_sha: str, parent_key: str | None) -> str:
    blob = {"format": FORMAT, "recipe": recipe.to_json(), "data": data.sha256, "names": list(spec.names),
            "template": TEMPLATE, "base": base_sha, "parent": parent_key}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return meta
    except (OSError, ValueError):
        return None


def build_experts(suite: Suite, *, backbone: str = DEFAULT, recipe: Recipe | None = None,
                  cache_dir: str | Path | None = None, device: str = "cpu", progress: bool = True,
                  user_experts: dict[str, Path] | None = None) -> dict[str, Any]:
    """Fine-tune (or reuse) every expert of ``suite``; returns the zoo manifest (also written to zoo.json)."""
    recipe = recipe or Recipe()
    user_experts = user_experts or {}
    base = backbone_folder(backbone, cache_dir)
    base_sha = weights_sha256(base)
    root = zoo_dir(suite, backbone, cache_dir)
    base_model, tokenizer = load_encoder(base, device)
    parent: tuple[Path, str] | None = None  # sequential suites: (folder, key) of the previous expert
    entries: dict[str, dict[str, Any]] = {}
    for index, spec in enumerate(suite.tasks):
        data = load_task(spec, cache_dir)
        eval_names = spec.eval_names or spec.names
        eval_head = text_head(base_model, tokenizer, eval_names, device)
        user = spec.name in user_experts
        if user:  # a user's own fine-tuned model: scored, never trained; its record lives in the zoo folder
            folder = Path(user_experts[spec.name])
            key = "user:" + weights_sha256(folder)
            meta_path = root / "registered" / f"{spec.name}.json"
        else:
            folder = root / "experts" / spec.name
            key = expert_key(recipe, spec, data, base_sha, parent[1] if suite.sequential and parent else None)
            meta_path = folder / META
        meta = read_meta(meta_path)
        if meta is None or meta.get("key") != key:
            desc = f"[{index + 1}/{len(suite.tasks)}] {spec.name}"
            labels = [c for _, c in data.test]
            zero_shot = accuracy(_embed_test(base_model, tokenizer, data, device, progress, desc + " zero-shot"),
                                 eval_head, labels)
            meta = {"key": key, "task": spec.name, "zero_shot": zero_shot, "n_train": len(data.train),
                    "n_test": len(data.test), "data_sha256": data.sha256, "base_sha256": base_sha}
            if user:
                model, _ = load_encoder(_check_folder(folder), device)
                target = meta_path.parent
            else:
                init = parent[0] if suite.sequential and parent else base
                model, _ = load_encoder(init, device)
                head = text_head(base_model, tokenizer, spec.names, device)  # the task's own classes, from the base
                start = time.perf_counter()
                meta["train_loss"] = finetune(model, tokenizer, head, data.train, recipe, device=device,
                                              progress=progress, desc=desc)
                meta["seconds"] = round(time.perf_counter() - start, 1)
                meta["recipe"] = recipe.to_json()
                meta["initialised_from"] = "previous expert" if suite.sequential and index else "base"
                target = folder.with_name(folder.name + ".tmp")
                shutil.rmtree(target, ignore_errors=True)
                save_expert(model, base, target)
            meta["accuracy"] = accuracy(_embed_test(model, tokenizer, data, device, progress, desc + " test"),
                                        eval_head, labels)
            target.mkdir(parents=True, exist_ok=True)
            (target / meta_path.name).write_text(json.dumps(meta, indent=1), encoding="utf-8")
            if not user:  # the finished folder replaces the old one in one rename
                shutil.rmtree(folder, ignore_errors=True)
                target.replace(folder)
            log.info("%s: accuracy %.3f (zero-shot %.3f)", spec.name, meta["accuracy"], zero_shot)
        entries[spec.name] = {"path": str(folder), "accuracy": meta["accuracy"], "zero_shot": meta["zero_shot"],
                              "seconds": meta.get("seconds")}
        parent = (folder, key)
    manifest = {"suite": suite.name, "backbone": backbone, "base": str(base), "sequential": suite.sequential,
                "tasks": [asdict(t) for t in suite.tasks], "experts": entries, "recipe": recipe.to_json()}
    root.mkdir(parents=True, exist_ok=True)
    write_text(root / "zoo.json", json.dumps(manifest, indent=1))
    return manifest


def _embed_test(model: Any, tokenizer: Any, data: TaskData, device: str, progress: bool, desc: str) -> Any:
    return encode(model, tokenizer, [t for t, _ in data.test], device=device, progress=progress, desc=desc)


def _check_folder(folder: Path) -> Path:
    if not (folder / "config.json").exists():
        raise MergelabError("a registered expert must be a Hugging Face model folder (config.json missing)",
                            file=str(folder))
    return folder
