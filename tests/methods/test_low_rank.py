"""Spectral merges of low-rank task vectors (LoRA-derived models, duplicated models): ``low_rank="auto"``
is continuous there, invariant to the SVD's numerics and to its choice of null-space basis, equal bit
for bit to the official definition on full-rank inputs; the merge reports the numerical rank (one
warning, the output's metadata). OPCM's projection checked on rank-deficient merged vectors too."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import mergelab
from mergelab.continual.rules.opcm import project_out
from mergelab.errors import MergelabError
from mergelab.methods.registry import TensorCtx, get_method
from mergelab.ops import spectral as _spectral
from mergelab.ops import svd as _svd
from mergelab.ops.spectral import NOTE, RANK_TOL, LowRankWarning

SPECTRAL = ["tsv", "iso_c", "iso_cts"]
SHAPES = [(48, 32), (32, 32), (24, 64)]  # tall, square, wide: min(m, n) >= 24, so TSV-M keeps k >= 6 >= rank


def merge(method: str, taus: torch.Tensor, ctx: TensorCtx | None = None, **hparams: object) -> torch.Tensor:
    """The registered method on one matrix, hyperparameters resolved as the engine does (defaults)."""
    spec = get_method(method)
    resolved = spec.resolve(hparams, taus.shape[0])
    return spec.fn(taus, torch.zeros_like(taus[0]), ctx or TensorCtx("w"), **resolved)


def lora_taus(seed: int, shape: tuple[int, int], n_tasks: int, rank: int, duplicated: bool = False) -> torch.Tensor:
    """``(T, m, n)`` float64 task vectors of rank ``rank`` each (``B A``, as LoRA merged back); with
    ``duplicated`` the second half repeats the first (the same fine-tune given twice)."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    taus = torch.stack([
        torch.randn(m, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, n, generator=gen, dtype=torch.float64)
        for _ in range(n_tasks)
    ])
    if duplicated:
        half = n_tasks // 2
        taus[half : 2 * half] = taus[:half]
    return taus


def perturbed(taus: torch.Tensor, seed: int, size: float = 1e-7) -> torch.Tensor:
    """``taus + size * max|taus| * N(0, 1)``, independently per task (duplicates become near-duplicates)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    return taus + torch.randn(taus.shape, generator=gen, dtype=taus.dtype) * size * float(taus.abs().max())


def gap(a: torch.Tensor, b: torch.Tensor, taus: torch.Tensor) -> float:
    """Largest entry of ``a - b`` relative to the task vectors' largest entry (the issue's measure)."""
    return float((a.double() - b.double()).abs().max() / taus.abs().max())


low_rank_inputs = st.tuples(
    st.sampled_from(SPECTRAL),
    st.integers(0, 2**31 - 1),
    st.sampled_from(SHAPES),
    st.integers(2, 4),  # tasks
    st.integers(1, 3),  # LoRA rank
    st.booleans(),  # duplicated models
)


@settings(max_examples=30, deadline=None)
@given(low_rank_inputs)
def test_continuous_on_low_rank_inputs(case):
    # a 1e-7 perturbation of the inputs moves the output by O(1e-7) (official: up to 116 %, issue measure)
    method, seed, shape, n_tasks, rank, duplicated = case
    taus = lora_taus(seed, shape, n_tasks, rank, duplicated)
    out = merge(method, taus.float())  # as a merge computes: float32 task vectors
    moved = merge(method, perturbed(taus, seed).float())
    assert gap(out, moved, taus) < 1e-5  # measured <= 4.8e-7 (300 draws)


@settings(max_examples=30, deadline=None)
@given(low_rank_inputs)
def test_invariant_to_the_svd_numerics_on_low_rank_inputs(case):
    # float64 exact SVDs (float64 compute), float32 compute with float64 SVDs (Gram path where it
    # passes its check), float32 SVDs (torch's, the official numerics): the same result
    method, seed, shape, n_tasks, rank, duplicated = case
    taus = lora_taus(seed, shape, n_tasks, rank, duplicated)
    exact = merge(method, taus)
    assert gap(merge(method, taus.float()), exact, taus) < 1e-5
    assert gap(merge(method, taus.float(), svd_dtype="float32"), exact, taus) < 1e-5  # measured <= 1.6e-6 (300 draws)


def rotated_null_basis(svd, seed: int):
    """An SVD that returns other bases for the numerically zero singular values (those below 1e-5
    s_1: random rotations of their left and right singular vectors, which change ``U S V^T`` by that
    much at most), as another LAPACK, driver or precision may."""
    gen = torch.Generator().manual_seed(seed)

    def other(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        U, S, Vh = svd(x)
        null = torch.nonzero(S <= 1e-5 * S.max()).flatten()
        if null.numel() < 2:
            return U, S, Vh
        q_u, q_v = (torch.linalg.qr(torch.randn(null.numel(), null.numel(), generator=gen, dtype=U.dtype))[0] for _ in "uv")
        U, Vh = U.clone(), Vh.clone()
        U[:, null] = U[:, null] @ q_u  # exact zeros: any orthonormal bases of the two null spaces are valid
        Vh[null] = q_v.mT @ Vh[null]
        return U, S, Vh

    return other


@pytest.mark.parametrize("duplicated", [False, True])
@pytest.mark.parametrize("method", SPECTRAL)
def test_invariant_to_the_null_space_basis(monkeypatch, method, duplicated):
    taus = lora_taus(3, (48, 32), 4, 2, duplicated).float().double()  # stored in float32: rounding noise ~1e-7 s_1
    auto, official = merge(method, taus), merge(method, taus, low_rank="official")
    monkeypatch.setattr(_svd, "svd", rotated_null_basis(_svd.svd, 0))  # fast_svd's exact path
    monkeypatch.setattr(_spectral, "svd", rotated_null_basis(_spectral.svd, 1))  # polar factors
    assert gap(merge(method, taus), auto, taus) < 1e-12
    assert gap(merge(method, taus, low_rank="official"), official, taus) > 1e-2  # the official definition is not


@pytest.mark.parametrize("svd_dtype", ["float64", "float32"])
@pytest.mark.parametrize("compute", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(48, 32), (24, 64), (40, 40)])
@pytest.mark.parametrize("method", SPECTRAL)
def test_full_rank_inputs_are_unchanged_bit_for_bit(method, shape, compute, svd_dtype):
    # generic task vectors: no singular value below rank_tol, so "auto" is the official definition
    # (low_rank="official" is the code before the option, line for line)
    gen = torch.Generator().manual_seed(sum(shape))
    m, n = shape
    # a well-conditioned square: a random orthogonal matrix plus noise (a Gaussian square may be near singular)
    taus = torch.randn(3, m, n, generator=gen)
    if m == n:
        taus = torch.linalg.qr(taus)[0] + 0.3 * taus
    taus = taus.to(compute)
    ctx = TensorCtx("w")
    auto = merge(method, taus, ctx, svd_dtype=svd_dtype)
    assert torch.equal(auto, merge(method, taus, svd_dtype=svd_dtype, low_rank="official"))
    assert ctx.notes[NOTE]["noise"] == 0


@pytest.mark.parametrize("method", SPECTRAL)
def test_notes_count_the_numerically_zero_directions(method):
    # 3 rank-2 tasks on 48 x 32: TSV-M keeps k = 10 per task, 8 of them noise; the sum has rank 6 of 32
    taus = lora_taus(5, (48, 32), 3, 2).float()
    ctx = TensorCtx("w")
    merge(method, taus, ctx)
    expected = {"tsv": {"noise": 24, "of": 30}, "iso_c": {"noise": 26, "of": 32}, "iso_cts": {"noise": 26, "of": 32}}
    assert ctx.notes[NOTE] == expected[method]
    # official: the same count (noted, not acted on); rank_tol sets where numerically zero starts
    ctx = TensorCtx("w")
    merge(method, taus, ctx, low_rank="official")
    assert ctx.notes[NOTE] == expected[method]
    ctx = TensorCtx("w")
    merge(method, taus + 1e-3 * torch.randn(taus.shape, generator=torch.Generator().manual_seed(0)), ctx, rank_tol=1e-6)
    assert ctx.notes[NOTE]["noise"] == 0  # noise at ~1e-4 s_1 is above rank_tol=1e-6: "full rank"


def test_rank_tol_is_checked():
    with pytest.raises(MergelabError, match="rank_tol must be in"):
        get_method("iso_c").resolve({"rank_tol": 1.5}, 2)
    with pytest.raises(MergelabError, match="low_rank=.never. is not one of"):
        get_method("tsv").resolve({"low_rank": "never"}, 2)


# --- the engine: one warning per merge, the output's metadata -----------------------------------------


def lora_models(n_models: int = 3, duplicated: bool = False) -> list[dict[str, torch.Tensor]]:
    """A base and LoRA-merged models: rank-2 updates on two matrices, a full-rank one on a third."""
    gen = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(48, 32, generator=gen), "b.weight": torch.randn(32, 32, generator=gen),
            "c.weight": torch.randn(40, 24, generator=gen), "a.bias": torch.randn(48, generator=gen)}
    models = []
    for t in range(n_models):
        if duplicated and t == n_models - 1:
            models.append({k: v.clone() for k, v in models[0].items()})
            continue
        model = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}  # full-rank updates
        for name in ("a.weight", "b.weight"):
            m, n = base[name].shape
            model[name] = base[name] + 0.1 * torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen)
        models.append(model)
    return [base, *models]


@pytest.fixture
def torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def metadata(path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    metas = []
    for file in files:
        with safe_open(str(file), "pt") as handle:
            metas.append(handle.metadata())
    assert all(meta == metas[0] for meta in metas)  # every shard alike
    return metas[0]


@pytest.mark.parametrize("threads", [1, 2])  # one tensor at a time; several at once (tensor_parallel)
@pytest.mark.parametrize("method", SPECTRAL)
def test_merge_warns_once_and_records_the_rank(tmp_path, torch_threads, method, threads):
    torch.set_num_threads(threads)
    base, *models = lora_models()
    with pytest.warns(LowRankWarning) as caught:
        out = mergelab.merge(method, base, models, out=tmp_path / "o", max_shard_size=4000)
    assert len([w for w in caught if w.category is LowRankWarning]) == 1
    line = str(caught[0].message)
    assert line.startswith(f"mergelab: {method}: 2 of 3 matrices") and "left those directions out" in line
    record = json.loads(metadata(out)["mergelab.numerical_rank"])
    assert record["matrices"] == 3 and record["rank_deficient"] == 2 and record["low_rank"] == "auto"
    assert record["worst"]["tensor"] in ("a.weight", "b.weight") and f"Worst: {record['worst']['tensor']}" in line
    assert len(list(out.glob("*.safetensors"))) > 1  # sharded: every shard's header filled


def test_full_rank_merge_does_not_warn_and_records_zero(tmp_path):
    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(48, 32, generator=gen), "v": torch.randn(32, generator=gen)}
    models = [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowRankWarning)
        out = mergelab.merge("iso_c", base, models, out=tmp_path / "o.safetensors")
    record = json.loads(metadata(out)["mergelab.numerical_rank"])
    assert record == {"rank_tol": 1e-5, "low_rank": "auto", "matrices": 1, "rank_deficient": 0}
    out = mergelab.merge("tsv", base, models, out=tmp_path / "p.safetensors", exclude=["*"])  # no matrix at all
    assert json.loads(metadata(out)["mergelab.numerical_rank"])["matrices"] == 0
    out = mergelab.merge("cart", base, models, out=tmp_path / "q.safetensors")  # no low_rank: nothing reserved
    assert "mergelab.numerical_rank" not in metadata(out)


def test_official_warns_that_it_kept_them_and_in_memory_merges_warn_too():
    base, *models = lora_models(duplicated=True)
    with pytest.warns(LowRankWarning, match="low_rank='official' kept them"):
        mergelab.merge("tsv", base, models, low_rank="official")
    with pytest.warns(LowRankWarning, match="weave: 2 of 3 matrices"):
        mergelab.merge("weave", base, models, inner="iso_c")  # the inner method's notes reach the engine


@pytest.mark.parametrize("inner", SPECTRAL)
def test_weave_fast_path_holds_on_low_rank_inputs(inner):
    # the stable variant is still scaling * g(taus): Weight Weaving's closed form equals its algorithm
    base, *models = lora_models()
    common = {"inner": inner, "lambdas": [0.2, 0.9, 1.4], "dtype": "float64"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LowRankWarning)
        fast = mergelab.merge("weave", base, models, **common)
        general = mergelab.merge("weave", base, models, path="general", **common)
    for name in base:
        torch.testing.assert_close(fast[name], general[name], rtol=1e-9, atol=1e-9)


# --- CART: already stable (truncation to the top components) --------------------------------------------


@pytest.mark.parametrize("duplicated", [False, True])
def test_cart_is_continuous_on_low_rank_inputs(duplicated):
    taus = lora_taus(7, (48, 32), 4, 2, duplicated)
    assert gap(merge("cart", taus.float()), merge("cart", perturbed(taus, 7).float()), taus) < 1e-5
    assert gap(merge("cart", taus.float(), svd_dtype="float32"), merge("cart", taus), taus) < 1e-5


# --- OPCM (continual): its projection on rank-deficient merged task vectors -----------------------------


@pytest.mark.parametrize("shape", [(64, 64), (96, 64), (64, 192)])
def test_opcm_paper_projection_is_continuous_on_low_rank_merged_vectors(shape):
    # the paper's projection removes the top-left r x r block, r <= numerical rank: well defined
    gen = torch.Generator().manual_seed(0)
    m, n = shape
    merged_tv = (torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen)).float()
    tau = (torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen)).float()
    noise = 1e-7 * float(merged_tv.abs().max()) * torch.randn(m, n, generator=gen)
    moved = project_out(merged_tv + noise, tau, 0.5, "paper") - project_out(merged_tv, tau, 0.5, "paper")
    assert float(moved.abs().max() / tau.abs().max()) < 1e-5  # measured <= 1.2e-7


def test_opcm_auto_projection_is_continuous_on_low_rank_merged_vectors_and_official_is_not():
    gen = torch.Generator().manual_seed(0)
    merged_tv = (torch.randn(64, 2, generator=gen) @ torch.randn(2, 64, generator=gen)).float()
    tau = (torch.randn(64, 2, generator=gen) @ torch.randn(2, 64, generator=gen)).float()
    noise = 1e-7 * float(merged_tv.abs().max()) * torch.randn(64, 64, generator=gen)

    def moved(rank_tol: float) -> float:
        change = project_out(merged_tv + noise, tau, 0.5, "official", rank_tol) - project_out(
            merged_tv, tau, 0.5, "official", rank_tol)
        return float(change.abs().max() / tau.abs().max())

    assert moved(RANK_TOL) < 1e-5  # low_rank="auto"
    assert moved(0.0) > 1e-2  # the official rule: measured 0.14 to 0.18


def test_opcm_auto_projection_is_the_official_one_bit_for_bit_on_full_rank_merged_vectors():
    gen = torch.Generator().manual_seed(1)
    merged_tv, tau = torch.randn(48, 40, generator=gen), torch.randn(48, 40, generator=gen)
    assert torch.equal(project_out(merged_tv, tau, 0.5, "official", RANK_TOL),
                       project_out(merged_tv, tau, 0.5, "official"))
