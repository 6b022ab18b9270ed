"""The files of a model folder that are not weights (config, tokenizer, sentence-transformers modules),
copied beside a merged model, and the merged model's card."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from mergelab.errors import MergelabError
from mergelab.io.sources import BIN_INDEX, SAFE_INDEX
from mergelab.version import __version__

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


INDEX_FILES = (SAFE_INDEX, BIN_INDEX)


CARD = "README.md"  # a model card: the base's is kept only inside the merged model's own card


MODULES = "modules.json"  # sentence-transformers: the module folders the model needs


def copy_extras(folder: Path, target: Path, shown: Path | None = None) -> list[str]:
    """Copy the non-weight files of a model folder into ``target``: its top-level files and the
    module folders of a sentence-transformers model (those ``modules.json`` names), never weights,
    indexes, hidden files, other subfolders or the model card (see :func:`model_card`). Returns the
    relative paths copied. Errors name the file as ``shown`` (default ``target``) will hold it."""
    copied = []
    for path in _extras(folder):
        relative = path.relative_to(folder)
        where = (shown or target) / relative
        try:
            if path.is_dir():
                (target / relative).mkdir(0o777, exist_ok=True)
            else:
                shutil.copyfile(path, target / relative)  # new file, default mode (copy2 would keep the source's)
        except OSError as err:
            raise MergelabError(f"cannot copy {path} into the output ({err.strerror or err})", file=str(where)) from None
        copied.append(relative.as_posix())
    return copied


def _extras(folder: Path) -> list[Path]:
    """What :func:`copy_extras` copies, folders before their contents."""
    found = [p for p in sorted(folder.iterdir()) if p.is_file() and _is_extra(p.name) and p.name != CARD]
    for module in _module_folders(folder):
        found.append(module)
        for path in sorted(module.rglob("*")):
            if any(part.startswith(".") for part in path.relative_to(module).parts):
                continue
            if path.is_dir() or (path.is_file() and _is_extra(path.name)):
                found.append(path)
            elif path.is_file():
                log.warning("%s: weights of a sentence-transformers module are not merged and not copied; the output "
                            "lacks them", path)
    return found


def _is_extra(name: str) -> bool:
    return not (name.endswith(WEIGHT_SUFFIXES) or name in INDEX_FILES or name.startswith("."))


def _module_folders(folder: Path) -> list[Path]:
    """The subfolders a sentence-transformers ``modules.json`` names (plain names inside ``folder``)."""
    try:
        modules = json.loads((folder / MODULES).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    names = {m.get("path") for m in modules if isinstance(m, dict)} if isinstance(modules, list) else set()
    return [folder / name for name in sorted(n for n in names if isinstance(n, str) and n)
            if Path(name).name == name and not name.startswith(".") and (folder / name).is_dir()
            and not (folder / name).is_symlink()]


def model_card(metadata: dict[str, str], base: str, base_card: str) -> str:
    """The merged model's README.md: how it was made, then the base's card marked as the base's."""
    inputs = json.loads(metadata.get("mergelab.inputs", "[]"))
    models = [str(i.get("name")) for i in inputs if isinstance(i, dict) and i.get("role") != "base"]
    lines = [
        "---", "tags:", "- merge", "- mergelab", "---", "",
        "# Merged model", "",
        f"Merged by mergelab {__version__} with the method `{metadata.get('mergelab.method', '?')}`, hyperparameters "
        f"`{metadata.get('mergelab.hparams', '{}')}`.", "",
        f"- base: `{base}`",
        *[f"- merged model {i}: `{name}`" for i, name in enumerate(models, 1)], "",
        "Its weights are not the base model's. The card below is the base model's, copied unchanged for "
        "reference: it describes the base, not this merged model.", "",
        "---", "",
        f"## Base model card ({base})", "",
    ]
    return "\n".join(lines) + "\n" + base_card
