"""Selection primitives against a NumPy reference (stable sort: ties go to the lower index)."""

from unittest import mock

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from srigl_jax import selection
from srigl_jax.selection import column_top_count_mask, magnitude_score, perturb_ties, top_n_mask


def reference_top_n(score, eligible, n):
    """Sort the eligible entries by (-score, flat index) and take the first n."""
    flat = score.ravel()
    idx = np.flatnonzero(eligible.ravel())
    order = idx[np.lexsort((idx, -flat[idx]))]
    out = np.zeros(flat.shape, bool)
    out[order[: max(0, min(n, len(order)))]] = True
    return out.reshape(score.shape)


def reference_column_top(score, eligible, counts):
    out = np.zeros(score.shape, bool)
    for j in range(score.shape[1]):
        out[:, j] = reference_top_n(score[:, j], eligible[:, j], int(counts[j]))
    return out


# Compiled once per shape (eager calls re-trace and re-compile the selection's loops on every call).
_jit_top_n = jax.jit(top_n_mask)
_jit_column_top = jax.jit(column_top_count_mask)
# Its own function (so its own trace cache), only ever called while _SLAB_COLUMNS is patched: see the slab test.
_jit_column_top_slab = jax.jit(lambda score, eligible, counts: column_top_count_mask(score, eligible, counts))

# Few distinct values so that ties are common.
scores_2d = st.tuples(st.integers(1, 7), st.integers(1, 9), st.integers(0, 2**31 - 1)).map(
    lambda t: np.random.default_rng(t[2]).integers(0, 4, size=(t[0], t[1])).astype(np.float32) / 2
)


@given(scores_2d, st.integers(0, 70), st.integers(0, 2**31 - 1))
def test_top_n_matches_reference(score, n, seed):
    eligible = np.random.default_rng(seed).random(score.shape) < 0.7
    got = np.asarray(top_n_mask(jnp.asarray(score), jnp.asarray(eligible), n))
    np.testing.assert_array_equal(got, reference_top_n(score, eligible, n))


@given(scores_2d, st.integers(0, 2**31 - 1))
def test_column_top_count_matches_reference(score, seed):
    rng = np.random.default_rng(seed)
    eligible = rng.random(score.shape) < 0.8
    counts = rng.integers(0, score.shape[0] + 1, size=score.shape[1])
    got = column_top_count_mask(jnp.asarray(score), jnp.asarray(eligible), jnp.asarray(counts))
    np.testing.assert_array_equal(np.asarray(got), reference_column_top(score, eligible, counts))


@given(st.integers(0, 2**31 - 1), st.sampled_from(["normal", "lognormal", "clustered"]))
def test_top_n_on_continuous_scores(seed, kind):
    """Smooth and very skewed distributions: the interpolating search must still be exact."""
    rng = np.random.default_rng(seed)
    size = (23, 37)
    score = {"normal": np.abs(rng.normal(size=size)),
             "lognormal": rng.lognormal(0, 8, size=size),
             "clustered": 1.0 + (rng.random(size) < 0.5) * 1e-6 * rng.random(size)}[kind].astype(np.float32)
    eligible = rng.random(size) < 0.9
    n = int(rng.integers(0, eligible.sum() + 1))
    got = np.asarray(_jit_top_n(jnp.asarray(score), jnp.asarray(eligible), n))
    np.testing.assert_array_equal(got, reference_top_n(score, eligible, n))
    cols = np.asarray(_jit_column_top(jnp.asarray(score), jnp.asarray(eligible), jnp.full(37, n // 37)))
    np.testing.assert_array_equal(cols, reference_column_top(score, eligible, np.full(37, n // 37)))


# Adversarial inputs for the radix select: exact ties, zeros, subnormals, values one ulp apart, float32
# max, ranges spanning every exponent, all-equal layers; shapes include single rows and columns.
_F32 = np.float32
_SPECIAL = np.array(
    [0.0, 1e-45, 3e-45, 1e-40, np.finfo(_F32).tiny, 1e-10, 0.5, 1.0, np.nextafter(_F32(1), _F32(2)),
     np.nextafter(_F32(1), _F32(0)), 2.0, 65536.0, 3e38, np.finfo(_F32).max],
    _F32,
)
_SHAPES = [(1, 1), (1, 7), (6, 1), (3, 4), (8, 9), (33, 5)]


def adversarial_case(shape_index, kind, seed):
    rng = np.random.default_rng(seed)
    shape = _SHAPES[shape_index]
    if kind == "special":
        score = rng.choice(_SPECIAL, size=shape)
    elif kind == "few":  # a handful of distinct values over a wide range
        score = rng.choice(rng.lognormal(0, 10, size=3).astype(_F32), size=shape)
    elif kind == "wide":
        score = np.minimum(rng.lognormal(0, 30, size=shape), np.finfo(_F32).max)
    elif kind == "ulps":  # consecutive float32 values around 1: keys differ in the last bits only
        score = (1 + rng.integers(0, 5, size=shape) * np.finfo(_F32).eps)
    else:  # "equal": one value everywhere, zero included
        score = np.full(shape, rng.choice(_SPECIAL))
    eligible = rng.random(shape) < rng.choice([0.0, 0.5, 0.9, 1.0])
    return score.astype(_F32), eligible, rng


cases = st.builds(
    adversarial_case,
    st.integers(0, len(_SHAPES) - 1),
    st.sampled_from(["special", "few", "wide", "ulps", "equal"]),
    st.integers(0, 2**31 - 1),
)


@settings(max_examples=300, deadline=None)
@given(cases, st.floats(0, 1.2))
def test_top_n_matches_reference_on_adversarial_inputs(case, frac):
    score, eligible, _ = case
    n = int(round(frac * score.size))  # 0 ... more than #eligible (clipped)
    got = np.asarray(_jit_top_n(jnp.asarray(score), jnp.asarray(eligible), n))
    np.testing.assert_array_equal(got, reference_top_n(score, eligible, n))


@settings(max_examples=300, deadline=None)
@given(cases)
def test_column_top_count_matches_reference_on_adversarial_inputs(case):
    score, eligible, rng = case
    counts = rng.integers(0, score.shape[0] + 2, size=score.shape[1])
    got = _jit_column_top(jnp.asarray(score), jnp.asarray(eligible), jnp.asarray(counts))
    np.testing.assert_array_equal(np.asarray(got), reference_column_top(score, eligible, counts))


@settings(max_examples=60, deadline=None)
@given(cases)
def test_column_top_count_on_a_slab_of_columns(case):
    """Force the gathered-slab passes (normally only for layers over 512 columns) on small layers."""
    score, eligible, rng = case
    counts = rng.integers(0, score.shape[0] + 2, size=score.shape[1])
    # _SLAB_COLUMNS is read while tracing: a jitted function whose traces all happen under the patch
    with mock.patch.object(selection, "_SLAB_COLUMNS", 2):
        got = _jit_column_top_slab(jnp.asarray(score), jnp.asarray(eligible), jnp.asarray(counts))
    np.testing.assert_array_equal(np.asarray(got), reference_column_top(score, eligible, counts))


def test_wide_layer_uses_slab_and_matches_reference():
    """A layer wide enough for the real slab path: continuous columns, tied columns, empty columns."""
    rng = np.random.default_rng(0)
    score = rng.lognormal(0, 2, size=(40, 700)).astype(_F32)
    score[:, 100:120] = 1.0  # all tied: the tie cut runs per column
    score[::3, 200:260] = 0.0
    eligible = rng.random(score.shape) < 0.9
    eligible[:, 300:310] = False
    counts = rng.integers(0, 42, size=700)
    got = column_top_count_mask(jnp.asarray(score), jnp.asarray(eligible), jnp.asarray(counts))
    np.testing.assert_array_equal(np.asarray(got), reference_column_top(score, eligible, counts))
    for n in (0, 1, 9000, int(eligible.sum())):
        got = top_n_mask(jnp.asarray(score), jnp.asarray(eligible), n)
        np.testing.assert_array_equal(np.asarray(got), reference_top_n(score, eligible, n))


def test_top_n_handles_extremes_and_large_values():
    score = jnp.array([0.0, 3e38, 1e-45, 7.0, 3e38])
    every = jnp.ones(5, bool)
    assert np.asarray(top_n_mask(score, every, 0)).sum() == 0
    assert np.asarray(top_n_mask(score, every, 99)).all()  # n clipped to #eligible
    np.testing.assert_array_equal(top_n_mask(score, every, 2), [False, True, False, False, True])
    np.testing.assert_array_equal(top_n_mask(score, every, 4), [False, True, True, True, True])


def test_empty_layers_select_nothing():
    for shape in [(0,), (0, 3), (3, 0)]:
        assert top_n_mask(jnp.zeros(shape), jnp.ones(shape, bool), 2).shape == shape
    assert column_top_count_mask(jnp.zeros((0, 3)), jnp.ones((0, 3), bool), jnp.ones(3, jnp.int32)).shape == (0, 3)


def test_top_n_traced_count_under_jit():
    score = jnp.arange(10.0)
    f = jax.jit(lambda n: top_n_mask(score, jnp.ones(10, bool), n))
    assert int(f(3).sum()) == 3 and bool(f(3)[9]) and not bool(f(3)[6])
    assert int(f(7).sum()) == 7


def test_magnitude_score_sanitises_nonfinite():
    s = magnitude_score(jnp.array([jnp.nan, -jnp.inf, jnp.inf, -2.0]))
    assert np.isfinite(np.asarray(s)).all()
    np.testing.assert_array_equal(np.asarray(s)[[0, 3]], [0.0, 2.0])
    assert float(s[1]) == float(s[2]) == float(jnp.finfo(jnp.float32).max)


def test_perturb_ties_is_seeded_and_keeps_order_of_distinct_values():
    s = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0, 2.0])
    a = perturb_ties(s, jax.random.key(0))
    b = perturb_ties(s, jax.random.key(0))
    np.testing.assert_array_equal(a, b)
    assert float(a[5]) > float(a[:3].max()) > float(a[3:5].max())  # distinct values keep their order
    # Which tied entry wins depends on the seed (ties are no longer "lower index first").
    winners = {int(jnp.argmax(perturb_ties(s[:3], jax.random.key(i)))) for i in range(20)}
    assert len(winners) > 1


_X64_CASE = """
import jax, jax.numpy as jnp, numpy as np
from srigl_jax.selection import column_top_count_mask, top_n_mask
rng = np.random.default_rng(3)
score = jnp.asarray(np.round(rng.random((300, 700)) * 50).astype(np.float32))  # many ties, many columns
eligible = jnp.asarray(rng.random((300, 700)) < 0.8)
counts = jnp.asarray(rng.integers(0, 200, 700), jnp.int32)
want = (np.asarray(top_n_mask(score, eligible, 12345)), np.asarray(column_top_count_mask(score, eligible, counts)))
with jax.enable_x64(True):
    got = (np.asarray(top_n_mask(score, eligible, 12345)), np.asarray(column_top_count_mask(score, eligible, counts)))
np.testing.assert_array_equal(got[0], want[0])
np.testing.assert_array_equal(got[1], want[1])
print("same selections")
"""


def test_selection_under_x64_matches_default():
    """Under jax_enable_x64 (e.g. float64 training) integer sums widen to int64: the selections must still
    trace and select exactly the same entries. Runs in a fresh process: switching x64 on late in the full
    suite's process crashed XLA while compiling (a segfault in CI), whatever this test checks."""
    proc = subprocess.run([sys.executable, "-c", _X64_CASE], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and "same selections" in proc.stdout, proc.stderr[-4000:]
