"""Tiny stand-ins for the zoo tests: a 1-layer BERT from a small config (random weights, seeded), a word
tokenizer, and a two-class CSV task whose words tell the classes apart."""

from __future__ import annotations

from pathlib import Path

POSITIVE = ["good", "great", "nice", "fine", "happy", "sunny"]
NEGATIVE = ["bad", "awful", "poor", "sad", "grim", "rainy"]
FILLER = ["the", "day", "was", "very", "quite", "today", "and", "it"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "this", "is", "about", ".", "positive", "negative",
         *POSITIVE, *NEGATIVE, *FILLER]


def write_tiny_bert(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    # a vocabulary mapping: ``vocab_file=`` gives an all-[UNK] tokenizer with transformers 5 (every text the same)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True).save_pretrained(str(folder))
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=72)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(folder))
    return folder


def task_rows(n: int) -> list[tuple[str, str]]:
    """``n`` distinct sentences, alternately positive and negative."""
    rows = []
    for i in range(n):
        words = POSITIVE if i % 2 == 0 else NEGATIVE
        text = f"{FILLER[i % len(FILLER)]} {words[i % len(words)]} {FILLER[(i // 3) % len(FILLER)]} {i}"
        rows.append((text, "pos" if i % 2 == 0 else "neg"))
    return rows


def write_task(folder: Path, name: str = "mood", n: int = 120, n_train: int = 40, n_test: int = 16) -> Path:
    """A CSV of (text, label) and its task YAML; returns the YAML path."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["text,label"] + [f"{t},{lab}" for t, lab in task_rows(n)]
    (folder / f"{name}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    yaml_path = folder / f"{name}.yaml"
    yaml_path.write_text(
        f"name: {name}\nfile: {name}.csv\nlabels: {{pos: positive, neg: negative}}\n"
        f"n_train: {n_train}\nn_test: {n_test}\n", encoding="utf-8")
    return yaml_path


def write_suite(folder: Path, tasks: list[str], sequential: bool = False, experts: dict[str, str] | None = None) -> Path:
    for name in tasks:
        write_task(folder, name)
    body = "suite: tiny\n" + f"sequential: {str(sequential).lower()}\n" + "tasks:\n"
    body += "".join(f"  - {name}.yaml\n" for name in tasks)
    if experts:
        body += "experts:\n" + "".join(f"  {k}: {v}\n" for k, v in experts.items())
    path = folder / "suite.yaml"
    path.write_text(body, encoding="utf-8")
    return path
