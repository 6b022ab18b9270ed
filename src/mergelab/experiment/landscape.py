"""Loss-landscape planes: the geometry behind CART's Figs. 4, 7 and 8 (Choi et al., "Revisiting Weight
Averaging for Model Merging", arXiv:2412.12153, Sec. 4.3 and Appendix B), which follow Li et al., "Visualizing
the Loss Landscape of Neural Nets" (NeurIPS 2018, Sec. 7): every floating tensor is flattened into one
parameter vector, the points of interest are projected onto a 2-D plane, and the loss is evaluated on a grid
``theta(x, y) = origin + x * d1 + y * d2`` of that plane.

Two planes:

* :func:`pca_plane`: through an origin (CART's weight average), spanned by the first two principal directions
  of the points' offsets ``p_i - origin`` (the top-2 right singular vectors of the offset matrix; not mean-centred,
  so the origin lies in the plane). Points off the plane are drawn at their projection;
  :func:`in_plane_fraction` says how much of each offset the plane keeps.
* :func:`plane_through`: the plane through three points exactly (Fig. 8: an expert, CART and task arithmetic).

The principal directions come from the ``N x N`` Gram matrix of the offsets (float64), so only the ``N``
flat vectors are held, never a ``D x D`` matrix. Pure functions on tensors; the experiment driver is
``experiments/cart_landscape.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def float_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The floating tensors of ``state`` in its order: the coordinates of the flat vector."""
    return [name for name, tensor in state.items() if tensor.is_floating_point()]


def flatten(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """``names``' tensors of ``state`` concatenated into one float32 vector."""
    return torch.cat([state[name].detach().reshape(-1).float() for name in names])


def unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """A state dict shaped like ``like``: ``names`` filled from ``vector``, every other tensor ``like``'s own."""
    size = sum(like[name].numel() for name in names)
    if size != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the tensors {size}")
    out = dict(like)
    offset = 0
    for name in names:
        ref = like[name]
        out[name] = vector[offset: offset + ref.numel()].reshape(ref.shape).to(ref.dtype)
        offset += ref.numel()
    return out


def pca_plane(offsets: torch.Tensor, chunk: int = 1 << 20) -> tuple[torch.Tensor, list[float]]:
    """The two leading principal directions ``(2, D)`` (orthonormal) of the offsets ``points - origin``
    (``(N, D)``, float32) and the fraction of their total squared norm that each explains. Works in column
    chunks of ``chunk`` entries, so the float64 copies stay ``N x chunk``."""
    n, d = offsets.shape
    gram = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, d, chunk):
        block = offsets[:, start: start + chunk].double()
        gram += block @ block.T
    values, vectors = torch.linalg.eigh(gram)  # ascending
    order = torch.argsort(values, descending=True)[:2]
    if len(order) < 2 or values[order[-1]] <= values.max() * 1e-12:
        raise ValueError("the points span less than two directions around the origin")
    weights = torch.stack([vectors[:, k] / values[k].sqrt() for k in order])  # (2, N): d_k = offsets.T v_k / s_k
    basis = torch.empty(2, d, dtype=torch.float64)
    for start in range(0, d, chunk):
        basis[:, start: start + chunk] = weights @ offsets[:, start: start + chunk].double()
    total = float(values.clamp_min(0).sum())
    return _orthonormal(basis), [float(values[k]) / total for k in order]


def plane_through(origin: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The orthonormal basis ``(2, D)`` of the plane through three points: ``d1`` towards ``first``, ``d2`` the
    part of ``second - origin`` orthogonal to it (Gram-Schmidt)."""
    return _orthonormal(torch.stack([first - origin, second - origin]))


def _orthonormal(basis: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt in float64 on two rows (re-orthogonalises a numerically drifted pair)."""
    d1 = basis[0].double()
    n1 = d1.norm()
    if n1 == 0:
        raise ValueError("degenerate plane: the first direction is zero")
    d1 = d1 / n1
    d2 = basis[1].double() - (basis[1].double() @ d1) * d1
    n2 = d2.norm()
    if n2 <= 1e-9 * basis[1].double().norm().clamp_min(1e-30):
        raise ValueError("degenerate plane: the three points are collinear")
    return torch.stack([d1, d2 / n2]).float()


def project(points: torch.Tensor, origin: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Plane coordinates ``(N, 2)`` of ``points`` (``(N, D)``)."""
    return ((points - origin).double() @ basis.double().T).float()


def in_plane_fraction(points: torch.Tensor, origin: torch.Tensor, basis: torch.Tensor) -> list[float]:
    """Per point, ``|projection| / |offset|`` (1: on the plane; 1 for the origin itself, whose zero offset
    lies in every plane)."""
    offsets = (points - origin).double()
    inside = (offsets @ basis.double().T).norm(dim=1)
    norms = offsets.norm(dim=1)
    return [float(i / n) if n > 0 else 1.0 for i, n in zip(inside, norms, strict=True)]


def grid_axes(coords: torch.Tensor, steps: int, margin: float = 0.2) -> tuple[list[float], list[float]]:
    """``steps`` evenly spaced values per axis covering ``coords`` ``(N, 2)`` plus ``margin`` of the span on
    each side (a zero span gets a unit span)."""
    if steps < 2:
        raise ValueError("a grid needs at least 2 steps per axis")
    axes = []
    for k in range(2):
        low, high = float(coords[:, k].min()), float(coords[:, k].max())
        span = high - low or 1.0
        low, high = low - margin * span, high + margin * span
        axes.append([low + (high - low) * i / (steps - 1) for i in range(steps)])
    return axes[0], axes[1]


def point_on_plane(origin: torch.Tensor, basis: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """``origin + x * d1 + y * d2``."""
    return origin + x * basis[0] + y * basis[1]


def cross_entropy(logits: torch.Tensor, labels: Sequence[int]) -> float:
    """Mean cross-entropy of ``logits`` ``(n, classes)`` against class indices."""
    return float(torch.nn.functional.cross_entropy(logits.float(), torch.tensor(list(labels), dtype=torch.long)))
