"""Pure SVD helpers shared by the spectral methods (TSV-M, Iso-C, Iso-CTS, CART).

Matrices in, matrices out; no I/O, no device choice, no RNG.

Precision (hyperparameter ``svd_dtype`` of every spectral method, :data:`SVD_DTYPES`): the matrix
part of a method -- SVDs and the products around them -- runs in ``svd_dtype``, then is cast back
to the compute dtype. Default ``"float64"``: float32 singular vectors are only accurate to about
``eps * s_1 / gap``, so those of small, clustered singular values are close to arbitrary, and
Iso-C/Iso-CTS give such directions the full mean singular value while TSV-M's polar factors couple
them to every other task's vectors. Relative Frobenius difference between the float32 and the
float64 output, 8 random task matrices of 768 x 3072 (CPU, LAPACK):

=========================== ======= ======= ======= =======
task singular values        tsv     iso_c   iso_cts cart
=========================== ======= ======= ======= =======
``i^-0.5`` / ``i^-1``       1e-5    5e-6    3e-5    4e-6
``i^-2``                    2e-3    5e-4    8e-2    8e-6
rank 64 + 0.1 % noise       1e-1    3e-4    6e-3    3e-6
=========================== ======= ======= ======= =======

(rank 64 + noise: TSV-M keeps 768 / 8 = 96 triplets per task, so 32 come from the noise.) The
official codes (and FusionBench) run in float32; ``svd_dtype="float32"`` gives their numerics
(exact float32 LAPACK SVDs).

Low-rank inputs (hyperparameters ``low_rank`` and ``rank_tol`` of TSV-M, Iso-C and Iso-CTS). Models
fine-tuned with LoRA and merged back have task vectors of rank ``<= r`` per matrix (duplicated models
likewise make TSV-M's stacked bases, and Iso-C's sum, rank-deficient). Stored in float32, such a task
vector is ``B A`` plus rounding noise: its other singular values are ~2.5e-8 ``||W||_2`` (measured,
fine-tuned weights rounded to float32; about ``eps32 / 5``), i.e. ``2.5e-8 / rho`` of its largest
for a task vector of spectral norm ``rho ||W||_2``. Their singular vectors are noise, yet the
official definitions use them: Iso-C gives each the mean singular value (``mean(s) U V^T`` over all
``min(m, n)`` directions), TSV-M's polar factors couple them to the other tasks' vectors. So the
output jumps by O(1) under a 1e-7 perturbation of the inputs, or between float32 and float64 SVDs
(4 rank-2 tasks: 61 to 116 % of the task vectors' largest entry). With ``low_rank="auto"`` (default)
a singular value is numerically zero when ``s_i <= rank_tol * s_1`` (:func:`numerical`; ``s_1`` the
largest singular value of the decomposed spectrum: each task's top-``k`` together in TSV-M, the sum in
Iso-C, all slots in Iso-CTS; for TSV-M's polar factors, ``U``'s own), and its direction is left out
-- the well-defined part of the official output (for Iso-C exactly the official output projected on
the numerical range of the sum). Where nothing lies below the threshold (full-rank inputs) nothing
changes, bit for bit. ``rank_tol=1e-5`` (:data:`RANK_TOL`), a compromise measured both ways:
(1) it must exceed the noise: float32 storage noise is below it for task vectors with
``rho >= 2.5e-3`` (LoRA updates are typically 1e-2 to 1e-1 of the weight in spectral norm -- an
estimate, not measured on real checkpoints), and a float32 SVD's own noise on an exactly rank-8
float32 matrix was 2.5e-7 (64 x 64), 4.4e-7 (768 x 768) and 2.0e-6 (768 x 3072) ``s_1``, so the result
no longer depends on ``svd_dtype``; (2) it must stay below genuine, well-separated small singular
values, which a relative threshold cannot tell from noise: the sum of 5 generic 150 x 150 task
matrices had ``s_min = 9.2e-5 s_1`` (well determined: the next one is at 3.7e-3 ``s_1``),
which ``rank_tol=1e-4`` dropped (the square case is the risky one: the smallest singular value of a
random square n x n matrix falls below ``tau s_1`` with probability ~ ``n tau``). Smaller updates
(``2.5e-4 <= rho < 2.5e-3``) need ``rank_tol=1e-4``. Checkpoints stored in bfloat16 are another matter: rounding
``W + B A`` to bf16 adds noise of up to 1.7e-3 ``||W||_2`` (1.6 to 63 % of ``s_1`` of the LoRA update,
measured), full rank and not distinguishable from signal by a relative threshold; ``rank_tol`` could be
raised to that level by hand. ``low_rank="official"`` keeps them (only exact zeros dropped, as
:func:`significant`): the official numerics. Either way the merge counts the rank-deficient matrices
(:func:`note_rank`, :func:`rank_report`): one :class:`LowRankWarning` per merge and the output's
``mergelab.numerical_rank`` metadata. ``mergelab plan`` cannot know it: headers carry no spectra.

Speed (``ops.svd``): with ``svd_dtype="float64"`` and a float32 result, each SVD is first tried as
an eigendecomposition of the float64 Gram matrix (top-k triplets only where a method needs only
those), checked against an error estimate below float32 rounding, with the exact SVD as fallback;
the result is that of the exact float64 SVDs up to last-bit flips (tests check it), several times
faster on CPU than the exact path (a Cholesky factorisation first rules out Gram matrices too
ill-conditioned for the estimate, so those go straight to the exact SVD). A float64 compute dtype
always gets the exact SVDs. On CPU every float64 decomposition and product releases the GIL (SciPy's
LAPACK through ``ops.lapack``, NumPy's BLAS on one thread), and the engine merges several tensors at
once, one per core (``tensor_parallel`` in the registry, ``engine.stream``).

Which 2-D tensors are "matrices" is decided by :func:`is_matrix` from the tensor's shape and the
method's ``exclude`` patterns (matched against the tensor name): a glob (``fnmatch``, matched
against the whole name, e.g. ``"*text_projection*"``), or a Python regular expression searched in
the name when prefixed with ``"re:"`` (e.g. ``"re:^(?!.*(?:attn|mlp))"``).

:data:`OFFICIAL_EXCLUDE` lists, per method, the patterns that reproduce which 2-D tensors the
official code does *not* treat as matrices (open_clip / HF-CLIP naming):

* ``tsv``, ``iso_c``, ``iso_cts``: ``"text_projection" not in key`` (AntoAndGar/task_singular_vectors
  src/utils/TSVM_utils.py, danielm1405/iso-merging src/utils/iso.py). ``text_projection`` is in
  the text tower, which fine-tuning the image encoder leaves untouched (zero task vector), so with
  their checkpoints the rule should change nothing; every other 2-D tensor -- including
  ``visual.positional_embedding`` and ``visual.proj`` -- is a matrix. FusionBench
  (``exclude_keys``, exact names) excludes nothing by default.
* ``cart``: only names containing ``attn`` or ``mlp`` and neither ``ln`` nor ``bias`` are matrices
  (JH-GEECS/CART src/merging.py ``_get_truncated_task_vectors``); so ``visual.positional_embedding``,
  ``visual.proj``, ``text_projection``, ``token_embedding.weight`` are averaged. The regexes below
  say exactly that, for open_clip and for HF-CLIP names (``self_attn``, ``mlp.fc1``) alike.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import torch

from mergelab.ops.svd import EPS64, error_estimate, fast_svd, gram_eigh, matmul, solver, tolerance
from mergelab.ops.svd import svd as svd  # re-exported: the exact SVD and its CUDA driver live in ops.svd
from mergelab.ops.svd import svd_driver as svd_driver

SVD_DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}

LOW_RANK = ("auto", "official")  # hyperparameter ``low_rank`` of tsv, iso_c, iso_cts (see "Low-rank inputs" above)
RANK_TOL = 1e-5  # default ``rank_tol``: numerical-rank tolerance, relative to the largest singular value
# experiment runs stored before ``low_rank``/``rank_tol`` existed were computed as ``"official"``: runs at these
# values keep their identity (``Method.compat``)
LOW_RANK_COMPAT: dict[str, object] = {"low_rank": "official", "rank_tol": RANK_TOL}
NOTE = "numerical_rank"  # key of the per-tensor note the methods leave in ``TensorCtx.notes``


class LowRankWarning(UserWarning):
    """A spectral merge met numerically rank-deficient task vectors (see :func:`rank_report`)."""

OFFICIAL_EXCLUDE: dict[str, list[str]] = {
    "tsv": ["*text_projection*"],
    "iso_c": ["*text_projection*"],
    "iso_cts": ["*text_projection*"],
    "cart": ["re:^(?!.*(?:attn|mlp))", "re:ln|bias"],
}


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    return re.compile(fnmatch.translate(pattern))


def check_patterns(patterns: Sequence[object]) -> None:
    """Raise ``ValueError`` unless ``patterns`` is a list of valid glob / ``re:`` patterns."""
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"exclude patterns must be strings, got {pattern!r}")
        try:
            _compiled(pattern)
        except re.error as err:
            raise ValueError(f"exclude pattern {pattern!r} is not a valid regular expression: {err}") from None


def excluded(name: str, patterns: Sequence[str]) -> bool:
    """True if ``name`` matches a glob (whole name) or a ``re:`` pattern (searched)."""
    for pattern in patterns:
        compiled = _compiled(pattern)
        if compiled.search(name) if pattern.startswith("re:") else compiled.match(name):
            return True
    return False


def is_matrix(name: str, shape: Sequence[int], exclude: Sequence[str]) -> bool:
    """A 2-D tensor not excluded by name is treated as a matrix by every spectral method."""
    return len(shape) == 2 and not excluded(name, exclude)


class SvdNumerics(NamedTuple):
    """How a spectral method decomposes one matrix: the SVD's working ``dtype`` and the error ``tol`` it
    accepts from the fast path (:func:`mergelab.ops.svd.fast_svd`)."""

    dtype: torch.dtype
    tol: float


def matrix_numerics(name: str, shape: Sequence[int], exclude: Sequence[str], svd_dtype: str,
                    taus_dtype: torch.dtype) -> SvdNumerics | None:
    """What every spectral method (tsv, iso_c, iso_cts, cart, cart_pp) decides first for a tensor: ``None``
    if it is not a matrix (:func:`is_matrix`: the method's non-matrix rule applies), else SVDs in ``svd_dtype``
    -- float64 within ``tolerance`` of the task vectors' dtype, float32 exact (the official numerics)."""
    if not is_matrix(name, shape, exclude):
        return None
    dtype = SVD_DTYPES[svd_dtype]
    return SvdNumerics(dtype, tolerance(taus_dtype) if dtype == torch.float64 else 0.0)


def low_rank(x: torch.Tensor, k: int, tol: float = 0.0) -> torch.Tensor:
    """``SVD_k(x)``: the best rank-``k`` approximation of the 2-D ``x`` (``fast_svd`` with ``tol``)."""
    if k <= 0:
        return torch.zeros_like(x)
    U, S, Vh = fast_svd(x, k, tol)
    return matmul(U * S, Vh)  # (m, k) (k, n)


def smallest_components(x: torch.Tensor, k: int) -> torch.Tensor:
    """The sum of the ``k`` *smallest* singular triplets of the 2-D ``x`` (of its ``min(m, n)``), exact SVD:
    CART's reverse-ordered rank reduction (Sec. 4.1, Fig. 2)."""
    if k <= 0:
        return torch.zeros_like(x)
    U, S, Vh = svd(x)
    return matmul(U[:, -k:] * S[-k:], Vh[-k:])


def significant(s: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Mask of the singular values ``s`` of an ``(m, n)`` matrix that are not numerically zero:
    ``s > 16 max(m, n) eps64 max(s)`` (16: room for the SVD's own rounding on small matrices).

    The singular vectors of zero singular values are whatever basis the SVD routine picks (for a
    zero matrix LAPACK returns the identity), so they carry no information about the inputs. The
    official codes keep them, which only matters for exactly rank-deficient input: a task vector
    that is zero on a tensor (a layer frozen in one fine-tune), duplicated models, tasks whose
    stacked singular vectors are linearly dependent. There their output depends on that basis (it
    is not even equivariant under rotations of the inputs); dropping these directions makes it
    well defined. The threshold uses float64's epsilon whatever ``svd_dtype``, so with float32
    only exact zeros are dropped and near-degenerate directions behave as in the official code.
    """
    return s > s.max() * (16 * max(shape) * torch.finfo(torch.float64).eps)


def numerical(s: torch.Tensor, shape: Sequence[int], rank_tol: float = 0.0) -> torch.Tensor:
    """Mask of the singular values ``s`` of an ``(m, n)`` matrix above its numerical-rank threshold
    ``max(rank_tol, 16 max(m, n) eps64) max(s)``; with ``rank_tol=0`` exactly :func:`significant`
    (so results where nothing lies between the two thresholds are bit-identical to it)."""
    if rank_tol <= 16 * max(shape) * EPS64:
        return significant(s, shape)
    return s > s.max() * rank_tol


def noise_count(s: torch.Tensor, rank_tol: float) -> int:
    """How many of the singular values ``s`` are numerically zero: ``s_i <= rank_tol max(s)``
    (0 for an empty or all-zero ``s``: a zero matrix is well defined, whatever its basis)."""
    if s.numel() == 0 or not bool(s.max() > 0):
        return 0
    return int((s <= s.max() * rank_tol).sum())


def polar(x: torch.Tensor, tol: float = 0.0, rank_tol: float = 0.0) -> torch.Tensor:
    """Orthogonal polar factor ``P Q^T`` of ``x = P Sigma Q^T``: the matrix with orthonormal
    columns (rows, if wide) nearest to ``x`` in Frobenius norm (orthogonal Procrustes). If ``x`` is
    rank-deficient, the partial isometry over its :func:`numerical` singular values (unique).
    ``tol``: see ``ops.svd.fast_svd`` (0: exact SVD); ``rank_tol``: see :func:`numerical`."""
    return polar_and_spectrum(x, tol, rank_tol)[0]


def polar_and_spectrum(x: torch.Tensor, tol: float = 0.0, rank_tol: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`polar` of the 2-D ``x`` and all ``min(m, n)`` singular values (descending). On the Gram
    path (``tol > 0``, estimate within ``tol``, see ``ops.svd``) without forming ``P`` and ``Q``:
    ``P Q^T = x (x^T x)^(-1/2) = x H`` with ``H = (W / s) W^T`` (wide: ``H x``), two GEMMs of which
    one is ``r x r`` -- a tall 3072 x 768 matrix's factor in 67 ms instead of 100. The Gram path is
    taken only where no direction is to be dropped (its estimate needs ``s_min > 1.2e-4 s_1`` anyway)."""
    r = min(x.shape)
    if r > 0 and solver(x.device, x.dtype, tol) == "gram":
        found = gram_eigh(x, None, EPS64 / tol)  # every direction used: the smallest must be resolved
        if found is not None and error_estimate(found[0], r) <= tol:
            lam, w, tall = found
            s = lam.sqrt()  # all positive: the estimate is finite, so nothing is dropped as insignificant
            if bool(s[-1] > s[0] * rank_tol):
                h = matmul(w / s, w.mT)
                return (matmul(x, h) if tall else matmul(h, x)), s
    P, S, Qh = svd(x)
    keep = numerical(S, x.shape, rank_tol)
    if bool(keep.all()):
        return matmul(P, Qh), S
    return matmul(P[:, keep], Qh[keep]), S


def flat_spectrum(s: torch.Tensor) -> torch.Tensor:
    """Replace every singular value by their mean (isotropic spectrum)."""
    return torch.ones_like(s) * s.mean()  # stays on the device: no host sync


def kept_rank(r: int, rank_ratio: float) -> int:
    """CART's rank rule, the official ``parsed_dim``: 0 for ratio 0, r for ratio 1, else ``max(1, int(ratio * r))``."""
    if rank_ratio == 0.0:
        return 0
    if rank_ratio == 1.0:
        return r
    return max(1, int(rank_ratio * r))


def check_hparams(hp: dict[str, object]) -> None:
    """Validation shared by the spectral methods: a finite ``scaling`` (unless ``None``) and ``exclude``."""
    scaling = hp.get("scaling")
    if scaling is not None and (
        isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not -1e6 < scaling < 1e6
    ):
        raise ValueError(f"scaling={scaling!r} is not a finite number")
    exclude = hp.get("exclude", [])
    if not isinstance(exclude, (list, tuple)):
        raise ValueError(f"exclude must be a list of name patterns, got {exclude!r}")
    check_patterns(exclude)
    check_rank_tol(hp)


def check_rank_tol(hp: dict[str, Any]) -> None:
    """``rank_tol`` (if given) is a number in [0, 1): tsv, iso_c, iso_cts and opcm."""
    rank_tol = hp.get("rank_tol", 0.0)
    if not isinstance(rank_tol, (int, float)) or isinstance(rank_tol, bool) or not 0.0 <= rank_tol < 1.0:
        raise ValueError(f"rank_tol must be in [0, 1), got {rank_tol!r}")


def dropped_below(low_rank: str, rank_tol: float) -> float:
    """The ``rank_tol`` a method applies: its value with ``low_rank="auto"``, 0 (exact zeros only,
    :func:`significant`) with ``"official"``."""
    return rank_tol if low_rank == "auto" else 0.0


def note_rank(notes: dict[str, Any] | None, noise: int, of: int) -> None:
    """Leave in ``notes`` (a ``TensorCtx.notes``) that ``noise`` of the ``of`` directions the official
    definition spreads this matrix's merge over are numerically zero (see :func:`rank_report`)."""
    if notes is not None:
        notes[NOTE] = {"noise": noise, "of": of}


def rank_report(method: str, notes: Mapping[str, Mapping[str, Any]], hparams: Mapping[str, Any]) -> tuple[str, str] | None:
    """The warning line and the metadata value (JSON) summing up the :func:`note_rank` notes of one
    merge (``{tensor name: TensorCtx.notes}``); ``None`` if no tensor was noted and ``hparams`` has no
    ``low_rank`` (not a spectral merge).

    The metadata value, e.g. ``{"rank_tol": 1e-05, "low_rank": "auto", "matrices": 36,
    "rank_deficient": 12, "worst": {"tensor": "...", "noise": 56, "of": 64}}``, is always recorded;
    the warning only when a matrix is rank-deficient. Worst: the largest fraction of noise directions.
    """
    noted = {name: note[NOTE] for name, note in notes.items() if NOTE in note}
    if not noted and "low_rank" not in hparams:
        return None
    deficient = {name: n for name, n in noted.items() if n["noise"] > 0}
    low_rank, rank_tol = hparams.get("low_rank", "auto"), hparams.get("rank_tol", RANK_TOL)
    record: dict[str, Any] = {
        "rank_tol": rank_tol, "low_rank": low_rank, "matrices": len(noted), "rank_deficient": len(deficient),
    }
    if not deficient:
        return "", json.dumps(record, separators=(",", ":"))
    worst = max(sorted(deficient), key=lambda name: deficient[name]["noise"] / max(deficient[name]["of"], 1))
    record["worst"] = {"tensor": worst, **deficient[worst]}
    done = ("low_rank='auto' left those directions out" if low_rank == "auto"
            else "low_rank='official' kept them, so the result there depends on rounding (use low_rank='auto')")
    line = (f"mergelab: {method}: {len(deficient)} of {len(noted)} matrices have numerically rank-deficient task "
            f"vectors (singular values <= rank_tol={rank_tol:g} x the largest: LoRA-derived or duplicated models, "
            f"or rows the fine-tuning left (almost) untouched); "
            f"the official definition is ill-posed there and {done}. Worst: {worst}, "
            f"{deficient[worst]['noise']} of {deficient[worst]['of']} directions numerically zero")
    return line, json.dumps(record, separators=(",", ":"))
