"""Cosine similarity of task vectors, streamed tensor by tensor.

``cos(tau_i, tau_j) = <tau_i, tau_j> / (|tau_i| |tau_j|)`` over the whole flattened task vector
``tau_t = model_t - base`` (every floating tensor of the base), as in Task Arithmetic (Ilharco et al.
2023, Fig. "cosine similarity between task vectors") and the weight-weaving paper's Fig. 3. Only the
Gram matrix ``G = sum over tensors of taus @ taus.T`` (T x T, float64) is accumulated, so memory is one
tensor per model at a time, whatever the model size.
"""

from __future__ import annotations

from typing import Any

import torch


def gram_update(gram: torch.Tensor, taus: torch.Tensor) -> None:
    """``gram += taus @ taus.T`` for one tensor's stacked task vectors ``(T, *shape)``."""
    flat = taus.reshape(taus.shape[0], -1).double()  # (T, n)
    gram += flat @ flat.T


def cosine_from_gram(gram: torch.Tensor) -> list[list[float]]:
    """Cosine matrix from the Gram matrix; a zero task vector has cosine 0 with everything (1 with itself)."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    t = gram.shape[0]
    out = [[1.0] * t for _ in range(t)]
    for i in range(t):
        for j in range(i + 1, t):  # upper triangle, mirrored: exactly symmetric whatever the rounding of G
            denom = float(norms[i] * norms[j])
            out[i][j] = out[j][i] = float(gram[i, j]) / denom if denom > 0 else 0.0
    return out


def cosine_matrix(base: Any, models: list[Any]) -> list[list[float]]:
    """Pairwise cosine similarity of the task vectors of ``models`` w.r.t. ``base`` (any model-like inputs)."""
    from mergelab.io.checks import check_models
    from mergelab.io.sources import open_source

    base_src = open_source(base, "<base>")
    sources = [open_source(m, f"<model {i + 1}>") for i, m in enumerate(models)]
    try:
        check_models(base_src, sources)
        gram = torch.zeros(len(sources), len(sources), dtype=torch.float64)
        for name, spec in base_src.specs.items():
            if not spec.dtype.is_floating_point:
                continue
            b = base_src.get(name).double()
            gram_update(gram, torch.stack([s.get(name).double() - b for s in sources]))
    finally:
        for src in [base_src, *sources]:
            src.close()
    return cosine_from_gram(gram)
