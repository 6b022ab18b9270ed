"""A tiny zoo for the adaptation tests: a 2-layer BERT (random, seeded, wide enough init that the frozen heads
differ) and three two-class tasks over the same word CSV with different label prompts, so the experts differ."""

from __future__ import annotations

from pathlib import Path

from tests.zoo.zoo_tiny import VOCAB, task_rows

LABELS = {"mood": ("positive", "negative"), "tone": ("good", "bad"), "sky": ("sunny", "rainy")}


def write_bert(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    # a vocabulary mapping (zoo_tiny's vocab_file= gives an all-[UNK] tokenizer with transformers 5)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True).save_pretrained(str(folder))
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=72, initializer_range=0.5)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(folder))
    return folder


def write_suite(folder: Path, n: int = 96, n_train: int = 48, n_test: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["text,label"] + [f"{t},{lab}" for t, lab in task_rows(n)]
    (folder / "words.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name, (pos, neg) in LABELS.items():
        (folder / f"{name}.yaml").write_text(
            f"name: {name}\nfile: words.csv\nlabels: {{pos: {pos}, neg: {neg}}}\nn_train: {n_train}\nn_test: {n_test}\n",
            encoding="utf-8")
    path = folder / "suite.yaml"
    path.write_text("suite: tinyadapt\ntasks:\n" + "".join(f"  - {name}.yaml\n" for name in LABELS), encoding="utf-8")
    return path


def build(root: Path):  # type: ignore[no-untyped-def]
    from mergelab.zoo import build_zoo
    from mergelab.zoo.train import Recipe

    return build_zoo(write_suite(root / "data"), backbone=str(write_bert(root / "bert")), cache_dir=root / "cache",
                     progress=False, recipe=Recipe(batch_size=16, lr=2e-3))
