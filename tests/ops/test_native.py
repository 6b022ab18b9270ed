"""The compiled kernels (engine/kernels.cpp via engine.native: global TIES, task arithmetic) against the plain torch path.

The kernels promise the plain path's bits, with one documented exception: torch's vectorised sum
over the task dimension groups the last (chunk mod 32) positions of each column chunk differently
(AVX2; 64 with AVX-512), so there merged values may differ by float rounding. ``assert_same``
checks exactly that: equal bits everywhere else. They are built here with the machine's C++
compiler (CI has one); where none is installed the tests that need them are skipped and the
fallback is tested instead.
"""

from __future__ import annotations

import shutil
import warnings
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergelab
from mergelab.engine import chunks
from mergelab.errors import MergelabError
from mergelab.ops import native
from mergelab.ops.select import StreamingKth, WindowCount
from tests.helpers import save_states

needs_kernels = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                   reason="no C++ compiler to build the kernels")


@pytest.fixture
def plain(monkeypatch):
    """``plain(True)``: the kernels turned off (the plain torch path); ``plain(False)``: on again."""
    loaded = native.kernels

    def switch(off: bool) -> None:
        monkeypatch.setattr(native, "kernels", (lambda: None) if off else loaded)

    return switch


def try_loading_again(monkeypatch) -> None:
    monkeypatch.setattr(native, "_TRIED", False)
    monkeypatch.setattr(native, "_KERNELS", None)


def states(n_models: int, dtype: torch.dtype, seed: int = 0, quantised: bool = True) -> tuple[dict, list[dict]]:
    """A base and fine-tunes; bf16 rounding of small differences makes many exact ties and
    sign cancellations, the cases where the two paths could part."""
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(300, 70, generator=gen).to(dtype), "b": torch.randn(513, generator=gen).to(dtype),
            "s": torch.randn((), generator=gen).to(dtype)}
    scale = 0.01 if quantised else 0.1
    models = [{k: (v.float() + scale * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in base.items()}
              for _ in range(n_models)]
    return base, models


TAIL = 64  # positions at the end of a chunk where torch's sum order may differ from t = 0..T-1


def assert_same(fast: dict, slow: dict, chunk: int = chunks.CHUNK_ELEMENTS["cpu"]) -> None:
    """Equal bits, except possibly in the last TAIL positions of a column chunk (then close)."""
    for name, expected in slow.items():
        got, expected = fast[name].reshape(-1), expected.reshape(-1)
        differ = torch.nonzero(got != expected).reshape(-1)
        n = expected.numel()
        chunk_end = torch.clamp((differ // chunk + 1) * chunk, max=n)
        assert bool((chunk_end - differ <= TAIL).all()), f"{name}: differs at {differ[chunk_end - differ > TAIL][:5].tolist()}"
        assert torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-6), name


def count_kernel_calls(monkeypatch, *names: str) -> Counter[str]:
    """Counts, for the rest of the test, the calls of these ``native.Kernels`` methods (which still run)."""
    calls: Counter[str] = Counter()
    kernels = native.kernels()
    assert kernels is not None
    for name in names:
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *args, _real=real, _name=name: calls.update([_name]) or _real(*args))
    return calls


def merged_both_ways(plain, base, models, **hparams) -> tuple[dict, dict]:
    fast = mergelab.merge("ties", base, models, **hparams)
    plain(True)
    slow = mergelab.merge("ties", base, models, **hparams)
    plain(False)
    return fast, slow


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_models", [1, 2, 3, 8, 9])  # 9: the merge kernel declines (T <= 8), selection still native
@pytest.mark.parametrize("merge_func", ["mean", "sum", "max"])
def test_kernels_give_the_plain_paths_bits(monkeypatch, plain, dtype, n_models, merge_func):
    monkeypatch.setitem(chunks.CHUNK_ELEMENTS, "cpu", 1000)  # several chunks per tensor, on both threads
    base, models = states(n_models, dtype)
    fast, slow = merged_both_ways(plain, base, models, merge_func=merge_func, scaling=0.7)
    assert_same(fast, slow, chunk=1000)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_models", [1, 3, 8, 9])  # 9: declined, the plain path
def test_task_arithmetic_kernel_gives_the_plain_paths_bits(monkeypatch, plain, dtype, n_models):
    monkeypatch.setitem(chunks.CHUNK_ELEMENTS, "cpu", 1000)
    base, models = states(n_models, dtype, quantised=False)
    calls = count_kernel_calls(monkeypatch, "task_arithmetic")
    fast = mergelab.merge("task_arithmetic", base, models, scaling=0.37)
    plain(True)
    slow = mergelab.merge("task_arithmetic", base, models, scaling=0.37)
    assert_same(fast, slow, chunk=1000)
    assert bool(calls["task_arithmetic"]) == (n_models <= native.MAX_MERGE_MODELS)


@needs_kernels
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_models=st.integers(1, 8), density=st.floats(0.0, 1.0),
       threshold=st.sampled_from(["official", "exact"]), bf16=st.booleans())
def test_kernels_equal_the_plain_path_property(seed, n_models, density, threshold, bf16):
    dtype = torch.bfloat16 if bf16 else torch.float32
    base, models = states(n_models, dtype, seed, quantised=seed % 2 == 0)
    hparams = {"density": density, "threshold": threshold}
    fast = mergelab.merge("ties", base, models, **hparams)
    loaded, native.kernels = native.kernels, lambda: None  # type: ignore[assignment]  # (no fixtures in @given)
    try:
        slow = mergelab.merge("ties", base, models, **hparams)
    finally:
        native.kernels = loaded  # type: ignore[assignment]
    assert_same(fast, slow)


@needs_kernels
def test_the_kernels_do_the_work(monkeypatch):
    calls = count_kernel_calls(monkeypatch, "abs_diff_high_counts", "abs_diff_window_counts", "abs_diff_digit_counts",
                               "ties_merge")
    base, models = states(3, torch.bfloat16)
    mergelab.merge("ties", base, models)
    # one chunk per tensor: the sample pass, the window count (which held every threshold: no third pass), the merge
    assert calls == {"abs_diff_high_counts": 3, "abs_diff_window_counts": 3, "ties_merge": 3}


@needs_kernels
def test_majority_sign_patch_through_the_kernels(plain):
    # every parameter's trimmed entries cancel except where the models agree on a negative value:
    # the model-wide majority sign is -1, so the cancelled parameters are patched after the pass
    base = {"w": torch.zeros(64)}
    first = torch.full((64,), 1.0)
    first[:8] = -1.0
    models = [{"w": first}, {"w": -first}, {"w": torch.where(torch.arange(64) < 8, -1.0, 0.0)}]
    fast, slow = merged_both_ways(plain, base, models, density=1.0)
    assert torch.equal(fast["w"], slow["w"])  # T = 3: the same order everywhere
    assert (fast["w"][8:] == -1.0).all()  # merged with the majority sign, not the provisional +1


def bf16_inputs(n: int, n_models: int, scale: float, seed: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """A bf16 base, models = base + scale * noise (bf16), and the task vectors' magnitudes ``(T, n)``."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen).bfloat16()
    models = [(base.float() + scale * torch.randn(n, generator=gen)).bfloat16() for _ in range(n_models)]
    return base, models, torch.stack([(m.float() - base.float()).abs() for m in models])


@needs_kernels
def test_selection_kernels_equal_kthvalue():
    base, models, magnitudes = bf16_inputs(50_000, 3, 0.02, seed=3)
    ranks = [1, 12_345, 50_000]
    selector = StreamingKth(3, nonnegative=True, dtype=None)
    for part in range(0, 50_000, 7_000):  # several chunks, as the engine streams them
        assert selector.observe_abs_diff(base[part : part + 7_000], [m[part : part + 7_000] for m in models])
    selector.end_pass0([[r] for r in ranks])
    for part in range(0, 50_000, 7_000):
        assert selector.observe_abs_diff(base[part : part + 7_000], [m[part : part + 7_000] for m in models])
    values = [row[0] for row in selector.values()]
    assert values == [float(magnitudes[t].kthvalue(r).values) for t, r in enumerate(ranks)]


@needs_kernels
@pytest.mark.parametrize("culprit", [0, 2])
@pytest.mark.parametrize("where", [(5, 6), (299, 69)])  # inside the sample pass's 1/32 of the chunk, and past it
def test_non_finite_input_is_named_on_the_kernel_path(tmp_path, culprit, where):
    base, models = states(2, torch.bfloat16)
    all_states = [base, *models]
    all_states[culprit]["w"][where] = float("nan")
    paths = save_states(all_states, tmp_path)
    with pytest.raises(MergelabError, match="NaN or Inf") as err:
        mergelab.merge("ties", paths[0], paths[1:])
    assert str(err.value).startswith(f"{paths[culprit]}: tensor 'w'")


@needs_kernels
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_inputs_the_kernels_do_not_take_go_the_plain_way(plain, dtypes):
    base_dtype, model_dtype = dtypes
    base, models = states(3, model_dtype)
    base = {k: v.to(base_dtype) for k, v in base.items()}
    assert not native.takes(base["w"].reshape(-1), [m["w"].reshape(-1) for m in models])
    fast, slow = merged_both_ways(plain, base, models)
    assert all(torch.equal(fast[k], slow[k]) for k in base)  # both took the plain path


@needs_kernels
def test_library_is_built_once_and_reused(tmp_path):
    first = native.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no scratch left beside it


def test_no_compiler_means_the_plain_path_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path))
    try_loading_again(monkeypatch)
    with pytest.warns(UserWarning, match="compiled kernels unavailable"):
        assert native.kernels() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.kernels() is None  # decided once
    base, models = states(3, torch.bfloat16)
    assert set(mergelab.merge("ties", base, models)) == set(base)


def test_compile_error_is_reported_not_raised(monkeypatch, tmp_path):
    broken = tmp_path / "kernels.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    try_loading_again(monkeypatch)
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    with pytest.warns(UserWarning, match="failed on kernels.cpp"):
        assert native.kernels() is None
    assert not any((tmp_path / "cache" / "native").glob("*.so"))


def test_environment_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("MERGELAB_NATIVE", "0")
    try_loading_again(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.kernels() is None




@needs_kernels
def test_a_library_others_may_write_is_not_loaded(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    library = native.build(cache / "native")
    library.chmod(0o666)  # as if opened up (or planted) in a shared cache
    with pytest.raises(OSError, match="writable by others"):
        native.build(cache / "native")
    monkeypatch.setenv("MERGELAB_CACHE", str(cache))
    try_loading_again(monkeypatch)
    with pytest.warns(UserWarning, match="writable by others"):
        assert native.kernels() is None


@needs_kernels
def test_plan_says_whether_the_kernels_will_run(plain):
    base, models = states(2, torch.bfloat16)
    assert "float32 on cpu (compiled kernels)" in mergelab.plan("ties", base, models).summary()
    half = {k: v.half() for k, v in base.items()}
    mixed = {**base, "w": half["w"]}
    assert "(compiled kernels for 2 of 3 tensors" in mergelab.plan("ties", mixed, [{**m, "w": m["w"].half()} for m in models]).summary()
    assert "(compiled kernels)" in mergelab.plan("ties", base, models, scope="tensor").summary()
    assert "(compiled kernels" not in mergelab.plan("magmax", base, models).summary()  # no kernels for it
    plain(True)
    assert "(torch operations)" in mergelab.plan("task_arithmetic", base, models).summary()


@needs_kernels
def test_window_count_kernel_equals_the_torch_count():
    base, models, magnitudes = bf16_inputs(40_000, 2, 0.05, seed=5)
    rank = 31_000
    expected = magnitudes.kthvalue(rank, dim=1).values
    lows = [(int(v.view(torch.int32)) >> 16) - 1 for v in expected]
    fast, slow = WindowCount(lows, 3), WindowCount(lows, 3)
    for part in range(0, 40_000, 9_000):
        assert fast.observe_abs_diff(base[part : part + 9_000], [m[part : part + 9_000] for m in models])
    slow.observe(magnitudes)
    assert fast.values(rank) == slow.values(rank) == expected.tolist()


@needs_kernels
@pytest.mark.parametrize("guess", ["hit", "miss", "none"])
def test_window_guess_hit_miss_or_none_gives_the_same_merge(monkeypatch, plain, guess):
    """A missed guess costs the two histogram passes (4 in all), no guess one more pass (3); never exactness."""
    from mergelab.ops.thresholds import ThresholdPasses

    real = ThresholdPasses._guess_window
    if guess == "miss":
        monkeypatch.setattr(ThresholdPasses, "_guess_window",
                            lambda self: WindowCount([int(lo) + 40 for lo in real(self).lows], 1))
    elif guess == "none":
        monkeypatch.setattr(ThresholdPasses, "_guess_window", lambda self: None)
    passes: list[int] = []
    end_pass = ThresholdPasses.end_pass
    monkeypatch.setattr(ThresholdPasses, "end_pass", lambda self, i: passes.append(i) or end_pass(self, i))
    base, models = states(3, torch.bfloat16)
    fast, slow = merged_both_ways(plain, base, models)
    assert_same(fast, slow)
    kernel_passes = {"hit": 2, "miss": 4, "none": 3}[guess]
    assert passes == [*range(kernel_passes), 0, 1]  # then the plain path's two


@needs_kernels
def test_weave_over_global_ties_uses_the_selection_kernels(monkeypatch, plain):
    calls = count_kernel_calls(monkeypatch, "abs_diff_window_counts")
    base, models = states(3, torch.bfloat16)
    fast = mergelab.merge("weave", base, models, inner="ties", lambdas=[0.5, 1.0])
    plain(True)
    slow = mergelab.merge("weave", base, models, inner="ties", lambdas=[0.5, 1.0])
    assert calls["abs_diff_window_counts"] and all(torch.equal(fast[k], slow[k]) for k in base)  # weave's own merge pass is torch's both times


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("merge_func", ["mean", "sum", "max"])
@pytest.mark.parametrize("threshold", ["official", "exact"])
def test_per_tensor_scope_on_the_kernels(monkeypatch, plain, dtype, merge_func, threshold):
    calls = count_kernel_calls(monkeypatch, "ties_merge")
    base, models = states(3, dtype)
    fast, slow = merged_both_ways(plain, base, models, scope="tensor", merge_func=merge_func, threshold=threshold)
    assert_same(fast, slow, chunk=10**12)  # whole tensors: torch's other summation order at each tensor's end
    assert calls["ties_merge"] == len(base)


@needs_kernels
@pytest.mark.parametrize("majority", [-1.0, 0.0])
def test_per_tensor_majority_sign_on_the_kernels(plain, majority):
    # positions 8.. cancel exactly (their sign waits); positions 0..7 elect -1, and 8 more elect +1 when majority is 0
    w = torch.full((64,), 1.0)
    w[:8] = -1.0
    third = torch.where(torch.arange(64) < 8, -1.0, 0.0)
    if majority == 0.0:
        w = torch.cat([w, torch.full((8,), 1.0)])
        third = torch.cat([third, torch.full((8,), 1.0)])
    second = torch.where(torch.arange(w.numel()) < 64, -w, 1.0)
    base = {"w": torch.zeros(w.numel())}
    models = [{"w": w}, {"w": second}, {"w": third}]
    fast, slow = merged_both_ways(plain, base, models, density=1.0, scope="tensor")
    assert torch.equal(fast["w"], slow["w"])
    assert (fast["w"][8:64] == -1.0).all()  # the cancelled ones took the negative entries (majority -1, or 0: "< 0")


@needs_kernels
def test_finished_selectors_are_freed_at_once_not_by_the_garbage_collector():
    # per-tensor TIES makes one selector per tensor: a reference cycle (a count factory holding `self`) kept
    # each one, with its count arrays, until the collector ran -- peak RSS doubled on the engine benchmark
    import gc
    import weakref

    base, models, _ = bf16_inputs(20_000, 3, 0.02, seed=7)
    gc.disable()
    try:
        selector = StreamingKth(3, nonnegative=True, dtype=None)
        assert selector.observe_abs_diff(base, models)
        selector.end_pass0([[100]] * 3)
        assert selector.observe_abs_diff(base, models)  # the digit pass: its counts made by the new factory
        window = WindowCount([0, 0, 0], 2)
        assert window.observe_abs_diff(base, models)
        refs = [weakref.ref(selector), weakref.ref(window)]
        del selector, window
        assert [ref() for ref in refs] == [None, None]
    finally:
        gc.enable()
