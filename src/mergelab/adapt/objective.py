"""The test-time objective: Shannon entropy of the predictions on unlabelled inputs (pure maths).

AdaMerging (Yang et al., ICLR 2024, Eq. 6) and CART++ (Choi et al., CART, arXiv:2412.12153, Algorithm 2, line 6)
minimise ``sum_tasks mean_{x in batch} H(softmax(f(x)))``, ``H(p) = -sum_c p_c log p_c``. The entropy is the
official ``softmax_entropy`` (EnnengYang/AdaMerging: ``-(x.softmax(1) * x.log_softmax(1)).sum(1)``), exact
for any logits; FusionBench's ``entropy_loss`` adds ``eps = 1e-8`` inside the log, which changes it by at most
``C * 1e-8``.
"""

from __future__ import annotations

import torch


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row Shannon entropy (nats) of ``softmax(logits)``: ``(batch, classes) -> (batch,)``."""
    return -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1)


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The batch's mean entropy, one task's term of the objective."""
    return entropy(logits).mean()
