"""Selection primitives shared by every sparse method (SRigL, RigL, SET, init).

All scores are non-negative float32; ineligible entries never get selected. Ties are broken
deterministically by position: lower (row-major) index first. Everything has static shapes, so the
primitives run under ``jit`` with traced counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)
_INT32_MAX = int(jnp.iinfo(jnp.int32).max)
# Bisection over the int32 bit patterns of non-negative float32 needs this many halvings.
_BISECTION_STEPS = 31


def magnitude_score(x: jax.Array) -> jax.Array:
    """|x| as float32 with NaN -> 0 and +-Inf -> float32 max, so scores are always finite."""
    return jnp.nan_to_num(jnp.abs(x.astype(jnp.float32)), nan=0.0, posinf=_FLOAT32_MAX)


def perturb_ties(score: jax.Array, key: jax.Array) -> jax.Array:
    """Seeded tiny perturbation (a few ulps, plus an additive 1e-30 for exact zeros) to break ties randomly."""
    u = jax.random.uniform(key, score.shape, jnp.float32)
    return score * (1.0 + 2.0**-20 * u) + 1e-30 * u


def top_n_mask(score: jax.Array, eligible: jax.Array, n: jax.Array) -> jax.Array:
    """Boolean mask of the ``n`` highest-scoring eligible entries of ``score`` (any shape).

    ``n`` may be traced; it is clipped to [0, #eligible]. Exactly ``min(n, #eligible)`` entries are
    selected; ties go to the lower flat (row-major) index. Finds the n-th largest score by bisection on
    its float32 bit pattern (monotone for non-negative floats): 31 O(size) passes, no sort.

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[0.5, 2.0, 2.0], [1.0, 2.0, 0.0]])
    >>> top_n_mask(s, jnp.ones_like(s, bool), 2).astype(int).tolist()
    [[0, 1, 1], [0, 0, 0]]
    """
    keys = jnp.where(eligible, lax.bitcast_convert_type(score.astype(jnp.float32), jnp.int32), -1)
    n = jnp.clip(jnp.asarray(n, jnp.int32), 0, jnp.sum(eligible, dtype=jnp.int32))

    def halve(_, bounds):
        lo, hi = bounds  # invariant: count(keys >= lo) >= n > count(keys >= hi)
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(keys >= mid, dtype=jnp.int32) >= n
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    threshold, _ = lax.fori_loop(
        0, _BISECTION_STEPS, halve, (jnp.int32(0), jnp.int32(_INT32_MAX))
    )
    above = keys > threshold
    quota = n - jnp.sum(above, dtype=jnp.int32)
    at = keys == threshold
    tie_order = jnp.cumsum(at.ravel(), dtype=jnp.int32).reshape(at.shape)
    return above | (at & (tie_order <= quota))


def row_top_count_mask(
    score: jax.Array, eligible: jax.Array, counts: jax.Array, max_count: int
) -> jax.Array:
    """Per row ``i`` of a 2-D ``score``, select the ``counts[i]`` highest-scoring eligible entries.

    ``counts`` may be traced but must be <= ``max_count`` (static), which bounds the ``lax.top_k``
    width. Ties go to the lower column index.

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[3.0, 1.0, 3.0, 2.0], [0.0, 0.0, 5.0, 0.0]])
    >>> row_top_count_mask(s, s >= 0, jnp.array([2, 2]), 2).astype(int).tolist()
    [[1, 0, 1, 0], [1, 0, 1, 0]]
    """
    n_rows, n_cols = score.shape
    width = min(int(max_count), n_cols)
    if width == 0:
        return jnp.zeros(score.shape, bool)
    masked = jnp.where(eligible, score.astype(jnp.float32), -1.0)
    values, cols = lax.top_k(masked, width)
    take = (jnp.arange(width)[None, :] < counts[:, None]) & (values >= 0)
    rows = jnp.arange(n_rows)[:, None]
    return jnp.zeros(score.shape, bool).at[rows, cols].set(take, unique_indices=True)


def kth_largest(values: jax.Array, k: int) -> jax.Array:
    """The k-th largest entry (1-based, static k) of a 1-D array."""
    return lax.top_k(values, k)[0][k - 1]
