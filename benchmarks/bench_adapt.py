"""Cost of test-time adaptation (mergelab.adapt) on MT8-shaped MiniLM: seconds per step, peak memory, and
(with a built zoo) accuracy against steps.

Synthetic mode (default; no zoo needed): the packaged all-MiniLM-L6-v2 as base, ``--tasks`` synthetic experts
(base + Gaussian noise of 1e-3 x each tensor's std), ``--classes`` label words per task from the tokenizer's
vocabulary and random word texts as unlabelled inputs -- the same tensor shapes, batch shapes and step work as
MT8, not its accuracy. Zoo mode (``--suite mt8`` or ``mt8-quick``, built): the real experts and inputs, with the
accuracy trace every ``--eval-every`` steps.

    python benchmarks/bench_adapt.py --method cart_pp --steps 5              # synthetic, extrapolates to 500
    python benchmarks/bench_adapt.py --method adamerging --suite mt8 --steps 500 --eval-every 50
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time


def synthetic(args: argparse.Namespace) -> dict[str, object]:
    import torch

    from mergelab.adapt.data import Inputs, TaskInputs
    from mergelab.adapt.encoders import TextEncoder
    from mergelab.adapt.model import build
    from mergelab.adapt.optimise import Options, optimise
    from mergelab.io.sources import open_source
    from mergelab.methods.registry import get_method
    from mergelab.zoo.backbones import backbone_folder
    from mergelab.zoo.encoder import load_encoder, text_head

    folder = backbone_folder("all-minilm-l6-v2", None)
    module, tokenizer = load_encoder(folder)
    for p in module.parameters():
        p.requires_grad_(False)
    source = open_source(folder)
    base = {n: source.get(n) for n in source.specs}
    gen = torch.Generator().manual_seed(0)
    models = [{n: (t + 1e-3 * t.float().std().nan_to_num() * torch.randn(t.shape, generator=gen)).to(t.dtype)
               if t.is_floating_point() else t for n, t in base.items()} for _ in range(args.tasks)]
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 3]
    rng = random.Random(0)
    tasks = [TaskInputs(f"t{i}", [" ".join(rng.choices(words, k=rng.randint(5, 30))) for _ in range(1000)],
                        text_head(module, tokenizer, rng.sample(words, args.classes)), []) for i in range(args.tasks)]
    inputs = Inputs(TextEncoder(module, tokenizer), tasks, {})
    hp = get_method(args.method).resolve({"granularity": args.granularity}, args.tasks)
    start = time.perf_counter()
    merged = build(args.method, hp, base, models, deltas_dtype=args.deltas_dtype)
    build_s = time.perf_counter() - start
    del models
    options = Options(steps=args.steps, eval_every=-1)
    outcome = optimise(merged, inputs, options)
    per_step = outcome.seconds / max(args.steps, 1)
    return {"mode": "synthetic", "method": args.method, "granularity": args.granularity, "tasks": args.tasks,
            "coefficients": len(merged.groups) * args.tasks, "build_s": round(build_s, 2),
            "steps": args.steps, "s_per_step": round(per_step, 3),
            "extrapolated_500_steps_min": round(500 * per_step / 60, 1),
            "entropy_first_last": [outcome.trace[0]["entropy"], outcome.trace[-1]["entropy"]] if outcome.trace else None}


def zoo_mode(args: argparse.Namespace) -> dict[str, object]:
    import mergelab

    result = mergelab.adapt(args.method, args.suite, steps=args.steps, eval_every=args.eval_every,
                            granularity=args.granularity, deltas_dtype=args.deltas_dtype, progress=True)
    per_step = result.seconds / max(args.steps, 1)  # includes the evaluations
    return {"mode": "zoo", "suite": args.suite, "method": args.method, "steps": args.steps, "seconds": result.seconds,
            "s_per_step_incl_eval": round(per_step, 3),
            "accuracy_vs_steps": [(e["step"], round(e["average"], 4)) for e in result.accuracies],
            "entropy_first_last": [result.entropies[0], result.entropies[-1]] if result.entropies else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="cart_pp", choices=["adamerging", "adamerging_pp", "cart_pp"])
    parser.add_argument("--granularity", default="layer", choices=["layer", "block", "task"])
    parser.add_argument("--suite", help="a built zoo suite (mt8, mt8-quick); default: synthetic MT8 shapes")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--deltas-dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    out = zoo_mode(args) if args.suite else synthetic(args)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
