"""The radix-select histogram pass on the C++ kernel (srigl_jax/_ffi_histogram.py) counts exactly what XLA's
scatter-add counts, so every selection, and every mask update, is bit-identical with and without it.

Skipped where the kernel library is not built (the selection then always uses XLA's scatter-add)."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import srigl_jax as sj
from srigl_jax import _ffi_histogram, selection
from srigl_jax._ffi_kernels import FORCE_XLA_ENV

pytestmark = pytest.mark.skipif(not _ffi_histogram.usable(), reason="histogram kernel not built")


def both_histograms(score, eligible, lo, shift, digit_bits, per_column):
    """(XLA's (hist, above), the kernel's (hist, above)) for one pass."""
    def xla(score, eligible, lo, shift):
        return selection._window_histogram(selection._sortable_keys(score, eligible), lo, shift, digit_bits,
                                           per_column)

    def kernel(score, eligible, lo, shift):
        table = _ffi_histogram.window_histogram_table(score, eligible, lo, shift, digit_bits, per_column)
        table = table.reshape((1 << digit_bits) + 1, -1)
        return table[: 1 << digit_bits], table[1 << digit_bits]

    args = (score, eligible, lo, shift)
    return jax.jit(xla)(*args), jax.jit(kernel)(*args)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), per_column=st.booleans(),
       digit_bits=st.sampled_from([1, 4, 10, 16]), seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_kernel_counts_what_the_scatter_add_counts(rows, cols, per_column, digit_bits, seed, ties):
    rng = np.random.default_rng(seed)
    score = np.abs(rng.standard_normal((rows, cols))).astype(np.float32)
    if ties:  # few distinct values, zeros and float32 max among them
        score = rng.choice(np.array([0.0, 0.5, 1.0, np.finfo(np.float32).max], np.float32), (rows, cols))
    eligible = rng.random((rows, cols)) < 0.8
    groups = cols if per_column else 1
    keys = np.where(eligible, score.view(np.int32), -1)
    # windows below, inside and above the keys, a window start of 2^31 - 1 (a group with nothing to select)
    lo = rng.choice(np.concatenate([keys[keys >= 0], [0, 2**31 - 1]]).astype(np.int64), groups).astype(np.int32)
    shift = rng.integers(0, 32 - digit_bits + 1, groups).astype(np.int32)
    (h_xla, a_xla), (h_kernel, a_kernel) = both_histograms(score, eligible, lo, shift, digit_bits, per_column)
    np.testing.assert_array_equal(h_kernel, h_xla)
    np.testing.assert_array_equal(a_kernel, a_xla)


def test_kernel_counts_on_a_large_layer_split_over_threads():
    """3072 x 1024: both modes split the work (private tables summed / column ranges) where XLA's pool has
    two threads or more (CI's 2 cores have two)."""
    rng = np.random.default_rng(0)
    score = np.abs(rng.standard_normal((3072, 1024))).astype(np.float32)
    eligible = rng.random(score.shape) < 0.9
    for per_column, bits, groups, shift in ((False, 16, 1, 8), (True, 10, 1024, 12)):
        # windows [0.25, 1.0) and [0.25, 0.375): keys below, inside and above each
        lo = np.full(groups, np.float32(0.25).view(np.int32), np.int32)
        shift = np.full(groups, shift, np.int32)
        (h_xla, a_xla), (h_kernel, a_kernel) = both_histograms(score, eligible, lo, shift, bits, per_column)
        np.testing.assert_array_equal(h_kernel, h_xla)
        np.testing.assert_array_equal(a_kernel, a_xla)
        assert int(h_xla.sum()) > 0 and int(a_xla.sum()) > 0  # the window cuts the keys: every branch counts


def _compiled(fn, args, monkeypatch, force_xla):
    """``fn`` compiled with the kernel, or with XLA's scatter-add (the switch is read when tracing, so every call
    traces anew: jit caches traces per function). Checks which one the compiled program calls."""
    if force_xla:
        monkeypatch.setenv(FORCE_XLA_ENV, "1")
    else:
        monkeypatch.delenv(FORCE_XLA_ENV, raising=False)
    compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile()
    assert (_ffi_histogram.TARGET_NAME in compiled.as_text()) == (not force_xla)
    return compiled


@settings(max_examples=4, deadline=None)
@given(rows=st.integers(1, 64), cols=st.integers(1, 600), seed=st.integers(0, 2**31 - 1),
       ties=st.booleans())
def test_selections_are_identical_with_and_without_the_kernel(rows, cols, seed, ties):
    rng = np.random.default_rng(seed)
    score = np.abs(rng.standard_normal((rows, cols))).astype(np.float32)
    if ties:
        score = np.round(score * 2) / 2
    eligible = rng.random((rows, cols)) < 0.7
    n = np.int32(rng.integers(0, rows * cols + 1))
    counts = rng.integers(0, rows + 1, cols).astype(np.int32)
    with pytest.MonkeyPatch.context() as monkeypatch:
        for fn, args in ((selection.top_n_mask, (score, eligible, n)),
                         (selection.column_top_count_mask, (score, eligible, counts))):
            with_kernel = _compiled(fn, args, monkeypatch, force_xla=False)(*args)
            with_xla = _compiled(fn, args, monkeypatch, force_xla=True)(*args)
            np.testing.assert_array_equal(with_kernel, with_xla)


def test_mask_update_is_bit_identical_with_and_without_the_kernel(monkeypatch):
    """A whole SRigL update with ablation (every selection, the slab path of 600 neurons included) and a
    batched (lax.map-ped) update of two equal layers."""
    params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (200, 600))},
              "b": {"kernel": jax.random.normal(jax.random.key(1), (64, 48))},
              "c": {"kernel": jax.random.normal(jax.random.key(2), (64, 48))}}
    algo = sj.SRigL(sparsity=0.9, distribution="uniform", delta_t=10, t_end=1000, gamma_sal=0.5,
                    ablation_exempt=())
    masks = algo.init_masks(params, jax.random.key(3))
    params = algo.init_params(params, masks, jax.random.key(4))
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(5), p.shape) * (1 + (p != 0)), params)
    args = (params, grads, masks, jax.random.key(6), jnp.int32(10))
    with_kernel = _compiled(algo.update_masks, args, monkeypatch, force_xla=False)(*args)
    with_xla = _compiled(algo.update_masks, args, monkeypatch, force_xla=True)(*args)
    jax.tree.map(np.testing.assert_array_equal, with_kernel, with_xla)
    changed = jax.tree.map(lambda a, b: bool((a != b).any()), with_kernel[1], masks)
    assert all(jax.tree.leaves(changed))  # the update did change every mask


def test_selections_stay_differentiable():
    """The kernel's integer counts carry no gradient; a loss that selects still differentiates (as with XLA)."""
    score = jnp.abs(jax.random.normal(jax.random.key(0), (16, 8)))

    def loss(x):
        return jnp.sum(jnp.where(selection.top_n_mask(x, jnp.ones(x.shape, bool), 20), x, 0.0) ** 2)

    grad = jax.jit(jax.grad(loss))(score)
    kept = selection.top_n_mask(score, jnp.ones(score.shape, bool), 20)
    np.testing.assert_allclose(grad, jnp.where(kept, 2 * score, 0.0), rtol=1e-6)


def test_gpu_lowering_uses_the_scatter_add():
    """Lowered for CUDA (no GPU needed), a selection has no CPU FFI call; lowered for CPU it has one."""
    score, eligible = jnp.ones((8, 6)), jnp.ones((8, 6), bool)
    traced = jax.jit(selection.top_n_mask).trace(score, eligible, 5)
    assert _ffi_histogram.TARGET_NAME not in traced.lower(lowering_platforms=("cuda",)).as_text()
    assert _ffi_histogram.TARGET_NAME in traced.lower(lowering_platforms=("cpu",)).as_text()
