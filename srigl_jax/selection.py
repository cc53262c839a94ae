"""Selection primitives shared by every sparse method (SRigL, RigL, SET, init).

All scores are non-negative float32; ineligible entries never get selected. Ties are broken
deterministically by position: lower (row-major) index first. Layers are viewed as 2-D
(fan_in, n_neurons) matrices (a free reshape of Dense/Conv kernels): one column per neuron. Everything has static shapes, so the
primitives run under ``jit`` with traced counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)
# Halvings that exhaust the int32 bit patterns of non-negative float32 (bounds the search).
_BISECTION_STEPS = 31


def magnitude_score(x: jax.Array) -> jax.Array:
    """|x| as float32 with NaN -> 0 and +-Inf -> float32 max, so scores are always finite."""
    return jnp.nan_to_num(jnp.abs(x.astype(jnp.float32)), nan=0.0, posinf=_FLOAT32_MAX)


def perturb_ties(score: jax.Array, key: jax.Array) -> jax.Array:
    """Seeded tiny perturbation (a few ulps, plus an additive 1e-30 for exact zeros) to break ties randomly."""
    u = jax.random.uniform(key, score.shape, jnp.float32)
    return score * (1.0 + 2.0**-20 * u) + 1e-30 * u


def _sortable_keys(score: jax.Array, eligible: jax.Array) -> jax.Array:
    """int32 keys ordered like the non-negative float32 scores; ineligible entries get -1."""
    return jnp.where(eligible, lax.bitcast_convert_type(score.astype(jnp.float32), jnp.int32), -1)


_SAMPLES_PER_COLUMN = 64
_SAMPLES_TOTAL = 16384
_MARGIN_SIGMAS = 4.0


def _count_at_least(keys: jax.Array, t: jax.Array) -> jax.Array:
    return jnp.sum(keys >= t[None, :], axis=0, dtype=jnp.int32)


def _sampled_bracket(keys: jax.Array, n: jax.Array):
    """A tight starting bracket [lo, hi) for ``_column_thresholds`` from a strided sample of each column.

    The sample's order statistics around the target rank, widened by a few binomial standard
    deviations, are verified with two counting passes; a failed side falls back to the trivial bound,
    so the bracket is always valid whatever the data.
    """
    n_rows, n_cols = keys.shape
    per_col = max(1, min(n_rows, max(_SAMPLES_PER_COLUMN, _SAMPLES_TOTAL // n_cols)))
    stride = max(1, n_rows // per_col)
    sample = -jnp.sort(-keys[::stride], axis=0)  # descending per column
    m = sample.shape[0]
    rank = n.astype(jnp.float32) * (m / n_rows)  # expected position of the threshold in the sample
    margin = _MARGIN_SIGMAS * jnp.sqrt(rank * (1.0 - rank / m) + 1.0) + 1.0
    lo_idx = jnp.clip(jnp.ceil(rank + margin), 0, m - 1).astype(jnp.int32)
    hi_idx = jnp.clip(jnp.floor(rank - margin), 0, m - 1).astype(jnp.int32)
    cols = jnp.arange(n_cols)
    lo_probe = jnp.maximum(sample[lo_idx, cols], 0)
    hi_probe = jnp.maximum(sample[hi_idx, cols], 0) + 1
    c_lo_probe, c_hi_probe = _count_at_least(keys, lo_probe), _count_at_least(keys, hi_probe)
    lo_ok, hi_ok = c_lo_probe >= n, (c_hi_probe < n) & (hi_probe > lo_probe)
    lo = jnp.where(lo_ok, lo_probe, 0)
    c_lo = jnp.where(lo_ok, c_lo_probe, jnp.sum(keys >= 0, axis=0, dtype=jnp.int32))
    hi = jnp.where(hi_ok, hi_probe, jnp.max(keys, axis=0) + 1)  # max key < INT32_MAX: no overflow
    c_hi = jnp.where(hi_ok, c_hi_probe, 0)
    return lo, c_lo, hi, c_hi


def _column_thresholds(keys: jax.Array, n: jax.Array) -> jax.Array:
    """Per column c of int32 ``keys`` (R, C), the largest t with count(keys[:, c] >= t) >= n[c].

    Requires 0 <= n[c] <= count(keys[:, c] >= 0). A bracketing search [lo, hi) on the key values that
    alternates linear interpolation of the count (few passes on smooth score distributions) with
    bisection (guarantees at most ~62 passes); stops once count(keys >= lo) == n exactly.
    """
    n = n.astype(jnp.int32)
    lo, c_lo, hi, c_hi = _sampled_bracket(keys, n)

    def searching(state):
        lo, hi, c_lo, _, it = state
        return jnp.any((hi - lo > 1) & (c_lo != n)) & (it < 4 * _BISECTION_STEPS)

    def probe_once(state):
        lo, hi, c_lo, c_hi, it = state
        active = (hi - lo > 1) & (c_lo != n)
        width = (hi - lo).astype(jnp.float32)
        frac = (c_lo - n).astype(jnp.float32) / jnp.maximum(c_lo - c_hi, 1).astype(jnp.float32)
        interpolated = lo + (width * frac).astype(jnp.int32)
        bisected = lo + (hi - lo) // 2
        probe = jnp.clip(jnp.where(it % 2 == 0, interpolated, bisected), lo + 1, hi - 1)
        count = _count_at_least(keys, probe)
        go_up = active & (count >= n)
        go_down = active & (count < n)
        return (
            jnp.where(go_up, probe, lo),
            jnp.where(go_down, probe, hi),
            jnp.where(go_up, count, c_lo),
            jnp.where(go_down, count, c_hi),
            it + 1,
        )

    lo, *_ = lax.while_loop(searching, probe_once, (lo, hi, c_lo, c_hi, jnp.int32(0)))
    return lo


def _select_columns(keys: jax.Array, n: jax.Array) -> jax.Array:
    """Per column, the n[c] largest keys (>= 0); ties go to the lower row index."""
    threshold = _column_thresholds(keys, n)[None, :]
    at_least = keys >= threshold
    surplus = jnp.sum(at_least, axis=0, keepdims=True, dtype=jnp.int32) - n[None, :]

    def drop_surplus_ties(selected):  # rare for continuous scores: skip the cumsum when no tie is cut
        at = keys == threshold
        tie_rank_from_end = jnp.cumsum(at[::-1], axis=0, dtype=jnp.int32)[::-1]
        return selected & ~(at & (tie_rank_from_end <= surplus))

    return lax.cond(jnp.any(surplus > 0), drop_surplus_ties, lambda sel: sel, at_least)


def top_n_mask(score: jax.Array, eligible: jax.Array, n: jax.Array) -> jax.Array:
    """Boolean mask of the ``n`` highest-scoring eligible entries of ``score`` (any shape).

    ``n`` may be traced; it is clipped to [0, #eligible]. Exactly ``min(n, #eligible)`` entries are
    selected; ties go to the lower flat (row-major) index. No sort: a threshold search over the float32
    bit patterns (monotone for non-negative floats), each step one O(size) counting pass.

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[0.5, 2.0, 2.0], [1.0, 2.0, 0.0]])
    >>> top_n_mask(s, jnp.ones_like(s, bool), 2).astype(int).tolist()
    [[0, 1, 1], [0, 0, 0]]
    """
    keys = _sortable_keys(score, eligible).reshape(-1, 1)
    n = jnp.clip(jnp.asarray(n, jnp.int32), 0, jnp.sum(eligible, dtype=jnp.int32)).reshape(1)
    return _select_columns(keys, n).reshape(score.shape)


def column_top_count_mask(score: jax.Array, eligible: jax.Array, counts: jax.Array) -> jax.Array:
    """Per column ``j`` of a 2-D ``score`` (one column per neuron), select the ``counts[j]``
    highest-scoring eligible entries.

    ``counts`` may be traced; each is clipped to the column's number of eligible entries. Ties go to
    the lower row (fan-in) index.

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[3.0, 1.0, 3.0, 2.0], [0.0, 0.0, 5.0, 0.0]]).T
    >>> column_top_count_mask(s, s >= 0, jnp.array([2, 2])).T.astype(int).tolist()
    [[1, 0, 1, 0], [1, 0, 1, 0]]
    """
    keys = _sortable_keys(score, eligible)
    n = jnp.clip(counts.astype(jnp.int32), 0, jnp.sum(eligible, axis=0, dtype=jnp.int32))
    return _select_columns(keys, n)


def kth_largest(values: jax.Array, k: int) -> jax.Array:
    """The k-th largest entry (1-based, static k) of a 1-D array."""
    return lax.top_k(values, k)[0][k - 1]
