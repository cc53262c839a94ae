"""The exact top-n selection on the C++ kernel (srigl_jax/_ffi_select.py) selects exactly what its definition
(numpy lexsort: the n largest keys, ties to the lower position) and XLA's radix select select, so every mask
update is bit-identical with and without it; the column-count kernel counts what a column sum counts.

Skipped where the kernel library is not built (selections then always use the XLA formulation)."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import srigl_jax as sj
from srigl_jax import _ffi_select, selection
from srigl_jax._ffi_kernels import FORCE_XLA_ENV

pytestmark = pytest.mark.skipif(not _ffi_select.usable(), reason="selection kernel not built")

_kernel = jax.jit(_ffi_select.select_mask, static_argnums=3)
_xla = jax.jit(selection._select_xla, static_argnums=3)


def _random_case(rng, rows, cols, per_column, ties):
    score = np.abs(rng.standard_normal((rows, cols))).astype(np.float32)
    if ties:  # few distinct values, zeros and float32 max among them
        score = rng.choice(np.array([0.0, 0.5, 1.0, np.finfo(np.float32).max], np.float32), (rows, cols))
    eligible = rng.random((rows, cols)) < rng.choice([0.0, 0.3, 0.8, 1.0])
    # n from below 0 to above the eligible count: both implementations clip to [0, #eligible] themselves
    if per_column:
        n = rng.integers(-2, rows + 3, cols).astype(np.int32)
    else:
        n = np.array([rng.integers(-2, rows * cols + 3)], np.int32)
    return score, eligible, n


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), per_column=st.booleans(),
       seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_kernel_selects_the_definition(rows, cols, per_column, seed, ties):
    score, eligible, n = _random_case(np.random.default_rng(seed), rows, cols, per_column, ties)
    want = _ffi_select.reference_select(score, eligible, n, per_column)
    np.testing.assert_array_equal(_kernel(score, eligible, n, per_column), want)
    np.testing.assert_array_equal(_xla(score, eligible, n, per_column), want)
    counts = want.sum(axis=0) if per_column else np.atleast_1d(want.sum())
    available = eligible.sum(axis=0) if per_column else np.atleast_1d(eligible.sum())
    np.testing.assert_array_equal(counts, np.clip(n, 0, available))  # exactly n, never more: ties are cut


def test_kernel_with_special_floats_and_columns_with_fewer_eligible_than_wanted():
    """Zeros, -0.0 and other negative scores (keys < 0: never selected, by the kernel's definition), float32 max,
    +Inf and NaN bit patterns (ordered above every finite score); per column, n above the eligible count on a
    column long enough for the min-heap path (n * 8 < rows) and on one that collects every row."""
    rng = np.random.default_rng(1)
    specials = np.array([0.0, -0.0, -1.0, 1.0, np.finfo(np.float32).max, np.inf, np.nan], np.float32)
    score = rng.choice(specials, (200, 12))
    eligible = rng.random(score.shape) < 0.9
    eligible[:, 0] = False
    eligible[:5, 0] = True                                   # 5 eligible of 200 rows, 20 wanted (heap path)
    n_col = np.array([20, 0, 3, 150, 199, 200, 7, 1, 2, 500, -1, 40], np.int32)
    for per_column, n in ((True, n_col), (False, np.array([700], np.int32)), (False, np.array([0], np.int32))):
        want = _ffi_select.reference_select(score, eligible, n, per_column)
        np.testing.assert_array_equal(_kernel(score, eligible, n, per_column), want)
    # n = 0 selects nothing on the XLA path too, even where keys equal its "no threshold" value (a NaN pattern)
    nan_max = np.full((4, 3), np.array(0x7FFFFFFF, np.int32).view(np.float32))
    for per_column, n in ((True, np.zeros(3, np.int32)), (False, np.zeros(1, np.int32))):
        assert not np.asarray(_xla(nan_max, np.ones((4, 3), bool), n, per_column)).any()
        assert not np.asarray(_kernel(nan_max, np.ones((4, 3), bool), n, per_column)).any()


def test_kernel_on_a_large_layer_split_over_threads():
    """3072 x 1024: both modes split the work over chunks / column tiles where XLA's pool has two threads or
    more (CI's 2 cores have two); scores rounded to 1/8 so the threshold's ties are cut across chunks."""
    rng = np.random.default_rng(0)
    for rounded in (False, True):
        score = np.abs(rng.standard_normal((3072, 1024))).astype(np.float32)
        if rounded:
            score = np.round(score * 8) / 8
        eligible = rng.random(score.shape) < 0.9
        for per_column, n in ((False, np.array([1_000_003], np.int32)),
                              (True, rng.integers(0, 2000, 1024).astype(np.int32))):
            want = _ffi_select.reference_select(score, eligible, n, per_column)
            np.testing.assert_array_equal(_kernel(score, eligible, n, per_column), want)


def _compiled(fn, args, monkeypatch, force_xla, target=_ffi_select.TARGET_NAME):
    """``fn`` compiled with the kernel, or with the XLA formulation (the switch is read when tracing, so every call
    traces anew: jit caches traces per function). Checks which one the compiled program calls (``target``)."""
    if force_xla:
        monkeypatch.setenv(FORCE_XLA_ENV, "1")
    else:
        monkeypatch.delenv(FORCE_XLA_ENV, raising=False)
    compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile()
    assert (target in compiled.as_text()) == (not force_xla)
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
    """A whole SRigL update with ablation (every selection; with XLA the slab path of 600 neurons included) and
    a batched (lax.map-ped) update of two equal layers."""
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


@settings(max_examples=4, deadline=None)
@given(batch=st.integers(1, 4), rows=st.integers(1, 40), cols=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_vmapped_selections_and_counts_equal_slice_by_slice(batch, rows, cols, seed):
    """Under vmap (as in the analysis simulations), with the kernel and with XLA: each slice's selection is the
    definition's, with unbatched operands shared across the batch."""
    rng = np.random.default_rng(seed)
    score = np.abs(rng.standard_normal((batch, rows, cols))).astype(np.float32)
    eligible = rng.random((rows, cols)) < 0.7   # one eligibility for the whole batch (not mapped)
    counts = rng.integers(0, rows + 1, (batch, cols)).astype(np.int32)
    n = np.int32(rng.integers(0, rows * cols + 1))
    cases = (
        (jax.vmap(selection.column_top_count_mask, in_axes=(0, None, 0)), (score, eligible, counts),
         [_ffi_select.reference_select(score[b], eligible, counts[b], True) for b in range(batch)],
         _ffi_select.TARGET_NAME),
        (jax.vmap(selection.top_n_mask, in_axes=(0, None, None)), (score, eligible, n),
         [_ffi_select.reference_select(score[b], eligible, np.array([n]), False) for b in range(batch)],
         _ffi_select.TARGET_NAME),
        (jax.vmap(jax.vmap(selection.column_counts)), ((score > 1.0).reshape(batch, 1, rows, cols),),
         [(score[b] > 1.0).sum(axis=0)[None] for b in range(batch)], _ffi_select.COUNTS_TARGET_NAME),
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        for fn, args, want, target in cases:
            for force_xla in (False, True):
                got = _compiled(fn, args, monkeypatch, force_xla, target)(*args)
                np.testing.assert_array_equal(got, np.stack(want))


def test_selections_stay_differentiable():
    """A mask carries no gradient; a loss that selects still differentiates with the kernel (as with XLA)."""
    score = jnp.abs(jax.random.normal(jax.random.key(0), (16, 8)))

    def loss(x):
        return jnp.sum(jnp.where(selection.top_n_mask(x, jnp.ones(x.shape, bool), 20), x, 0.0) ** 2)

    grad = jax.jit(jax.grad(loss))(score)
    kept = selection.top_n_mask(score, jnp.ones(score.shape, bool), 20)
    np.testing.assert_allclose(grad, jnp.where(kept, 2 * score, 0.0), rtol=1e-6)


def test_gpu_lowering_uses_the_xla_formulation():
    """Lowered for CUDA (no GPU needed), a selection has no CPU FFI call; lowered for CPU it has one."""
    score, eligible = jnp.ones((8, 6)), jnp.ones((8, 6), bool)
    traced = jax.jit(selection.top_n_mask).trace(score, eligible, 5)
    assert _ffi_select.TARGET_NAME not in traced.lower(lowering_platforms=("cuda",)).as_text()
    assert _ffi_select.TARGET_NAME in traced.lower(lowering_platforms=("cpu",)).as_text()


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(0, 70), cols=st.integers(1, 700), density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
       seed=st.integers(0, 2**31 - 1))
def test_column_counts_kernel_counts_per_column(rows, cols, density, seed):
    mask = np.random.default_rng(seed).random((rows, cols)) < density
    np.testing.assert_array_equal(jax.jit(_ffi_select.column_counts)(mask), mask.sum(axis=0))
    np.testing.assert_array_equal(jax.jit(selection.column_counts)(mask), mask.sum(axis=0))


def test_column_counts_on_a_large_mask_split_over_threads():
    mask = np.random.default_rng(2).random((3072, 1000)) < 0.3  # 1000 columns: tiles of 256 and a short one
    np.testing.assert_array_equal(jax.jit(_ffi_select.column_counts)(mask), mask.sum(axis=0))


def test_gpu_lowering_counts_with_xla():
    traced = jax.jit(selection.column_counts).trace(jnp.ones((8, 6), bool))
    assert _ffi_select.COUNTS_TARGET_NAME not in traced.lower(lowering_platforms=("cuda",)).as_text()
    assert _ffi_select.COUNTS_TARGET_NAME in traced.lower(lowering_platforms=("cpu",)).as_text()
