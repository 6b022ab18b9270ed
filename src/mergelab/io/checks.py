"""Every model against the base, from headers alone: the same tensor names, shapes and floating dtypes
(one-line errors that name the file and tensor, and say what to do where a cause is likely)."""

from __future__ import annotations

from mergelab.errors import MergelabError
from mergelab.io.safetensors_header import TensorSpec
from mergelab.io.sources import ADAPTER_MESSAGE, TensorSource

EXAMPLES = 3  # tensor names quoted in a message about many


def check_models(base: TensorSource, models: list[TensorSource]) -> tuple[set[str], set[str]]:
    """Keys, shapes and dtypes of every model against the base; returns (merged, copied) names."""
    merged = {n for n, s in base.specs.items() if s.dtype.is_floating_point}
    copied = set(base.specs) - merged
    for model in models:
        missing = sorted(set(base.specs) - set(model.specs))
        extra = sorted(set(model.specs) - set(base.specs))
        if (missing or extra) and any(_is_lora(n) for n in model.specs) and not any(_is_lora(n) for n in base.specs):
            raise MergelabError(f"{ADAPTER_MESSAGE} (it holds LoRA tensors such as '{next(n for n in model.specs if _is_lora(n))}')",
                                file=model.label)
        also = f"; and {_count(len(extra), 'tensor')} not in the base: {_examples(extra)}" if extra else ""
        if missing:
            more = f" (and {len(missing) - 1} more: {_examples(missing[1:])})" if len(missing) > 1 else ""
            raise MergelabError(f"tensor missing, present in the base{more}{also}", file=model.label, tensor=missing[0])
        if extra:
            more = f" (and {len(extra) - 1} more: {_examples(extra[1:])})" if len(extra) > 1 else ""
            raise MergelabError(f"tensor not in the base{more}", file=model.file_of(extra[0]), tensor=extra[0])
        for name in sorted(base.specs):
            _check_pair(name, base.specs[name], model.specs[name], model.file_of(name), name in merged)
    return merged, copied


def _is_lora(name: str) -> bool:
    return any(part in name for part in (".lora_A", ".lora_B", "lora_down", "lora_up", ".lora_embedding_"))


def _examples(names: list[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:EXAMPLES])
    return shown + (", ..." if len(names) > EXAMPLES else "")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _check_pair(name: str, base: TensorSpec, other: TensorSpec, file: str, floating: bool) -> None:
    if other.shape != base.shape:
        hint = ""
        if len(base.shape) == len(other.shape) == 2 and base.shape[1] == other.shape[1] and ("embed" in name or "lm_head" in name):
            hint = f" (vocabulary size {other.shape[0]} vs the base's {base.shape[0]}: resize the embeddings first)"
        raise MergelabError(f"shape {other.shape} differs from the base's {base.shape}{hint}", file=file, tensor=name)
    if floating and not other.dtype.is_floating_point:
        raise MergelabError(f"non-floating dtype {other.dtype} where the base has {base.dtype}", file=file, tensor=name)
