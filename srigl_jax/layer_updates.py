"""One layer's mask update on the kernel viewed as a (fan_in, n_neurons) matrix: one column per neuron
(a free reshape of Flax Dense (in, out) and Conv (kh, kw, in, out) kernels, so no transposes).

These are the spec's steps (../SRIGL_SPEC.md, "One mask update of one layer") as pure functions of
scores (non-negative float32, see ``selection.magnitude_score``) and the current boolean mask.
SRigL, RigL and SET all go through ``top_n_mask`` / ``column_top_count_mask``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from srigl_jax.plans import LayerPlan
from srigl_jax.selection import column_counts, column_top_count_mask, kth_largest, top_n_mask


def as_matrix(x: jax.Array) -> jax.Array:
    """Kernel (..., n_neurons) -> (fan_in, n_neurons), a free reshape."""
    return x.reshape(-1, x.shape[-1])


def neuron_fan_in(mask: jax.Array) -> jax.Array:
    """Active weights per neuron (last axis) of a kernel mask."""
    return column_counts(as_matrix(mask))


def prune_counts(mask: jax.Array, drop_frac: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(n_prune, n_keep) with n_prune = floor(nnz * d) (spec step 1).

    The product is float32 (no x64 under jit): above 2^24 nonzeros in one layer n_prune may differ from the
    exact floor by one; n_keep = nnz - n_prune stays consistent, so no invariant depends on it.
    """
    n_active = jnp.sum(neuron_fan_in(mask), dtype=jnp.int32)
    n_prune = jnp.floor(n_active.astype(jnp.float32) * drop_frac).astype(jnp.int32)
    return n_prune, n_active - n_prune


def salience_threshold(gamma_sal: float, k0: int) -> int:
    """theta = max(1, floor(gamma_sal * k0)); gamma_sal >= 1 is an absolute count (spec step 4)."""
    if gamma_sal >= 1:
        return int(gamma_sal)
    return max(1, int(math.floor(gamma_sal * k0)))


def srigl_active_neurons(
    w_score: jax.Array,
    g_score: jax.Array,
    mask: jax.Array,
    n_prune: jax.Array,
    n_keep: jax.Array,
    theta: int,
    min_active: int,
) -> tuple[jax.Array, jax.Array]:
    """Neurons that survive ablation (spec steps 2-5): salient count >= theta, lowered if needed so
    that at least ``min_active`` neurons survive. Also returns the top-n_keep-|w| selection, which is
    the drop step's selection whenever no neuron is ablated."""
    keep_by_w = top_n_mask(w_score, mask, n_keep)
    salient = keep_by_w | top_n_mask(g_score, jnp.ones_like(mask), n_prune)
    counts = column_counts(salient)
    floor_theta = kth_largest(counts, min_active)
    return counts >= jnp.minimum(theta, floor_theta), keep_by_w


def srigl_survivors_and_keep(
    w_score: jax.Array,
    g_score: jax.Array,
    mask: jax.Array,
    drop_frac: jax.Array,
    plan: LayerPlan,
    gamma_sal: float | None,
) -> tuple[jax.Array, jax.Array]:
    """Spec steps 1-5 and the global magnitude drop of step 7: the surviving neurons (all of them without
    ablation: ``gamma_sal=None`` or a non-ablatable layer) and the kept weights, the n_keep largest |w| among the
    active weights of survivors. Shared by SRigL and N:M."""
    n_prune, n_keep = prune_counts(mask, drop_frac)
    if gamma_sal is None or not plan.ablatable:
        return jnp.ones(mask.shape[1], bool), top_n_mask(w_score, mask, n_keep)
    active, keep_by_w = srigl_active_neurons(
        w_score, g_score, mask, n_prune, n_keep, salience_threshold(gamma_sal, plan.k0), plan.min_active)
    # the salience pass already selected the drop's keep unless some neuron was ablated
    keep = lax.cond(jnp.all(active), lambda: keep_by_w,
                    lambda: top_n_mask(w_score, mask & active[None, :], n_keep))
    return active, keep


def srigl_layer_mask(
    w_score: jax.Array,
    g_score: jax.Array,
    mask: jax.Array,
    drop_frac: jax.Array,
    plan: LayerPlan,
    gamma_sal: float | None,
) -> jax.Array:
    """SRigL update of one layer ((fan_in, n_neurons) matrices). Returns the new mask: every surviving neuron has
    exactly k' = floor(T / survivors) active weights, ablated neurons none.

    ``gamma_sal=None`` (or a non-ablatable layer) disables ablation: k' = k0 for every neuron.
    """
    active, keep = srigl_survivors_and_keep(w_score, g_score, mask, drop_frac, plan, gamma_sal)
    k_new = plan.nnz_budget // jnp.sum(active, dtype=jnp.int32)
    # Step 7 continued: cap each neuron at k' (only needed when k' shrank, e.g. after neurons were revived, so
    # the per-row pass is skipped otherwise).
    kept_per_neuron = column_counts(keep)
    keep = lax.cond(
        jnp.any(kept_per_neuron > k_new),
        lambda k: column_top_count_mask(w_score, k, jnp.minimum(kept_per_neuron, k_new)),
        lambda k: k,
        keep,
    )
    # Step 8: each survivor regrows its largest-|grad| inactive positions up to exactly k'. The cap kept exactly
    # min(kept, k') per neuron (a selection takes exactly its count when that many are eligible), and without it
    # kept <= k' already: no second count of ``keep``.
    need = jnp.where(active, k_new - jnp.minimum(kept_per_neuron, k_new), 0)
    grow = column_top_count_mask(g_score, ~keep, need)
    return keep | grow


def unstructured_layer_mask(
    w_score: jax.Array, grow_score: jax.Array, mask: jax.Array, drop_frac: jax.Array
) -> jax.Array:
    """RigL / SET update of one layer: drop the n_prune smallest |w|, grow the n_prune best-scored
    positions among the rest (|grad| for RigL, random for SET). nnz is preserved exactly."""
    n_prune, n_keep = prune_counts(mask, drop_frac)
    keep = top_n_mask(w_score, mask, n_keep)
    return keep | top_n_mask(grow_score, ~keep, n_prune)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def constant_fan_in_mask(key: jax.Array, n_neurons: int, fan_in: int, k: int) -> jax.Array:
    """Random (fan_in, n_neurons) mask with exactly k distinct positions per neuron, uniformly at random."""
    scores = jax.random.uniform(key, (fan_in, n_neurons))
    return column_top_count_mask(scores, jnp.ones_like(scores, bool), jnp.full((n_neurons,), k))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def uniform_random_mask(key: jax.Array, n_neurons: int, fan_in: int, nnz: int) -> jax.Array:
    """Random (fan_in, n_neurons) mask with exactly nnz positions over the whole layer."""
    scores = jax.random.uniform(key, (fan_in, n_neurons))
    return top_n_mask(scores, jnp.ones_like(scores, bool), nnz)
